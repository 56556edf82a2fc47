//! `mfr bench`: timed training steps on random latents, reported as JSON. Speed targets live
//! here, never in tests.
pub mod profile;

use crate::device;
use crate::eval::metrics::{frechet_distance, Stats};
use crate::meanflow::{meanflow_loss, Draw, JvpMethod, MeanFlowConfig};
use crate::model::inception::Inception;
use crate::model::vae::{AutoencoderKl, VaeConfig};
use crate::model::{AttentionKernel, SiT, SiTConfig};
use crate::sample::{decode_latents, DecodePrecision};
use crate::spec::{MeanFlowSection, Precision, TrainSection};
use crate::train;
use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

pub struct TrainBench {
    pub model: String,
    pub batch: i64,
    pub precision: Precision,
    pub device: Device,
    pub warmup: usize,
    pub steps: usize,
    pub omega: f64,
    pub kappa: f64,
    pub grad_clip: f64,
    pub jvp: JvpMethod,
    /// Replay the step as a CUDA graph (`train.cuda_graph`).
    pub cuda_graph: bool,
}

/// The stated tolerances of the manual JVP against forward-mode AD under bf16 autocast (relative,
/// as [`Agreement`]): bf16's unit roundoff (3.9e-3) compounded over the network's depth.
pub const BF16_DU_DT_TOLERANCE: f64 = 2e-2;
pub const BF16_GRADS_TOLERANCE: f64 = 5e-3;

/// Relative differences (||a - b|| / ||b||) of the JVP method under test from forward-mode AD,
/// on one batch with the same randomness, in the bench's precision.
#[derive(Debug, Serialize)]
pub struct Agreement {
    pub u: f64,
    pub du_dt: f64,
    pub loss: f64,
    pub grads: f64,
    /// Under bf16: du/dt and the gradients within the stated tolerances. None in other
    /// precisions, which have none stated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub within_bf16_tolerance: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct TrainBenchResult {
    pub what: &'static str,
    pub model: String,
    pub parameters: i64,
    pub batch: i64,
    pub precision: Precision,
    pub omega: f64,
    pub kappa: f64,
    pub grad_clip: f64,
    pub jvp: JvpMethod,
    pub cuda_graph: bool,
    pub agreement_with_forward_ad: Agreement,
    /// With `--cuda-graph`: replayed steps against eager ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph_vs_eager: Option<GraphAgreement>,
    pub device: String,
    pub warmup_steps: usize,
    pub timed_steps: usize,
    pub ms_per_step: f64,
    pub img_per_s: f64,
    pub peak_memory_gib: f64,
    /// What `peak_memory_gib` measures: the CUDA caching allocator's peak since warm-up, or the
    /// whole process's peak resident set on the CPU.
    pub peak_memory_of: &'static str,
    pub final_loss: f64,
    /// dtype of the network's output inside the step's autocast region (proves what ran).
    pub compute_dtype: String,
    /// One more step, op by op: what it launches, moves and computes.
    pub ops: profile::OpProfile,
    pub libtorch: String,
    pub mfr_version: &'static str,
}

/// The bench's network: the same random weights on every call.
fn network(b: &TrainBench, config: &SiTConfig) -> Result<(nn::VarStore, SiT)> {
    tch::manual_seed(0);
    let mut vs = nn::VarStore::new(b.device);
    let net = SiT::new(&vs.root(), config);
    train::prepare_precision(&mut vs, b.precision, b.device)?;
    // Random weights everywhere: a freshly initialised SiT outputs exactly zero (adaLN-Zero),
    // which would make the agreement checks below trivially exact.
    randomise(&vs, 0.02);
    Ok((vs, net))
}

fn trainer<'a>(
    b: &TrainBench,
    net: &'a SiT,
    vs: &nn::VarStore,
    cfg: &MeanFlowConfig,
    graph: bool,
) -> Result<train::Trainer<'a>> {
    let defaults = TrainSection::default();
    Ok(train::Trainer {
        net,
        opt: train::optim::AdamW::new(train::trainable(vs), defaults.lr, defaults.betas, 0.0),
        cfg: cfg.clone(),
        precision: b.precision,
        grad_clip: b.grad_clip,
        accumulation: 1,
        sync: None,
        graph: match graph {
            true => Some(train::graph::StepGraph::new(b.device)?),
            false => None,
        },
    })
}

pub fn train(b: &TrainBench) -> Result<TrainBenchResult> {
    let config = preset(&b.model)?;
    let (vs, net) = network(b, &config)?;
    let train_defaults = TrainSection::default();
    let cfg = MeanFlowSection {
        omega: b.omega,
        kappa: b.kappa,
        jvp: b.jvp,
        ..MeanFlowSection::default()
    }
    .config();
    let kind = train::input_kind(b.precision);
    let shape = [
        b.batch,
        config.in_channels,
        config.input_size,
        config.input_size,
    ];
    let x = Tensor::randn(shape, (kind, b.device));
    let labels = Tensor::randint(config.num_classes, [b.batch], (Kind::Int64, b.device));

    let compute_dtype = device::autocast_bf16(b.device, b.precision == Precision::Bf16, || {
        let t = Tensor::ones([b.batch], (kind, b.device));
        Ok(tch::no_grad(|| net.forward(&x, &t, &t, &labels, AttentionKernel::Fused)).kind())
    })?;
    let agreement = agreement(&net, &vs, &cfg, &x, &labels, b.precision)?;
    let graph_vs_eager = match b.cuda_graph {
        true => Some(graph_agreement(b, &config, &cfg, &x, &labels)?),
        false => None,
    };
    let mut trainer = trainer(b, &net, &vs, &cfg, b.cuda_graph)?;
    let mut last = Tensor::zeros([], (Kind::Float, b.device));
    let mut run = |n: usize| -> Result<()> {
        for _ in 0..n {
            last = trainer.step(&x, &labels, train_defaults.lr)?.loss;
        }
        device::synchronize(b.device);
        Ok(())
    };
    run(b.warmup)?;
    device::reset_peak_memory(b.device)?;
    let start = Instant::now();
    run(b.steps)?;
    let seconds = start.elapsed().as_secs_f64() / b.steps.max(1) as f64;
    let peak_memory_gib = peak_memory_gib(b.device)?;
    let ((), ops) = profile::profile(|| run(1))?;
    let parameters = vs
        .trainable_variables()
        .iter()
        .map(|v| v.numel() as i64)
        .sum();
    Ok(TrainBenchResult {
        what: "meanflow train step",
        model: b.model.clone(),
        parameters,
        batch: b.batch,
        precision: b.precision,
        omega: b.omega,
        kappa: b.kappa,
        grad_clip: b.grad_clip,
        jvp: b.jvp,
        cuda_graph: b.cuda_graph,
        agreement_with_forward_ad: agreement,
        graph_vs_eager,
        device: device::describe(b.device),
        warmup_steps: b.warmup,
        timed_steps: b.steps,
        ms_per_step: seconds * 1e3,
        img_per_s: b.batch as f64 / seconds,
        peak_memory_gib,
        peak_memory_of: peak_memory_of(b.device),
        final_loss: last.double_value(&[]),
        compute_dtype: format!("{compute_dtype:?}"),
        ops,
        libtorch: "2.11.0".to_owned(),
        mfr_version: env!("CARGO_PKG_VERSION"),
    })
}

fn agreement(
    net: &SiT,
    vs: &nn::VarStore,
    cfg: &MeanFlowConfig,
    x: &Tensor,
    labels: &Tensor,
    precision: Precision,
) -> Result<Agreement> {
    tch::manual_seed(1);
    let draw = Draw::sample(cfg, x);
    let run = |jvp: JvpMethod| -> Result<[Tensor; 4]> {
        let cfg = MeanFlowConfig { jvp, ..cfg.clone() };
        for mut g in vs
            .trainable_variables()
            .iter()
            .map(|v| v.grad())
            .filter(|g| g.defined())
        {
            let _ = g.zero_();
        }
        let terms = device::autocast_bf16(x.device(), precision == Precision::Bf16, || {
            meanflow_loss(net, &cfg, x, labels, &draw)
        })?;
        terms.loss.backward();
        let grads: Vec<Tensor> = vs
            .trainable_variables()
            .iter()
            .map(|v| v.grad().to_kind(Kind::Float).reshape([-1]))
            .collect();
        // du/dt where the target uses it (the manual JVP skips the r = t rows).
        let b = x.size()[0];
        Ok([
            terms.u,
            terms.du_dt.narrow(0, draw.r_equals_t, b - draw.r_equals_t),
            terms.loss.detach(),
            Tensor::cat(&grads, 0),
        ])
    };
    let (ours, plain) = (run(cfg.jvp)?, run(JvpMethod::ForwardAd)?);
    let (du_dt, grads) = (rel_diff(&ours[1], &plain[1]), rel_diff(&ours[3], &plain[3]));
    Ok(Agreement {
        u: rel_diff(&ours[0], &plain[0]),
        du_dt,
        loss: rel_diff(&ours[2], &plain[2]),
        grads,
        within_bf16_tolerance: (precision == Precision::Bf16)
            .then_some(du_dt < BF16_DU_DT_TOLERANCE && grads < BF16_GRADS_TOLERANCE),
    })
}

/// Steps of two copies of the bench's network on the same batch and seeds, one replaying a
/// CUDA graph and one eager: the largest relative difference of the step's loss, and of the
/// weights after the last step. Its first steps are eager on both sides, the rest replays.
#[derive(Debug, Serialize)]
pub struct GraphAgreement {
    pub steps: usize,
    pub replayed_steps: usize,
    pub loss: f64,
    pub weights: f64,
}

fn graph_agreement(
    b: &TrainBench,
    config: &SiTConfig,
    cfg: &MeanFlowConfig,
    x: &Tensor,
    labels: &Tensor,
) -> Result<GraphAgreement> {
    const STEPS: usize = 7;
    let lr = TrainSection::default().lr;
    // Each side's losses and final weights, moved to the CPU so that one network at a time
    // occupies the device (XL/2's three copies would not fit an H100 beside each other).
    let run = |graph: bool| -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let (vs, net) = network(b, config)?;
        let mut trainer = trainer(b, &net, &vs, cfg, graph)?;
        let losses = (0..STEPS)
            .map(|i| {
                tch::manual_seed(100 + i as i64);
                Ok(trainer.step(x, labels, lr)?.loss.to_device(Device::Cpu))
            })
            .collect::<Result<Vec<_>>>()?;
        let weights = train::trainable(&vs)
            .into_iter()
            .map(|(_, v)| v.to_device(Device::Cpu))
            .collect();
        Ok((losses, weights))
    };
    let (graphed, graphed_weights) = run(true)?;
    let (eager, eager_weights) = run(false)?;
    let largest = |a: &[Tensor], b: &[Tensor]| {
        a.iter()
            .zip(b)
            .map(|(a, b)| rel_diff(a, b))
            .fold(0.0, f64::max)
    };
    let (loss, weights) = (
        largest(&graphed, &eager),
        largest(&graphed_weights, &eager_weights),
    );
    Ok(GraphAgreement {
        steps: STEPS,
        replayed_steps: STEPS - train::graph::WARMUP_STEPS,
        loss,
        weights,
    })
}

/// ||a - b|| / ||b|| in float64.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-300)
}

fn preset(model: &str) -> Result<SiTConfig> {
    SiTConfig::preset(model).ok_or_else(|| {
        anyhow!(
            "unknown model preset `{model}`, expected one of {}",
            SiTConfig::preset_names().join(", ")
        )
    })
}

/// Fills every trainable variable with N(0, std) (timing on zeros can flatter a kernel).
fn randomise(vs: &nn::VarStore, std: f64) {
    tch::no_grad(|| {
        for mut v in vs.trainable_variables() {
            let w = v.randn_like() * std;
            v.copy_(&w);
        }
    });
}

/// Random Inception weights whose activations stay finite through its ~90 layers:
/// He-scaled convolutions, unit BatchNorm variances (N(0, s) would make some negative: NaN).
fn randomise_inception(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            let w = if name.ends_with("var") {
                v.ones_like()
            } else if v.dim() == 4 {
                let fan_in = (v.numel() as i64 / v.size()[0]) as f64;
                v.randn_like() * (2.0 / fan_in).sqrt()
            } else {
                v.randn_like() * 0.05
            };
            v.copy_(&w);
        }
    });
}

fn peak_memory_gib(dev: Device) -> Result<f64> {
    Ok(device::peak_memory_bytes(dev)? as f64 / (1u64 << 30) as f64)
}

/// What [`peak_memory_gib`] measures on a device.
fn peak_memory_of(dev: Device) -> &'static str {
    if dev.is_cuda() {
        "cuda allocator"
    } else {
        "process peak RSS"
    }
}

/// Seconds per batch after the warm-up, and one more batch op by op.
fn time_batches(
    device: Device,
    warmup: usize,
    batches: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(f64, profile::OpProfile)> {
    for _ in 0..warmup {
        f()?;
    }
    device::synchronize(device);
    device::reset_peak_memory(device)?;
    let start = Instant::now();
    for _ in 0..batches {
        f()?;
    }
    device::synchronize(device);
    let seconds = start.elapsed().as_secs_f64() / batches.max(1) as f64;
    let ((), ops) = profile::profile(f)?;
    Ok((seconds, ops))
}

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
    let mut vs = nn::VarStore::new(dev);
    let net = SiT::new(&vs.root(), &config);
    train::prepare_precision(&mut vs, precision, dev)?;
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
    if num < 4 {
        bail!("--num {num}: the two halves need at least 2 samples each");
    }
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
