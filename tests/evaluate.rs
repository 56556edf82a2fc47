//! `mfr evaluate` end to end on small generated .npz files, and bad inputs.
mod common;
use common::temp_dir;
use meanflow_repro::eval::evaluator::Options;
use meanflow_repro::eval::npz::{write_images, Npz};
use meanflow_repro::pipeline::evaluate_files;
use tch::{Device, Kind, Tensor};

/// Smooth random 64x64 "images" (Inception features of pure noise barely vary).
fn images(n: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    let low = Tensor::rand([n, 3, 8, 8], (Kind::Float, Device::Cpu)) * 255.0;
    low.upsample_bilinear2d([64, 64], false, None, None)
        .permute([0, 2, 3, 1])
        .round()
        .to_kind(Kind::Uint8)
}

fn options(dir: &std::path::Path) -> Options {
    Options {
        batch: 8,
        device: Device::Cpu,
        bootstrap: 0,
        cache: dir.join("cache"),
    }
}

#[test]
fn identical_inputs_give_fid_zero_and_full_precision_recall() {
    let dir = temp_dir("same");
    let (reference, samples) = (dir.join("ref.npz"), dir.join("samples.npz"));
    let imgs = images(24, 1);
    write_images(&reference, &imgs).unwrap();
    write_images(&samples, &imgs).unwrap();
    let report = evaluate_files(&reference, &samples, None, &options(&dir)).unwrap();
    assert!(
        report.fid.abs() < 1e-3,
        "FID of identical sets: {}",
        report.fid
    );
    let sfid = report
        .sfid
        .expect("a reference of images has spatial features");
    assert!(sfid.abs() < 1e-3, "sFID of identical sets: {sfid}");
    assert_eq!((report.precision, report.recall), (Some(1.0), Some(1.0)));
    assert_eq!((report.num_samples, report.num_reference), (24, 24));
    assert!(
        report.inception_score.is_none(),
        "the TorchScript weights have no softmax layer"
    );
    // The reference's features were cached by content hash.
    assert_eq!(
        std::fs::read_dir(dir.join("cache/reference-features"))
            .unwrap()
            .count(),
        1
    );
    let again = evaluate_files(&reference, &samples, None, &options(&dir)).unwrap();
    assert_eq!(again.fid, report.fid);
    // The file's hash is memoised by (path, size, mtime); a new file at the same path is hashed
    // anew, so its features are not taken from the old file's cache entry.
    assert_eq!(
        std::fs::read_dir(dir.join("cache/hashes")).unwrap().count(),
        1
    );
    std::thread::sleep(std::time::Duration::from_millis(20));
    write_images(&reference, &images(24, 9)).unwrap();
    let changed = evaluate_files(&reference, &samples, None, &options(&dir)).unwrap();
    assert!(
        changed.fid > 1.0,
        "FID against the new reference: {}",
        changed.fid
    );
    assert_eq!(
        std::fs::read_dir(dir.join("cache/reference-features"))
            .unwrap()
            .count(),
        2
    );
}

#[test]
fn different_inputs_give_a_positive_fid_and_stored_statistics_win() {
    let dir = temp_dir("diff");
    let (reference, samples) = (dir.join("ref.npz"), dir.join("samples.npz"));
    write_images(&reference, &images(24, 2)).unwrap();
    write_images(&samples, &(images(24, 3) / 2).to_kind(Kind::Uint8)).unwrap();
    let report = evaluate_files(&reference, &samples, None, &options(&dir)).unwrap();
    assert!(report.fid > 1.0, "FID {}", report.fid);
    assert!(report
        .adm_lines()
        .starts_with("Inception Score: unavailable"));
    assert!(report.adm_lines().contains(&format!(
        "\nFID: {}\nsFID: {}\nPrecision: ",
        report.fid,
        report.sfid.unwrap()
    )));
}

#[test]
fn truncated_and_malformed_files_are_named() {
    let dir = temp_dir("bad");
    let good = dir.join("good.npz");
    write_images(&good, &images(6, 4)).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.join("cut.npz");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = Npz::open(&cut)
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(
        err.contains("cut.npz") && err.contains("truncated"),
        "{err}"
    );
    let junk = dir.join("junk.npz");
    std::fs::write(&junk, b"not a zip at all").unwrap();
    let err = format!("{:#}", Npz::open(&junk).err().unwrap());
    assert!(err.contains("junk.npz: not a readable .npz"), "{err}");
    let mut npz = Npz::open(&good).unwrap();
    let err = format!("{:#}", npz.images("mu").err().unwrap());
    assert!(err.contains("has no array `mu`"), "{err}");
}

/// An .npz holding only float64 arrays (statistics), written as numpy would.
fn stats_npz(path: &std::path::Path, arrays: &[(&str, &Tensor)]) {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let options =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, t) in arrays {
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let values = Vec::<f64>::try_from(&t.reshape([-1])).unwrap();
        let body: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        zip.start_file(format!("{name}.npy"), options).unwrap();
        zip.write_all(&meanflow_repro::data::npy::encode("<f8", &shape, &body))
            .unwrap();
    }
    zip.finish().unwrap();
}

#[test]
fn a_reference_of_statistics_alone_gives_fid_and_says_what_it_cannot() {
    let dir = temp_dir("stats-only");
    let (reference, samples) = (dir.join("ref.npz"), dir.join("samples.npz"));
    write_images(&reference, &images(24, 5)).unwrap();
    write_images(&samples, &images(24, 6)).unwrap();
    let full = evaluate_files(&reference, &samples, None, &options(&dir)).unwrap();
    // The reference's own Inception statistics, from the features the evaluation cached.
    let cached = std::fs::read_dir(dir.join("cache/reference-features"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let features: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&cached)
        .unwrap()
        .into_iter()
        .collect();
    let stats = meanflow_repro::eval::Stats::of(&features["pool"]).unwrap();
    for (mu, sigma) in [("mu", "sigma"), ("ref_mu", "ref_sigma")] {
        let only = dir.join(format!("{mu}.npz"));
        stats_npz(&only, &[(mu, &stats.mu), (sigma, &stats.sigma)]);
        let scores = evaluate_files(&only, &samples, None, &options(&dir)).unwrap();
        assert!(
            (scores.fid - full.fid).abs() <= 1e-9 * full.fid.abs().max(1.0),
            "{mu}: FID {} against {} from the images",
            scores.fid,
            full.fid
        );
        assert_eq!(
            (scores.sfid, scores.precision, scores.recall),
            (None, None, None)
        );
        let lines = scores.adm_lines();
        assert!(
            lines.contains("Precision: unavailable (the reference holds statistics"),
            "{lines}"
        );
    }
}
