//! One optimisation step: the MeanFlow loss, backward, optional clipping, AdamW. The loop, EMA and
//! checkpoints build on this.
use crate::meanflow::{meanflow_loss, Draw, MeanFlowConfig};
use crate::model::SiT;
use crate::spec::{Precision, TrainSection};
use anyhow::{bail, Result};
use tch::{nn, Device, Kind, Tensor};

/// AdamW with the spec's lr, betas and weight decay (eps 1e-8, as torch.optim.AdamW).
pub fn optimizer(vs: &nn::VarStore, train: &TrainSection) -> Result<nn::Optimizer> {
    let adamw = nn::AdamW {
        beta1: train.betas[0],
        beta2: train.betas[1],
        wd: train.weight_decay,
        eps: 1e-8,
        amsgrad: false,
    };
    Ok(nn::OptimizerConfig::build(adamw, vs, train.lr)?)
}

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

pub struct StepStats {
    pub loss: f64,
    pub v_loss: f64,
    pub grad_norm: f64,
}

/// Global L2 norm of the gradients; scales them down to `max_norm` when above it (0 = never).
pub fn clip_grad_norm(vs: &nn::VarStore, max_norm: f64) -> f64 {
    let grads: Vec<Tensor> = vs
        .trainable_variables()
        .iter()
        .map(|v| v.grad())
        .filter(|g| g.defined())
        .collect();
    if grads.is_empty() {
        return 0.0;
    }
    let norms: Vec<Tensor> = grads
        .iter()
        .map(|g| g.norm().to_kind(Kind::Double))
        .collect();
    let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
    if max_norm > 0.0 && total > max_norm {
        let scale = max_norm / (total + 1e-6);
        tch::no_grad(|| {
            for g in &grads {
                let _ = g.shallow_clone().g_mul_scalar_(scale);
            }
        });
    }
    total
}

/// What a training step needs besides the batch.
pub struct Trainer<'a> {
    pub net: &'a SiT,
    pub vs: &'a nn::VarStore,
    pub opt: nn::Optimizer,
    pub cfg: MeanFlowConfig,
    pub precision: Precision,
    /// Gradient-norm clip; 0 disables it.
    pub grad_clip: f64,
}

impl Trainer<'_> {
    /// One step on a batch (x, labels): returns the loss, v loss and pre-clip grad norm.
    pub fn step(&mut self, x: &Tensor, labels: &Tensor) -> Result<StepStats> {
        self.opt.zero_grad();
        let draw = Draw::sample(&self.cfg, x);
        let autocast = self.precision == Precision::Bf16;
        let terms = crate::device::autocast_bf16(autocast, || {
            meanflow_loss(self.net, &self.cfg, x, labels, &draw)
        })?;
        terms.loss.backward();
        let grad_norm = clip_grad_norm(self.vs, self.grad_clip);
        self.opt.step();
        Ok(StepStats {
            loss: terms.loss.double_value(&[]),
            v_loss: terms.v_loss.double_value(&[]),
            grad_norm,
        })
    }
}
