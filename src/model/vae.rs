//! Placeholder for the SD-VAE port (branch `vae`): the interface the sampler codes against.
use anyhow::{bail, Result};
use std::path::Path;
use tch::{nn, Device, Tensor};

pub const SCALING_FACTOR: f64 = 0.18215;

pub struct VaeConfig;
impl VaeConfig {
    pub fn sd() -> Self {
        VaeConfig
    }
}

pub struct AutoencoderKl;
impl AutoencoderKl {
    pub fn decode(&self, _z: &Tensor) -> Tensor {
        unimplemented!()
    }
    pub fn encode(&self, _x: &Tensor) -> (Tensor, Tensor) {
        unimplemented!()
    }
}

pub fn load(
    _path: &Path,
    _cfg: &VaeConfig,
    _device: Device,
) -> Result<(nn::VarStore, AutoencoderKl)> {
    bail!("the SD-VAE port is not merged yet")
}

pub fn to_uint8_nhwc(_images: &Tensor) -> Tensor {
    unimplemented!()
}
