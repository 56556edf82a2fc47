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
    /// (name, parameter, exp_avg, exp_avg_sq) for every trainable parameter.
    pub params: Vec<(String, Tensor, Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(named: Vec<(String, Tensor)>, lr: f64, betas: [f64; 2], weight_decay: f64) -> Self {
        let params = named
            .into_iter()
            .map(|(name, p)| {
                let (m, v) = (p.zeros_like().detach(), p.zeros_like().detach());
                (name, p, m, v)
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
        let params = handles(self.params.iter().map(|(_, p, _, _)| p));
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
                .map(|(_, p, _, _)| Tensor::full([], step, (Kind::Float, p.device())))
                .collect();
        }
        let live: Vec<usize> = (0..self.params.len())
            .filter(|&i| self.params[i].1.grad().defined())
            .collect();
        let grads: Vec<Tensor> = live.iter().map(|&i| self.params[i].1.grad()).collect();
        let pick = |f: fn(&(String, Tensor, Tensor, Tensor)) -> &Tensor| {
            handles(live.iter().map(|&i| f(&self.params[i])))
        };
        let (params, m, v) = (pick(|e| &e.1), pick(|e| &e.2), pick(|e| &e.3));
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
pub fn clip_grad_norm(
    params: &[(String, Tensor, Tensor, Tensor)],
    max_norm: f64,
) -> Result<Tensor> {
    let grads: Vec<Tensor> = params
        .iter()
        .map(|(_, p, _, _)| p.grad())
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
