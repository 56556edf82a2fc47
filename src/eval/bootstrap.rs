//! How much of an FID is noise: a bootstrap over the sample. The sample's features are drawn
//! again with replacement (the reference statistics held fixed), the FID of each draw computed,
//! and the percentile interval of those FIDs reported beside the FID itself. Two runs whose
//! intervals overlap are not told apart by their FIDs.
//!
//! Each draw's FID reuses the reference's square root and the sample's product with it
//! ([`Reference::project`]): one eigenproblem of the smaller of n and d per draw, no d x d
//! matrix product.
use super::metrics::Reference;
use crate::data::mix;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

/// A percentile interval of FID.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
    /// 0.95: the central 95% of the resampled FIDs.
    pub level: f64,
    pub resamples: usize,
}

impl Interval {
    pub fn half_width(&self) -> f64 {
        (self.high - self.low) / 2.0
    }

    pub fn overlaps(&self, other: &Interval) -> bool {
        self.low <= other.high && other.low <= self.high
    }
}

/// The row indices of draw `r` of `n` samples: n uniform draws with replacement, a function of
/// (seed, r) alone (tests hand the same indices to a numpy bootstrap).
pub fn draw_indices(n: usize, seed: u64, r: usize) -> Vec<i64> {
    let stream = mix(seed, r as u64);
    (0..n)
        .map(|i| (mix(stream, i as u64) % n as u64) as i64)
        .collect()
}

/// numpy's default percentile (linear interpolation between closest ranks) of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let at = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64)
}

/// The FID of every draw (features (n, d) of the sample against `reference`), on `device`.
pub fn resampled_fids(
    reference: &Reference,
    features: &Tensor,
    resamples: usize,
    seed: u64,
    device: Device,
) -> Result<Vec<f64>> {
    let reference = reference.to_device(device);
    let projected = reference.project(features)?;
    let n = features.size()[0] as usize;
    tch::no_grad(|| {
        (0..resamples)
            .map(|r| {
                let rows = Tensor::from_slice(&draw_indices(n, seed, r)).to_device(device);
                projected.fid(Some(&rows))
            })
            .collect()
    })
}

/// The central `level` percentile interval of `resamples` bootstrap FIDs.
pub fn fid_interval(
    reference: &Reference,
    features: &Tensor,
    resamples: usize,
    seed: u64,
    level: f64,
    device: Device,
) -> Result<Interval> {
    if resamples < 2 {
        bail!("a bootstrap interval needs at least 2 resamples, got {resamples}");
    }
    let mut fids = resampled_fids(reference, features, resamples, seed, device)?;
    fids.sort_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0;
    Ok(Interval {
        low: percentile(&fids, tail),
        high: percentile(&fids, 1.0 - tail),
        level,
        resamples,
    })
}
