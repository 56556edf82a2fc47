//! The forward-mode JVP against central finite differences, and the dual-level guard.
mod common;

use common::{random_network, rel_err, small_config};
use meanflow_repro::meanflow::jvp::{jvp, DualLevel};
use meanflow_repro::model::{AttentionKernel, Conditioning};
use tch::{Device, Kind, Tensor};

/// d/ds f(z + s dz, t + s dt, r + s dr) at s = 0 by forward AD, against central differences
/// with one Richardson step (truncation error O(h^4)).
fn check_against_finite_differences(
    conditioning: Conditioning,
    with_time: bool,
    h: f64,
    tolerance: f64,
) {
    let config = small_config(conditioning);
    let (_vs, net) = random_network(&config, 7);
    let opts = (Kind::Double, Device::Cpu);
    let b = 4;
    let z = Tensor::randn([b, 3, 8, 8], opts);
    let t = Tensor::rand([b], opts) * 0.5 + 0.5;
    let r = Tensor::rand([b], opts) * 0.5;
    let y = Tensor::from_slice(&[0i64, 4, 5, 2]);
    let time_scale = if with_time { 1.0 } else { 0.0 };
    let dz = Tensor::randn([b, 3, 8, 8], opts);
    let (dt, dr) = (
        Tensor::rand([b], opts) * time_scale,
        Tensor::rand([b], opts) * time_scale,
    );
    let f = |z: &Tensor, t: &Tensor, r: &Tensor| {
        net.forward_aten(z, t, r, &y, AttentionKernel::Explicit)
    };

    let (u, du) = jvp(
        |x| Ok(f(&x[0], &x[1], &x[2])),
        &[&z, &t, &r],
        &[&dz, &dt, &dr],
    )
    .unwrap();
    let at = |s: f64| f(&(&z + s * &dz), &(&t + s * &dt), &(&r + s * &dr));
    let central = |h: f64| (at(h) - at(-h)) / (2.0 * h);
    let fd = tch::no_grad(|| (4.0 * central(h / 2.0) - central(h)) / 3.0);
    assert!(
        rel_err(&u, &f(&z, &t, &r)) < 1e-14,
        "{conditioning:?}: the JVP changed the primal output"
    );
    let err = rel_err(&du, &fd);
    assert!(
        err < tolerance,
        "{conditioning:?}: JVP vs finite differences, relative error {err:.3e}"
    );
    assert!(
        du.abs().max().double_value(&[]) > 0.0,
        "{conditioning:?}: the tangent is all zero"
    );
}

/// Along z alone the network is float64 throughout: step 1e-4 leaves truncation ~1e-16 and
/// rounding ~1e-12, so 1e-8 is tight.
#[test]
fn jvp_along_z_matches_finite_differences() {
    check_against_finite_differences(Conditioning::THalf, false, 1e-4, 1e-8);
}

/// Along (z, t, r): the reference quantises times to float32 in its sinusoid (steps ~6e-8), so
/// the quotient needs a wide step: 2e-3 leaves truncation ~1e-8 and quantisation noise ~1e-5
/// (measured: 4e-6 to 7e-6).
#[test]
fn jvp_along_z_t_r_matches_finite_differences_for_every_conditioning() {
    for conditioning in [
        Conditioning::THalf,
        Conditioning::TR,
        Conditioning::TRH,
        Conditioning::H,
    ] {
        check_against_finite_differences(conditioning, true, 2e-3, 1e-4);
    }
}

#[test]
fn a_failed_jvp_releases_the_dual_level() {
    let x = Tensor::ones([3], (Kind::Double, Device::Cpu));
    let failed = jvp(|_| anyhow::bail!("the function failed"), &[&x], &[&x]);
    assert!(failed
        .unwrap_err()
        .to_string()
        .contains("the function failed"));
    // libtorch allows one level at a time: entering again proves the last one was released.
    let level = DualLevel::enter().expect("the dual level leaked after an error");
    drop(level);

    let panicked = std::panic::catch_unwind(|| jvp(|_| panic!("boom"), &[&x], &[&x]));
    assert!(panicked.is_err());
    let (y, dy) =
        jvp(|v| Ok(v[0].square()), &[&x], &[&x]).expect("the dual level leaked after a panic");
    assert_eq!(Vec::<f64>::try_from(&y).unwrap(), vec![1.0; 3]);
    assert_eq!(Vec::<f64>::try_from(&dy).unwrap(), vec![2.0; 3]);
}

#[test]
fn a_nested_level_is_an_error_not_a_deadlock() {
    let _outer = DualLevel::enter().unwrap();
    let err = DualLevel::enter()
        .err()
        .expect("libtorch supports one forward-AD level at a time");
    assert!(err.to_string().contains("nested forward-AD"), "{err}");
}

#[test]
fn threads_take_turns_at_the_level() {
    let workers: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let x = Tensor::full([2], i as f64, (Kind::Double, Device::Cpu));
                let (_, dy) = jvp(|v| Ok(v[0].square()), &[&x], &[&x]).unwrap();
                Vec::<f64>::try_from(&dy).unwrap()
            })
        })
        .collect();
    for (i, w) in workers.into_iter().enumerate() {
        assert_eq!(w.join().unwrap(), vec![2.0 * (i * i) as f64; 2]);
    }
}
