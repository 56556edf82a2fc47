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
    assert!(
        report.sfid.abs() < 1e-3,
        "sFID of identical sets: {}",
        report.sfid
    );
    assert_eq!((report.precision, report.recall), (1.0, 1.0));
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
        report.fid, report.sfid
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
