//! FID's bootstrap interval against a direct bootstrap in numpy: the same resampled rows (handed
//! over), each resample's FID by ADM's formula (scipy's sqrtm of sigma1 sigma2), and numpy's
//! percentile. Both ways of taking the trace of the square root are checked: the sample wider
//! than it is long (a small-sample FID, through the n x n eigenproblem) and the other way.
mod common;
use common::temp_dir;
use meanflow_repro::eval::bootstrap::{draw_indices, fid_interval, resampled_fids};
use meanflow_repro::eval::{Reference, Stats};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

fn numpy_bootstrap(n: i64, d: i64) {
    let dir = temp_dir(&format!("bootstrap-{n}-{d}"));
    tch::manual_seed(n * 1000 + d);
    // Correlated features, as Inception's are, and a reference of other statistics.
    let mix = Tensor::randn([d, d], (Kind::Double, Device::Cpu)) / (d as f64).sqrt();
    let features = Tensor::randn([n, d], (Kind::Double, Device::Cpu)).matmul(&mix) + 0.3;
    let reference = Tensor::randn([3 * d, d], (Kind::Double, Device::Cpu)).matmul(&mix);
    let stats = Stats::of(&reference).unwrap();
    let (resamples, seed) = (64usize, 7u64);
    let root = Reference::new(&stats).unwrap();
    let ours = resampled_fids(&root, &features, resamples, seed, Device::Cpu).unwrap();
    let interval = fid_interval(&root, &features, resamples, seed, 0.95, Device::Cpu).unwrap();
    let indices: Vec<i64> = (0..resamples)
        .flat_map(|r| draw_indices(n as usize, seed, r))
        .collect();
    let file = dir.join("case.safetensors");
    Tensor::write_safetensors(
        &[
            ("features", &features),
            ("mu", &stats.mu),
            ("sigma", &stats.sigma),
            (
                "indices",
                &Tensor::from_slice(&indices).view([resamples as i64, n]),
            ),
        ],
        &file,
    )
    .unwrap();
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let out = std::process::Command::new(python)
        .args([
            "-c",
            "import sys, json, numpy as np
from scipy import linalg
from safetensors.numpy import load_file
f = load_file(sys.argv[1])
x, mu2, s2 = f['features'], f['mu'], f['sigma']
fids = []
for idx in f['indices']:
    xs = x[idx]
    mu1, s1 = xs.mean(0), np.cov(xs, rowvar=False)
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    diff = mu1 - mu2
    fids.append(float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)))
print(json.dumps({'fids': fids, 'low': float(np.percentile(fids, 2.5)), 'high': float(np.percentile(fids, 97.5))}))",
            file.to_str().unwrap(),
        ])
        .output()
        .expect("the project's .venv python (make setup)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // scipy's sqrtm (Schur) and our symmetric eigendecompositions agree to ~1e-10 on these
    // well-conditioned covariances; 1e-7 relative still fails any wrong resample or formula.
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-7 * b.abs().max(1.0);
    for (r, (a, b)) in ours
        .iter()
        .zip(theirs["fids"].as_array().unwrap())
        .enumerate()
    {
        let b = b.as_f64().unwrap();
        assert!(close(*a, b), "resample {r}: {a} vs numpy's {b}");
    }
    let (low, high) = (
        theirs["low"].as_f64().unwrap(),
        theirs["high"].as_f64().unwrap(),
    );
    assert!(
        close(interval.low, low) && close(interval.high, high),
        "{interval:?} vs [{low}, {high}]"
    );
    assert!(interval.low < interval.high);
}

#[test]
fn a_small_sample_interval_matches_numpy() {
    numpy_bootstrap(20, 40);
}

#[test]
fn a_large_sample_interval_matches_numpy() {
    numpy_bootstrap(60, 24);
}
