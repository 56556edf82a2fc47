//! How much of an FID is noise: a bootstrap over the sample. The sample's features are drawn
//! again with replacement (the reference statistics held fixed), the FID of each draw computed,
//! and the percentile interval of those FIDs reported beside the FID itself. Two runs whose
//! intervals overlap are not told apart by their FIDs.
//!
//! Each draw's FID takes the reference's square root once: tr sqrt(S_r S) is the trace of the
//! square root of R S R with R = sqrt(S_r), and when the sample has fewer rows n than features
//! d (a small-sample FID), R S R = A^T A with A = X_c R / sqrt(n - 1), whose nonzero eigenvalues
//! are those of the n x n matrix A A^T: a small eigenproblem per draw instead of a d x d one.
use super::metrics::Stats;
use crate::data::mix;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

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
    reference: &Stats,
    features: &Tensor,
    resamples: usize,
    seed: u64,
    device: Device,
) -> Result<Vec<f64>> {
    let x = features.to_kind(Kind::Double).to_device(device);
    let (n, d) = x.size2()?;
    if n < 2 {
        bail!("a bootstrap needs at least 2 samples, got {n}");
    }
    let sigma_r = reference.sigma.to_kind(Kind::Double).to_device(device);
    let mu_r = reference.mu.to_kind(Kind::Double).to_device(device);
    let (w, v) = sigma_r.linalg_eigh("L");
    let root = (&v * w.clamp_min(0.0).sqrt().unsqueeze(0)).matmul(&v.transpose(0, 1));
    let trace_r = sigma_r.trace().double_value(&[]);
    tch::no_grad(|| {
        (0..resamples)
            .map(|r| {
                let idx = Tensor::from_slice(&draw_indices(n as usize, seed, r)).to_device(device);
                let xs = x.index_select(0, &idx);
                let mu = xs.mean_dim(0, false, None::<Kind>);
                let centred = &xs - &mu;
                let trace_s = centred.square().sum(Kind::Double).double_value(&[]) / (n - 1) as f64;
                let eig = if n <= d {
                    let a = centred.matmul(&root) / ((n - 1) as f64).sqrt();
                    let small = a.matmul(&a.transpose(0, 1));
                    ((&small + small.transpose(0, 1)) / 2.0).linalg_eigvalsh("L")
                } else {
                    let s = centred.transpose(0, 1).matmul(&centred) / (n - 1) as f64;
                    let m = root.matmul(&s).matmul(&root);
                    ((&m + m.transpose(0, 1)) / 2.0).linalg_eigvalsh("L")
                };
                let trace_sqrt = eig
                    .clamp_min(0.0)
                    .sqrt()
                    .sum(Kind::Double)
                    .double_value(&[]);
                let diff = &mu - &mu_r;
                let fid = diff.dot(&diff).double_value(&[]) + trace_r + trace_s - 2.0 * trace_sqrt;
                if !fid.is_finite() {
                    bail!("a resampled FID is not finite (non-finite features?)");
                }
                Ok(fid)
            })
            .collect()
    })
}

/// The central `level` percentile interval of `resamples` bootstrap FIDs.
pub fn fid_interval(
    reference: &Stats,
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
