//! FID, IS and precision/recall against numpy/scipy and brute force (golden data from
//! tests/make_eval_fixtures.py: FID by ADM's own arithmetic with scipy.linalg.sqrtm).
mod common;

use meanflow_repro::eval::{frechet_distance, inception_score, precision_recall, Reference, Stats};
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

fn fixture() -> BTreeMap<String, Tensor> {
    common::eval_fixture("metrics.safetensors")
}

fn scalar(t: &Tensor, i: i64) -> f64 {
    t.double_value(&[i])
}

#[test]
fn statistics_are_numpy_mean_and_unbiased_covariance() {
    let f = fixture();
    let s = Stats::of(&f["acts1"]).unwrap();
    let err = (&s.sigma - &f["sigma1"]).abs().max().double_value(&[]);
    assert!(err < 1e-12, "covariance differs by {err:e}");
    assert!((&s.mu - &f["mu1"]).abs().max().double_value(&[]) < 1e-14);
}

#[test]
fn fid_matches_adm_arithmetic() {
    let f = fixture();
    let stats = |k: &str| Stats::of(&f[k]).unwrap();
    let (s1, s2, s3) = (stats("acts1"), stats("acts2"), stats("acts3"));
    let fid = frechet_distance(&s1, &s2).unwrap();
    let expected = scalar(&f["fid_12"], 0);
    assert!(
        (fid - expected).abs() < 1e-8 * expected,
        "{fid} vs scipy {expected}"
    );
    // Near-singular (rank 39 in 64 dimensions): scipy's sqrtm goes complex, ADM keeps its real
    // part; the symmetric route is real throughout. Agreement to 1e-6 relative.
    let fid = frechet_distance(&s1, &s3).unwrap();
    let expected = scalar(&f["fid_13"], 0);
    assert!(
        (fid - expected).abs() < 1e-6 * expected,
        "{fid} vs scipy {expected}"
    );
    // Equal covariances leave |mu1 - mu2|^2.
    let shifted = Stats {
        mu: &s1.mu + 0.5,
        sigma: s1.sigma.copy(),
    };
    let fid = frechet_distance(&s1, &shifted).unwrap();
    let d = s1.mu.size()[0] as f64 * 0.25;
    assert!((fid - d).abs() < 1e-6, "{fid} vs {d}");
    assert!(frechet_distance(&s1, &s1).unwrap().abs() < 1e-8);
}

#[test]
fn fid_of_features_matches_adm_arithmetic() {
    // The evaluator's route: the reference's square root once, then the sample's features
    // through it (an n x n eigenproblem when n < d). Against scipy's FID of the same data, and
    // against the statistics route on a sample narrower than the features (20 rows, 64 wide).
    let f = fixture();
    let s2 = Stats::of(&f["acts2"]).unwrap();
    let fid = Reference::new(&s2).unwrap().fid(&f["acts1"]).unwrap();
    let expected = scalar(&f["fid_12"], 0);
    // As fid_matches_adm_arithmetic: scipy's Schur sqrtm and symmetric eigensolvers agree to
    // ~1e-10 on these well-conditioned covariances.
    assert!(
        (fid - expected).abs() < 1e-8 * expected,
        "{fid} vs scipy {expected}"
    );
    let few = f["acts1"].narrow(0, 0, 20);
    assert!(few.size()[0] < few.size()[1]);
    let small = Reference::new(&s2).unwrap().fid(&few).unwrap();
    let by_stats = frechet_distance(&s2, &Stats::of(&few).unwrap()).unwrap();
    // The d x d route has 45 eigenvalues that are zero up to rounding (~1e-16 of the largest)
    // and keeps their square roots in its trace (1.2e-8 relative on this data here); the n x n
    // route has none. 1e-6 leaves room for other CPUs' rounding and still fails a wrong term.
    assert!(
        (small - by_stats).abs() < 1e-6 * by_stats,
        "{small} vs {by_stats}"
    );
    let bad = Tensor::full([4, 64], f64::NAN, (Kind::Double, tch::Device::Cpu));
    let err = Reference::new(&s2)
        .unwrap()
        .fid(&bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not finite"), "{err}");
}

#[test]
fn inception_score_matches_numpy_on_ordered_splits() {
    let f = fixture();
    let (mean, std) = inception_score(&f["logits"], 5000);
    let (em, es) = (scalar(&f["is"], 0), scalar(&f["is"], 1));
    assert!((mean - em).abs() < 1e-10 * em, "{mean} vs {em}");
    assert!((std - es).abs() < 1e-8, "{std} vs {es}");
}

#[test]
fn precision_and_recall_match_brute_force() {
    let f = fixture();
    let (real, fake) = (
        f["real"].to_kind(tch::Kind::Double),
        f["fake"].to_kind(tch::Kind::Double),
    );
    let (precision, recall) = precision_recall(&real, &fake, 3).unwrap();
    assert_eq!(precision, scalar(&f["precision"], 0));
    assert_eq!(recall, scalar(&f["recall"], 0));
    assert!(precision > 0.0 && precision < 1.0 && recall > 0.0 && recall < 1.0);
}

#[test]
fn fid_of_fewer_samples_than_dimensions_is_a_number() {
    // Two samples per set in 2048 dimensions: rank-1 covariances, on which LAPACK's
    // divide-and-conquer eigensolver fails to converge.
    tch::manual_seed(3);
    let a = Tensor::randn([2, 2048], (Kind::Double, tch::Device::Cpu));
    let s = Stats::of(&a).unwrap();
    let fid = frechet_distance(&s, &s).unwrap();
    // 2047 eigenvalues are zero up to rounding (~1e-16 of the largest), and each adds its
    // square root: ~1e-5 of the trace is the arithmetic's floor here, as it is for scipy.
    let scale = s.sigma.trace().double_value(&[]);
    assert!(fid.abs() < 1e-5 * scale, "FID of a set with itself: {fid}");
    let shifted = Stats {
        mu: &s.mu + 0.5,
        sigma: s.sigma.copy(),
    };
    let fid = frechet_distance(&s, &shifted).unwrap();
    assert!((fid - 2048.0 * 0.25).abs() < 1e-5 * scale, "{fid}");
}

#[test]
fn fid_of_non_finite_statistics_is_an_error_not_a_panic() {
    let s = Stats::of(&Tensor::randn([8, 16], (Kind::Double, tch::Device::Cpu))).unwrap();
    let sigma = s.sigma.copy();
    let _ = sigma.get(0).get(0).fill_(f64::NAN);
    let bad = Stats {
        mu: s.mu.copy(),
        sigma,
    };
    let err = frechet_distance(&s, &bad).unwrap_err().to_string();
    assert!(err.contains("not finite"), "{err}");
}
