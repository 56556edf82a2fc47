//! A SiT saved by PyTorch code -> our checkpoint layout (src/rundir/checkpoint.rs): `model.*`,
//! `ema.*`, `opt.exp_avg.*` / `opt.exp_avg_sq.*` and a TrainState, in one safetensors file.
//!
//! Accepted: a flat state dict, or a training checkpoint as the REPA-derived PyTorch ports save it
//! (`{'model': ..., 'ema': ..., 'opt': optimizer.state_dict(), 'args': Namespace, 'steps': int}`).
//! Names lose DDP's `module.` and torch.compile's `_orig_mod.` prefixes; the preset is inferred
//! from (depth, hidden size, patch size) unless given, the conditioning from which time embedders
//! are present; then every name and shape is checked strictly against that network. The EMA is
//! taken from 'ema' when present (and stands in for the model when 'model' is absent); a flat
//! state dict is both. AdamW moments are carried over when 'opt' can be matched to the parameters
//! (see [`optimizer_moments`]); otherwise the checkpoint has none and serves sampling only.
use super::torch_file::{tensor_dict, Value};
use super::Summary;
use crate::model::{sit::PRESETS, Conditioning, SiT, SiTConfig};
use crate::rundir::checkpoint::{self, TrainState};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// The name without DDP's `module.` and torch.compile's `_orig_mod.` prefixes (any nesting).
pub fn strip_prefixes(name: &str) -> &str {
    let mut n = name;
    while let Some(rest) = n
        .strip_prefix("module.")
        .or_else(|| n.strip_prefix("_orig_mod."))
    {
        n = rest;
    }
    n
}

fn has_patch_embed(value: &Value) -> bool {
    value
        .keys()
        .iter()
        .any(|k| strip_prefixes(k) == "x_embedder.proj.weight")
}

/// A SiT state dict at the top, or under 'model' or 'ema'.
pub fn looks_like(value: &Value) -> bool {
    has_patch_embed(value)
        || ["model", "ema"]
            .iter()
            .any(|k| value.get(k).is_some_and(has_patch_embed))
}

/// A state dict with the prefixes stripped; two names that strip to one are an error.
fn state_dict(value: &Value, what: &str) -> Result<Vec<(String, Tensor)>> {
    let mut seen = std::collections::HashSet::new();
    tensor_dict(value, what)?
        .into_iter()
        .map(|(k, t)| {
            let name = strip_prefixes(&k).to_owned();
            if !seen.insert(name.clone()) {
                bail!("{what}: two entries are named {name} once module./_orig_mod. prefixes are removed");
            }
            Ok((name, t))
        })
        .collect()
}

/// The preset (and conditioning) whose network has these tensors' shapes.
pub fn infer_config(tensors: &[(String, Tensor)], what: &str) -> Result<(String, SiTConfig)> {
    let find = |name: &str| tensors.iter().find(|(k, _)| k == name).map(|(_, t)| t);
    let proj = find("x_embedder.proj.weight")
        .ok_or_else(|| anyhow!("{what}: no x_embedder.proj.weight, so not a SiT"))?;
    let [hidden, _, patch, _] = proj.size()[..] else {
        bail!(
            "{what}: x_embedder.proj.weight is {:?}, not a convolution kernel",
            proj.size()
        );
    };
    let depth = tensors
        .iter()
        .filter_map(|(k, _)| {
            k.strip_prefix("blocks.")?
                .split('.')
                .next()?
                .parse::<i64>()
                .ok()
        })
        .max()
        .map_or(0, |d| d + 1);
    let name = PRESETS
        .iter()
        .find(|row| (row.1, row.2, row.4) == (depth, hidden, patch))
        .map(|row| row.0)
        .ok_or_else(|| {
            anyhow!(
                "{what}: no preset has depth {depth}, hidden size {hidden} and patch size {patch} (presets: {}); pass --preset NAME to check it against one",
                SiTConfig::preset_names().join(", ")
            )
        })?;
    let mut config = SiTConfig::preset(name).expect("a preset of the table");
    fit_data(&mut config, tensors, what)?;
    Ok((name.to_owned(), config))
}

/// What a preset leaves to the data, read off the tensors: the conditioning (which time
/// embedders exist), the latent channels (the patch kernel's), the classes (the label table's
/// rows but the null one) and, when the file holds its position table, the input size.
fn fit_data(config: &mut SiTConfig, tensors: &[(String, Tensor)], what: &str) -> Result<()> {
    let find = |name: &str| {
        tensors
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, t)| t.size())
    };
    config.conditioning = conditioning(tensors, what)?;
    if let Some(&[_, channels, _, _]) = find("x_embedder.proj.weight").as_deref() {
        config.in_channels = channels;
    }
    if let Some(&[rows, _]) = find("y_embedder.embedding_table.weight").as_deref() {
        config.num_classes = (rows - 1).max(1);
    }
    if let Some(&[1, tokens, _]) = find("pos_embed").as_deref() {
        let grid = (tokens as f64).sqrt().round() as i64;
        if grid * grid == tokens {
            config.input_size = grid * config.patch_size;
        }
    }
    // The spec's bounds (spec/validate.rs), checked before the network is built: a crafted
    // table (zero channels, a 10^9-row class table) would otherwise reach tch's var store.
    for (from, what_it_sets, value, max) in [
        (
            "x_embedder.proj.weight",
            "input channels",
            config.in_channels,
            1024,
        ),
        (
            "y_embedder.embedding_table.weight",
            "classes",
            config.num_classes,
            1 << 24,
        ),
        ("pos_embed", "pixels a side", config.input_size, 4096),
    ] {
        if !(1..=max).contains(&value) {
            bail!("{what}: {from} makes {value} {what_it_sets}, outside 1 to {max}: not a SiT this imports");
        }
    }
    Ok(())
}

fn conditioning(tensors: &[(String, Tensor)], what: &str) -> Result<Conditioning> {
    let has = |p: &str| tensors.iter().any(|(k, _)| k.starts_with(p));
    Ok(
        match (has("t_embedder."), has("h_embedder."), has("r_embedder.")) {
            (true, true, false) => Conditioning::THalf,
            (true, false, true) => Conditioning::TR,
            (true, true, true) => Conditioning::TRH,
            (false, true, false) => Conditioning::H,
            (t, h, r) => bail!(
                "{what}: time embedders t: {t}, t-r (h_embedder): {h}, r: {r} match no conditioning of the paper's Table 1c"
            ),
        },
    )
}

/// Our network's variables holding `tensors`, checked strictly (names and shapes).
fn load_checked(
    config: &SiTConfig,
    tensors: &[(String, Tensor)],
    what: &str,
) -> Result<nn::VarStore> {
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = SiT::new(&vs.root(), config);
    crate::model::load_state_dict(&vs, tensors, "", what)?;
    Ok(vs)
}

/// (parameter name, exp_avg, exp_avg_sq) for each parameter with optimizer state.
pub type Moments = Vec<(String, Tensor, Tensor)>;

/// AdamW moments and the step of a torch.optim state dict.
///
/// torch.optim numbers parameters in the order they were given (param_groups' `params`), and
/// the training scripts pass `model.parameters()`, whose order is the state dict's order when the
/// model has no buffers (a SiT has none). So parameter i is the state dict's i-th name; this is
/// only taken when the counts agree and every moment has its parameter's shape. A parameter that
/// never had a gradient (the fixed pos_embed) has no entry. Err: why the moments were left out.
pub fn optimizer_moments(
    opt: &Value,
    order: &[(String, Tensor)],
) -> std::result::Result<(Moments, i64), String> {
    let groups = match opt.get("param_groups") {
        Some(Value::List(g)) => g,
        _ => return Err("'opt' has no param_groups list (not a torch.optim state dict)".into()),
    };
    let mut indices = Vec::new();
    for g in groups {
        match g.get("params") {
            Some(Value::List(p)) => {
                for v in p {
                    indices.push(v.as_int().ok_or("a param_groups entry is not an index")?);
                }
            }
            _ => return Err("a param group without params".into()),
        }
    }
    if indices.len() != order.len() {
        return Err(format!(
            "the optimizer has {} parameters and the model state dict {} entries",
            indices.len(),
            order.len()
        ));
    }
    let state = opt
        .get("state")
        .and_then(Value::as_dict)
        .ok_or("'opt' has no state dict")?;
    let mut moments = Vec::new();
    let mut step = 0i64;
    for (k, entry) in state {
        let index = k.as_int().ok_or("an optimizer state key is not an index")?;
        let position = indices
            .iter()
            .position(|&i| i == index)
            .ok_or_else(|| format!("optimizer state {index} belongs to no param group"))?;
        let (name, param) = &order[position];
        let (Some(m), Some(v)) = (
            entry.get("exp_avg").and_then(Value::as_tensor),
            entry.get("exp_avg_sq").and_then(Value::as_tensor),
        ) else {
            return Err(format!(
                "optimizer state {index} has no exp_avg / exp_avg_sq (not Adam)"
            ));
        };
        if m.size() != param.size() || v.size() != param.size() {
            return Err(format!(
                "optimizer state {index} is {:?}, but parameter {index} ({name}) is {:?}: the optimizer's order is not the state dict's",
                m.size(),
                param.size()
            ));
        }
        if let Some(s) = entry.get("step").and_then(Value::as_f64) {
            step = step.max(s.round() as i64);
        }
        moments.push((name.clone(), m.shallow_clone(), v.shallow_clone()));
    }
    Ok((moments, step))
}

/// Converts a loaded torch.save value holding a SiT into our checkpoint at `out`.
pub fn import(file: &Path, value: &Value, preset: Option<&str>, out: &Path) -> Result<Summary> {
    let name = file.display().to_string();
    let (model, model_from, ema, ema_from) = if has_patch_embed(value) {
        let flat = state_dict(value, &name)?;
        let copy = flat
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        (flat, "the flat state dict", copy, "the flat state dict")
    } else {
        let part = |key: &str| -> Result<Option<Vec<(String, Tensor)>>> {
            value
                .get(key)
                .map(|v| state_dict(v, &format!("{name} ['{key}']")))
                .transpose()
        };
        match (part("model")?, part("ema")?) {
            (Some(m), Some(e)) => (m, "'model'", e, "'ema'"),
            (None, Some(e)) => {
                let copy = e
                    .iter()
                    .map(|(k, t)| (k.clone(), t.shallow_clone()))
                    .collect();
                (copy, "'ema' (no 'model')", e, "'ema'")
            }
            (Some(m), None) => {
                let copy = m
                    .iter()
                    .map(|(k, t)| (k.clone(), t.shallow_clone()))
                    .collect();
                (m, "'model'", copy, "'model' (no 'ema')")
            }
            (None, None) => bail!("{name}: neither 'model' nor 'ema' holds a state dict"),
        }
    };
    let (moments, optimizer, adam_step) = match value.get("opt") {
        None => (
            Vec::new(),
            "none in the file: the checkpoint samples but cannot resume".to_owned(),
            0,
        ),
        Some(opt) => match optimizer_moments(opt, &model) {
            Ok((moments, step)) => {
                let what = format!(
                    "AdamW moments of {} parameters at step {step}",
                    moments.len()
                );
                (moments, what, step)
            }
            Err(why) => (Vec::new(), format!("'opt' left out: {why}"), 0),
        },
    };
    let steps = ["steps", "step", "global_step", "train_steps"]
        .iter()
        .find_map(|k| value.get(k).and_then(Value::as_f64))
        .map(|s| s.max(0.0) as u64)
        .unwrap_or(adam_step.max(0) as u64);
    write(Imported {
        file,
        kind: "SiT checkpoint",
        model: Weights {
            tensors: model,
            from: model_from,
        },
        ema: Weights {
            tensors: ema,
            from: ema_from,
        },
        moments,
        optimizer,
        adam_step,
        steps,
        preset,
        out,
    })
}

/// A network's tensors in our names, and where in the file they came from ("['ema']").
pub struct Weights<'a> {
    pub tensors: Vec<(String, Tensor)>,
    pub from: &'a str,
}

/// A SiT read from another program's file, in our names: what [`write`] turns into our
/// checkpoint.
pub struct Imported<'a> {
    pub file: &'a Path,
    pub kind: &'static str,
    /// The trained weights.
    pub model: Weights<'a>,
    pub ema: Weights<'a>,
    pub moments: Moments,
    /// What became of the optimizer state, for the summary.
    pub optimizer: String,
    pub adam_step: i64,
    pub steps: u64,
    pub preset: Option<&'a str>,
    pub out: &'a Path,
}

/// Checks an imported SiT strictly against the preset (given, or inferred from its shapes) and
/// writes it as our checkpoint at `out`, its source and sha256 in the metadata.
pub fn write(i: Imported) -> Result<Summary> {
    let name = i.file.display().to_string();
    let Weights {
        tensors: model,
        from: model_from,
    } = i.model;
    let Weights {
        tensors: ema,
        from: ema_from,
    } = i.ema;
    let (preset, config) = match i.preset {
        Some(p) => {
            let mut config = SiTConfig::preset(p).ok_or_else(|| {
                anyhow!(
                    "unknown preset `{p}`, expected one of {}",
                    SiTConfig::preset_names().join(", ")
                )
            })?;
            fit_data(&mut config, &ema, &name)?;
            (p.to_owned(), config)
        }
        None => infer_config(&ema, &name)?,
    };
    // The official flax network recomputes its fixed position table on every call and stores
    // none: such a file gets the table the network computes itself.
    let with_table = |mut tensors: Vec<(String, Tensor)>| {
        if !tensors.iter().any(|(k, _)| k == "pos_embed") {
            let table = crate::model::embed::sincos_pos_embed(config.hidden_size, config.grid());
            tensors.push(("pos_embed".to_owned(), table.unsqueeze(0)));
        }
        tensors
    };
    let (model, ema) = (with_table(model), with_table(ema));
    super::check_finite(&model, &format!("{name} [{model_from}]"))?;
    super::check_finite(&ema, &format!("{name} [{ema_from}]"))?;
    let moments_at = format!("{name} [optimizer moments]");
    for (k, m, v) in &i.moments {
        super::check_finite(
            &[
                (format!("{k} exp_avg"), m.shallow_clone()),
                (format!("{k} exp_avg_sq"), v.shallow_clone()),
            ],
            &moments_at,
        )?;
    }
    let model_vs = load_checked(&config, &model, &format!("{name} [{model_from}]"))?;
    let ema_vs = load_checked(&config, &ema, &format!("{name} [{ema_from}]"))?;
    let moments: Vec<(String, Tensor, Tensor)> = i
        .moments
        .into_iter()
        .map(|(k, m, v)| (k, m.to_kind(Kind::Float), v.to_kind(Kind::Float)))
        .collect();
    let tensors = checkpoint::layout(
        &model_vs,
        &ema_vs,
        moments.iter().map(|(k, m, v)| (k.as_str(), m, v)),
    );
    let sha256 = crate::files::sha256_file(i.file)?;
    let state = TrainState {
        step: i.steps,
        epoch: 0,
        adam_step: i.adam_step,
        seed: 0,
        spec_sha256: format!("imported:{sha256}"),
        wall_s: 0.0,
    };
    let record: BTreeMap<&str, String> = BTreeMap::from([
        ("source", name.clone()),
        ("source_sha256", sha256),
        ("preset", preset.clone()),
        (
            "conditioning",
            serde_json::to_value(config.conditioning)?
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ),
        ("model_from", model_from.to_owned()),
        ("ema_from", ema_from.to_owned()),
        ("optimizer", i.optimizer.clone()),
        ("steps", i.steps.to_string()),
    ]);
    if let Some(dir) = i.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    checkpoint::write_with_metadata(
        i.out,
        &tensors,
        &state,
        &[("import", serde_json::to_string(&record)?)],
    )?;
    super::read_back(i.out)?;
    Ok(Summary {
        source: i.file.to_owned(),
        kind: i.kind,
        tensors: tensors.len(),
        preset: Some(format!("{preset} ({})", record["conditioning"])),
        details: format!(
            "model from {model_from}, EMA from {ema_from}, step {}; optimizer: {}",
            i.steps, i.optimizer
        ),
        out: i.out.to_owned(),
    })
}
