//! The MeanFlow objective (Geng et al. 2025, Sec. 4 and Alg. 1), in the order of the official
//! meanflow.py: noise distribution, guidance, label dropout, JVP, target, adaptive weighting.
//!
//! [`meanflow_loss`] is a pure function of explicit randomness ([`Draw`]), so it can be checked
//! against golden fixtures; [`Draw::sample`] draws that randomness as training does.
use super::jvp::jvp;
use crate::model::{AttentionKernel, Dual, SiT};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// The distribution both times are drawn from before ordering (paper Table 1d).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum TimeSampler {
    /// sigmoid(N(p_mean, p_std))
    LogitNormal {
        p_mean: f64,
        p_std: f64,
    },
    Uniform,
}

/// Classifier-free guidance folded into the target, active for t_start <= t <= t_end.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Guidance {
    pub omega: f64,
    pub kappa: f64,
    pub t_start: f64,
    pub t_end: f64,
}

impl Guidance {
    /// omega = 1, kappa = 0 leaves v unchanged: no guidance forward is needed.
    pub fn is_identity(&self) -> bool {
        self.omega == 1.0 && self.kappa == 0.0
    }
}

/// The tangent (dz, dr, dt) = (v_g, dr, dt) of the JVP (paper Table 1b; (v, 0, 1) is correct).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tangent {
    pub dr: f64,
    pub dt: f64,
}

/// How du/dt is computed. Both give the same numbers (to rounding); `Manual` records no
/// autograd graph for the tangent and lets attention's primal use the fused kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JvpMethod {
    /// Hand-written tangent rules carried beside the primal ([`crate::model::Dual`]).
    Manual,
    /// libtorch's forward-mode AD through the plain network (the reference's torch.func.jvp).
    ForwardAd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeanFlowConfig {
    pub time_sampler: TimeSampler,
    /// Fraction of each batch (its first samples) with r = t.
    pub data_proportion: f64,
    pub guidance: Guidance,
    /// Probability of the null label (the first num_drop ~ Binomial(B, p) samples get it).
    pub class_dropout: f64,
    pub tangent: Tangent,
    pub jvp: JvpMethod,
    /// Adaptive weight (loss + norm_eps)^norm_p.
    pub norm_p: f64,
    pub norm_eps: f64,
}

/// The randomness of one step: times t >= r (B,), noise e like x, and how many of the first
/// samples lose their label.
pub struct Draw {
    pub t: Tensor,
    pub r: Tensor,
    pub e: Tensor,
    /// A 0-dim int64 tensor on x's device (reading it would stall the device every step).
    pub num_drop: Tensor,
    /// How many of the first samples have r = t by construction (data_proportion): their
    /// target is v_g whatever du/dt is, so their tangent is never computed.
    pub r_equals_t: i64,
}

impl Draw {
    /// Draws (t, r), e and num_drop from torch's generator, as the reference does.
    pub fn sample(cfg: &MeanFlowConfig, x: &Tensor) -> Self {
        Self::sample_part(cfg, x, x.size()[0], 0)
    }

    /// The rows [offset, offset + B) of the draw of a batch of `global` samples, for the B
    /// samples of `x` (a data-parallel process's part of the batch): every process draws the
    /// whole batch's (t, r), e and label-drop count from the same generator state and keeps its
    /// rows, so N processes train on the draws of one. The r = t rows and the dropped labels
    /// stay the first rows of the whole batch.
    pub fn sample_part(cfg: &MeanFlowConfig, x: &Tensor, global: i64, offset: i64) -> Self {
        let b = x.size()[0];
        let opts = (x.kind(), x.device());
        let one = || match cfg.time_sampler {
            TimeSampler::LogitNormal { p_mean, p_std } => {
                (Tensor::randn([global], opts) * p_std + p_mean).sigmoid()
            }
            TimeSampler::Uniform => Tensor::rand([global], opts),
        };
        let (a, c) = (one(), one());
        let (t, r) = (a.maximum(&c), a.minimum(&c));
        let mut shape = x.size();
        shape[0] = global;
        let e = Tensor::randn(shape, opts);
        let num_drop = Tensor::rand([global], (Kind::Float, x.device()))
            .lt(cfg.class_dropout)
            .sum(Kind::Int64);
        let whole = Self::with_times(cfg, t, r, e, num_drop);
        if global == b {
            return whole;
        }
        Self {
            t: whole.t.narrow(0, offset, b),
            r: whole.r.narrow(0, offset, b),
            e: whole.e.narrow(0, offset, b),
            num_drop: (whole.num_drop - offset).clamp(0, b),
            r_equals_t: (whole.r_equals_t - offset).clamp(0, b),
        }
    }

    /// From ordered times (t >= r): applies data_proportion, r = t on the first floor(B * proportion).
    pub fn new(cfg: &MeanFlowConfig, t: Tensor, r: Tensor, e: Tensor, num_drop: i64) -> Self {
        let num_drop = Tensor::from(num_drop).to_device(t.device());
        Self::with_times(cfg, t, r, e, num_drop)
    }

    fn with_times(cfg: &MeanFlowConfig, t: Tensor, r: Tensor, e: Tensor, num_drop: Tensor) -> Self {
        let b = t.size()[0];
        let equal = (b as f64 * cfg.data_proportion).floor() as i64;
        let mask = Tensor::arange(b, (Kind::Int64, t.device())).lt(equal);
        let r = t.where_self(&mask, &r);
        Self {
            t,
            r,
            e,
            num_drop,
            r_equals_t: equal,
        }
    }
}

/// Everything one step computes; `loss` carries the gradient, the rest is detached.
pub struct Terms {
    pub loss: Tensor,
    pub v_loss: Tensor,
    pub z_t: Tensor,
    pub v: Tensor,
    pub v_g: Tensor,
    pub y_inp: Tensor,
    pub u: Tensor,
    /// du/dt; with the manual JVP, zero on the first [`Draw::r_equals_t`] rows (not computed:
    /// their target does not use it).
    pub du_dt: Tensor,
    pub u_tgt: Tensor,
    pub per_sample_loss: Tensor,
    pub adaptive_weight: Tensor,
}

/// (B,) -> (B, 1, 1, 1), to scale images per sample.
fn per_image(t: &Tensor) -> Tensor {
    t.view([-1, 1, 1, 1])
}

/// z_t = (1 - t) x + t e and v = e - x.
pub fn interpolate(x: &Tensor, t: &Tensor, e: &Tensor) -> (Tensor, Tensor) {
    let t = per_image(t);
    ((1.0 - &t) * x + &t * e, e - x)
}

/// The instantaneous velocity v(z, t | y) = u(z, r = t, t | y), without gradient.
pub fn velocity(net: &SiT, z: &Tensor, t: &Tensor, y: &Tensor) -> Tensor {
    tch::no_grad(|| net.forward(z, t, t, y, AttentionKernel::Fused))
}

/// The guided velocity v_g = omega v + (1 - omega - kappa) v(null) + kappa v(y) inside the
/// t-window, v outside it. With kappa = 0 it is written v(null) + omega (v - v(null)), as the
/// official code writes it. Returns v_g and the unconditional velocity it used (if any).
pub fn guide(
    net: &SiT,
    g: &Guidance,
    z_t: &Tensor,
    t: &Tensor,
    v: &Tensor,
    labels: &Tensor,
) -> (Tensor, Option<Tensor>) {
    if g.is_identity() {
        return (v.shallow_clone(), None);
    }
    let window = per_image(&t.ge(g.t_start).logical_and(&t.le(g.t_end)));
    let opts = (v.kind(), v.device());
    let omega = Tensor::full([1], g.omega, opts).where_self(&window, &Tensor::ones([1], opts));
    let null = labels.full_like(net.config.null_class());
    if g.kappa == 0.0 {
        let v_uncond = velocity(net, z_t, t, &null);
        return (&v_uncond + &omega * (v - &v_uncond), Some(v_uncond));
    }
    // Both guidance velocities in one batched call: rows are independent, so this is the same
    // function, with twice the rows per kernel (it matters at XL/2's batch of 32).
    let both = velocity(
        net,
        &Tensor::cat(&[z_t, z_t], 0),
        &Tensor::cat(&[t, t], 0),
        &Tensor::cat(&[&null, labels], 0),
    );
    let (v_uncond, v_cond) = (
        both.narrow(0, 0, z_t.size()[0]),
        both.narrow(0, z_t.size()[0], z_t.size()[0]),
    );
    let kappa = Tensor::full([1], g.kappa, opts).where_self(&window, &Tensor::zeros([1], opts));
    let v_g = &omega * v + (1.0 - &omega - &kappa) * &v_uncond + &kappa * v_cond;
    (v_g, Some(v_uncond))
}

/// The first num_drop samples get the null label, and their target velocity is plain v.
pub fn drop_labels(
    net: &SiT,
    labels: &Tensor,
    v: &Tensor,
    v_g: &Tensor,
    num_drop: &Tensor,
) -> (Tensor, Tensor) {
    drop_first(net.config.null_class(), labels, v, v_g, num_drop)
}

/// [`drop_labels`] with the null class given: what improved MeanFlow's objective does too.
pub fn drop_first(
    null: i64,
    labels: &Tensor,
    v: &Tensor,
    v_g: &Tensor,
    num_drop: &Tensor,
) -> (Tensor, Tensor) {
    let b = labels.size()[0];
    let dropped = Tensor::arange(b, (Kind::Int64, labels.device())).lt_tensor(num_drop);
    let y_inp = labels.full_like(null).where_self(&dropped, labels);
    (y_inp, v.where_self(&per_image(&dropped), v_g))
}

/// u = u_theta(z_t, r, t | y) and its total derivative d/dt u along (dz, dr, dt) = (v_g, dr, dt).
/// u keeps its autograd graph; du/dt is detached. With the manual JVP, du/dt is computed only
/// for rows `skip..` (zero before: rows whose r = t makes the target ignore it).
#[allow(clippy::too_many_arguments)]
pub fn u_and_du_dt(
    net: &SiT,
    cfg: &MeanFlowConfig,
    z_t: &Tensor,
    t: &Tensor,
    r: &Tensor,
    y: &Tensor,
    v_g: &Tensor,
    skip: i64,
) -> Result<(Tensor, Tensor)> {
    let dt = t.full_like(cfg.tangent.dt);
    let dr = r.full_like(cfg.tangent.dr);
    match cfg.jvp {
        JvpMethod::Manual => {
            let b = z_t.size()[0];
            let from = skip.clamp(0, b);
            if from == b {
                let u = net.forward(z_t, t, r, y, AttentionKernel::Fused);
                let du_dt = u.detach().zeros_like();
                return Ok((u, du_dt));
            }
            let dual = |p: &Tensor, d: &Tensor| {
                Dual::from_row(p.shallow_clone(), d.narrow(0, from, b - from), from)
            };
            let out = net.forward_dual(
                &dual(z_t, v_g),
                &dual(t, &dt),
                &dual(r, &dr),
                y,
                AttentionKernel::Fused,
            );
            let du_dt = out.tangent_or_zeros().detach();
            Ok((out.primal, du_dt))
        }
        JvpMethod::ForwardAd => jvp(
            |x| Ok(net.forward_aten(&x[0], &x[1], &x[2], y, AttentionKernel::Explicit)),
            &[z_t, t, r],
            &[v_g, &dt, &dr],
        ),
    }
}

/// The MeanFlow identity's target: u_tgt = v_g - clip(t - r, 0, 1) du/dt, without gradient.
pub fn target(v_g: &Tensor, t: &Tensor, r: &Tensor, du_dt: &Tensor) -> Tensor {
    (v_g - per_image(&(t - r).clamp(0.0, 1.0)) * du_dt).detach()
}

/// Per-sample squared error summed over (C, H, W).
fn sum_sq(a: &Tensor) -> Tensor {
    a.square()
        .sum_dim_intlist([1, 2, 3].as_slice(), false, None::<Kind>)
}

/// One MeanFlow step's loss: mean over the batch of ||u - u_tgt||^2 / sg((||u - u_tgt||^2 + eps)^p).
pub fn meanflow_loss(
    net: &SiT,
    cfg: &MeanFlowConfig,
    x: &Tensor,
    labels: &Tensor,
    draw: &Draw,
) -> Result<Terms> {
    let Draw {
        t,
        r,
        e,
        num_drop,
        r_equals_t,
    } = draw;
    let (z_t, v) = interpolate(x, t, e);
    let (v_g, _) = guide(net, &cfg.guidance, &z_t, t, &v, labels);
    let (y_inp, v_g) = drop_labels(net, labels, &v, &v_g, num_drop);
    let (u, du_dt) = u_and_du_dt(net, cfg, &z_t, t, r, &y_inp, &v_g, *r_equals_t)?;
    let u_tgt = target(&v_g, t, r, &du_dt);
    let per_sample_loss = sum_sq(&(&u - &u_tgt));
    let adaptive_weight = (per_sample_loss.detach() + cfg.norm_eps).pow_tensor_scalar(cfg.norm_p);
    let loss = (&per_sample_loss / &adaptive_weight).mean(None::<Kind>);
    let v_loss = sum_sq(&(&u - &v)).mean(None::<Kind>).detach();
    Ok(Terms {
        loss,
        v_loss,
        z_t,
        v,
        v_g,
        y_inp,
        u: u.detach(),
        du_dt,
        u_tgt,
        per_sample_loss: per_sample_loss.detach(),
        adaptive_weight,
    })
}
