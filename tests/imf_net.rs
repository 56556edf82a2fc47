//! The imfDiT network, the iMF draws and the sampler beyond the golden steps (tests/parity_imf.rs):
//! the hand-written tangent pass against libtorch's forward-mode AD, bf16 autocast, the optional
//! v-head, the parameter count, the draws' distributions and their data-parallel split, the
//! paper's switch, and the sampler's checks.
mod common;
use common::{rel_err, serial};
use meanflow_repro::device::autocast_bf16;
use meanflow_repro::imf::loss::{cfg_scale, guidance, imf_loss, u_and_du_dt, v_head, Draw};
use meanflow_repro::imf::sampler::{self, SamplingGuidance};
use meanflow_repro::imf::{ImfConfig, UncondOmega};
use meanflow_repro::meanflow::jvp::DualLevel;
use meanflow_repro::meanflow::JvpMethod;
use meanflow_repro::model::imf::{Conditions, Heads};
use meanflow_repro::model::{AttentionKernel, Dual, ImfDiT, ImfDiTConfig, TimeEmbedding};
use tch::{nn, Device, Kind, Tensor};

/// A small network of every kind of block: 2 shared + 2 + 2 head blocks, 3 heads of 8, patch 2.
fn small_config() -> ImfDiTConfig {
    ImfDiTConfig {
        input_size: 8,
        patch_size: 2,
        in_channels: 3,
        hidden_size: 24,
        depth: 4,
        num_heads: 3,
        aux_head_depth: 2,
        num_classes: 5,
        num_class_tokens: 2,
        num_time_tokens: 3,
        num_cfg_tokens: 1,
        num_interval_tokens: 2,
        time_embedding: TimeEmbedding::Float64,
        v_head: true,
    }
}

/// A float64 (or float32) CPU network with every parameter drawn at random (the official init
/// zeroes the gates and the final layers, which would hide most of the network).
fn random_network(config: &ImfDiTConfig, kind: Kind, seed: i64) -> (nn::VarStore, ImfDiT) {
    tch::manual_seed(seed);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = ImfDiT::new(&vs.root(), config).unwrap();
    if kind == Kind::Double {
        vs.double();
    }
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            let centre = if name.ends_with("norm.weight")
                || name.contains("norm1")
                || name.contains("norm2")
            {
                1.0
            } else {
                0.0
            };
            let noise = v.randn_like() * 0.3 + centre;
            v.copy_(&noise);
        }
    });
    (vs, net)
}

struct Inputs {
    x: Tensor,
    h: Tensor,
    omega: Tensor,
    t_min: Tensor,
    t_max: Tensor,
    y: Tensor,
}

impl Inputs {
    fn new(kind: Kind) -> Self {
        let opts = (kind, Device::Cpu);
        let v = |s: &[f64]| Tensor::from_slice(s).to_kind(kind);
        Self {
            x: Tensor::randn([4, 3, 8, 8], opts),
            h: v(&[0.0, 0.6, 0.05, 1.0]),
            omega: v(&[1.0, 2.5, 7.9, 4.0]),
            t_min: v(&[0.0, 0.1, 0.45, 0.3]),
            t_max: v(&[1.0, 0.6, 0.9, 0.55]),
            y: Tensor::from_slice(&[0i64, 5, 2, 4]),
        }
    }

    fn cond(&self) -> Conditions<'_> {
        Conditions {
            omega: &self.omega,
            t_min: &self.t_min,
            t_max: &self.t_max,
            y: &self.y,
        }
    }
}

#[test]
fn the_dual_pass_equals_forward_mode_ad() {
    // Torch's one global generator: tests that seed it take turns.
    let _serial = serial();
    let (_vs, net) = random_network(&small_config(), Kind::Double, 3);
    let i = Inputs::new(Kind::Double);
    let dx = Tensor::randn_like(&i.x);
    let dh = i.h.ones_like();
    let (u_ad, du_ad, v_ad) = {
        let level = DualLevel::enter().unwrap();
        let (u, v) = net.forward(
            &level.make_dual(&i.x, &dx),
            &level.make_dual(&i.h, &dh),
            &i.cond(),
            Heads::Both,
            AttentionKernel::Explicit,
        );
        let (u, du) = level.unpack(&u.unwrap());
        let (v, _) = level.unpack(&v.unwrap());
        (u, du, v)
    };
    assert!(
        du_ad.abs().max().double_value(&[]) > 0.1,
        "a tangent that matters"
    );
    for kernel in [AttentionKernel::Explicit, AttentionKernel::Fused] {
        // All rows, then the tangent over rows 2.. only (MeanFlow's r = t rows skipped).
        for from in [0, 2] {
            let dual = |p: &Tensor, d: &Tensor| {
                Dual::from_row(p.shallow_clone(), d.narrow(0, from, 4 - from), from)
            };
            let (u, v) = net.forward_dual(
                &dual(&i.x, &dx),
                &dual(&i.h, &dh),
                &i.cond(),
                Heads::Both,
                kernel,
            );
            let u = u.unwrap();
            let what = format!("{kernel:?}, tangent from row {from}");
            // One network, two orders of float64 operations: ~1e-15; 1e-12 leaves room for the
            // fused kernel's own order.
            assert!(
                rel_err(&u.primal, &u_ad) < 1e-13,
                "{what}: u {:.2e}",
                rel_err(&u.primal, &u_ad)
            );
            assert!(rel_err(&v.unwrap(), &v_ad) < 1e-13, "{what}: v");
            let du = u.tangent_or_zeros();
            let err = rel_err(
                &du.narrow(0, from, 4 - from),
                &du_ad.narrow(0, from, 4 - from),
            );
            assert!(err < 1e-12, "{what}: du {err:.2e}");
            assert!(!du.requires_grad(), "{what}: the tangent records no graph");
        }
    }
}

#[test]
fn both_jvp_methods_give_one_loss_and_one_gradient() {
    // Torch's one global generator: tests that seed it take turns.
    let _serial = serial();
    let (vs, net) = random_network(&small_config(), Kind::Double, 4);
    let x = Tensor::randn([6, 3, 8, 8], (Kind::Double, Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 0]);
    let mut out = Vec::new();
    for jvp in [JvpMethod::Manual, JvpMethod::ForwardAd] {
        let cfg = ImfConfig {
            jvp,
            ..ImfConfig::official()
        };
        tch::manual_seed(9);
        let draw = Draw::sample(&cfg, &x);
        for mut v in vs.trainable_variables() {
            v.zero_grad();
        }
        let terms = imf_loss(&net, &cfg, &x, &labels, &draw).unwrap();
        terms.loss.backward();
        let grads: Vec<Tensor> = vs
            .trainable_variables()
            .iter()
            .map(|v| v.grad().reshape([-1]))
            .collect();
        out.push((
            terms.loss.double_value(&[]),
            Tensor::cat(&grads, 0),
            terms.compound,
        ));
    }
    let (manual, ad) = (&out[0], &out[1]);
    assert!(
        (manual.0 - ad.0).abs() < 1e-13 * ad.0.abs(),
        "loss {} vs {}",
        manual.0,
        ad.0
    );
    assert!(
        rel_err(&manual.1, &ad.1) < 1e-12,
        "gradients {:.2e}",
        rel_err(&manual.1, &ad.1)
    );
    assert!(rel_err(&manual.2, &ad.2) < 1e-12, "V");
}

#[test]
fn under_bf16_autocast_the_step_runs_and_stays_near_float32() {
    // Torch's one global generator: tests that seed it take turns.
    let _serial = serial();
    let mut config = small_config();
    config.time_embedding = TimeEmbedding::Float32;
    let (_vs, net) = random_network(&config, Kind::Float, 5);
    let i = Inputs::new(Kind::Float);
    let plain = || {
        let (u, v) = net.forward(&i.x, &i.h, &i.cond(), Heads::Both, AttentionKernel::Fused);
        (u.unwrap(), v.unwrap())
    };
    let (u32_, v32) = tch::no_grad(plain);
    let (u16, v16) = autocast_bf16(Device::Cpu, true, || Ok(tch::no_grad(plain))).unwrap();
    // bf16's unit roundoff (3.9e-3) compounded over 6 blocks: the bench's stated 2e-2.
    for (name, a, b) in [("u", &u16, &u32_), ("v", &v16, &v32)] {
        let err = rel_err(a, b);
        assert!(err < 2e-2 && err > 0.0, "{name} under bf16: {err:.2e}");
    }
    // The manual JVP under autocast against forward-mode AD in float32.
    let x = Tensor::randn([6, 3, 8, 8], (Kind::Float, Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 0]);
    let cfg = ImfConfig::official();
    tch::manual_seed(10);
    let draw = Draw::sample(&cfg, &x);
    let guided = guidance(&net, &cfg, &(&x * 0.5), &x, &labels, &draw).unwrap();
    let h = &draw.t - &draw.r;
    let cond = Conditions {
        omega: &draw.omega,
        t_min: &draw.t_min,
        t_max: &draw.t_max,
        y: &labels,
    };
    let z = &x * 0.5;
    let ad = ImfConfig {
        jvp: JvpMethod::ForwardAd,
        ..cfg.clone()
    };
    let reference = u_and_du_dt(&net, &ad, &z, &h, &cond, &guided.v_c, 0).unwrap();
    let jvp_bf16 = |c: &ImfConfig| {
        autocast_bf16(Device::Cpu, true, || {
            u_and_du_dt(&net, c, &z, &h, &cond, &guided.v_c, 0)
        })
        .unwrap()
    };
    let (manual, by_ad) = (jvp_bf16(&cfg), jvp_bf16(&ad));
    // Against the float32 truth, the hand-written rules under bf16 may lose no more than
    // libtorch's own forward-mode AD under the same autocast (up to a factor for rounding luck).
    let (err_manual, err_ad) = (
        rel_err(&manual.du_dt, &reference.du_dt),
        rel_err(&by_ad.du_dt, &reference.du_dt),
    );
    println!("du/dt under bf16 vs float32: manual {err_manual:.2e}, forward AD {err_ad:.2e}");
    assert!(
        err_manual > 0.0 && err_manual < 2.0 * err_ad,
        "manual {err_manual:.2e}, forward AD {err_ad:.2e}"
    );
    let terms = autocast_bf16(Device::Cpu, true, || {
        imf_loss(&net, &cfg, &x, &labels, &draw)
    })
    .unwrap();
    assert!(terms.loss.double_value(&[]).is_finite());
}

#[test]
fn without_its_v_head_the_network_samples_but_does_not_train() {
    // Torch's one global generator: tests that seed it take turns.
    let _serial = serial();
    let config = ImfDiTConfig {
        v_head: false,
        ..small_config()
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let net = ImfDiT::new(&vs.root(), &config).unwrap();
    let names: Vec<String> = vs.variables().into_keys().collect();
    assert!(!names.iter().any(|n| n.contains("v_heads")));
    assert!(
        names.iter().any(|n| n.starts_with("net.v_final_layer.")),
        "kept, as the official eval network keeps it"
    );
    let i = Inputs::new(Kind::Float);
    let (u, v) = net.forward(&i.x, &i.h, &i.cond(), Heads::Both, AttentionKernel::Fused);
    // The official init zeroes both final layers: a fresh network outputs exactly zero.
    assert_eq!(u.unwrap().abs().max().double_value(&[]), 0.0);
    assert!(v.is_none());
    assert!(v_head(&net, &i.x, &i.omega, &i.y).is_err());
    let cfg = ImfConfig::official();
    let draw = Draw::sample(&cfg, &i.x);
    let err = imf_loss(&net, &cfg, &i.x, &i.y, &draw)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("v-head") && err.contains("inference checkpoint"),
        "{err}"
    );
}

#[test]
fn the_parameter_count_is_the_networks() {
    // Torch's one global generator: tests that seed it take turns.
    let _serial = serial();
    for name in ["iMF-micro/2", "iMF-tiny/2"] {
        for v_head in [true, false] {
            let config = ImfDiTConfig {
                v_head,
                ..ImfDiTConfig::preset(name).unwrap()
            };
            let vs = nn::VarStore::new(Device::Cpu);
            let _net = ImfDiT::new(&vs.root(), &config).unwrap();
            let numel: i64 = vs.variables().values().map(|v| v.numel() as i64).sum();
            assert_eq!(config.parameters(), numel as f64, "{name}, v-head {v_head}");
        }
    }
    let b2 = ImfDiTConfig::preset("iMF-B/2").unwrap();
    assert_eq!(
        (
            b2.shared_depth(),
            b2.mlp_hidden(),
            b2.head_dim(),
            b2.prefix_tokens(),
            b2.total_tokens()
        ),
        (4, 2048, 64, 20, 276)
    );
    let l2 = ImfDiTConfig::preset("iMF-L/2").unwrap();
    assert_eq!(
        (l2.shared_depth(), l2.mlp_hidden(), l2.num_heads),
        (24, 2730, 16)
    );
}

#[test]
fn an_impossible_shape_is_one_sentence() {
    // Torch's one global generator: tests that seed it take turns.
    let _serial = serial();
    for (config, needle) in [
        (
            ImfDiTConfig {
                aux_head_depth: 5,
                ..small_config()
            },
            "aux_head_depth",
        ),
        (
            ImfDiTConfig {
                num_heads: 5,
                ..small_config()
            },
            "heads",
        ),
        (
            ImfDiTConfig {
                hidden_size: 18,
                num_heads: 6,
                ..small_config()
            },
            "even",
        ),
        (
            ImfDiTConfig {
                patch_size: 3,
                ..small_config()
            },
            "patch size",
        ),
        (
            ImfDiTConfig {
                num_cfg_tokens: 0,
                ..small_config()
            },
            "token",
        ),
    ] {
        let vs = nn::VarStore::new(Device::Cpu);
        let err = ImfDiT::new(&vs.root(), &config).err().unwrap().to_string();
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn the_draws_follow_the_official_distributions() {
    // Torch's one global generator: tests that seed it take turns.
    let _serial = serial();
    let cfg = ImfConfig::official();
    let x = Tensor::zeros([4000, 1, 1, 1], (Kind::Double, Device::Cpu));
    tch::manual_seed(1);
    let d = Draw::sample(&cfg, &x);
    let n_fm = 2000;
    assert_eq!(d.n_fm, n_fm);
    let rows = |t: &Tensor, a: i64, b: i64| t.narrow(0, a, b - a);
    let (fm, rest) = (
        |t: &Tensor| rows(t, 0, n_fm),
        |t: &Tensor| rows(t, n_fm, 4000),
    );
    assert!(d.t.ge_tensor(&d.r).all().int64_value(&[]) == 1);
    assert_eq!(fm(&d.t), fm(&d.r));
    assert!(rest(&d.t).gt_tensor(&rest(&d.r)).all().int64_value(&[]) == 1);
    assert_eq!(fm(&d.t_min).abs().max().double_value(&[]), 0.0);
    assert_eq!(fm(&d.t_max).min().double_value(&[]), 1.0);
    let (lo, hi) = (rest(&d.t_min), rest(&d.t_max));
    assert!(lo.min().double_value(&[]) >= 0.0 && lo.max().double_value(&[]) < 0.5);
    assert!(hi.min().double_value(&[]) >= 0.5 && hi.max().double_value(&[]) < 1.0);
    // omega on [1, 8): with beta = 1, P(omega <= w) = ln w / ln 8, so the median is sqrt(8).
    assert!(d.omega.min().double_value(&[]) >= 1.0 && d.omega.max().double_value(&[]) < 8.0);
    let median = d.omega.median().double_value(&[]);
    assert!((median - 8f64.sqrt()).abs() < 0.1, "median omega {median}");
    // ~10% of the rows dropped (binomial sd 19 of 4000).
    let dropped = d.num_drop.int64_value(&[]);
    assert!((320..480).contains(&dropped), "{dropped}");
}

#[test]
fn the_guidance_scale_is_the_inverse_cdf_of_its_power_law() {
    // Torch's one global generator: tests that seed it take turns.
    let _serial = serial();
    // p(w) ∝ w^-beta on [1, 1 + s]: F(w) = (w^(1-b) - 1) / ((1+s)^(1-b) - 1), ln w / ln(1+s) at 1.
    for beta in [1.0, 0.5, 2.0, 3.0] {
        let cfg = ImfConfig {
            cfg_beta: beta,
            ..ImfConfig::official()
        };
        let u = Tensor::linspace(0.0, 0.999, 37, (Kind::Double, Device::Cpu));
        let w = cfg_scale(&cfg, &u);
        let top = 1.0 + cfg.s_max;
        let cdf = if beta == 1.0 {
            w.log() / top.ln()
        } else {
            (w.pow_tensor_scalar(1.0 - beta) - 1.0) / (top.powf(1.0 - beta) - 1.0)
        };
        assert!(
            rel_err(&cdf, &u) < 1e-12,
            "beta {beta}: {:.2e}",
            rel_err(&cdf, &u)
        );
    }
}

#[test]
fn two_halves_of_a_batch_draw_and_lose_what_the_whole_does() {
    // Torch's one global generator: tests that seed it take turns.
    let _serial = serial();
    let (_vs, net) = random_network(&small_config(), Kind::Double, 6);
    let cfg = ImfConfig {
        class_dropout: 0.4,
        ..ImfConfig::official()
    };
    let x = Tensor::randn([8, 3, 8, 8], (Kind::Double, Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 0, 1, 2]);
    tch::manual_seed(21);
    let whole = Draw::sample(&cfg, &x);
    let loss = imf_loss(&net, &cfg, &x, &labels, &whole)
        .unwrap()
        .loss
        .double_value(&[]);
    let mut halves = 0.0;
    for offset in [0, 4] {
        tch::manual_seed(21);
        let part = Draw::sample_part(&cfg, &x.narrow(0, offset, 4), 8, offset);
        assert_eq!(part.t, whole.t.narrow(0, offset, 4));
        assert_eq!(part.omega, whole.omega.narrow(0, offset, 4));
        let terms = imf_loss(
            &net,
            &cfg,
            &x.narrow(0, offset, 4),
            &labels.narrow(0, offset, 4),
            &part,
        )
        .unwrap();
        halves += terms.loss.double_value(&[]) / 2.0;
    }
    assert!(
        (halves - loss).abs() < 1e-12 * loss.abs(),
        "{halves} vs {loss}"
    );
}

#[test]
fn the_papers_switch_conditions_the_unconditional_velocity_on_omega() {
    // Torch's one global generator: tests that seed it take turns.
    let _serial = serial();
    let (_vs, net) = random_network(&small_config(), Kind::Double, 7);
    let x = Tensor::randn([6, 3, 8, 8], (Kind::Double, Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 0]);
    let code = ImfConfig::official();
    tch::manual_seed(2);
    let draw = Draw::sample(&code, &x);
    let null = labels.full_like(5);
    for (switch, omega) in [
        (UncondOmega::One, draw.omega.ones_like()),
        (UncondOmega::Omega, draw.omega.shallow_clone()),
    ] {
        let cfg = ImfConfig {
            uncond_omega: switch,
            ..code.clone()
        };
        let g = guidance(&net, &cfg, &x, &x, &labels, &draw).unwrap();
        let want = v_head(&net, &x, &omega, &null).unwrap();
        assert!(rel_err(&g.v_u, &want) < 1e-13, "{switch:?}");
    }
}

#[test]
fn the_sampler_checks_its_settings_and_runs_its_schedule() {
    // Torch's one global generator: tests that seed it take turns.
    let _serial = serial();
    assert_eq!(
        sampler::uniform_schedule(4),
        vec![1.0, 0.75, 0.5, 0.25, 0.0]
    );
    assert_eq!(sampler::uniform_schedule(1), vec![1.0, 0.0]);
    let (_vs, net) = random_network(&small_config(), Kind::Double, 8);
    let e = Tensor::randn([2, 3, 8, 8], (Kind::Double, Device::Cpu));
    let y = Tensor::from_slice(&[1i64, 5]);
    let ok = SamplingGuidance {
        omega: 8.0,
        t_min: 0.4,
        t_max: 0.65,
    };
    for (bad, needle) in [
        (SamplingGuidance { omega: 0.5, ..ok }, "omega"),
        (
            SamplingGuidance {
                omega: f64::NAN,
                ..ok
            },
            "omega",
        ),
        (SamplingGuidance { t_min: 0.7, ..ok }, "interval"),
        (SamplingGuidance { t_max: 1.5, ..ok }, "interval"),
    ] {
        let err = sampler::sample(&net, &e, &y, &[1.0, 0.0], &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err}");
    }
    assert!(sampler::sample(&net, &e, &y, &[1.0, 0.5], &ok).is_err());
    // Two steps are two single steps, each z - (t - r) u at the same conditioning.
    let two = sampler::sample(&net, &e, &y, &[1.0, 0.3, 0.0], &ok).unwrap();
    let by_hand = sampler::step(
        &net,
        &sampler::step(&net, &e, &y, 1.0, 0.3, &ok),
        &y,
        0.3,
        0.0,
        &ok,
    );
    assert_eq!(two, by_hand);
    let (u, _) = net.forward(
        &e,
        &Tensor::full([2], 1.0, (Kind::Double, Device::Cpu)),
        &Conditions {
            omega: &Tensor::full([2], 8.0, (Kind::Double, Device::Cpu)),
            t_min: &Tensor::full([2], 0.4, (Kind::Double, Device::Cpu)),
            t_max: &Tensor::full([2], 0.65, (Kind::Double, Device::Cpu)),
            y: &y,
        },
        Heads::U,
        AttentionKernel::Explicit,
    );
    let one = sampler::sample(&net, &e, &y, &[1.0, 0.0], &ok).unwrap();
    assert!(rel_err(&one, &(&e - u.unwrap())) < 1e-13);
}
