//! AdamW with its moments in plain view (checkpoints hold them), stepped by libtorch's fused
//! kernel (`_fused_adamw_`, torch.optim.AdamW(fused=True)) through the shim: one launch for all
//! parameters instead of a dozen per parameter. Also the fused global-norm gradient clip.
use crate::device::{handles, shim_call, shim_tensor};
use crate::ffi::{mfr_clear_grads, mfr_clip_grad_norm, mfr_fused_adamw};
use anyhow::Result;
use tch::{Kind, Tensor};

pub struct AdamW {
    pub lr: f64,
    pub betas: [f64; 2],
    pub weight_decay: f64,
    pub eps: f64,
    /// Updates taken so far (torch's `step`).
    step: i64,
    /// The step as the fused kernel keeps it: a float tensor per parameter, on its device.
    steps: Vec<Tensor>,
    /// Every trainable parameter with its moments.
    pub params: Vec<Param>,
}

/// A trainable parameter and AdamW's two moments of it (torch's `exp_avg`, `exp_avg_sq`).
pub struct Param {
    pub name: String,
    pub value: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

impl AdamW {
    pub fn new(named: Vec<(String, Tensor)>, lr: f64, betas: [f64; 2], weight_decay: f64) -> Self {
        let params = named
            .into_iter()
            .map(|(name, value)| Param {
                exp_avg: value.zeros_like().detach(),
                exp_avg_sq: value.zeros_like().detach(),
                name,
                value,
            })
            .collect();
        Self {
            lr,
            betas,
            weight_decay,
            eps: 1e-8,
            step: 0,
            steps: Vec::new(),
            params,
        }
    }

    pub fn step(&self) -> i64 {
        self.step
    }

    /// Counts an update the optimizer's recorded kernels made in a CUDA graph replay.
    pub(crate) fn count_replayed_update(&mut self) {
        self.step += 1;
    }

    /// Sets the update count (when restoring a checkpoint).
    pub fn set_step(&mut self, step: i64) {
        self.step = step;
        self.steps.clear();
    }

    /// Drops every gradient (torch's `zero_grad(set_to_none=True)`): the next backward
    /// writes them afresh instead of adding into zeroed tensors.
    pub fn zero_grad(&mut self) -> Result<()> {
        let params = handles(self.params.iter().map(|p| &p.value));
        // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
        shim_call("clear the gradients", |e, l| unsafe {
            mfr_clear_grads(params.as_ptr(), params.len(), e, l)
        })
    }

    /// One update at learning rate `lr` of every parameter that has a gradient.
    pub fn update(&mut self, lr: f64) -> Result<()> {
        if self.steps.len() != self.params.len() {
            let step = self.step as f64;
            self.steps = self
                .params
                .iter()
                .map(|p| Tensor::full([], step, (Kind::Float, p.value.device())))
                .collect();
        }
        let live: Vec<usize> = (0..self.params.len())
            .filter(|&i| self.params[i].value.grad().defined())
            .collect();
        let grads: Vec<Tensor> = live.iter().map(|&i| self.params[i].value.grad()).collect();
        let pick = |f: fn(&Param) -> &Tensor| handles(live.iter().map(|&i| f(&self.params[i])));
        let (params, m, v) = (
            pick(|p| &p.value),
            pick(|p| &p.exp_avg),
            pick(|p| &p.exp_avg_sq),
        );
        let (grads, steps) = (
            handles(&grads),
            handles(live.iter().map(|&i| &self.steps[i])),
        );
        let [b1, b2] = self.betas;
        tch::no_grad(|| {
            // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
            shim_call("fused AdamW", |e, l| unsafe {
                mfr_fused_adamw(
                    params.as_ptr(),
                    grads.as_ptr(),
                    m.as_ptr(),
                    v.as_ptr(),
                    steps.as_ptr(),
                    live.len(),
                    lr,
                    b1,
                    b2,
                    self.weight_decay,
                    self.eps,
                    e,
                    l,
                )
            })
        })?;
        self.step += 1;
        Ok(())
    }
}

/// Global L2 norm of the gradients, and gradients scaled down to `max_norm` when above it
/// (0 = never), without a host sync: the norm stays on the device (torch's clip_grad_norm_).
pub fn clip_grad_norm(params: &[Param], max_norm: f64) -> Result<Tensor> {
    let grads: Vec<Tensor> = params
        .iter()
        .map(|p| p.value.grad())
        .filter(|g| g.defined())
        .collect();
    if grads.is_empty() {
        return Ok(Tensor::zeros([], (Kind::Float, tch::Device::Cpu)));
    }
    let list = handles(&grads);
    tch::no_grad(|| {
        // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
        shim_tensor("clip gradients", |total, e, l| unsafe {
            mfr_clip_grad_norm(list.as_ptr(), list.len(), max_norm, total, e, l)
        })
    })
}
