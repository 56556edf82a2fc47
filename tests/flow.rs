//! The hand-written tangent pass (Dual) against libtorch's forward-mode AD through the plain
//! network: same primal, same tangent, and no autograd graph for the tangent.
mod common;

use common::{random_network, rel_err, small_config};
use meanflow_repro::meanflow::jvp::jvp;
use meanflow_repro::model::{AttentionKernel, Conditioning, Dual};
use tch::{Device, Kind, Tensor};

#[test]
fn the_dual_pass_equals_forward_mode_ad() {
    for conditioning in [
        Conditioning::THalf,
        Conditioning::TR,
        Conditioning::TRH,
        Conditioning::H,
    ] {
        for kernel in [AttentionKernel::Explicit, AttentionKernel::Fused] {
            let config = small_config(conditioning);
            let (_vs, net) = random_network(&config, 11);
            let opts = (Kind::Double, Device::Cpu);
            let z = Tensor::randn([3, 3, 8, 8], opts);
            let (t, r) = (
                Tensor::from_slice(&[0.9, 0.5, 0.3]),
                Tensor::from_slice(&[0.1, 0.5, 0.2]),
            );
            let y = Tensor::from_slice(&[0i64, 5, 2]);
            let (dz, dt, dr) = (
                Tensor::randn([3, 3, 8, 8], opts),
                Tensor::rand([3], opts),
                Tensor::rand([3], opts),
            );

            let (u, du) = jvp(
                |x| Ok(net.forward(&x[0], &x[1], &x[2], &y, AttentionKernel::Explicit)),
                &[&z, &t, &r],
                &[&dz, &dt, &dr],
            )
            .unwrap();
            let dual = |p: &Tensor, d: &Tensor| Dual::new(p.shallow_clone(), d.shallow_clone());
            let out = net.forward_dual(&dual(&z, &dz), &dual(&t, &dt), &dual(&r, &dr), &y, kernel);
            let what = format!("{conditioning:?} {kernel:?}");
            assert!(
                rel_err(&out.primal, &u) < 1e-13,
                "{what}: primal {:.2e}",
                rel_err(&out.primal, &u)
            );
            assert!(
                rel_err(&out.tangent(), &du) < 1e-12,
                "{what}: tangent {:.2e}",
                rel_err(&out.tangent(), &du)
            );
            assert!(
                out.primal.requires_grad(),
                "{what}: the primal lost its graph"
            );
            assert!(
                !out.tangent().requires_grad(),
                "{what}: the tangent recorded a graph"
            );
        }
    }
}

#[test]
fn a_zero_tangent_gives_a_zero_derivative() {
    let config = small_config(Conditioning::THalf);
    let (_vs, net) = random_network(&config, 12);
    let opts = (Kind::Double, Device::Cpu);
    let z = Tensor::randn([2, 3, 8, 8], opts);
    let (t, r) = (
        Tensor::from_slice(&[0.9, 0.5]),
        Tensor::from_slice(&[0.1, 0.5]),
    );
    let y = Tensor::from_slice(&[1i64, 2]);
    let zero = |p: &Tensor| Dual::new(p.shallow_clone(), p.zeros_like());
    let out = net.forward_dual(&zero(&z), &zero(&t), &zero(&r), &y, AttentionKernel::Fused);
    assert_eq!(out.tangent().abs().max().double_value(&[]), 0.0);
    assert!(
        rel_err(
            &out.primal,
            &net.forward(&z, &t, &r, &y, AttentionKernel::Fused)
        ) < 1e-15
    );
}
