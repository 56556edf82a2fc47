//! Training: one optimisation step ([`Trainer`]), AdamW, EMA, checkpoints and the loop
//! ([`run::train`]).
pub mod checkpoint;
pub mod ema;
pub mod optim;
pub mod run;

use crate::meanflow::{meanflow_loss, Draw, MeanFlowConfig};
use crate::model::SiT;
use crate::spec::Precision;
use anyhow::{bail, Result};
use optim::AdamW;
use tch::{nn, Device, Kind, Tensor};

/// Puts the variables in the precision's dtype and sets TF32; bf16 autocast needs CUDA.
pub fn prepare_precision(
    vs: &mut nn::VarStore,
    precision: Precision,
    device: Device,
) -> Result<()> {
    match precision {
        Precision::F64 => vs.double(),
        Precision::Bf16 if !device.is_cuda() => {
            bail!("bf16 autocast runs on CUDA only: use precision f32 (or f64) on the CPU")
        }
        _ => vs.float(),
    }
    if device.is_cuda() {
        crate::device::set_tf32(precision == Precision::Tf32)?;
    }
    Ok(())
}

/// The dtype of the model's inputs and master weights under a precision.
pub fn input_kind(precision: Precision) -> Kind {
    if precision == Precision::F64 {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Trainable variables sorted by name (the optimizer's and the checkpoint's order).
pub fn trainable(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, v)| v.requires_grad())
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// A step's numbers, left on the device (reading them would stall it).
pub struct StepStats {
    pub loss: Tensor,
    pub v_loss: Tensor,
    pub grad_norm: Tensor,
}

/// What a training step needs besides the batch.
pub struct Trainer<'a> {
    pub net: &'a SiT,
    pub opt: AdamW,
    pub cfg: MeanFlowConfig,
    pub precision: Precision,
    /// Gradient-norm clip; 0 disables it.
    pub grad_clip: f64,
    /// Micro-batches per step: the batch is split and the gradients summed.
    pub accumulation: i64,
}

impl Trainer<'_> {
    /// One step on a batch (x, labels) at learning rate `lr`; randomness comes from torch's
    /// generator (seed it first for a reproducible step).
    pub fn step(&mut self, x: &Tensor, labels: &Tensor, lr: f64) -> Result<StepStats> {
        self.opt.zero_grad();
        let chunks = self.accumulation.max(1);
        let (mut loss, mut v_loss) = (
            Tensor::zeros([], (Kind::Float, x.device())),
            Tensor::zeros([], (Kind::Float, x.device())),
        );
        for (x, labels) in x
            .chunk(chunks, 0)
            .iter()
            .zip(labels.chunk(chunks, 0).iter())
        {
            let draw = Draw::sample(&self.cfg, x);
            let autocast = self.precision == Precision::Bf16;
            let terms = crate::device::autocast_bf16(autocast, || {
                meanflow_loss(self.net, &self.cfg, x, labels, &draw)
            })?;
            (terms.loss.shallow_clone() / chunks as f64).backward();
            loss += terms.loss.detach().to_kind(Kind::Float) / chunks as f64;
            v_loss += terms.v_loss.to_kind(Kind::Float) / chunks as f64;
        }
        let grad_norm = optim::clip_grad_norm(&self.opt.params, self.grad_clip)?;
        self.opt.update(lr)?;
        Ok(StepStats {
            loss,
            v_loss,
            grad_norm,
        })
    }
}
