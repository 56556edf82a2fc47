//! The SD-VAE from a diffusers safetensors file (`diffusion_pytorch_model.safetensors` of
//! stabilityai/sd-vae-ft-ema or -ft-mse, either attention naming).
use crate::model::vae::{modern_attention_names, AutoencoderKl, VaeConfig};
use anyhow::{Context, Result};
use std::path::Path;
use tch::{nn, Device};

/// The network of `cfg` on `device` in float32 (call `vs.double()` / `vs.half()` after for
/// another dtype). Names and shapes must match `cfg` exactly: a missing, extra or mis-shaped key
/// is an error naming it.
pub fn load(path: &Path, cfg: &VaeConfig, device: Device) -> Result<(nn::VarStore, AutoencoderKl)> {
    let vs = nn::VarStore::new(device);
    let net = AutoencoderKl::new(&vs.root(), cfg);
    let tensors = crate::tensorfile::read(path).with_context(|| {
        format!(
            "{}: not readable SD-VAE weights (they are diffusion_pytorch_model.safetensors of stabilityai/sd-vae-ft-ema or sd-vae-ft-mse)",
            path.display()
        )
    })?;
    let tensors = modern_attention_names(tensors)
        .with_context(|| format!("{}: ambiguous attention names", path.display()))?;
    crate::model::load_state_dict(&vs, &tensors, "", &path.display().to_string())?;
    Ok((vs, net))
}
