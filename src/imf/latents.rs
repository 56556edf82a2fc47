//! The latent space of the official iMF networks: SD-VAE (ft-mse) posterior draws normalised per
//! channel by fixed ImageNet statistics (official utils/vae_util.py, `LatentManager`: `(latent -
//! mean) / std` to encode, `latent * std + mean` to decode; no 0.18215 factor), where MeanFlow's
//! data and decoder use the latents times 0.18215.
use crate::model::vae::SCALING_FACTOR;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// The per-channel mean and standard deviation of the official `LatentManager`.
pub const MEAN: [f64; 4] = [0.86488, -0.27787343, 0.21616915, 0.3738409];
pub const STD: [f64; 4] = [4.85503674, 5.31922414, 3.93725398, 3.9870003];

/// How the network's latents relate to the data's (SD-VAE latents times 0.18215).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatentNorm {
    /// The official per-channel normalisation (what the released checkpoints take and give).
    #[default]
    PerChannel,
    /// The data's latents as they are (MeanFlow's scaling).
    None,
}

fn per_channel(values: &[f64; 4], like: &Tensor) -> Tensor {
    Tensor::from_slice(values)
        .to_kind(like.kind())
        .to_device(like.device())
        .view([1, 4, 1, 1])
}

impl LatentNorm {
    /// Data latents (N, 4, H, W) times 0.18215 -> the network's.
    pub fn to_network(self, x: &Tensor) -> Tensor {
        match self {
            LatentNorm::None => x.shallow_clone(),
            LatentNorm::PerChannel => {
                (x / SCALING_FACTOR - per_channel(&MEAN, x)) / per_channel(&STD, x)
            }
        }
    }

    /// The network's latents -> data latents times 0.18215 (what the decoder takes).
    pub fn from_network(self, z: &Tensor) -> Tensor {
        match self {
            LatentNorm::None => z.shallow_clone(),
            LatentNorm::PerChannel => {
                (z * per_channel(&STD, z) + per_channel(&MEAN, z)) * SCALING_FACTOR
            }
        }
    }
}
