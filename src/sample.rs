//! `mfr sample`: EMA samples into ADM's sample format, an .npz whose arr_0 is (N, H, W, 3) uint8
//! and arr_1 the class labels. Batch b draws its noise from seed mix(sample.seed, 1 + b) and
//! takes labels (i mod num_classes) for its global indices i, so any batch can be regenerated
//! alone and the classes are balanced. Each finished batch is a part file renamed into place;
//! an interrupted run keeps its parts and continues, and the .npz is assembled (streamed, never
//! held in memory) only when every part is there.
use crate::data;
use crate::meanflow::sampler;
use crate::model::{vae, SiT};
use crate::spec::{Precision, Spec};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// What turns the network's output into uint8 NHWC images.
pub enum Decoder {
    /// The data is pixels in [-1, 1] (the demo's digits): 1 channel is repeated to RGB.
    Pixels,
    /// The data is SD-VAE latents times 0.18215.
    Vae(Box<vae::AutoencoderKl>, tch::nn::VarStore),
}

impl Decoder {
    /// The SD-VAE named by `sample.vae` (an asset name, fetched into the cache, or a path).
    pub fn vae(spec: &Spec, device: Device) -> Result<Decoder> {
        let path = vae_weights(&spec.sample.vae)?;
        let (vs, net) = vae::load(&path, &vae::VaeConfig::sd(), device)
            .with_context(|| format!("loading the SD-VAE from {}", path.display()))?;
        Ok(Decoder::Vae(Box::new(net), vs))
    }

    pub fn images(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Decoder::Pixels => Ok(pixels_to_u8(x)),
            Decoder::Vae(net, _) => decode_latents(net, x, DecodePrecision::Tf32),
        }
    }
}

/// How the SD-VAE decodes on CUDA (on a CPU it is always float32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
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

/// The class label of global sample index `i`: balanced over the classes.
pub fn labels(start: i64, n: i64, classes: i64, device: Device) -> Tensor {
    (Tensor::arange(n, (Kind::Int64, device)) + start).remainder(classes)
}

/// A network, the decoder of its outputs and the device they run on: what makes images.
pub struct Sampler<'a> {
    pub spec: &'a Spec,
    pub net: &'a SiT,
    pub decoder: &'a Decoder,
    pub device: Device,
}

impl Sampler<'_> {
    fn noise(&self, seed: u64, n: i64) -> Tensor {
        tch::manual_seed(seed as i64);
        let m = &self.spec.model;
        let kind = crate::train::input_kind(self.spec.train.precision);
        Tensor::randn(
            [n, m.in_channels, m.input_size, m.input_size],
            (kind, self.device),
        )
    }

    /// Batch `b` of the sample batch (`n` images), uint8 NHWC: its noise is a function of the
    /// spec's seed and b only, its labels of its indices.
    pub fn batch(&self, schedule: &[f64], b: u64, n: i64) -> Result<Tensor> {
        let noise = self.noise(data::mix(self.spec.sample.seed, 1 + b), n);
        let start = b as i64 * self.spec.sample.batch;
        let y = labels(start, n, self.spec.model.num_classes, self.device);
        self.generate(schedule, &noise, &y)
    }

    /// `per_class` images of each of the first `classes` classes, class = index mod classes,
    /// from noise of its own seed: the same for every schedule, so grids compare image for image.
    pub fn grid(&self, schedule: &[f64], classes: i64, per_class: i64) -> Result<Tensor> {
        let n = classes * per_class;
        let noise = self.noise(data::mix(self.spec.sample.seed, 0), n);
        self.generate(schedule, &noise, &labels(0, n, classes, self.device))
    }

    fn generate(&self, schedule: &[f64], noise: &Tensor, y: &Tensor) -> Result<Tensor> {
        let bf16 = self.spec.train.precision == Precision::Bf16;
        let x = crate::device::autocast_bf16(self.device, bf16, || {
            sampler::sample(self.net, noise, y, schedule)
        })?;
        self.decoder.images(&x)
    }

    /// The spec's `num_samples` samples for `schedule` as an ADM .npz at `path`, resuming from
    /// the part files of an interrupted call. Returns the number of images.
    pub fn write_npz(&self, schedule: &[f64], path: &Path) -> Result<usize> {
        self.write_parts(schedule, path, 0, 1)?;
        assemble(self.spec, path)
    }

    /// The part files of the batches b with b mod `ranks` = `rank` (all of them alone): the
    /// ranks of a data-parallel job share the sample batch this way, then one assembles it.
    pub fn write_parts(
        &self,
        schedule: &[f64],
        path: &Path,
        rank: usize,
        ranks: usize,
    ) -> Result<()> {
        let (n, per) = (self.spec.sample.num_samples, self.spec.sample.batch);
        let batches = (n + per - 1) / per;
        let parts = parts_dir(path);
        std::fs::create_dir_all(&parts)
            .with_context(|| format!("{}: cannot create", parts.display()))?;
        let mine: Vec<i64> = (0..batches)
            .filter(|b| *b as usize % ranks == rank)
            .collect();
        let todo: Vec<i64> = mine
            .iter()
            .copied()
            .filter(|&b| !part(&parts, b).exists())
            .collect();
        let size = |b: i64| per.min(n - b * per);
        let bar = ProgressBar::new(mine.iter().map(|&b| size(b) as u64).sum()).with_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}<{eta_precise}] {wide_bar} {pos}/{len} images {per_sec}",
            )
            .expect("a valid template"),
        );
        if rank != 0 {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        bar.set_prefix(format!("{}-NFE", schedule.len() - 1));
        bar.set_position(
            mine.iter()
                .filter(|b| !todo.contains(b))
                .map(|&b| size(b) as u64)
                .sum(),
        );
        for b in todo {
            let images = self.batch(schedule, b as u64, size(b))?;
            write_u8_npy(&part(&parts, b), &images)?;
            bar.inc(size(b) as u64);
        }
        bar.finish_and_clear();
        Ok(())
    }
}

fn parts_dir(path: &Path) -> PathBuf {
    path.with_extension("parts")
}

fn part(parts: &Path, b: i64) -> PathBuf {
    parts.join(format!("batch-{b:06}.npy"))
}

/// Writes uint8 `images` as a .npy, through a temporary name.
fn write_u8_npy(path: &Path, images: &Tensor) -> Result<()> {
    let shape: Vec<usize> = images.size().iter().map(|&d| d as usize).collect();
    let data = images.to_device(Device::Cpu).contiguous();
    let mut bytes = vec![0u8; data.numel()];
    data.copy_data_u8(&mut bytes, data.numel());
    let tmp = path.with_extension("npy.tmp");
    std::fs::write(&tmp, data::npy::encode("|u1", &shape, &bytes))
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename", path.display()))
}

/// Streams the part files of `path` into one stored (uncompressed, zip64 when large) .npz,
/// then removes them. Returns the number of images.
pub fn assemble(spec: &Spec, path: &Path) -> Result<usize> {
    let (n, per, classes) = (
        spec.sample.num_samples,
        spec.sample.batch,
        spec.model.num_classes,
    );
    let batches = (n + per - 1) / per;
    let parts = parts_dir(path);
    let mut image_shape: Option<Vec<usize>> = None;
    for b in 0..batches {
        let file = part(&parts, b);
        let header = read_header(&file)?;
        let shape = image_shape.get_or_insert_with(|| header.shape[1..].to_vec());
        // uint8 has no byte order: numpy writes |u1, some writers <u1.
        let bytes = header.descr == "|u1" || header.descr == "<u1";
        if !bytes
            || header.shape[1..] != shape[..]
            || header.shape[0] as i64 != per.min(n - b * per)
        {
            bail!(
                "{}: not a part of this sample batch (remove {} and sample again)",
                file.display(),
                parts.display()
            );
        }
    }
    let shape = image_shape.context("no samples to write")?;
    let tmp = path.with_extension("npz.tmp");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    // A fixed timestamp: the same samples make the same bytes (and the same sha256).
    let options = zip::write::FileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .last_modified_time(zip::DateTime::default())
        .large_file(true);
    zip.start_file("arr_0.npy", options)?;
    let full: Vec<usize> = std::iter::once(n as usize).chain(shape).collect();
    zip.write_all(&data::npy::encode("|u1", &full, &[]))?;
    for b in 0..batches {
        let file = part(&parts, b);
        let skip = read_header(&file)?.data_offset;
        let mut f = std::fs::File::open(&file)?;
        std::io::copy(
            &mut std::io::Read::by_ref(&mut f).take(skip as u64),
            &mut std::io::sink(),
        )?;
        std::io::copy(&mut f, &mut zip)?;
    }
    zip.start_file("arr_1.npy", options)?;
    let labels: Vec<u8> = (0..n).flat_map(|i| (i % classes).to_le_bytes()).collect();
    zip.write_all(&data::npy::encode("<i8", &[n as usize], &labels))?;
    zip.finish()?
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    std::fs::remove_dir_all(&parts).ok();
    Ok(n as usize)
}

/// The parsed header of a .npy file (its data starts at `data_offset`).
fn read_header(file: &Path) -> Result<data::npy::Header> {
    let mut f =
        std::fs::File::open(file).with_context(|| format!("{}: cannot open", file.display()))?;
    let mut head = vec![0u8; 12];
    f.read_exact(&mut head)
        .with_context(|| format!("{}: truncated", file.display()))?;
    let (start, len) = data::npy::header_len(&head)?;
    head.resize(start + len, 0);
    f.read_exact(&mut head[12..])
        .with_context(|| format!("{}: truncated", file.display()))?;
    data::npy::parse_header(&head).with_context(|| format!("{}", file.display()))
}
