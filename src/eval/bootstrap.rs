//! How much of an FID is sampling noise: an interval from half-samples of the sample's features.
//!
//! What the interval covers: theta_n, the median of the FID over independent samples of the
//! same size n from the same generator, against the same fixed reference statistics. At level
//! 0.95 it covers theta_n in about 95% of samples (tests/bootstrap.rs measures it on Gaussian
//! features, for n below and above the feature width). It says nothing of the FID at infinite
//! sample size (below theta_n: FID's bias shrinks as n grows), of the reference's own sampling
//! noise, or of the variation between trainings (repeat the run over seeds for that).
//!
//! How: `resamples` half-samples, each m = floor(n/2) distinct rows drawn without replacement;
//! the FID of each; their deviations from their median, placed around the FID of the whole
//! sample in the "basic" orientation: [F - dev_hi, F - dev_lo] with dev_lo, dev_hi the
//! deviations' (1 - level)/2 and (1 + level)/2 percentiles (F - theta_n is distributed as the
//! deviations are). dev_lo <= 0 <= dev_hi, so the interval contains F by construction.
//!
//! Why half-samples: the mean of m = n/2 rows drawn without replacement from n varies around
//! the sample's mean with variance (1 - m/n) s^2/m = s^2/n (s^2 the sample's unbiased
//! variance), the estimate of sigma^2/n, the variance of the sample's mean around the
//! generator's. FID is a function of the means of x and x x^T, so where it is smooth its spread
//! over half-samples is, to first order, its spread over fresh samples of size n (for odd n the
//! deviations are scaled by sqrt(m/(n-m)) to keep that identity). With fewer samples than
//! features it is not smooth everywhere (the square root meets the sample covariance's zero
//! eigenvalues): there the simulation, not this argument, is the evidence. The half-samples'
//! FIDs sit higher, near the FID at n/2 (FID's bias grows as the sample shrinks), which is why
//! only their deviations are used. A bootstrap with replacement repeats rows: ~37% of them are
//! missing from each draw and the repeats collapse the sample's spectrum, so the resampled FIDs
//! sit above F (with fewer samples than features, nearly all of them: the percentile intervals
//! this module made before missed their estimates) and there their spread also overstates the
//! FID's (measured in a simulation like the test's: intervals 1.45x too wide at n = 50,
//! d = 128).
//!
//! Each half-sample's FID reuses the reference's square root and the sample's product with it
//! ([`Reference::project`]): one eigenproblem of the smaller of n/2 and d, no d x d product.
use super::metrics::Reference;
use crate::data::epoch_order;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use tch::{Device, Tensor};

/// The level of every FID interval the evaluator makes.
pub const LEVEL: f64 = 0.95;

/// The most resamples one interval may take. More add nothing: the Monte Carlo error of a 2.5th
/// percentile of B normal draws is about 2.7/sqrt(B) of their standard deviation, under 0.03 of
/// it at this bound; and at 50,000 samples each resample costs a d x d eigenproblem.
pub const MAX_RESAMPLES: usize = 10_000;

/// Checks a number of resamples from a flag or a spec: 0 (no interval) or [2, MAX_RESAMPLES].
/// The error is the part of a sentence after the key that gave it.
pub fn check_resamples<T>(resamples: T) -> std::result::Result<usize, String>
where
    T: TryInto<usize> + fmt::Display + Copy,
{
    match resamples.try_into() {
        Ok(r) if r == 0 || (2..=MAX_RESAMPLES).contains(&r) => Ok(r),
        _ => Err(format!(
            "expected 0 (no interval) or an integer in [2, {MAX_RESAMPLES}] resamples, got {resamples}"
        )),
    }
}

/// How an interval was made (metrics.json's `method`; records from before it have none and are
/// not read: their intervals came from a bootstrap with replacement that missed its estimates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The deviations of half-samples' FIDs from their median, around the sample's FID.
    HalfSamples,
}

impl Method {
    /// One sentence for a report's caption.
    pub fn describe(&self) -> &'static str {
        match self {
            Method::HalfSamples => {
                "the spread of FID over half-samples of the features drawn without replacement, \
                 placed around the sample's FID: it covers the median FID of fresh samples of \
                 the same size from the same model (the sampling noise of the FID only)"
            }
        }
    }
}

/// An interval of FID: where the median FID of fresh samples of the same size lies.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
    /// 0.95: the interval covers the median FID at this sample size 95% of the time.
    pub level: f64,
    pub resamples: usize,
    pub method: Method,
}

impl Interval {
    pub fn overlaps(&self, other: &Interval) -> bool {
        self.low <= other.high && other.low <= self.high
    }

    pub fn contains(&self, fid: f64) -> bool {
        self.low <= fid && fid <= self.high
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:.2}, {:.2}]", self.low, self.high)
    }
}

/// The rows of half-sample `r` of `n` samples: floor(n/2) distinct indices, a function of
/// (seed, r) alone.
pub fn half_sample(n: usize, seed: u64, r: usize) -> Vec<i64> {
    let mut order = epoch_order(n, seed, r as u64);
    order.truncate(n / 2);
    order.into_iter().map(|i| i as i64).collect()
}

/// numpy's default percentile (linear interpolation between closest ranks) of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let at = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64)
}

/// The FID of every half-sample (features (n, d) of the sample against `reference`), on `device`.
pub fn half_sample_fids(
    reference: &Reference,
    features: &Tensor,
    resamples: usize,
    seed: u64,
    device: Device,
) -> Result<Vec<f64>> {
    let n = features.size2()?.0 as usize;
    if n < 4 {
        bail!("an FID interval needs at least 4 samples (half-samples of 2), got {n}");
    }
    let reference = reference.to_device(device);
    let projected = reference.project(features)?;
    tch::no_grad(|| {
        (0..resamples)
            .map(|r| {
                let rows = Tensor::from_slice(&half_sample(n, seed, r)).to_device(device);
                projected.fid(Some(&rows))
            })
            .collect()
    })
}

/// The `LEVEL` interval around `estimate`, the FID of all of `features` against `reference`
/// (the caller's, so that the interval contains exactly the number reported beside it), from
/// `resamples` half-samples.
pub fn fid_interval(
    reference: &Reference,
    features: &Tensor,
    estimate: f64,
    resamples: usize,
    seed: u64,
    device: Device,
) -> Result<Interval> {
    if !(2..=MAX_RESAMPLES).contains(&resamples) {
        bail!("an FID interval takes 2 to {MAX_RESAMPLES} resamples, got {resamples}");
    }
    let mut fids = half_sample_fids(reference, features, resamples, seed, device)?;
    fids.sort_by(f64::total_cmp);
    let n = features.size2()?.0 as f64;
    let m = (n / 2.0).floor();
    let scale = (m / (n - m)).sqrt();
    let median = percentile(&fids, 0.5);
    let tail = (1.0 - LEVEL) / 2.0;
    Ok(Interval {
        low: estimate - scale * (percentile(&fids, 1.0 - tail) - median),
        high: estimate + scale * (median - percentile(&fids, tail)),
        level: LEVEL,
        resamples,
        method: Method::HalfSamples,
    })
}
