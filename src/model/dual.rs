//! Values that may carry a tangent. The SiT's forward is written once over [`MaybeDual`]: a
//! plain [`Tensor`] gives the ordinary forward; a [`Dual`] carries each value's tangent beside
//! it and gives the JVP in the same pass, by hand-written tangent rules.
//!
//! Why by hand: libtorch's forward-mode AD records an autograd graph for every tangent op when
//! the parameters require grad (the tangent is a function of them), although MeanFlow uses the
//! tangent only as a stop-gradient target. Here the tangent is computed under no_grad beside a
//! primal that alone carries the graph, and attention's primal may use the fused kernel. Each
//! rule is the forward-AD formula libtorch itself uses for that op (derivatives.yaml), so the
//! two paths agree to rounding (tests/dual.rs; the parity fixtures hold for both).
use crate::device::{handle, shim_tensor};
use crate::ffi::{mfr_add_mul_broadcast, mfr_layer_norm_backward};
use std::os::raw::c_int;
use tch::{nn, Kind, Tensor};

/// acc + big * small with `small` (N, 1, D) broadcast over the tokens of `big` (N, T, D): what
/// addcmul computes, with a backward that does not first multiply `big` by addcmul's `value`
/// (csrc/shim.cpp). For the pass that carries the graph; it has no forward-AD rule. With
/// `into_matmul` (the value feeds a linear layer only), under autocast the result is written
/// in autocast's dtype: the rounding the layer would apply on entry, without the float32 copy.
fn add_mul_broadcast(acc: &Tensor, big: &Tensor, small: &Tensor, into_matmul: bool) -> Tensor {
    let h = handle;
    // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
    shim_tensor("acc + big * small", |out, e, l| unsafe {
        mfr_add_mul_broadcast(h(acc), h(big), h(small), into_matmul as c_int, out, e, l)
    })
    .expect("operands of one modulate or gated residual broadcast together")
}

/// LayerNorm's backward kernel for `grad` (tch does not bind it).
fn layer_norm_backward(grad: &Tensor, x: &Tensor, mean: &Tensor, rstd: &Tensor, d: i64) -> Tensor {
    let h = handle;
    // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
    shim_tensor("LayerNorm backward", |out, e, l| unsafe {
        mfr_layer_norm_backward(h(grad), h(x), h(mean), h(rstd), d, out, e, l)
    })
    .expect("LayerNorm's backward takes what its forward gave")
}

/// LayerNorm epsilon of every SiT norm.
pub const NORM_EPS: f64 = 1e-6;

/// A value the network's ops take: a plain tensor, or a [`Dual`] with its tangent.
pub trait MaybeDual: Sized {
    /// A value with a zero tangent.
    fn constant(value: Tensor) -> Self;
    /// The ordinary value.
    fn primal(&self) -> &Tensor;
    /// A linear shape op (reshape, permute, ...) applied to the value and its tangent alike.
    fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Self;
    fn add(&self, other: &Self) -> Self;
    /// `x W^T + b`.
    fn linear(&self, layer: &nn::Linear) -> Self;
    /// A convolution with kernel = stride = `patch` (the patch embedding).
    fn patch_conv(&self, weight: &Tensor, bias: &Tensor, patch: i64) -> Self;
    fn silu(&self) -> Self;
    fn gelu_tanh(&self) -> Self;
    /// LayerNorm over the last dimension without affine parameters.
    fn normalized(&self) -> Self;
    /// `x (1 + scale) + shift`, scale and shift per sample, broadcast over tokens. Its value
    /// goes into a linear layer only, so under autocast it may come in autocast's dtype.
    fn modulate(&self, shift: &Self, scale: &Self) -> Self;
    /// `x + gate * y`, gate per sample, broadcast over tokens.
    fn gated_add(&self, gate: &Self, y: &Self) -> Self;
    fn chunk(&self, chunks: i64) -> Vec<Self>;
    /// The slices along the first dimension.
    fn unbind(&self) -> Vec<Self>;
    /// softmax(q k^T scale) v over (N, heads, T, head_dim).
    fn attention(q: &Self, k: &Self, v: &Self, scale: f64, fused: bool) -> Self;
    /// [cos(t f), sin(t f)] of a (N,) time, computed in `kind` (float32 in both references;
    /// float64 for the official code's float64 fixtures).
    fn sinusoid(&self, dim: i64, kind: Kind) -> Self;
}

fn sinusoid_args(t: &Tensor, dim: i64, kind: Kind) -> (Tensor, Tensor) {
    let half = dim / 2;
    let freqs = (Tensor::arange(half, (kind, t.device())) * (-(10000f64).ln()) / half).exp();
    let args = t.to_kind(kind).unsqueeze(1) * &freqs.unsqueeze(0);
    (args, freqs)
}

fn explicit_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    (q * scale)
        .matmul(&k.transpose(-2, -1))
        .softmax(-1, None::<Kind>)
        .matmul(v)
}

impl MaybeDual for Tensor {
    fn constant(value: Tensor) -> Self {
        value
    }
    fn primal(&self) -> &Tensor {
        self
    }
    fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        f(self)
    }
    fn add(&self, other: &Self) -> Self {
        self + other
    }
    fn linear(&self, layer: &nn::Linear) -> Self {
        self.linear(&layer.ws, layer.bs.as_ref())
    }
    fn patch_conv(&self, weight: &Tensor, bias: &Tensor, patch: i64) -> Self {
        self.conv2d(weight, Some(bias), [patch, patch], [0, 0], [1, 1], 1)
    }
    fn silu(&self) -> Self {
        Tensor::silu(self)
    }
    fn gelu_tanh(&self) -> Self {
        self.gelu("tanh")
    }
    fn normalized(&self) -> Self {
        let d = self.size()[self.dim() - 1];
        self.layer_norm([d], None::<Tensor>, None::<Tensor>, NORM_EPS, true)
    }
    fn modulate(&self, shift: &Self, scale: &Self) -> Self {
        shift
            .unsqueeze(1)
            .addcmul(self, &(scale.unsqueeze(1) + 1.0))
    }
    fn gated_add(&self, gate: &Self, y: &Self) -> Self {
        self.addcmul(&gate.unsqueeze(1), y)
    }
    fn chunk(&self, chunks: i64) -> Vec<Self> {
        Tensor::chunk(self, chunks, -1)
    }
    fn unbind(&self) -> Vec<Self> {
        Tensor::unbind(self, 0)
    }
    fn attention(q: &Self, k: &Self, v: &Self, scale: f64, fused: bool) -> Self {
        if fused {
            Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, false, scale, false)
        } else {
            explicit_attention(q, k, v, scale)
        }
    }
    fn sinusoid(&self, dim: i64, kind: Kind) -> Self {
        let (args, _) = sinusoid_args(self, dim, kind);
        Tensor::cat(&[args.cos(), args.sin()], -1).to_kind(self.kind())
    }
}

/// A value and its tangent (None: zero, which skips the work). The tangent may cover only the
/// rows `from..` of the value (samples are independent through the network): the earlier rows'
/// tangent is zero and never computed, as MeanFlow's r = t rows need no du/dt.
pub struct Dual {
    pub primal: Tensor,
    pub tangent: Option<Tensor>,
    /// The first row (along dimension 0) the tangent covers.
    pub from: i64,
}

impl Dual {
    pub fn new(primal: Tensor, tangent: Tensor) -> Self {
        Self::from_row(primal, tangent, 0)
    }

    /// A value whose tangent is zero on rows `..from` and `tangent` on rows `from..`.
    pub fn from_row(primal: Tensor, tangent: Tensor, from: i64) -> Self {
        Self {
            primal,
            tangent: Some(tangent),
            from,
        }
    }

    /// The tangent of every row, its zero rows (or a zero tangent) materialised.
    pub fn tangent_or_zeros(&self) -> Tensor {
        match &self.tangent {
            None => self.primal.zeros_like(),
            Some(t) if self.from == 0 => t.shallow_clone(),
            Some(t) => {
                let mut shape = t.size();
                shape[0] = self.from;
                let zeros = Tensor::zeros(shape, (t.kind(), t.device()));
                Tensor::cat(&[&zeros, t], 0)
            }
        }
    }

    /// The rows of a value of this pass that the tangents cover.
    fn rows(&self, x: &Tensor) -> Tensor {
        rows(x, self.from)
    }

    /// The parts a linear split op gives, value and tangent alike.
    fn split(&self, f: impl Fn(&Tensor) -> Vec<Tensor>) -> Vec<Self> {
        let tangents = self.tangent.as_ref().map(&f);
        f(&self.primal)
            .into_iter()
            .enumerate()
            .map(|(i, p)| Self {
                primal: p,
                tangent: tangents.as_ref().map(|t| t[i].shallow_clone()),
                from: self.from,
            })
            .collect()
    }

    /// A new dual from a primal op and a tangent rule (over this dual's rows) run without
    /// autograd recording.
    fn with(&self, primal: Tensor, tangent: Option<impl FnOnce() -> Tensor>) -> Self {
        Self {
            primal,
            tangent: tangent.map(|rule| tch::no_grad(rule)),
            from: self.from,
        }
    }
}

/// Rows `from..` of `x`.
fn rows(x: &Tensor, from: i64) -> Tensor {
    if from == 0 {
        x.shallow_clone()
    } else {
        x.narrow(0, from, x.size()[0] - from)
    }
}

/// The first row the tangents of an op's operands cover (all of a pass's tangents agree).
fn from_of(operands: &[&Dual]) -> i64 {
    let mut covered = operands
        .iter()
        .filter(|d| d.tangent.is_some())
        .map(|d| d.from);
    let from = covered.next().unwrap_or(0);
    debug_assert!(covered.all(|f| f == from), "tangents over different rows");
    from
}

/// a + b where either may be absent (zero).
fn sum(a: Option<Tensor>, b: Option<Tensor>) -> Option<Tensor> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, None) => a,
        (None, b) => b,
    }
}

/// acc + x * y in one kernel, where acc may be absent (zero) and the term is skipped, `y` not
/// even computed, when its tangent factor `x` is absent.
fn add_product(
    acc: Option<Tensor>,
    x: Option<&Tensor>,
    y: impl FnOnce() -> Tensor,
) -> Option<Tensor> {
    match (acc, x) {
        (acc, None) => acc,
        (Some(acc), Some(x)) => Some(acc.addcmul(x, &y())),
        (None, Some(x)) => Some(x * y()),
    }
}

impl MaybeDual for Dual {
    fn constant(value: Tensor) -> Self {
        Self {
            primal: value,
            tangent: None,
            from: 0,
        }
    }
    fn primal(&self) -> &Tensor {
        &self.primal
    }
    fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        Self {
            primal: f(&self.primal),
            tangent: self.tangent.as_ref().map(&f),
            from: self.from,
        }
    }
    fn add(&self, other: &Self) -> Self {
        let tangent = tch::no_grad(|| {
            sum(
                self.tangent.as_ref().map(|t| t.shallow_clone()),
                other.tangent.as_ref().map(|t| t.shallow_clone()),
            )
        });
        Self {
            primal: &self.primal + &other.primal,
            tangent,
            from: from_of(&[self, other]),
        }
    }
    fn linear(&self, layer: &nn::Linear) -> Self {
        let rule = self
            .tangent
            .as_ref()
            .map(|t| move || t.linear(&layer.ws, None::<Tensor>));
        self.with(MaybeDual::linear(&self.primal, layer), rule)
    }
    fn patch_conv(&self, weight: &Tensor, bias: &Tensor, patch: i64) -> Self {
        let rule = self
            .tangent
            .as_ref()
            .map(|t| move || t.conv2d(weight, None::<Tensor>, [patch, patch], [0, 0], [1, 1], 1));
        self.with(self.primal.patch_conv(weight, bias, patch), rule)
    }
    fn silu(&self) -> Self {
        let rule = self
            .tangent
            .as_ref()
            .map(|t| || self.rows(&self.primal).silu_backward(t));
        self.with(MaybeDual::silu(&self.primal), rule)
    }
    fn gelu_tanh(&self) -> Self {
        let rule = self
            .tangent
            .as_ref()
            .map(|t| || self.rows(&self.primal).gelu_backward(t, "tanh"));
        self.with(self.primal.gelu_tanh(), rule)
    }
    fn normalized(&self) -> Self {
        let d = self.primal.size()[self.primal.dim() - 1];
        let x = &self.primal;
        let (out, mean, rstd) =
            Tensor::native_layer_norm(x, [d], None::<Tensor>, None::<Tensor>, NORM_EPS);
        // d xhat = rstd (dx - mean(dx) - xhat mean(xhat dx)): a symmetric Jacobian applied to
        // dx, which is what LayerNorm's backward kernel computes for a gradient dx, in one pass.
        let rule = self.tangent.as_ref().map(|t| {
            move || {
                let (x, mean, rstd) = (self.rows(x), self.rows(&mean), self.rows(&rstd));
                layer_norm_backward(&t.to_kind(x.kind()), &x, &mean, &rstd, d)
            }
        });
        self.with(out, rule)
    }
    fn modulate(&self, shift: &Self, scale: &Self) -> Self {
        // SiT feeds every modulated value to a linear layer.
        let one_plus_scale = scale.primal.unsqueeze(1) + 1.0;
        let primal = add_mul_broadcast(
            &shift.primal.unsqueeze(1),
            &self.primal,
            &one_plus_scale,
            true,
        );
        let from = from_of(&[self, shift, scale]);
        // dshift + dx (1 + scale) + x dscale
        let tangent = tch::no_grad(|| {
            let dshift = shift.tangent.as_ref().map(|t| t.unsqueeze(1));
            let dx = add_product(dshift, self.tangent.as_ref(), || {
                rows(&one_plus_scale, from)
            });
            let dscale = scale.tangent.as_ref().map(|t| t.unsqueeze(1));
            add_product(dx, dscale.as_ref(), || rows(&self.primal, from))
        });
        Self {
            primal,
            tangent,
            from,
        }
    }
    fn gated_add(&self, gate: &Self, y: &Self) -> Self {
        let primal = add_mul_broadcast(&self.primal, &y.primal, &gate.primal.unsqueeze(1), false);
        let from = from_of(&[self, gate, y]);
        // dx + dgate y + gate dy
        let tangent = tch::no_grad(|| {
            let dgate = gate.tangent.as_ref().map(|t| t.unsqueeze(1));
            let dx = self.tangent.as_ref().map(|t| t.shallow_clone());
            let dx = add_product(dx, dgate.as_ref(), || rows(&y.primal, from));
            add_product(dx, y.tangent.as_ref(), || {
                rows(&gate.primal, from).unsqueeze(1)
            })
        });
        Self {
            primal,
            tangent,
            from,
        }
    }
    fn chunk(&self, chunks: i64) -> Vec<Self> {
        self.split(|t| Tensor::chunk(t, chunks, -1))
    }
    fn unbind(&self) -> Vec<Self> {
        self.split(|t| Tensor::unbind(t, 0))
    }
    fn attention(q: &Self, k: &Self, v: &Self, scale: f64, fused: bool) -> Self {
        let primal = Tensor::attention(&q.primal, &k.primal, &v.primal, scale, fused);
        let from = from_of(&[q, k, v]);
        let tangent = tch::no_grad(|| {
            if q.tangent.is_none() && k.tangent.is_none() && v.tangent.is_none() {
                return None;
            }
            let (q_rows, k_rows, v_rows) = (
                rows(&q.primal, from),
                rows(&k.primal, from),
                rows(&v.primal, from),
            );
            // Batched products over (N heads, T, head_dim), each operand made contiguous once.
            let mut size = q_rows.size();
            let flat = |x: &Tensor| x.reshape([-1, size[2], size[3]]);
            let qs = flat(&(&q_rows * scale));
            let kt = flat(&k_rows).transpose(1, 2);
            // The fused primal keeps no probabilities: recompute them for the tangent.
            let p = qs.bmm(&kt).softmax(-1, None::<Kind>);
            // dS = dq k^T scale + q dk^T scale
            let ds = q.tangent.as_ref().map(|dq| flat(&(dq * scale)).bmm(&kt));
            let ds = match (ds, k.tangent.as_ref()) {
                (ds, None) => ds,
                (None, Some(dk)) => Some(qs.bmm(&flat(dk).transpose(1, 2))),
                (Some(ds), Some(dk)) => Some(ds.baddbmm(&qs, &flat(dk).transpose(1, 2), 1, 1)),
            };
            // Softmax's Jacobian is symmetric: its backward kernel applied to dS is dP.
            let dp = ds.map(|ds| {
                Tensor::internal_softmax_backward_data(&ds.to_kind(p.kind()), &p, -1, p.kind())
            });
            // d out = dP v + P dv
            let dout = dp.map(|dp| dp.bmm(&flat(&v_rows)));
            let dout = match (dout, v.tangent.as_ref()) {
                (dout, None) => dout,
                (None, Some(dv)) => Some(p.bmm(&flat(dv))),
                (Some(dout), Some(dv)) => Some(dout.baddbmm(&p, &flat(dv), 1, 1)),
            };
            size[0] = -1;
            dout.map(|o| o.reshape(size.as_slice()))
        });
        Self {
            primal,
            tangent,
            from,
        }
    }
    fn sinusoid(&self, dim: i64, kind: Kind) -> Self {
        let primal = self.primal.sinusoid(dim, kind);
        // libtorch's rules: mul -> dt * f, cos -> d * -sin, sin -> d * cos, casts -> casts.
        let rule = self.tangent.as_ref().map(|t| {
            move || {
                let (args, freqs) = sinusoid_args(&self.rows(&self.primal), dim, kind);
                let dargs = t.to_kind(kind).unsqueeze(1) * freqs.unsqueeze(0);
                Tensor::cat(&[&dargs * -args.sin(), &dargs * args.cos()], -1).to_kind(t.kind())
            }
        });
        self.with(primal, rule)
    }
}
