//! The fused AdamW step and gradient clip against torch.optim.AdamW's update written out.
use meanflow_repro::train::optim::{clip_grad_norm, AdamW, Param};
use tch::{Kind, Tensor};

fn param(values: &[f64]) -> Tensor {
    Tensor::from_slice(values).set_requires_grad(true)
}

fn set_grad(p: &Tensor, g: &[f64]) {
    let mut grad = p.grad();
    if !grad.defined() {
        // The first backward creates .grad; do the same through a trivial loss.
        (p * Tensor::from_slice(g)).sum(Kind::Double).backward();
        return;
    }
    tch::no_grad(|| grad.copy_(&Tensor::from_slice(g)));
}

/// torch.optim.AdamW (decoupled decay, bias-corrected moments, eps outside the root), by hand.
fn reference(p: &mut [f64], m: &mut [f64], v: &mut [f64], g: &[f64], step: i32, lr: f64, wd: f64) {
    let (b1, b2, eps) = (0.9, 0.95, 1e-8);
    for i in 0..p.len() {
        p[i] *= 1.0 - lr * wd;
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        let m_hat = m[i] / (1.0 - b1.powi(step));
        let v_hat = v[i] / (1.0 - b2.powi(step));
        p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
    }
}

#[test]
fn fused_adamw_matches_the_update_written_out() {
    let start = [0.5, -1.25, 3.0];
    let p = param(&start);
    let mut opt = AdamW::new(
        vec![("w".to_owned(), p.shallow_clone())],
        1e-2,
        [0.9, 0.95],
        0.1,
    );
    let (mut rp, mut rm, mut rv) = (start.to_vec(), vec![0.0; 3], vec![0.0; 3]);
    for (step, g) in [[0.3, -0.2, 1.5], [-0.7, 0.1, 0.4], [0.05, 2.0, -1.0]]
        .iter()
        .enumerate()
    {
        set_grad(&p, g);
        opt.update(1e-2).unwrap();
        reference(&mut rp, &mut rm, &mut rv, g, step as i32 + 1, 1e-2, 0.1);
        let ours = Vec::<f64>::try_from(&p.detach()).unwrap();
        for (a, b) in ours.iter().zip(&rp) {
            assert!(
                (a - b).abs() <= 1e-14 * b.abs().max(1.0),
                "step {}: {a} vs {b}",
                step + 1
            );
        }
    }
    assert_eq!(opt.step(), 3);
    let moments = Vec::<f64>::try_from(&opt.params[0].exp_avg).unwrap();
    assert!((moments[2] - rm[2]).abs() < 1e-15);
}

#[test]
fn restoring_the_step_restores_the_bias_correction() {
    let p = param(&[1.0]);
    let mut opt = AdamW::new(
        vec![("w".to_owned(), p.shallow_clone())],
        1e-2,
        [0.9, 0.95],
        0.0,
    );
    opt.set_step(9);
    set_grad(&p, &[0.5]);
    opt.update(1e-2).unwrap();
    let (mut rp, mut rm, mut rv) = (vec![1.0], vec![0.0], vec![0.0]);
    reference(&mut rp, &mut rm, &mut rv, &[0.5], 10, 1e-2, 0.0);
    assert!((p.double_value(&[0]) - rp[0]).abs() < 1e-15);
}

#[test]
fn clipping_scales_to_the_max_norm_and_reports_the_norm_before() {
    let (a, b) = (param(&[3.0, 0.0]), param(&[0.0, 4.0]));
    set_grad(&a, &[3.0, 0.0]);
    set_grad(&b, &[0.0, 4.0]);
    let named = |t: &Tensor| Param {
        name: "x".to_owned(),
        value: t.shallow_clone(),
        exp_avg: t.zeros_like(),
        exp_avg_sq: t.zeros_like(),
    };
    let params = [named(&a), named(&b)];
    let total = clip_grad_norm(&params, 1.0).unwrap();
    assert!((total.double_value(&[]) - 5.0).abs() < 1e-12);
    let scaled = Vec::<f64>::try_from(&b.grad()).unwrap();
    assert!((scaled[1] - 4.0 / (5.0 + 1e-6)).abs() < 1e-12);
    // Under the limit nothing changes; 0 disables clipping.
    let total = clip_grad_norm(&params, 0.0).unwrap();
    assert!((total.double_value(&[]) - 1.0).abs() < 1e-6);
    assert_eq!(Vec::<f64>::try_from(&b.grad()).unwrap(), scaled);
}
