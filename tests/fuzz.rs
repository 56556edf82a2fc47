//! Property tests: random bytes, and real files with bytes flipped, cut or spliced, fed to every
//! reader of outside data (.npy, .npz, torch.save pickles, TorchScript archives, flax msgpack
//! checkpoints, images, safetensors, specs). Each must return an error or a value, never panic,
//! hang or exhaust memory.
mod common;
use common::{import_fixture, temp_dir, TempDir};
use meanflow_repro::data::npy;
use meanflow_repro::data::prepare;
use meanflow_repro::eval::npz::Npz;
use meanflow_repro::import::{flax, torch_file};
use proptest::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Cases per property: enough to reach the readers' branches, few enough for CI's time.
const CASES: u32 = 200;

/// `bytes` with edits applied: (position, new byte) flips, then a cut.
fn mutate(bytes: &[u8], flips: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for &(at, value) in flips {
        if !out.is_empty() {
            let i = at % out.len();
            out[i] = value;
        }
    }
    if let Some(c) = cut {
        out.truncate(c % (out.len() + 1));
    }
    out
}

fn edits() -> impl Strategy<Value = (Vec<(usize, u8)>, Option<usize>)> {
    (
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        prop::option::of(any::<usize>()),
    )
}

/// A case file in a fresh directory, removed when the directory is dropped.
fn scratch(name: &str) -> (TempDir, PathBuf) {
    let dir = temp_dir(&format!("fuzz-{name}"));
    let path = dir.join("case");
    (dir, path)
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

/// A zip holding `members` (stored), as .npz and torch.save files are.
fn zip_of(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in members {
        zip.start_file(*name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

fn good_npy() -> Vec<u8> {
    npy::encode("|u1", &[4, 5, 5, 3], &[7u8; 300])
}

/// The official JAX code's training state as flax writes it (tests/fixtures/flax).
fn flax_checkpoint() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/flax/msgpack/checkpoint_1234/checkpoint")
}

fn test_image() -> image::RgbImage {
    image::RgbImage::from_fn(24, 20, |x, y| {
        image::Rgb([(x * 9) as u8, (y * 11) as u8, 77])
    })
}

fn png_bytes() -> Vec<u8> {
    let mut out = Vec::new();
    test_image()
        .write_to(
            &mut std::io::Cursor::new(&mut out),
            image::ImageOutputFormat::Png,
        )
        .unwrap();
    out
}

fn jpeg_bytes() -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut out)
        .encode_image(&test_image())
        .unwrap();
    out
}

/// Reads everything an .npz offers the evaluator: the images in batches and the statistics.
fn read_npz(path: &Path) {
    let Ok(mut npz) = Npz::open(path) else { return };
    if let Ok(mut images) = npz.images("arr_0") {
        while let Ok(Some(_)) = images.next_batch(3) {}
    }
    let _ = npz.floats("mu", 2048);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn npy_headers(bytes in prop::collection::vec(any::<u8>(), 0..200), (flips, cut) in edits()) {
        let _ = npy::parse(&bytes);
        let _ = npy::parse(&mutate(&good_npy(), &flips, cut));
        let _ = npy::parse(&mutate(&npy::encode("<f4", &[3, 2], &[0u8; 24]), &flips, cut));
    }

    #[test]
    fn npz_files((flips, cut) in edits(), member in prop::collection::vec(any::<u8>(), 0..120)) {
        let (_dir, path) = scratch("npz");
        write(&path, &mutate(&zip_of(&[("arr_0.npy", &good_npy())]), &flips, cut));
        read_npz(&path);
        // A whole archive around a mutated or random member.
        write(&path, &zip_of(&[("arr_0.npy", &mutate(&good_npy(), &flips, cut)), ("mu.npy", &member)]));
        read_npz(&path);
    }

    #[test]
    fn torch_save_pickles((flips, cut) in edits(), junk in prop::collection::vec(any::<u8>(), 0..200)) {
        let real = std::fs::read(import_fixture("sit_flat.pth")).unwrap();
        let (_dir, path) = scratch("pickle");
        write(&path, &mutate(&real, &flips, cut));
        let _ = torch_file::load(&path);
        // The archive whole, its pickle random or mutated.
        let pickle = {
            let mut z = zip::ZipArchive::new(std::io::Cursor::new(&real)).unwrap();
            let name = z.file_names().find(|n| n.ends_with("data.pkl")).unwrap().to_owned();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut z.by_name(&name).unwrap(), &mut bytes).unwrap();
            bytes
        };
        for data in [junk.clone(), mutate(&pickle, &flips, cut)] {
            write(&path, &zip_of(&[("archive/data.pkl", &data), ("archive/byteorder", b"little")]));
            let _ = torch_file::load(&path);
            write(&path, &zip_of(&[("archive/data.pkl", &data), ("archive/constants.pkl", b"\x80\x02).")]));
            let _ = torch_file::load_torchscript(&path);
        }
    }

    #[test]
    fn flax_msgpack_files((flips, cut) in edits(), junk in prop::collection::vec(any::<u8>(), 0..200)) {
        let real = std::fs::read(flax_checkpoint()).unwrap();
        let (_dir, path) = scratch("flax");
        write(&path, &mutate(&real, &flips, cut));
        if let Ok(state) = flax::read_msgpack(&path) {
            let _ = flax::to_state_dict(&state.tensors());
        }
        // A map header in front of random bytes: what the import takes for a flax file.
        write(&path, &[&[0x81u8][..], &junk].concat());
        let _ = flax::read_msgpack(&path);
    }

    #[test]
    fn images((flips, cut) in edits()) {
        for good in [png_bytes(), jpeg_bytes()] {
            if let Ok(img) = prepare::decode_rgb(&mutate(&good, &flips, cut)) {
                let _ = prepare::center_crop(img, 16);
            }
        }
    }

    #[test]
    fn safetensors_files((flips, cut) in edits(), junk in prop::collection::vec(any::<u8>(), 0..200)) {
        let (_dir, path) = scratch("safetensors");
        let good = path.with_extension("good");
        if !good.exists() {
            let t = tch::Tensor::arange(12, tch::kind::FLOAT_CPU).view([3, 4]);
            meanflow_repro::tensorfile::write(&good, &[("w".to_owned(), t)], &[("k", "v".to_owned())]).unwrap();
        }
        let bytes = std::fs::read(&good).unwrap();
        write(&path, &mutate(&bytes, &flips, cut));
        let _ = meanflow_repro::tensorfile::read(&path);
        let _ = meanflow_repro::rundir::checkpoint::read_state(&path);
        write(&path, &junk);
        let _ = meanflow_repro::tensorfile::read(&path);
    }

    #[test]
    fn spec_texts(text in "\\PC{0,300}", (flips, cut) in edits()) {
        let _ = meanflow_repro::spec::Spec::parse(&text, "fuzz.toml");
        let real = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/experiments/demo-digits.toml")).unwrap();
        let mutated = String::from_utf8_lossy(&mutate(&real, &flips, cut)).into_owned();
        let _ = meanflow_repro::spec::Spec::parse(&mutated, "fuzz.toml");
    }
}
