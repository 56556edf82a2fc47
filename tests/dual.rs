//! The hand-written tangent pass (Dual) against libtorch's forward-mode AD through the plain
//! network: same primal, same tangent, and no autograd graph for the tangent.
mod common;

use common::{random_network, rel_err, small_config};
use meanflow_repro::device;
use meanflow_repro::meanflow::jvp::jvp;
use meanflow_repro::model::{AttentionKernel, Conditioning, Dual, MaybeDual};
use tch::{Device, Kind, Tensor};

/// Three samples for `small_config` in `kind`: z (3, 3, 8, 8), t >= r with one r = t, labels.
fn inputs(kind: Kind) -> (Tensor, Tensor, Tensor, Tensor) {
    let time = |v: &[f64]| Tensor::from_slice(v).to_kind(kind);
    (
        Tensor::randn([3, 3, 8, 8], (kind, Device::Cpu)),
        time(&[0.9, 0.5, 0.3]),
        time(&[0.1, 0.5, 0.2]),
        Tensor::from_slice(&[0i64, 5, 2]),
    )
}

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
            let (z, t, r, y) = inputs(Kind::Double);
            let (dz, dt, dr) = (
                Tensor::randn([3, 3, 8, 8], opts),
                Tensor::rand([3], opts),
                Tensor::rand([3], opts),
            );

            let (u, du) = jvp(
                |x| Ok(net.forward_aten(&x[0], &x[1], &x[2], &y, AttentionKernel::Explicit)),
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
                rel_err(&out.tangent_or_zeros(), &du) < 1e-12,
                "{what}: tangent {:.2e}",
                rel_err(&out.tangent_or_zeros(), &du)
            );
            assert!(
                out.primal.requires_grad(),
                "{what}: the primal lost its graph"
            );
            assert!(
                !out.tangent_or_zeros().requires_grad(),
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
    assert_eq!(out.tangent_or_zeros().abs().max().double_value(&[]), 0.0);
    assert!(
        rel_err(
            &out.primal,
            &net.forward_aten(&z, &t, &r, &y, AttentionKernel::Fused)
        ) < 1e-15
    );
}

/// Under bf16 autocast the fast path's modulate writes its value in bf16, the rounding the next
/// linear layer would apply on entry, and its gated residual writes the gradient of the bf16
/// branch in bf16: bit for bit what the plain path (addcmul in float32, then the casts) gives,
/// values and the gradients of all operands.
#[test]
fn the_fast_modulate_and_gate_round_as_the_plain_path_under_bf16_autocast() {
    let leaf =
        |kind, shape: &[i64]| Tensor::randn(shape, (kind, Device::Cpu)).set_requires_grad(true);
    let (f32, bf16) = (Kind::Float, Kind::BFloat16);
    // x: the float32 LayerNorm output or residual; the rest come from bf16 matrix products.
    let x = leaf(f32, &[4, 16, 32]);
    let (shift, scale, gate) = (
        leaf(bf16, &[4, 32]),
        leaf(bf16, &[4, 32]),
        leaf(bf16, &[4, 32]),
    );
    let branch = leaf(bf16, &[4, 16, 32]);
    // Weights of a loss: the residual's gradient has float32's precision, as a real one does.
    let (weight_bf16, weight_f32) = (
        Tensor::randn([4, 16, 32], (bf16, Device::Cpu)),
        Tensor::randn([4, 16, 32], (f32, Device::Cpu)),
    );
    let leaves = [&x, &shift, &scale, &gate, &branch];
    let run = |fast: bool| {
        let (modulated, residual) = device::autocast_bf16(Device::Cpu, true, || {
            Ok(if fast {
                let c = |v: &Tensor| Dual::constant(v.shallow_clone());
                (
                    MaybeDual::modulate(&c(&x), &c(&shift), &c(&scale)).primal,
                    MaybeDual::gated_add(&c(&x), &c(&gate), &c(&branch)).primal,
                )
            } else {
                (
                    MaybeDual::modulate(&x, &shift, &scale).to_kind(bf16),
                    MaybeDual::gated_add(&x, &gate, &branch),
                )
            })
        })
        .unwrap();
        assert_eq!(
            (modulated.kind(), residual.kind()),
            (bf16, f32),
            "fast: {fast}"
        );
        let loss = (&modulated * &weight_bf16).sum(f32) + (&residual * &weight_f32).sum(f32);
        let grads = Tensor::run_backward(&[loss], &leaves, false, false);
        ([modulated.detach(), residual.detach()], grads)
    };
    let ((fast, fast_grads), (plain, plain_grads)) = (run(true), run(false));
    for (name, (a, b)) in ["modulate", "gated residual"]
        .iter()
        .zip(fast.iter().zip(plain.iter()))
    {
        assert!(a.equal(b), "{name}: {:.2e}", rel_err(a, b));
    }
    for (name, (a, b)) in ["x", "shift", "scale", "gate", "branch"]
        .iter()
        .zip(fast_grads.iter().zip(plain_grads.iter()))
    {
        assert_eq!(a.kind(), b.kind(), "{name}");
        assert!(a.equal(b), "gradient of {name}: {:.2e}", rel_err(a, b));
    }
}

/// The fast path's forward (guidance, sampling) gives the plain forward's numbers bit for bit,
/// and the same gradients, in float32 and under bf16 autocast.
#[test]
fn the_fast_forward_is_the_plain_forward() {
    let (mut vs, net) = random_network(&small_config(Conditioning::THalf), 5);
    vs.float();
    let (z, t, r, y) = inputs(Kind::Float);
    for autocast in [false, true] {
        let run = |fast: bool| {
            let u = device::autocast_bf16(Device::Cpu, autocast, || {
                Ok(match fast {
                    true => net.forward(&z, &t, &r, &y, AttentionKernel::Fused),
                    false => net.forward_aten(&z, &t, &r, &y, AttentionKernel::Fused),
                })
            })
            .unwrap();
            let params = vs.trainable_variables();
            let grads = Tensor::run_backward(&[(&u * &u).sum(Kind::Float)], &params, false, false);
            let flat: Vec<Tensor> = grads.iter().map(|g| g.reshape([-1])).collect();
            (u.detach(), Tensor::cat(&flat, 0))
        };
        let ((u_fast, g_fast), (u_plain, g_plain)) = (run(true), run(false));
        assert!(
            u_fast.equal(&u_plain),
            "autocast {autocast}: u {:.2e}",
            rel_err(&u_fast, &u_plain)
        );
        assert!(
            g_fast.equal(&g_plain),
            "autocast {autocast}: grads {:.2e}",
            rel_err(&g_fast, &g_plain)
        );
    }
}
