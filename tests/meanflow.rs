//! The objective's pieces that the fixtures do not pin down: the randomness it draws, the
//! guidance window, label dropout, the tangent variants and the few-step sampler.
mod common;

use common::{random_network, rel_err, small_config};
use meanflow_repro::meanflow::loss::{drop_labels, guide, velocity};
use meanflow_repro::meanflow::{meanflow_loss, sampler, Draw, Guidance, Tangent};
use meanflow_repro::model::{AttentionKernel, Conditioning};
use meanflow_repro::spec::MeanFlowSection;
use tch::{Device, Kind, Tensor};

fn floats(t: &Tensor) -> Vec<f64> {
    Vec::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

#[test]
fn drawn_times_are_ordered_and_the_first_share_is_r_equals_t() {
    tch::manual_seed(0);
    let cfg = MeanFlowSection::default().config();
    let x = Tensor::zeros([1000, 1, 2, 2], (Kind::Double, Device::Cpu));
    let d = Draw::sample(&cfg, &x);
    let (t, r) = (floats(&d.t), floats(&d.r));
    assert!(t
        .iter()
        .zip(&r)
        .all(|(t, r)| 0.0 < *r && r <= t && *t < 1.0));
    assert!(t[..750].iter().zip(&r[..750]).all(|(t, r)| t == r));
    assert!(t[750..].iter().zip(&r[750..]).all(|(t, r)| r < t));
    // logit-normal(-0.4, 1): the max of two draws has median sigmoid(-0.4 + 0.545) ~ 0.54.
    let mut sorted = t.clone();
    sorted.sort_by(f64::total_cmp);
    assert!(
        (sorted[500] - 0.536).abs() < 0.04,
        "median of t = {}",
        sorted[500]
    );
    // num_drop ~ Binomial(1000, 0.1): mean 100, sd 9.5.
    let num_drop = d.num_drop.int64_value(&[]);
    assert!((60..140).contains(&num_drop), "num_drop = {num_drop}");
}

#[test]
fn guidance_applies_only_inside_its_window() {
    let config = small_config(Conditioning::THalf);
    let (_vs, net) = random_network(&config, 2);
    let opts = (Kind::Double, Device::Cpu);
    let z = Tensor::randn([2, 3, 8, 8], opts);
    let v = Tensor::randn([2, 3, 8, 8], opts);
    let t = Tensor::from_slice(&[0.2, 0.9]);
    let y = Tensor::from_slice(&[1i64, 2]);
    let g = Guidance {
        omega: 2.0,
        kappa: 0.5,
        t_start: 0.0,
        t_end: 0.5,
    };
    let (v_g, v_uncond) = guide(&net, &g, &z, &t, &v, &y);
    let v_uncond = v_uncond.expect("guidance computes the unconditional velocity");
    let v_cond = velocity(&net, &z, &t, &y);
    let inside = 2.0 * v.get(0) + (1.0 - 2.0 - 0.5) * v_uncond.get(0) + 0.5 * v_cond.get(0);
    assert!(rel_err(&v_g.get(0), &inside) < 1e-14);
    assert!(v_g.get(1).equal(&v.get(1)), "outside the window v_g = v");
    let identity = Guidance {
        omega: 1.0,
        kappa: 0.0,
        t_start: 0.0,
        t_end: 1.0,
    };
    assert!(
        guide(&net, &identity, &z, &t, &v, &y).1.is_none(),
        "no guidance forward at omega 1"
    );
}

#[test]
fn dropped_labels_are_the_first_and_take_the_plain_velocity() {
    let config = small_config(Conditioning::THalf);
    let (_vs, net) = random_network(&config, 2);
    let opts = (Kind::Double, Device::Cpu);
    let (v, v_g) = (
        Tensor::ones([3, 1, 1, 1], opts),
        Tensor::zeros([3, 1, 1, 1], opts),
    );
    let (y, v_g) = drop_labels(
        &net,
        &Tensor::from_slice(&[1i64, 2, 3]),
        &v,
        &v_g,
        &Tensor::from(2i64),
    );
    assert_eq!(Vec::<i64>::try_from(&y).unwrap(), vec![5, 5, 3]);
    assert_eq!(floats(&v_g), vec![1.0, 1.0, 0.0]);
}

#[test]
fn the_tangent_variant_changes_the_target_as_the_chain_rule_says() {
    // With dt = 1 and dr = 1 the tangent of h = t - r vanishes: for a network that embeds only
    // t - r, du/dt then reduces to the z-direction alone, as with (dr, dt) = (0, 0).
    let config = small_config(Conditioning::H);
    let (_vs, net) = random_network(&config, 4);
    let opts = (Kind::Double, Device::Cpu);
    let x = Tensor::randn([4, 3, 8, 8], opts);
    let y = Tensor::from_slice(&[0i64, 1, 2, 3]);
    let du_dt = |dr: f64, dt: f64| {
        let mut cfg = MeanFlowSection {
            data_proportion: 0.0,
            ..Default::default()
        }
        .config();
        cfg.tangent = Tangent { dr, dt };
        let t = Tensor::from_slice(&[0.9, 0.8, 0.7, 0.6]);
        let r = Tensor::from_slice(&[0.1, 0.2, 0.3, 0.4]);
        let draw = Draw::new(&cfg, t, r, x.ones_like(), 0);
        meanflow_loss(&net, &cfg, &x, &y, &draw).unwrap().du_dt
    };
    let (both, none, correct) = (du_dt(1.0, 1.0), du_dt(0.0, 0.0), du_dt(0.0, 1.0));
    assert!(rel_err(&both, &none) < 1e-12);
    assert!(rel_err(&correct, &none) > 1e-3);
}

#[test]
fn a_two_step_schedule_is_two_mean_flow_steps() {
    let config = small_config(Conditioning::THalf);
    let (_vs, net) = random_network(&config, 6);
    let e = Tensor::randn([2, 3, 8, 8], (Kind::Double, Device::Cpu));
    let y = Tensor::from_slice(&[3i64, 4]);
    let u = |z: &Tensor, t: f64, r: f64| {
        let (t, r) = (
            Tensor::full([2], t, (Kind::Double, Device::Cpu)),
            Tensor::full([2], r, (Kind::Double, Device::Cpu)),
        );
        net.forward_aten(z, &t, &r, &y, AttentionKernel::Explicit)
    };
    let mid = &e - 0.7 * u(&e, 1.0, 0.3);
    let expected = &mid - 0.3 * u(&mid, 0.3, 0.0);
    let before = e.copy();
    let got = sampler::sample(&net, &e, &y, &[1.0, 0.3, 0.0]).unwrap();
    assert!(rel_err(&got, &expected) < 1e-12);
    assert!(e.equal(&before), "sampling modified the noise in place");
    for bad in [&[1.0, 0.5][..], &[0.9, 0.0], &[1.0, 0.5, 0.5, 0.0], &[1.0]] {
        assert!(
            sampler::sample(&net, &e, &y, bad).is_err(),
            "{bad:?} accepted"
        );
    }
}

#[test]
fn skipping_the_tangent_of_r_equals_t_rows_changes_no_loss_or_gradient() {
    // The manual JVP computes du/dt only for the rows with t != r; forward-mode AD computes it
    // for all. The targets, losses and gradients must agree, in f64, for every share of r = t
    // rows, including all (plain flow matching) and none.
    let config = small_config(Conditioning::THalf);
    let (vs, net) = random_network(&config, 9);
    let opts = (Kind::Double, Device::Cpu);
    let x = Tensor::randn([6, 3, 8, 8], opts);
    let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 0]);
    for proportion in [0.0, 0.5, 1.0] {
        let run = |jvp| {
            let cfg = MeanFlowSection {
                data_proportion: proportion,
                omega: 2.0,
                jvp,
                ..Default::default()
            }
            .config();
            tch::manual_seed(5);
            let draw = Draw::sample(&cfg, &x);
            for v in vs.trainable_variables() {
                let mut g = v.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let terms = meanflow_loss(&net, &cfg, &x, &y, &draw).unwrap();
            terms.loss.backward();
            let grads: Vec<Tensor> = vs
                .trainable_variables()
                .iter()
                .map(|v| v.grad().reshape([-1]))
                .collect();
            (terms, Tensor::cat(&grads, 0), draw.r_equals_t)
        };
        let (manual, manual_grads, skip) = run(meanflow_repro::meanflow::JvpMethod::Manual);
        let (plain, plain_grads, _) = run(meanflow_repro::meanflow::JvpMethod::ForwardAd);
        assert_eq!(skip, (6.0 * proportion) as i64);
        let what = format!("r = t share {proportion}");
        assert!(
            rel_err(&manual.u_tgt, &plain.u_tgt) < 1e-12,
            "{what}: u_tgt"
        );
        assert!(rel_err(&manual.loss, &plain.loss) < 1e-12, "{what}: loss");
        assert!(
            rel_err(&manual_grads, &plain_grads) < 1e-11,
            "{what}: gradients"
        );
        let rest = 6 - skip;
        if rest > 0 {
            let (a, b) = (
                manual.du_dt.narrow(0, skip, rest),
                plain.du_dt.narrow(0, skip, rest),
            );
            assert!(rel_err(&a, &b) < 1e-12, "{what}: du/dt of the t != r rows");
        }
        let skipped = manual.du_dt.narrow(0, 0, skip).abs().sum(Kind::Double);
        assert_eq!(skipped.double_value(&[]), 0.0, "{what}: skipped rows");
    }
}
