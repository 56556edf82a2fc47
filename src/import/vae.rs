//! The SD-VAE from a diffusers safetensors file (`diffusion_pytorch_model.safetensors` of
//! stabilityai/sd-vae-ft-ema or -ft-mse, either attention naming).
use crate::model::vae::{modern_attention_names, AutoencoderKl, VaeConfig};
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::{nn, Device, Tensor};

/// The network of `cfg` on `device` in float32 (call `vs.double()` / `vs.half()` after for
/// another dtype). Names and shapes must match `cfg` exactly: a missing, extra or mis-shaped key
/// is an error naming it.
pub fn load(path: &Path, cfg: &VaeConfig, device: Device) -> Result<(nn::VarStore, AutoencoderKl)> {
    build(path, &read(path)?, cfg, device)
}

/// The network at the shape its weights have (SD's for the released files; a reduced one for a
/// stand-in), with that shape: see [`config_of`].
pub fn load_as_stored(
    path: &Path,
    device: Device,
) -> Result<(nn::VarStore, AutoencoderKl, VaeConfig)> {
    let tensors = read(path)?;
    let cfg = config_of(&tensors).with_context(|| {
        format!(
            "{}: not the weights of a diffusers AutoencoderKL",
            path.display()
        )
    })?;
    let (vs, net) = build(path, &tensors, &cfg, device)?;
    Ok((vs, net, cfg))
}

fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let tensors = crate::tensorfile::read(path).with_context(|| {
        format!(
            "{}: not readable SD-VAE weights (they are diffusion_pytorch_model.safetensors of stabilityai/sd-vae-ft-ema or sd-vae-ft-mse)",
            path.display()
        )
    })?;
    modern_attention_names(tensors)
        .with_context(|| format!("{}: ambiguous attention names", path.display()))
}

fn build(
    path: &Path,
    tensors: &[(String, Tensor)],
    cfg: &VaeConfig,
    device: Device,
) -> Result<(nn::VarStore, AutoencoderKl)> {
    let vs = nn::VarStore::new(device);
    let net = AutoencoderKl::new(&vs.root(), cfg);
    crate::model::load_state_dict(&vs, tensors, "", &path.display().to_string())?;
    Ok((vs, net))
}

/// GroupNorm's group count is no parameter's shape: 32, as in every released kl-f8 VAE (SD 1.x
/// and 2.x, SDXL) and diffusers' default.
const GROUPS: i64 = 32;

/// The config of the AutoencoderKL whose weights are `tensors`: the widths per level from the
/// encoder's resnets, their depth from how many the first level has, the channels from the
/// outer convolutions. Whatever this gets wrong, loading the weights strictly then names.
pub fn config_of(tensors: &[(String, Tensor)]) -> Result<VaeConfig> {
    let shape = |key: &str| {
        tensors
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, t)| t.size())
    };
    let dim = |key: &str, i: usize| -> Result<i64> {
        match shape(key) {
            Some(s) if s.len() == 4 => Ok(s[i]),
            _ => bail!("no 4-D `{key}`"),
        }
    };
    let width = |level: usize| {
        shape(&format!(
            "encoder.down_blocks.{level}.resnets.0.conv2.weight"
        ))
    };
    let block_out_channels: Vec<i64> = (0..)
        .map_while(|l| width(l).filter(|s| s.len() == 4).map(|s| s[0]))
        .take(16)
        .collect();
    let layers_per_block = (0..)
        .take_while(|i| shape(&format!("encoder.down_blocks.0.resnets.{i}.conv1.weight")).is_some())
        .take(16)
        .count() as i64;
    if block_out_channels.is_empty() || layers_per_block == 0 {
        bail!("no `encoder.down_blocks.0.resnets.0.conv1.weight`");
    }
    if let Some(w) = block_out_channels.iter().find(|&&w| w % GROUPS != 0) {
        bail!("a level {w} channels wide, which GroupNorm's {GROUPS} groups do not divide");
    }
    Ok(VaeConfig {
        in_channels: dim("encoder.conv_in.weight", 1)?,
        out_channels: dim("decoder.conv_out.weight", 0)?,
        latent_channels: dim("decoder.conv_in.weight", 1)?,
        block_out_channels,
        layers_per_block,
        norm_num_groups: GROUPS,
    })
}
