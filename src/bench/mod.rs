//! `mfr bench`: components timed on random data with random weights, reported as JSON: the
//! training step ([`train`]), sampling, decoding, FID end to end and the Inception network
//! ([`generate`]). Speed targets live here, never in tests.
mod generate;
pub mod profile;
mod train;

pub use generate::{evaluate, fid, sample, FidBenchResult, ThroughputResult};
pub use train::{
    train, Agreement, GraphAgreement, TrainBench, TrainBenchResult, BF16_DU_DT_TOLERANCE,
    BF16_GRADS_TOLERANCE,
};

use crate::device;
use crate::model::SiTConfig;
use anyhow::{anyhow, Result};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

/// ||a - b|| / ||b|| in float64.
pub(crate) fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-300)
}

pub(crate) fn preset(model: &str) -> Result<SiTConfig> {
    SiTConfig::preset(model).ok_or_else(|| {
        anyhow!(
            "unknown model preset `{model}`, expected one of {}",
            SiTConfig::preset_names().join(", ")
        )
    })
}

/// Fills every trainable variable with N(0, std) (timing on zeros can flatter a kernel).
pub(crate) fn randomise(vs: &nn::VarStore, std: f64) {
    tch::no_grad(|| {
        for mut v in vs.trainable_variables() {
            let w = v.randn_like() * std;
            v.copy_(&w);
        }
    });
}

/// Random Inception weights whose activations stay finite through its ~90 layers:
/// He-scaled convolutions, unit BatchNorm variances (N(0, s) would make some negative: NaN).
pub(crate) fn randomise_inception(vs: &nn::VarStore) {
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

pub(crate) fn peak_memory_gib(dev: Device) -> Result<f64> {
    Ok(device::peak_memory_bytes(dev)? as f64 / (1u64 << 30) as f64)
}

/// What [`peak_memory_gib`] measures on a device.
pub(crate) fn peak_memory_of(dev: Device) -> &'static str {
    if dev.is_cuda() {
        "cuda allocator"
    } else {
        "process peak RSS"
    }
}

/// The largest batch and the most timed batches a bench takes: beyond them a typo, not a
/// measurement.
const MAX_BATCH: i64 = 1 << 20;
const MAX_BATCHES: usize = 1_000_000;

/// A bench's batch size and number of timed batches (steps), checked before anything is built.
pub(crate) fn check_sizes(batch: i64, batches: usize) -> Result<()> {
    if !(1..=MAX_BATCH).contains(&batch) {
        anyhow::bail!("--batch {batch}: expected an integer in [1, {MAX_BATCH}]");
    }
    if !(1..=MAX_BATCHES).contains(&batches) {
        anyhow::bail!("{batches} timed batches: expected an integer in [1, {MAX_BATCHES}]");
    }
    Ok(())
}

/// Seconds per batch after the warm-up, and one more batch op by op.
pub(crate) fn time_batches(
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
