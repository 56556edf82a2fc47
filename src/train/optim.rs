//! AdamW with its moments in plain view, so checkpoints can hold them. The update is
//! torch.optim.AdamW's (decoupled weight decay, bias-corrected moments, eps outside the root).
use tch::{Kind, Tensor};

pub struct AdamW {
    pub lr: f64,
    pub betas: [f64; 2],
    pub weight_decay: f64,
    pub eps: f64,
    /// Updates taken so far (torch's `step`).
    pub step: i64,
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
            params,
        }
    }

    pub fn zero_grad(&mut self) {
        for (_, p, _, _) in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// One update at learning rate `lr`.
    pub fn update(&mut self, lr: f64) {
        self.step += 1;
        let [b1, b2] = self.betas;
        let bias1 = 1.0 - b1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - b2.powi(self.step as i32)).sqrt();
        tch::no_grad(|| {
            for (_, p, m, v) in &mut self.params {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                if self.weight_decay != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let _ = m.lerp_(&g, 1.0 - b1);
                let _ = v.g_mul_scalar_(b2).addcmul_(&g, &g.g_mul_scalar(1.0 - b2));
                let denom = (v.sqrt() / bias2_sqrt) + self.eps;
                let _ = p.g_add_(&((&*m / denom) * (-lr / bias1)));
            }
        });
    }
}

/// Global L2 norm of the gradients, and gradients scaled down to `max_norm` when above it
/// (0 = never), without a host sync: the norm stays on the device (torch's clip_grad_norm_).
pub fn clip_grad_norm(params: &[(String, Tensor, Tensor, Tensor)], max_norm: f64) -> Tensor {
    let grads: Vec<Tensor> = params
        .iter()
        .map(|(_, p, _, _)| p.grad())
        .filter(|g| g.defined())
        .collect();
    let Some(first) = grads.first() else {
        return Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
    };
    let kind = first.kind();
    let norms: Vec<Tensor> = grads.iter().map(|g| g.norm().to_kind(kind)).collect();
    let total = Tensor::stack(&norms, 0).norm();
    if max_norm > 0.0 {
        let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
        tch::no_grad(|| {
            for g in &grads {
                let _ = g.shallow_clone().g_mul_(&coef.to_kind(g.kind()));
            }
        });
    }
    total
}
