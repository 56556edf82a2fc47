//! The op profile (mfr bench train's `ops`): kernel launches, bytes and FLOPs, checked on ops
//! whose costs follow from their shapes.
mod common;

use meanflow_repro::bench::profile::{profile, OpProfile};
use tch::{Kind, Tensor};

#[test]
fn a_matrix_product_counts_one_kernel_its_bytes_and_flops() {
    let _guard = common::serial();
    let (m, k, n) = (6i64, 5i64, 7i64);
    let a = Tensor::randn([m, k], (Kind::Float, tch::Device::Cpu));
    let b = Tensor::randn([k, n], (Kind::Float, tch::Device::Cpu));
    let (_, p) = profile(|| Ok(a.mm(&b))).unwrap();
    assert_one_float_product(&p, m, k, n);
    assert_eq!(p.top_by_bytes[0].op, "aten::mm");
}

/// One kernel that reads (m, k) and (k, n) float32 matrices, writes their (m, n) product once
/// and does 2 m k n FLOPs.
fn assert_one_float_product(p: &OpProfile, m: i64, k: i64, n: i64) {
    assert_eq!((p.kernels, p.dispatches), (1, 1), "{p:?}");
    let bytes = 4 * (m * k + k * n + m * n);
    assert!((p.gb_moved * 1e9 - bytes as f64).abs() < 1e-6, "{p:?}");
    assert!(
        (p.tflop * 1e12 - (2 * m * k * n) as f64).abs() < 1e-3,
        "{p:?}"
    );
}

#[test]
fn an_out_variant_counts_its_kernel_and_writes_its_out_argument_once() {
    let _guard = common::serial();
    let (m, k, n) = (6i64, 5i64, 7i64);
    let opts = (Kind::Float, tch::Device::Cpu);
    let (a, b) = (Tensor::randn([m, k], opts), Tensor::randn([k, n], opts));
    let out = Tensor::empty([m, n], opts);
    let (_, p) = profile(|| Ok(a.mm_out(&out, &b))).unwrap();
    assert_one_float_product(&p, m, k, n);
}

#[test]
fn views_dispatch_without_a_kernel_and_sub_ops_are_not_counted_twice() {
    let _guard = common::serial();
    let x = Tensor::randn([4, 3, 8], (Kind::Double, tch::Device::Cpu));
    let w = Tensor::randn([5, 8], (Kind::Double, tch::Device::Cpu));
    let (_, p) = profile(|| {
        let v = x.permute([1, 0, 2]).unsqueeze(0); // two views
        let y = x.linear(&w, None::<Tensor>); // one op, whatever it calls inside
        let mut z = &v + 1.0; // an op
        let _ = z.g_add_(&v); // and an in-place one
        Ok((y, z))
    })
    .unwrap();
    assert_eq!(p.dispatches, 5, "{p:?}");
    assert_eq!(p.kernels, 3, "{p:?}");
    let linear = p
        .top_by_bytes
        .iter()
        .find(|r| r.op == "aten::linear")
        .unwrap();
    assert!((linear.gflop * 1e9 - (2 * 4 * 3 * 8 * 5) as f64).abs() < 1e-6);
}

#[test]
fn a_failing_region_stops_the_profile_and_reports_its_error() {
    let _guard = common::serial();
    let err = profile(|| -> anyhow::Result<()> { anyhow::bail!("boom") }).unwrap_err();
    assert!(err.to_string().contains("boom"));
    // The profile was stopped: a new one starts.
    profile(|| Ok(())).unwrap();
}

#[test]
fn the_backward_pass_is_counted_op_by_op() {
    let _guard = common::serial();
    let (m, k, n) = (4i64, 3i64, 6i64);
    let a = Tensor::randn([m, k], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let b = Tensor::randn([k, n], (Kind::Float, tch::Device::Cpu));
    let loss = a.mm(&b).sum(Kind::Float);
    let (_, p) = profile(|| {
        loss.backward();
        Ok(())
    })
    .unwrap();
    // d loss / d a = ones(m, n) b^T: one product of (m, n) by (n, k).
    assert!(
        (p.tflop * 1e12 - (2 * m * n * k) as f64).abs() < 1e-3,
        "{p:?}"
    );
    assert!(p.top_by_bytes.iter().any(|r| r.op == "aten::mm"), "{p:?}");
}
