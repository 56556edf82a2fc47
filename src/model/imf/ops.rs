//! The ops imfDiT needs beyond SiT's ([`MaybeDual`]): RMSNorm with a scale, the product of two
//! values (SwiGLU's gate), a per-channel scale by a parameter (the residual gates),
//! concatenation along the tokens, and the interleaved rotary embedding. Each has a plain-tensor
//! form (ordinary ATen ops, so forward-mode AD also runs through it) and a [`Dual`] form whose
//! tangent rule is the forward-AD formula of those ops, computed without autograd recording
//! beside a primal that alone carries the graph, as in [`crate::model::dual`].
use crate::model::dual::{Dual, MaybeDual};
use tch::{Kind, Tensor};

/// The dtype a normalisation or rotation is computed in: the value's own, raised to float32 for
/// half types (under bf16 autocast q and k come out of their linear layers in bf16; the official
/// code rotates them in float32).
fn compute_kind(x: &Tensor) -> Kind {
    match x.kind() {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        k => k,
    }
}

/// Rows `from..` of `x` (the rows a dual's tangent covers).
fn rows(x: &Tensor, from: i64) -> Tensor {
    if from == 0 {
        x.shallow_clone()
    } else {
        x.narrow(0, from, x.size()[0] - from)
    }
}

/// The first row the tangents of some operands cover (a pass's tangents all agree).
fn from_of(parts: &[&Dual]) -> i64 {
    parts
        .iter()
        .find(|d| d.tangent.is_some())
        .map_or(0, |d| d.from)
}

/// The rotary tables of one sequence: cos and sin of angle[pos, i] = pos * theta^(-2i/hd),
/// (T, hd/2). Computed in float64 (the official code uses float32; its float64 golden steps,
/// float64) and cast to the rotated values' compute dtype on use.
pub fn rope_table(head_dim: i64, tokens: i64, theta: f64) -> (Tensor, Tensor) {
    let half = head_dim / 2;
    let mut angles = Vec::with_capacity((tokens * half) as usize);
    for pos in 0..tokens {
        for i in 0..half {
            // 1 / theta^(2i / hd), as the official `1.0 / (theta ** (arange(0, hd, 2) / hd))`.
            let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            angles.push(pos as f64 * freq);
        }
    }
    let angles = Tensor::from_slice(&angles).view([tokens, half]);
    (angles.cos(), angles.sin())
}

/// RoPE on (N, T, heads, hd): each head's interleaved pairs (x[2i], x[2i+1]) rotated by
/// angle[pos, i], (a, b) -> (a cos - b sin, a sin + b cos) (the official complex product). A
/// linear map of x, so it is also its own tangent rule.
pub fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let size = x.size();
    let (t, hd) = (size[1], size[3]);
    let kind = compute_kind(x);
    let pairs = x.to_kind(kind).reshape([-1, t, size[2], hd / 2, 2]);
    let (a, b) = (pairs.select(-1, 0), pairs.select(-1, 1));
    let table = |c: &Tensor| {
        c.to_kind(kind)
            .to_device(x.device())
            .view([1, t, 1, hd / 2])
    };
    let (cos, sin) = (table(cos), table(sin));
    let re = &a * &cos - &b * &sin;
    let im = &a * &sin + &b * &cos;
    Tensor::stack(&[re, im], -1)
        .reshape([-1, t, size[2], hd])
        .to_kind(x.kind())
}

/// The ops of imfDiT's blocks that [`MaybeDual`] lacks.
pub trait ImfOps: MaybeDual {
    /// `x / sqrt(mean(x^2, last axis) + eps) * weight`.
    fn rms_norm(&self, weight: &Tensor, eps: f64) -> Self;
    /// The elementwise product.
    fn mul(&self, other: &Self) -> Self;
    /// `x * scale`, with `scale` a parameter broadcast over the last axis (no tangent).
    fn scaled(&self, scale: &Tensor) -> Self;
    /// The parts concatenated along `dim` (not 0).
    fn cat(parts: &[Self], dim: i64) -> Self;
}

fn rms_norm_plain(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let x = x.to_kind(compute_kind(x));
    let rstd = (x.square().mean_dim(-1, true, None::<Kind>) + eps).rsqrt();
    x * rstd * weight
}

impl ImfOps for Tensor {
    fn rms_norm(&self, weight: &Tensor, eps: f64) -> Self {
        rms_norm_plain(self, weight, eps)
    }
    fn mul(&self, other: &Self) -> Self {
        self * other
    }
    fn scaled(&self, scale: &Tensor) -> Self {
        self * scale
    }
    fn cat(parts: &[Self], dim: i64) -> Self {
        Tensor::cat(parts, dim)
    }
}

impl ImfOps for Dual {
    fn rms_norm(&self, weight: &Tensor, eps: f64) -> Self {
        let primal = rms_norm_plain(&self.primal, weight, eps);
        // y = x r w with r = (mean(x^2) + eps)^(-1/2): dy = w r (dx - xhat mean(xhat dx)),
        // xhat = x r (dr = -r^3 mean(x dx)).
        let tangent = self.tangent.as_ref().map(|dx| {
            tch::no_grad(|| {
                let x = rows(&self.primal, self.from);
                let kind = compute_kind(&x);
                let (x, dx) = (x.to_kind(kind), dx.to_kind(kind));
                let rstd = (x.square().mean_dim(-1, true, None::<Kind>) + eps).rsqrt();
                let xhat = &x * &rstd;
                let proj = (&xhat * &dx).mean_dim(-1, true, None::<Kind>);
                (dx - xhat * proj) * rstd * weight
            })
        });
        Dual {
            primal,
            tangent,
            from: self.from,
        }
    }
    fn mul(&self, other: &Self) -> Self {
        let from = from_of(&[self, other]);
        // d(ab) = da b + a db
        let tangent = tch::no_grad(|| {
            let left = self
                .tangent
                .as_ref()
                .map(|da| da * rows(&other.primal, from));
            let right = other
                .tangent
                .as_ref()
                .map(|db| rows(&self.primal, from) * db);
            match (left, right) {
                (Some(l), Some(r)) => Some(l + r),
                (l, None) => l,
                (None, r) => r,
            }
        });
        Dual {
            primal: &self.primal * &other.primal,
            tangent,
            from,
        }
    }
    fn scaled(&self, scale: &Tensor) -> Self {
        Dual {
            primal: &self.primal * scale,
            tangent: self.tangent.as_ref().map(|t| tch::no_grad(|| t * scale)),
            from: self.from,
        }
    }
    fn cat(parts: &[Self], dim: i64) -> Self {
        let refs: Vec<&Dual> = parts.iter().collect();
        let from = from_of(&refs);
        let primals: Vec<&Tensor> = parts.iter().map(|d| &d.primal).collect();
        let tangent = parts.iter().any(|d| d.tangent.is_some()).then(|| {
            tch::no_grad(|| {
                let tangents: Vec<Tensor> = parts
                    .iter()
                    .map(|d| match &d.tangent {
                        Some(t) => t.shallow_clone(),
                        None => rows(&d.primal, from).zeros_like(),
                    })
                    .collect();
                Tensor::cat(&tangents, dim)
            })
        });
        Dual {
            primal: Tensor::cat(&primals, dim),
            tangent,
            from,
        }
    }
}
