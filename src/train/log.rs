//! What training reports as it goes: the steps' numbers summed on the device between log lines,
//! stats.jsonl (on the rank that writes it) and the progress bar.
use super::{StepStats, TrainConfig};
use crate::progress::Progress;
use crate::rundir::{StatLine, StatsLog};
use anyhow::Result;
use std::time::Instant;
use tch::{Kind, Tensor};

/// The steps' numbers, summed on the device between log lines (reading them would stall it),
/// the progress bar, and stats.jsonl on the rank that writes it.
pub(super) struct StepLog {
    loss: Tensor,
    v_loss: Tensor,
    adaptive_weight: Tensor,
    grad_norm: Tensor,
    /// The first step with a non-finite loss or gradient norm, -1 while there is none.
    first_bad: Tensor,
    window: (Instant, u64),
    batch: usize,
    started: Instant,
    wall_before: f64,
    file: Option<StatsLog>,
    bar: Progress,
}

impl StepLog {
    pub(super) fn new(
        cfg: &TrainConfig,
        file: Option<StatsLog>,
        total: u64,
        start: u64,
        wall_before: f64,
        device: tch::Device,
        shown: bool,
    ) -> StepLog {
        let bar = match shown {
            true => Progress::new(&format!("{} train", cfg.label), total, "steps"),
            false => Progress::hidden(),
        };
        bar.start_at(start);
        let zero = || Tensor::zeros([], (Kind::Float, device));
        StepLog {
            loss: zero(),
            v_loss: zero(),
            adaptive_weight: zero(),
            grad_norm: zero(),
            first_bad: Tensor::full([], -1i64, (Kind::Int64, device)),
            window: (Instant::now(), 0),
            batch: cfg.batch,
            started: Instant::now(),
            wall_before,
            file,
            bar,
        }
    }

    pub(super) fn add(&mut self, step: u64, s: &StepStats) {
        let bad = s
            .loss
            .isfinite()
            .logical_and(&s.grad_norm.isfinite())
            .logical_not();
        let at = Tensor::full([], step as i64, (Kind::Int64, self.first_bad.device()));
        self.first_bad = self
            .first_bad
            .where_self(&(self.first_bad.ge(0).logical_or(&bad.logical_not())), &at);
        self.loss += &s.loss;
        self.v_loss += &s.v_loss;
        self.adaptive_weight += &s.adaptive_weight;
        self.grad_norm += s.grad_norm.to_kind(Kind::Float);
        self.window.1 += 1;
    }

    pub(super) fn first_bad_step(&self) -> Option<u64> {
        u64::try_from(self.first_bad.int64_value(&[])).ok()
    }

    /// Training wall time across resumes.
    pub(super) fn wall_s(&self) -> f64 {
        self.wall_before + self.started.elapsed().as_secs_f64()
    }

    /// Logs the means since the previous line as step `done`'s line.
    pub(super) fn write(&mut self, done: u64, epoch: u64, lr: f64) -> Result<()> {
        let n = self.window.1 as f64;
        let elapsed = self.window.0.elapsed().as_secs_f64();
        let line = StatLine {
            step: done,
            epoch,
            loss: self.loss.double_value(&[]) / n,
            v_loss: self.v_loss.double_value(&[]) / n,
            adaptive_weight: Some(self.adaptive_weight.double_value(&[]) / n),
            grad_norm: self.grad_norm.double_value(&[]) / n,
            lr,
            img_per_s: n * self.batch as f64 / elapsed.max(1e-9),
            wall_s: self.wall_s(),
        };
        if let Some(file) = &mut self.file {
            file.append(&line)?;
        }
        self.bar
            .set_message(format!("loss {:.4} v_loss {:.4}", line.loss, line.v_loss));
        for sum in [
            &mut self.loss,
            &mut self.v_loss,
            &mut self.adaptive_weight,
            &mut self.grad_norm,
        ] {
            let _ = sum.zero_();
        }
        self.window = (Instant::now(), 0);
        Ok(())
    }

    pub(super) fn at(&self, done: u64) {
        self.bar.set_position(done);
    }

    pub(super) fn abandon(&self) {
        self.bar.abandon();
    }

    pub(super) fn finish(&self) {
        self.bar.finish();
    }
}
