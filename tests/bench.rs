//! The benches on the CPU: `mfr bench fid` end to end with a handful of samples (every stage
//! runs and the numbers add up; its timings are for GPUs), and `mfr bench train`'s agreement
//! check in bf16.
use meanflow_repro::bench;
use meanflow_repro::meanflow::JvpMethod;
use meanflow_repro::model::vae::DecodePrecision;
use meanflow_repro::spec::Precision;
use tch::Device;

#[test]
fn fid_end_to_end_runs_every_stage() {
    let r = bench::fid(
        "micro/2",
        4,
        2,
        Precision::F32,
        DecodePrecision::F32,
        Device::Cpu,
    )
    .unwrap();
    assert_eq!(r.num_samples, 4);
    assert!(r.fid_between_halves.is_finite(), "{r:?}");
    let stages =
        r.seconds_sampling + r.seconds_decoding + r.seconds_inception + r.seconds_statistics;
    assert!(stages > 0.0 && stages <= r.seconds * 1.001, "{r:?}");
    assert!(
        r.seconds_decoding > 0.0 && r.seconds_inception > 0.0,
        "{r:?}"
    );
    let err = bench::fid(
        "micro/2",
        3,
        2,
        Precision::F32,
        DecodePrecision::F32,
        Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--num 3"), "{err}");
}

/// The bench's agreement check under bf16 autocast, here on the CPU (CUDA's autocast keeps more
/// ops in float32, so its differences are its own): the hand-written tangent rules and the
/// custom modulate/gate backward take mixed bf16/f32 operands without losing more than bf16's
/// rounding, with both guidance forms (one unconditional forward; two in one batched call).
#[test]
fn manual_jvp_agrees_with_forward_ad_under_bf16_autocast() {
    for (model, omega, kappa) in [("micro/2", 3.0, 0.0), ("tiny/2", 1.0, 0.5)] {
        let r = bench::train(&bench::TrainBench {
            model: model.to_owned(),
            batch: 16,
            precision: Precision::Bf16,
            device: Device::Cpu,
            warmup: 0,
            steps: 1,
            omega,
            kappa,
            grad_clip: 1.0,
            jvp: JvpMethod::Manual,
            cuda_graph: false,
        })
        .unwrap();
        let a = &r.agreement_with_forward_ad;
        eprintln!("{model} omega {omega} kappa {kappa}: {a:?}");
        assert_eq!(r.compute_dtype, "BFloat16", "{model}: autocast did not run");
        assert!(a.du_dt > 0.0 && a.grads > 0.0, "{model}: {a:?}");
        assert!(a.du_dt < bench::BF16_DU_DT_TOLERANCE, "{model}: {a:?}");
        assert!(a.grads < bench::BF16_GRADS_TOLERANCE, "{model}: {a:?}");
        assert_eq!(a.within_bf16_tolerance, Some(true), "{model}: {a:?}");
    }
}
