//! `mfr bench fid` end to end on the CPU with a handful of samples: every stage runs and the
//! numbers add up (its timings are for GPUs; here only that the path works).
use meanflow_repro::bench;
use meanflow_repro::sample::DecodePrecision;
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
