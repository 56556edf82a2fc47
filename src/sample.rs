//! Images from a trained network: seeded noise -> the few-step sampler -> the decoder -> uint8
//! NHWC. Batch b draws its noise from seed mix(sample.seed, 1 + b) and takes labels
//! (i mod num_classes) for its global indices i, so any batch can be regenerated alone and the
//! classes are balanced. [`Sampler::write_parts`] writes a sample batch's parts
//! ([`crate::rundir::samples`]), redrawing any that is missing or damaged.
use crate::data;
use crate::meanflow::sampler;
use crate::model::{vae, SiT};
use crate::progress::Progress;
use crate::rundir::samples::SampleParts;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// What sampling needs to know, checked (built by `Spec::sample_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct SampleConfig {
    pub in_channels: i64,
    pub input_size: i64,
    pub num_classes: i64,
    /// The network runs under bf16 autocast.
    pub bf16: bool,
    /// The dtype of the noise (the network's input dtype).
    pub input_kind: Kind,
    pub seed: u64,
    /// Images per batch (and per part file).
    pub batch: i64,
    pub num_samples: i64,
    /// Labels drawn uniformly (from the seed, index by index) rather than balanced.
    pub random_labels: bool,
}

/// What turns the network's output into uint8 NHWC images.
pub enum Decoder {
    /// The data is pixels in [-1, 1] (the demo's digits): 1 channel is repeated to RGB.
    Pixels,
    /// The data is SD-VAE latents times 0.18215.
    Vae(Box<vae::AutoencoderKl>, tch::nn::VarStore),
}

impl Decoder {
    /// The SD-VAE named by `sample.vae` (an asset name, fetched into the cache, or a path).
    pub fn vae(name: &str, device: Device) -> Result<Decoder> {
        let path = vae_weights(name)?;
        let (vs, net) = crate::import::vae::load(&path, &vae::VaeConfig::sd(), device)
            .with_context(|| format!("loading the SD-VAE from {}", path.display()))?;
        Ok(Decoder::Vae(Box::new(net), vs))
    }

    /// The side of the images made from latents of side `latent`.
    pub fn image_side(&self, latent: i64) -> i64 {
        match self {
            Decoder::Pixels => latent,
            Decoder::Vae(..) => latent * vae::VaeConfig::sd().downscale(),
        }
    }

    pub fn images(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Decoder::Pixels => Ok(pixels_to_u8(x)),
            Decoder::Vae(net, _) => decode_latents(net, x, DecodePrecision::Tf32),
        }
    }
}

/// How the SD-VAE decodes on CUDA (on a CPU it is always float32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecodePrecision {
    /// float32 throughout.
    F32,
    /// float32 with TF32 matrix products and convolutions: how both references decode (the
    /// PyTorch port's `--tf32` default and PyTorch's cuDNN default; XLA's default precision),
    /// and so how the sample stage decodes.
    Tf32,
    /// bf16 autocast.
    Bf16,
}

/// SD-VAE latents (times 0.18215) as uint8 NHWC images.
pub fn decode_latents(
    net: &vae::AutoencoderKl,
    x: &Tensor,
    precision: DecodePrecision,
) -> Result<Tensor> {
    let decode = || {
        let images =
            crate::device::autocast_bf16(x.device(), precision == DecodePrecision::Bf16, || {
                Ok(tch::no_grad(|| {
                    net.decode(&(x.to_kind(Kind::Float) / vae::SCALING_FACTOR))
                }))
            })?;
        Ok(vae::to_uint8_nhwc(&images))
    };
    match x.device() {
        Device::Cuda(_) => crate::device::with_tf32(precision == DecodePrecision::Tf32, decode),
        _ => decode(),
    }
}

/// `sample.vae` as a file: a diffusers safetensors path, or the cached asset of that name.
pub fn vae_weights(name: &str) -> Result<PathBuf> {
    crate::assets::local(name, "the SD-VAE")
}

/// Pixel-space samples in [-1, 1], (N, 1 or 3, H, W), as uint8 RGB NHWC.
pub fn pixels_to_u8(images: &Tensor) -> Tensor {
    let rgb = if images.size()[1] == 1 {
        images.repeat([1, 3, 1, 1])
    } else {
        images.shallow_clone()
    };
    ((rgb.to_kind(Kind::Float).clamp(-1.0, 1.0) + 1.0) * 127.5)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous()
}

/// The class labels of global sample indices start..start + n: balanced over the classes
/// (index mod classes), or drawn uniformly, each from (seed, index) alone so that any batch
/// can be drawn again by itself.
pub fn class_labels(start: i64, n: i64, classes: i64, random: Option<u64>) -> Vec<i64> {
    (start..start + n)
        .map(|i| match random {
            None => i % classes,
            Some(seed) => (data::mix(seed, i as u64) % classes as u64) as i64,
        })
        .collect()
}

/// Balanced labels on `device` (sample grids: a column per class).
pub fn labels(start: i64, n: i64, classes: i64, device: Device) -> Tensor {
    Tensor::from_slice(&class_labels(start, n, classes, None)).to_device(device)
}

/// A network, the decoder of its outputs and the device they run on: what makes images.
pub struct Sampler<'a> {
    pub cfg: &'a SampleConfig,
    pub net: &'a SiT,
    pub decoder: &'a Decoder,
    pub device: Device,
}

impl Sampler<'_> {
    fn noise(&self, seed: u64, n: i64) -> Tensor {
        tch::manual_seed(seed as i64);
        let c = self.cfg;
        Tensor::randn(
            [n, c.in_channels, c.input_size, c.input_size],
            (c.input_kind, self.device),
        )
    }

    /// The labels' own seed when they are drawn (apart from the noise's).
    fn label_seed(&self) -> Option<u64> {
        self.cfg
            .random_labels
            .then(|| data::mix(self.cfg.seed, u64::MAX - 1))
    }

    /// Batch `b` of the sample batch (`n` images), uint8 NHWC: its noise is a function of the
    /// seed and b only, its labels of the seed and its indices.
    pub fn batch(&self, schedule: &[f64], b: u64, n: i64) -> Result<Tensor> {
        let noise = self.noise(data::mix(self.cfg.seed, 1 + b), n);
        let start = b as i64 * self.cfg.batch;
        let y = class_labels(start, n, self.cfg.num_classes, self.label_seed());
        let y = Tensor::from_slice(&y).to_device(self.device);
        self.generate(schedule, &noise, &y)
    }

    /// `per_class` images of each of the first `classes` classes, class = index mod classes,
    /// from noise of its own seed: the same for every schedule, so grids compare image for image.
    pub fn grid(&self, schedule: &[f64], classes: i64, per_class: i64) -> Result<Tensor> {
        let n = classes * per_class;
        let noise = self.noise(data::mix(self.cfg.seed, 0), n);
        self.generate(schedule, &noise, &labels(0, n, classes, self.device))
    }

    fn generate(&self, schedule: &[f64], noise: &Tensor, y: &Tensor) -> Result<Tensor> {
        let x = crate::device::autocast_bf16(self.device, self.cfg.bf16, || {
            sampler::sample(self.net, noise, y, schedule)
        })?;
        self.decoder.images(&x)
    }

    /// The part files of the sample batch at `npz`.
    pub fn parts(&self, npz: &Path) -> SampleParts {
        let side = self.decoder.image_side(self.cfg.input_size) as usize;
        SampleParts::new(npz, self.cfg.num_samples, self.cfg.batch, [side, side, 3])
    }

    /// Every sample's class label, in order.
    pub fn all_labels(&self) -> Vec<i64> {
        class_labels(
            0,
            self.cfg.num_samples,
            self.cfg.num_classes,
            self.label_seed(),
        )
    }

    /// The `num_samples` samples for `schedule` as an ADM .npz at `path`, resuming from the
    /// part files of an interrupted call. Returns the number of images.
    pub fn write_npz(&self, schedule: &[f64], path: &Path) -> Result<usize> {
        self.write_parts(schedule, path, 0, 1)?;
        self.parts(path).assemble(&self.all_labels())
    }

    /// The part files of the batches b with b mod `ranks` = `rank` (all of them alone) that are
    /// missing or damaged: the ranks of a data-parallel job share the sample batch this way,
    /// then one assembles it.
    pub fn write_parts(
        &self,
        schedule: &[f64],
        path: &Path,
        rank: usize,
        ranks: usize,
    ) -> Result<()> {
        let parts = self.parts(path);
        let mine: Vec<i64> = (0..parts.batches())
            .filter(|b| *b as usize % ranks == rank)
            .collect();
        let todo = parts.missing(mine.iter().copied());
        let images: u64 = mine.iter().map(|&b| parts.size(b) as u64).sum();
        let label = format!("{}-NFE samples", schedule.len() - 1);
        let bar = match rank {
            0 => Progress::new(&label, images, "images"),
            _ => Progress::hidden(),
        };
        bar.start_at(
            mine.iter()
                .filter(|b| !todo.contains(b))
                .map(|&b| parts.size(b) as u64)
                .sum(),
        );
        let total = todo.len();
        for (i, b) in todo.into_iter().enumerate() {
            crate::signals::check(|| {
                format!(
                    "after {i} of {total} {}-NFE sample batches",
                    schedule.len() - 1
                )
            })?;
            let images = self.batch(schedule, b as u64, parts.size(b))?;
            parts.write(b, &images)?;
            bar.inc(parts.size(b) as u64);
        }
        bar.finish();
        Ok(())
    }
}
