//! Sampling: z_r = z_t - (t - r) u(z_t, r, t | y) along a decreasing time schedule from 1 to 0.
//! [1, 0] is the one-step (1-NFE) sampler x = e - u(e, 0, 1 | y).
use crate::model::{AttentionKernel, SiT};
use anyhow::{bail, Result};
use tch::Tensor;

/// Checks that `schedule` starts at 1, ends at 0 and strictly decreases (so every time is a
/// finite number in [0, 1]).
pub fn check_schedule(schedule: &[f64]) -> Result<()> {
    if schedule.iter().any(|t| !t.is_finite()) {
        bail!("a sampling schedule holds finite times, got {schedule:?}");
    }
    if schedule.len() < 2 || schedule[0] != 1.0 || *schedule.last().unwrap() != 0.0 {
        bail!("a sampling schedule runs from 1.0 to 0.0 (e.g. [1.0, 0.0] for one step), got {schedule:?}");
    }
    if schedule.windows(2).any(|w| w[1] >= w[0]) {
        bail!("a sampling schedule must strictly decrease, got {schedule:?}");
    }
    Ok(())
}

/// Runs the schedule from noise `e` with class labels `y`; one network evaluation per interval.
pub fn sample(net: &SiT, e: &Tensor, y: &Tensor, schedule: &[f64]) -> Result<Tensor> {
    check_schedule(schedule)?;
    let b = e.size()[0];
    let opts = (e.kind(), e.device());
    Ok(tch::no_grad(|| {
        let mut z = e.copy();
        for w in schedule.windows(2) {
            let (t, r) = (Tensor::full([b], w[0], opts), Tensor::full([b], w[1], opts));
            let u = net.forward(&z, &t, &r, y, AttentionKernel::Fused);
            z -= (w[0] - w[1]) * u;
        }
        z
    }))
}
