//! `mfr bench sample|fid|evaluate`: 1-NFE sampling, SD-VAE decoding, FID-N end to end and the
//! Inception network, timed batch by batch.
use super::{
    peak_memory_gib, peak_memory_of, preset, profile, randomise, randomise_inception, time_batches,
};
use crate::device;
use crate::eval::metrics::{frechet_distance, Stats};
use crate::model::inception::Inception;
use crate::model::vae::{decode_latents, DecodePrecision};
use crate::model::vae::{AutoencoderKl, VaeConfig};
use crate::model::SiT;
use crate::spec::Precision;
use crate::train;
use anyhow::{bail, Result};
use serde::Serialize;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

#[derive(Debug, Serialize)]
pub struct ThroughputResult {
    pub what: String,
    pub batch: i64,
    pub precision: Precision,
    pub device: String,
    pub warmup_batches: usize,
    pub timed_batches: usize,
    pub ms_per_batch: f64,
    pub img_per_s: f64,
    pub peak_memory_gib: f64,
    pub peak_memory_of: &'static str,
    pub weights: &'static str,
    /// One more batch, op by op.
    pub ops: profile::OpProfile,
}

fn throughput(
    what: String,
    batch: i64,
    precision: Precision,
    dev: Device,
    warmup: usize,
    batches: usize,
    (seconds, ops): (f64, profile::OpProfile),
) -> Result<ThroughputResult> {
    Ok(ThroughputResult {
        what,
        batch,
        precision,
        device: device::describe(dev),
        warmup_batches: warmup,
        timed_batches: batches,
        ms_per_batch: seconds * 1e3,
        img_per_s: batch as f64 / seconds,
        peak_memory_gib: peak_memory_gib(dev)?,
        peak_memory_of: peak_memory_of(dev),
        weights: "random (timing only)",
        ops,
    })
}

/// Images decoded at once by the sample bench: bounds the decoder's full-resolution activations
/// (128 channels at 256 x 256, 32 MiB per image in float32) whatever `--batch` is.
const DECODE_CHUNK: i64 = 64;

/// A random-weight SiT for sampling, with the random latents and labels of one batch.
fn sampling_network(
    model: &str,
    batch: i64,
    precision: Precision,
    dev: Device,
) -> Result<(nn::VarStore, SiT, Tensor, Tensor)> {
    let config = preset(model)?;
    let (vs, net) = train::network(&config, precision, dev, 1.0)?;
    randomise(&vs, 0.02);
    let shape = [
        batch,
        config.in_channels,
        config.input_size,
        config.input_size,
    ];
    let e = Tensor::randn(shape, (train::input_kind(precision), dev));
    let labels = Tensor::randint(config.num_classes, [batch], (Kind::Int64, dev));
    Ok((vs, net, e, labels))
}

/// A random-weight SD-VAE for `model`'s latents.
fn vae_for(model: &str, dev: Device) -> Result<(nn::VarStore, AutoencoderKl)> {
    let (config, vae_config) = (preset(model)?, VaeConfig::sd());
    if config.in_channels != vae_config.latent_channels {
        bail!(
            "{model} has {} latent channels, the SD-VAE decodes {}",
            config.in_channels,
            vae_config.latent_channels
        );
    }
    let vs = nn::VarStore::new(dev);
    let vae = AutoencoderKl::new(&vs.root(), &vae_config);
    Ok((vs, vae))
}

fn one_step(net: &SiT, e: &Tensor, labels: &Tensor, precision: Precision) -> Result<Tensor> {
    device::autocast_bf16(e.device(), precision == Precision::Bf16, || {
        crate::meanflow::sampler::sample(net, e, labels, &[1.0, 0.0])
    })
}

/// Latents decoded [`DECODE_CHUNK`] at a time.
fn decode_chunked(vae: &AutoencoderKl, z: &Tensor, precision: DecodePrecision) -> Result<Tensor> {
    let images = z
        .split(DECODE_CHUNK, 0)
        .iter()
        .map(|chunk| decode_latents(vae, chunk, precision))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&images, 0))
}

/// 1-NFE sampling of latents with random weights; with `decode`, also the SD-VAE decode (random
/// weights, in chunks of [`DECODE_CHUNK`]) to uint8 NHWC images.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    model: &str,
    batch: i64,
    precision: Precision,
    dev: Device,
    warmup: usize,
    batches: usize,
    decode: Option<DecodePrecision>,
) -> Result<ThroughputResult> {
    super::check_sizes(batch, batches)?;
    let (_vs, net, e, labels) = sampling_network(model, batch, precision, dev)?;
    let vae = decode.map(|_| vae_for(model, dev)).transpose()?;
    let seconds = time_batches(dev, warmup, batches, || {
        let z = one_step(&net, &e, &labels, precision)?;
        if let (Some((_, vae)), Some(p)) = (&vae, decode) {
            drop(decode_chunked(vae, &z, p)?);
        }
        Ok(())
    })?;
    let what = match decode {
        Some(p) => format!("1-NFE sampling, {model}, then SD-VAE decode to 256 x 256 uint8 images (decode in {p:?})"),
        None => format!("1-NFE sampling, {model} (latents only)"),
    };
    throughput(what, batch, precision, dev, warmup, batches, seconds)
}

#[derive(Debug, Serialize)]
pub struct FidBenchResult {
    pub what: &'static str,
    pub model: String,
    pub num_samples: i64,
    pub batch: i64,
    pub precision: Precision,
    pub decode_precision: DecodePrecision,
    pub device: String,
    /// From the first sample to the distance, after one untimed warm-up batch.
    pub seconds: f64,
    pub seconds_sampling: f64,
    pub seconds_decoding: f64,
    pub seconds_inception: f64,
    pub seconds_statistics: f64,
    pub img_per_s: f64,
    pub peak_memory_gib: f64,
    pub peak_memory_of: &'static str,
    /// FID between the two halves of the samples: a number only (random weights), proof that
    /// every stage ran.
    pub fid_between_halves: f64,
    pub weights: &'static str,
}

/// FID-N end to end on one device, in memory: 1-NFE sampling, SD-VAE decode, Inception pool_3
/// features (full float32, as `mfr evaluate`), statistics and the Frechet distance. The
/// reference's statistics are cached in a real evaluation, so here the samples' two halves stand
/// in for samples and reference.
pub fn fid(
    model: &str,
    num: i64,
    batch: i64,
    precision: Precision,
    decode: DecodePrecision,
    dev: Device,
) -> Result<FidBenchResult> {
    if !(4..=10_000_000).contains(&num) {
        bail!("--num {num}: expected an integer in [4, 10000000] (the two halves need at least 2 samples each)");
    }
    super::check_sizes(batch, 1)?;
    let (_vs, net, e, labels) = sampling_network(model, batch, precision, dev)?;
    let (_vae_vs, vae) = vae_for(model, dev)?;
    let inception_vs = nn::VarStore::new(dev);
    let inception = Inception::new(&inception_vs.root());
    randomise_inception(&inception_vs);
    let features = |images: &Tensor| -> Result<Tensor> {
        let pool = || Ok(tch::no_grad(|| inception.features_of_images(images)).pool);
        match dev {
            Device::Cuda(_) => device::with_tf32(false, pool),
            _ => pool(),
        }
    };
    let mut clock = [0.0f64; 4];
    let mut timed = |stage: usize, f: &mut dyn FnMut() -> Result<Tensor>| -> Result<Tensor> {
        let start = Instant::now();
        let out = f()?;
        device::synchronize(dev);
        clock[stage] += start.elapsed().as_secs_f64();
        Ok(out)
    };
    // Warm-up: cuDNN's algorithm choice and the allocator's first blocks.
    drop(features(&decode_chunked(
        &vae,
        &one_step(&net, &e, &labels, precision)?,
        decode,
    )?)?);
    device::synchronize(dev);
    device::reset_peak_memory(dev)?;
    let start = Instant::now();
    let mut pools = Vec::new();
    let mut done = 0;
    while done < num {
        let n = batch.min(num - done);
        let (e, labels) = (e.narrow(0, 0, n), labels.narrow(0, 0, n));
        let z = timed(0, &mut || one_step(&net, &e, &labels, precision))?;
        let images = timed(1, &mut || decode_chunked(&vae, &z, decode))?;
        pools.push(timed(2, &mut || features(&images))?);
        done += n;
    }
    let mut distance = 0.0;
    let _ = timed(3, &mut || {
        let pool = Tensor::cat(&pools, 0);
        let half = num / 2;
        let (a, b) = (pool.narrow(0, 0, half), pool.narrow(0, half, num - half));
        distance = frechet_distance(&Stats::of(&a)?, &Stats::of(&b)?)?;
        Ok(pool)
    })?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(FidBenchResult {
        what:
            "FID end to end: 1-NFE sampling, SD-VAE decode, Inception pool_3, statistics, distance",
        model: model.to_owned(),
        num_samples: num,
        batch,
        precision,
        decode_precision: decode,
        device: device::describe(dev),
        seconds,
        seconds_sampling: clock[0],
        seconds_decoding: clock[1],
        seconds_inception: clock[2],
        seconds_statistics: clock[3],
        img_per_s: num as f64 / seconds,
        peak_memory_gib: peak_memory_gib(dev)?,
        peak_memory_of: peak_memory_of(dev),
        fid_between_halves: distance,
        weights: "random (timing only)",
    })
}

/// Inception features (pool_3 and sFID's) of random 256 x 256 uint8 images, random weights.
pub fn evaluate(
    batch: i64,
    precision: Precision,
    dev: Device,
    warmup: usize,
    batches: usize,
) -> Result<ThroughputResult> {
    super::check_sizes(batch, batches)?;
    let vs = nn::VarStore::new(dev);
    let net = Inception::new(&vs.root());
    randomise_inception(&vs);
    if dev.is_cuda() {
        // libtorch lets cuDNN convolutions use TF32 unless told otherwise.
        device::set_tf32(precision == Precision::Tf32)?;
    }
    let images = Tensor::randint(256, [batch, 256, 256, 3], (Kind::Uint8, dev));
    let seconds = time_batches(dev, warmup, batches, || {
        device::autocast_bf16(dev, precision == Precision::Bf16, || {
            Ok(tch::no_grad(|| net.features_of_images(&images))
                .pool
                .sum(Kind::Float))
        })
        .map(drop)
    })?;
    throughput(
        "Inception features of 256 x 256 images (resize, pool_3, mixed_6/conv)".to_owned(),
        batch,
        precision,
        dev,
        warmup,
        batches,
        seconds,
    )
}
