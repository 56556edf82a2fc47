//! The improved-MeanFlow objective (Geng et al., "Improved Mean Flows", 2025), in the order of
//! the official imf.py `iMeanFlow.forward`: sample (t, r), interpolate, sample the guidance
//! interval and scale, guided target, label dropout, JVP along the network's own velocity, the
//! compound velocity V, two adaptively weighted terms.
//!
//! [`imf_loss`] is a pure function of explicit randomness ([`Draw`]), so golden steps of the
//! official code can be fed to it (tests/parity_imf.rs); [`Draw::sample`] draws that randomness
//! from torch's generator as training does, in the official order of draws ([`RawDraw`]).
//!
//! Where the paper and the code differ the code is followed, and the paper's form is a switch:
//! [`UncondOmega`] (the scale the unconditional velocity is conditioned on).
use crate::meanflow::jvp::DualLevel;
use crate::meanflow::loss::{drop_first, interpolate};
use crate::meanflow::JvpMethod;
use crate::model::imf::{Conditions, Heads};
use crate::model::{AttentionKernel, Dual, ImfDiT};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// The guidance scale the unconditional velocity v_u of the target is conditioned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UncondOmega {
    /// omega = 1: the official imf.py (`v_fn` conditions the null-label half on ones).
    #[default]
    One,
    /// The sample's own omega, as the paper's Algorithm 2 writes it (the official repository's
    /// issue 8 points out that the code differs).
    Omega,
}

/// The objective's constants (official configs/default.py and imf.py defaults in
/// [`ImfConfig::official`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImfConfig {
    /// t and r are the max and min of two draws of sigmoid(N(p_mean, p_std)).
    pub p_mean: f64,
    pub p_std: f64,
    /// Fraction of each batch (its first int(B * p) rows) with r = t and interval [0, 1].
    pub data_proportion: f64,
    /// omega ~ omega^-cfg_beta on [1, 1 + s_max].
    pub cfg_beta: f64,
    pub s_max: f64,
    /// Probability of the null label (the first num_drop ~ Binomial(B, p) rows get it).
    pub class_dropout: f64,
    /// Adaptive weight (loss + norm_eps)^norm_p of each term.
    pub norm_p: f64,
    pub norm_eps: f64,
    pub jvp: JvpMethod,
    pub uncond_omega: UncondOmega,
}

impl ImfConfig {
    /// configs/default.py (P_mean -0.4, P_std 1.0, data_proportion 0.5, cfg_beta 1.0,
    /// class_dropout_prob 0.1, norm_p 1.0, norm_eps 0.01) and imf.py's `s_max = 7.0`.
    pub fn official() -> Self {
        Self {
            p_mean: -0.4,
            p_std: 1.0,
            data_proportion: 0.5,
            cfg_beta: 1.0,
            s_max: 7.0,
            class_dropout: 0.1,
            norm_p: 1.0,
            norm_eps: 0.01,
            jvp: JvpMethod::Manual,
            uncond_omega: UncondOmega::One,
        }
    }

    /// The rows of a batch of `b` with r = t: int(b * data_proportion).
    pub fn flow_matching_rows(&self, b: i64) -> i64 {
        ((b as f64 * self.data_proportion) as i64).clamp(0, b)
    }
}

/// The raw randomness of one step, in the official order of `make_rng('gen')` calls: two
/// normals (B,) for t and r, the noise like x, uniforms for t_min ([0, 0.5)) and t_max
/// ([0.5, 1)), the omega uniform, the label-dropout uniforms.
pub struct RawDraw {
    pub t_normal: Tensor,
    pub r_normal: Tensor,
    pub e: Tensor,
    pub t_min_draw: Tensor,
    pub t_max_draw: Tensor,
    pub omega_uniform: Tensor,
    pub drop_uniform: Tensor,
}

impl RawDraw {
    /// Draws for a batch of `global` samples shaped like `x`'s rows, from torch's generator.
    pub fn sample(x: &Tensor, global: i64) -> Self {
        let opts = (x.kind(), x.device());
        let mut shape = x.size();
        shape[0] = global;
        let t_normal = Tensor::randn([global], opts);
        let r_normal = Tensor::randn([global], opts);
        let e = Tensor::randn(shape, opts);
        let t_min_draw = Tensor::rand([global], opts) * 0.5;
        let t_max_draw = Tensor::rand([global], opts) * 0.5 + 0.5;
        let omega_uniform = Tensor::rand([global], opts);
        let drop_uniform = Tensor::rand([global], (Kind::Float, x.device()));
        Self {
            t_normal,
            r_normal,
            e,
            t_min_draw,
            t_max_draw,
            omega_uniform,
            drop_uniform,
        }
    }
}

/// The randomness of one step after the official transformations (all (B,) but `e`).
pub struct Draw {
    /// t >= r; r = t on the first `n_fm` rows.
    pub t: Tensor,
    pub r: Tensor,
    pub e: Tensor,
    /// The guidance interval; [0, 1] on the first `n_fm` rows.
    pub t_min: Tensor,
    pub t_max: Tensor,
    pub omega: Tensor,
    /// A 0-dim int64 tensor on x's device (reading it would stall the device every step).
    pub num_drop: Tensor,
    /// How many of the first rows are flow-matching rows (r = t): their V is u whatever du/dt
    /// is, so their tangent is never computed.
    pub n_fm: i64,
}

/// sigmoid(n * p_std + p_mean), the logit-normal time of a normal draw.
fn logit_normal(cfg: &ImfConfig, normal: &Tensor) -> Tensor {
    (normal * cfg.p_std + cfg.p_mean).sigmoid()
}

/// omega from a uniform u: the inverse CDF of p(omega) ∝ omega^-beta on [1, 1 + s_max]
/// (official `sample_cfg_scale`).
pub fn cfg_scale(cfg: &ImfConfig, u: &Tensor) -> Tensor {
    let log_top = cfg.s_max.ln_1p();
    if cfg.cfg_beta == 1.0 {
        (u * log_top).exp()
    } else {
        let b = cfg.cfg_beta;
        let inner = ((1.0 - b) * log_top).exp_m1();
        ((u * inner).log1p() / (1.0 - b)).exp()
    }
}

impl Draw {
    /// The draws of a batch like `x`, from torch's generator.
    pub fn sample(cfg: &ImfConfig, x: &Tensor) -> Self {
        Self::sample_part(cfg, x, x.size()[0], 0)
    }

    /// The rows [offset, offset + B) of the draw of a batch of `global` samples (a data-parallel
    /// process's part): every process draws the whole batch from the same generator state and
    /// keeps its rows, so N processes train on the draws of one. The flow-matching rows and the
    /// dropped labels stay the first rows of the whole batch.
    pub fn sample_part(cfg: &ImfConfig, x: &Tensor, global: i64, offset: i64) -> Self {
        let whole = Self::new(cfg, RawDraw::sample(x, global));
        let b = x.size()[0];
        if global == b {
            return whole;
        }
        let part = |t: &Tensor| t.narrow(0, offset, b);
        Self {
            t: part(&whole.t),
            r: part(&whole.r),
            e: part(&whole.e),
            t_min: part(&whole.t_min),
            t_max: part(&whole.t_max),
            omega: part(&whole.omega),
            num_drop: (whole.num_drop - offset).clamp(0, b),
            n_fm: (whole.n_fm - offset).clamp(0, b),
        }
    }

    /// The official transformations of the raw draws: ordered logit-normal times with r = t on
    /// the first int(B * data_proportion) rows, the interval [0, 1] on those rows, omega by
    /// [`cfg_scale`], num_drop = #(drop uniform < class_dropout).
    pub fn new(cfg: &ImfConfig, raw: RawDraw) -> Self {
        let b = raw.t_normal.size()[0];
        let n_fm = cfg.flow_matching_rows(b);
        let fm = Tensor::arange(b, (Kind::Int64, raw.t_normal.device())).lt(n_fm);
        let (a, c) = (
            logit_normal(cfg, &raw.t_normal),
            logit_normal(cfg, &raw.r_normal),
        );
        let (t, r) = (a.maximum(&c), a.minimum(&c));
        let r = t.where_self(&fm, &r);
        let t_min = raw.t_min_draw.zeros_like().where_self(&fm, &raw.t_min_draw);
        let t_max = raw.t_max_draw.ones_like().where_self(&fm, &raw.t_max_draw);
        let num_drop = raw.drop_uniform.lt(cfg.class_dropout).sum(Kind::Int64);
        Self {
            omega: cfg_scale(cfg, &raw.omega_uniform),
            t,
            r,
            e: raw.e,
            t_min,
            t_max,
            num_drop,
            n_fm,
        }
    }
}

/// (B,) -> (B, 1, 1, 1), to scale images per sample.
fn per_image(t: &Tensor) -> Tensor {
    t.view([-1, 1, 1, 1])
}

/// 1 - 1/omega, the guidance weight of (v_c - v_u) (and the omega embedder's input).
fn guidance_weight(omega: &Tensor) -> Tensor {
    1.0 - omega.reciprocal()
}

/// The target's velocities (official `guidance_fn`), all without gradient.
pub struct Guided {
    /// v-head at the sample's omega and the class label (h = 0, interval [0, 1]).
    pub v_c_omega: Tensor,
    /// v-head with the null label (at omega 1, or omega: [`UncondOmega`]).
    pub v_u: Tensor,
    /// omega inside the sample's interval [t_min, t_max] (inclusive), 1 outside.
    pub omega_masked: Tensor,
    /// v-head at omega_masked and the class label: the JVP's tangent.
    pub v_c: Tensor,
    /// v_t + (1 - 1/omega)(v_c_omega - v_u) on the flow-matching rows, v_t + (1 -
    /// 1/omega_masked)(v_c - v_u) on the others.
    pub v_g: Tensor,
}

/// The guided velocity and the network's conditional velocity. The official code makes three
/// v-head calls (the doubled batch for v_c_omega and v_u, then v_c); they are one call here,
/// rows being independent, and v_c is not recomputed on the flow-matching rows, where its inputs
/// are v_c_omega's (interval [0, 1] contains every t).
pub fn guidance(
    net: &ImfDiT,
    cfg: &ImfConfig,
    z_t: &Tensor,
    v_t: &Tensor,
    labels: &Tensor,
    draw: &Draw,
) -> Result<Guided> {
    let Draw {
        t,
        t_min,
        t_max,
        omega,
        n_fm,
        ..
    } = draw;
    let b = z_t.size()[0];
    let inside = t.ge_tensor(t_min).logical_and(&t.le_tensor(t_max));
    let omega_masked = omega.where_self(&inside, &omega.ones_like());
    let rest = |x: &Tensor| x.narrow(0, *n_fm, b - n_fm);
    let null = labels.full_like(net.config.null_class());
    let uncond_omega = match cfg.uncond_omega {
        UncondOmega::One => omega.ones_like(),
        UncondOmega::Omega => omega.shallow_clone(),
    };
    let zs = Tensor::cat(&[z_t, z_t, &rest(z_t)], 0);
    let ys = Tensor::cat(&[labels, &null, &rest(labels)], 0);
    let omegas = Tensor::cat(&[omega, &uncond_omega, &rest(&omega_masked)], 0);
    let v = tch::no_grad(|| v_head(net, &zs, &omegas, &ys))?;
    let (v_c_omega, v_u) = (v.narrow(0, 0, b), v.narrow(0, b, b));
    let v_c = Tensor::cat(
        &[
            &v_c_omega.narrow(0, 0, *n_fm),
            &v.narrow(0, 2 * b, b - n_fm),
        ],
        0,
    );
    let v_g_fm = v_t + per_image(&guidance_weight(omega)) * (&v_c_omega - &v_u);
    let v_g = v_t + per_image(&guidance_weight(&omega_masked)) * (&v_c - &v_u);
    let fm = per_image(&Tensor::arange(b, (Kind::Int64, z_t.device())).lt(*n_fm));
    Ok(Guided {
        v_g: v_g_fm.where_self(&fm, &v_g),
        v_c_omega,
        v_u,
        omega_masked,
        v_c,
    })
}

/// The v-head at h = 0 and the interval [0, 1] (official `v_cond_fn`), without gradient.
pub fn v_head(net: &ImfDiT, z: &Tensor, omega: &Tensor, y: &Tensor) -> Result<Tensor> {
    let zero = omega.zeros_like();
    let cond = Conditions {
        omega,
        t_min: &zero,
        t_max: &omega.ones_like(),
        y,
    };
    let (_, v) = net.forward(z, &zero, &cond, Heads::V, AttentionKernel::Fused);
    v.ok_or_else(|| no_v_head(net))
}

fn no_v_head(net: &ImfDiT) -> anyhow::Error {
    anyhow::anyhow!(
        "the iMF objective needs the network's v-head, and this network (depth {}) was built without it (an inference checkpoint): train from a full checkpoint or from scratch",
        net.config.depth
    )
}

/// The network's outputs of the differentiated call: u and v keep their autograd graphs, du/dt
/// is detached.
pub struct Jvp {
    pub u: Tensor,
    pub du_dt: Tensor,
    pub v: Tensor,
}

/// (u, du/dt, v) of (u, v) = net(z_t, h = t - r, omega, t_min, t_max | y) with du/dt along
/// (dz, dt, dr) = (v_c, 1, 0), i.e. dh = 1 (official `jax.jvp(u_fn, (z_t, t, r), (v_c, 1, 0),
/// has_aux=True)`). With the manual JVP, du/dt is computed only for rows `skip..` (zero before:
/// rows with t = r, whose V ignores it).
#[allow(clippy::too_many_arguments)]
pub fn u_and_du_dt(
    net: &ImfDiT,
    cfg: &ImfConfig,
    z_t: &Tensor,
    h: &Tensor,
    cond: &Conditions,
    v_c: &Tensor,
    skip: i64,
) -> Result<Jvp> {
    let no_v = || no_v_head(net);
    match cfg.jvp {
        JvpMethod::Manual => {
            let b = z_t.size()[0];
            let from = skip.clamp(0, b);
            let dual = |p: &Tensor, d: &Tensor| {
                Dual::from_row(p.shallow_clone(), d.narrow(0, from, b - from), from)
            };
            let (u, v) = net.forward_dual(
                &dual(z_t, v_c),
                &dual(h, &h.ones_like()),
                cond,
                Heads::Both,
                AttentionKernel::Fused,
            );
            let u = u.expect("the u-head is always there");
            Ok(Jvp {
                du_dt: u.tangent_or_zeros().detach(),
                u: u.primal,
                v: v.ok_or_else(no_v)?,
            })
        }
        JvpMethod::ForwardAd => {
            let level = DualLevel::enter()?;
            let z = level.make_dual(z_t, v_c);
            let h = level.make_dual(h, &h.ones_like());
            let (u, v) = net.forward(&z, &h, cond, Heads::Both, AttentionKernel::Explicit);
            let (u, du_dt) = level.unpack(&u.expect("the u-head is always there"));
            let (v, _) = level.unpack(&v.ok_or_else(no_v)?);
            Ok(Jvp {
                u,
                du_dt: du_dt.detach(),
                v,
            })
        }
    }
}

/// Per-sample squared error summed over (C, H, W).
fn sum_sq(a: &Tensor) -> Tensor {
    a.square()
        .sum_dim_intlist([1, 2, 3].as_slice(), false, None::<Kind>)
}

/// loss / sg((loss + eps)^p), and the weight.
fn adaptive(cfg: &ImfConfig, loss: &Tensor) -> (Tensor, Tensor) {
    let weight = (loss.detach() + cfg.norm_eps).pow_tensor_scalar(cfg.norm_p);
    (loss / &weight, weight)
}

/// Everything one step computes; `loss` carries the gradient, the rest is detached.
pub struct Terms {
    pub loss: Tensor,
    /// The official logged metrics: mean((V - v_g)^2) and mean((v - v_g)^2) over all elements.
    pub loss_u_mse: Tensor,
    pub loss_v_mse: Tensor,
    pub z_t: Tensor,
    pub v_t: Tensor,
    pub guided: Guided,
    /// The target after label dropout.
    pub v_g: Tensor,
    pub y_inp: Tensor,
    pub u: Tensor,
    /// With the manual JVP, zero on the first [`Draw::n_fm`] rows (not computed).
    pub du_dt: Tensor,
    /// The v-head's output of the differentiated call.
    pub v: Tensor,
    /// The compound velocity V = u + (t - r) sg(du/dt).
    pub compound: Tensor,
    pub loss_u_per_sample: Tensor,
    pub loss_u_weight: Tensor,
    pub loss_v_per_sample: Tensor,
    pub loss_v_weight: Tensor,
}

/// One improved-MeanFlow step's loss: the mean over rows of ||V - v_g||^2 and ||v - v_g||^2, each
/// divided by sg((itself + eps)^p). x (B, C, H, W), labels (B,) int64.
pub fn imf_loss(
    net: &ImfDiT,
    cfg: &ImfConfig,
    x: &Tensor,
    labels: &Tensor,
    draw: &Draw,
) -> Result<Terms> {
    if !net.config.v_head {
        bail!(no_v_head(net));
    }
    let (z_t, v_t) = interpolate(x, &draw.t, &draw.e);
    let guided = guidance(net, cfg, &z_t, &v_t, labels, draw)?;
    // The first num_drop rows get the null label and the target v_t (official `cond_drop`).
    let null = net.config.null_class();
    let (y_inp, v_g) = drop_first(null, labels, &v_t, &guided.v_g, &draw.num_drop);
    // The differentiated call sees the unmasked omega and the sampled interval.
    let cond = Conditions {
        omega: &draw.omega,
        t_min: &draw.t_min,
        t_max: &draw.t_max,
        y: &y_inp,
    };
    let h = &draw.t - &draw.r;
    let Jvp { u, du_dt, v } = u_and_du_dt(net, cfg, &z_t, &h, &cond, &guided.v_c, draw.n_fm)?;
    let compound = &u + per_image(&h) * &du_dt;
    let loss_u_per_sample = sum_sq(&(&compound - &v_g));
    let loss_v_per_sample = sum_sq(&(&v - &v_g));
    let (loss_u, loss_u_weight) = adaptive(cfg, &loss_u_per_sample);
    let (loss_v, loss_v_weight) = adaptive(cfg, &loss_v_per_sample);
    let loss = (loss_u + loss_v).mean(None::<Kind>);
    let mse = |a: &Tensor| (a - &v_g).square().mean(None::<Kind>).detach();
    Ok(Terms {
        loss,
        loss_u_mse: mse(&compound),
        loss_v_mse: mse(&v),
        z_t,
        v_t,
        guided,
        v_g,
        y_inp,
        u: u.detach(),
        du_dt,
        v: v.detach(),
        compound: compound.detach(),
        loss_u_per_sample: loss_u_per_sample.detach(),
        loss_u_weight,
        loss_v_per_sample: loss_v_per_sample.detach(),
        loss_v_weight,
    })
}
