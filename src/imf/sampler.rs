//! Sampling (official imf.py `generate` / `sample_one_step`): z_r = z_t - (t - r) u(z_t, h = t -
//! r, omega, t_min, t_max | y) along a decreasing schedule from 1 to 0, with the same guidance
//! scale and interval at every step. The interval is only conditioning: nothing is masked at
//! sampling time, and the v-head is not used.
use crate::meanflow::sampler::check_schedule;
use crate::model::imf::{Conditions, Heads};
use crate::model::{AttentionKernel, ImfDiT};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// The conditioning a sample is drawn at: the guidance scale omega and its interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingGuidance {
    pub omega: f64,
    pub t_min: f64,
    pub t_max: f64,
}

impl SamplingGuidance {
    /// Err: a scale that is not a finite number >= 1 (the network is trained on [1, 1 + s_max];
    /// it sees 1 - 1/omega), or an interval outside 0 <= t_min <= t_max <= 1.
    pub fn check(&self) -> Result<()> {
        let Self {
            omega,
            t_min,
            t_max,
        } = *self;
        if !omega.is_finite() || omega < 1.0 {
            bail!("the iMF guidance scale omega must be a finite number >= 1 (the released checkpoints use 4 to 10.5), got {omega}");
        }
        if !(t_min.is_finite()
            && t_max.is_finite()
            && 0.0 <= t_min
            && t_min <= t_max
            && t_max <= 1.0)
        {
            bail!("the iMF guidance interval must satisfy 0 <= t_min <= t_max <= 1, got [{t_min}, {t_max}]");
        }
        Ok(())
    }
}

/// The uniform schedule of `steps` steps, 1 -> 0 (official `linspace(1, 0, steps + 1)`, as
/// numpy computes it: 1 + i * (-1/steps), the last exactly 0).
pub fn uniform_schedule(steps: usize) -> Vec<f64> {
    let delta = -1.0 / steps as f64;
    (0..=steps)
        .map(|i| {
            if i == steps {
                0.0
            } else {
                1.0 + i as f64 * delta
            }
        })
        .collect()
}

/// One step from time t to r (official `sample_one_step`), without gradient.
pub fn step(net: &ImfDiT, z: &Tensor, y: &Tensor, t: f64, r: f64, g: &SamplingGuidance) -> Tensor {
    let b = z.size()[0];
    let opts = (z.kind(), z.device());
    let full = |v: f64| Tensor::full([b], v, opts);
    let (t, r) = (full(t), full(r));
    let h = &t - &r;
    let (omega, t_min, t_max) = (full(g.omega), full(g.t_min), full(g.t_max));
    let cond = Conditions {
        omega: &omega,
        t_min: &t_min,
        t_max: &t_max,
        y,
    };
    tch::no_grad(|| {
        let (u, _) = net.forward(z, &h, &cond, Heads::U, AttentionKernel::Fused);
        z - h.view([-1, 1, 1, 1]) * u.expect("the u-head is always there")
    })
}

/// Runs the schedule from noise `e` (N, C, H, W) with labels `y`; one network evaluation per
/// step.
pub fn sample(
    net: &ImfDiT,
    e: &Tensor,
    y: &Tensor,
    schedule: &[f64],
    g: &SamplingGuidance,
) -> Result<Tensor> {
    check_schedule(schedule)?;
    g.check()?;
    let mut z = e.shallow_clone();
    for w in schedule.windows(2) {
        z = step(net, &z, y, w[0], w[1], g);
    }
    Ok(z)
}
