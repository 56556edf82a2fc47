//! The sample stage: any batch can be regenerated from its seed alone, an interrupted call
//! resumes from its part files to the same bytes, and numpy reads the .npz as ADM's format.
mod common;
use common::{serial, temp_dir};
use meanflow_repro::eval::npz::Npz;
use meanflow_repro::method::Generator;
use meanflow_repro::pipeline::sample::{Decoder, SampleConfig, Sampler};
use meanflow_repro::spec::Spec;

use std::path::PathBuf;
use tch::Tensor;

fn spec() -> Spec {
    Spec::parse(
        r#"
[experiment]
name = "s"
[model]
preset = "micro/2"
input_size = 8
in_channels = 1
num_classes = 10
[train]
data = "digits"
precision = "f32"
device = "cpu"
[sample]
num_samples = 25
batch = 10
"#,
        "test",
    )
    .unwrap()
}

/// The spec's network with the weights a fresh run starts from.
fn network(spec: &Spec) -> (tch::nn::VarStore, meanflow_repro::model::SiT) {
    tch::manual_seed(0);
    meanflow_repro::train::network(
        &spec.model_config(),
        spec.train.precision,
        tch::Device::Cpu,
        1.0,
    )
    .unwrap()
}

fn read_all(path: &std::path::Path) -> Tensor {
    let mut npz = Npz::open(path).unwrap();
    let mut images = npz.images("arr_0").unwrap();
    let mut out = Vec::new();
    while let Some(b) = images.next_batch(7).unwrap() {
        out.push(b);
    }
    Tensor::cat(&out, 0)
}

#[test]
fn a_batch_regenerated_alone_equals_its_slice_and_a_resumed_call_the_whole() {
    let _turn = serial();
    let spec = spec();
    let (_vs, net) = network(&spec);
    let cfg = SampleConfig::of(&spec);
    let sampler = Sampler {
        cfg: &cfg,
        net: Generator::MeanFlow(&net),
        decoder: &Decoder::Pixels,
        device: tch::Device::Cpu,
    };
    let dir = temp_dir("determinism");
    let whole = dir.join("whole.npz");
    assert_eq!(sampler.write_npz(&[1.0, 0.0], &whole).unwrap(), 25);
    let all = read_all(&whole);
    assert_eq!(all.size(), [25, 8, 8, 3]);
    // Batch 1 (images 10..20) alone, after other draws moved torch's generator.
    let _ = Tensor::randn([100], tch::kind::FLOAT_CPU);
    let one = sampler.batch(&[1.0, 0.0], 1, 10).unwrap();
    assert!(one.equal(&all.narrow(0, 10, 10)));
    assert!(
        !one.equal(&all.narrow(0, 0, 10)),
        "batches draw different noise"
    );

    // An interrupted call: the part files of batches 0 and 2 exist, no .npz yet.
    let resumed = dir.join("resumed.npz");
    let parts = resumed.with_extension("parts");
    std::fs::create_dir_all(&parts).unwrap();
    for (b, n) in [(0u64, 10i64), (2, 5)] {
        let images = sampler.batch(&[1.0, 0.0], b, n).unwrap();
        images
            .write_npy(parts.join(format!("batch-{b:06}.npy")))
            .unwrap();
    }
    sampler.write_npz(&[1.0, 0.0], &resumed).unwrap();
    assert!(read_all(&resumed).equal(&all));
    assert!(
        !parts.exists(),
        "the parts are removed once the .npz is whole"
    );
}

#[test]
fn numpy_reads_the_images_and_the_balanced_labels() {
    let _turn = serial();
    let spec = spec();
    let (_vs, net) = network(&spec);
    let cfg = SampleConfig::of(&spec);
    let sampler = Sampler {
        cfg: &cfg,
        net: Generator::MeanFlow(&net),
        decoder: &Decoder::Pixels,
        device: tch::Device::Cpu,
    };
    let dir = temp_dir("numpy");
    let path = dir.join("s.npz");
    sampler.write_npz(&[1.0, 0.5, 0.0], &path).unwrap();
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let out = std::process::Command::new(python)
        .args([
            "-c",
            "import numpy as np, sys; f = np.load(sys.argv[1]); a, y = f['arr_0'], f['arr_1']; \
             print(a.shape, a.dtype, y.dtype, list(y[:12]), a.min() >= 0, int(a.std() > 0))",
            path.to_str().unwrap(),
        ])
        .output()
        .expect("the project's .venv python (make setup)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.trim(),
        "(25, 8, 8, 3) uint8 int64 [np.int64(0), np.int64(1), np.int64(2), np.int64(3), np.int64(4), np.int64(5), np.int64(6), np.int64(7), np.int64(8), np.int64(9), np.int64(0), np.int64(1)] True 1"
    );
}

#[test]
fn a_damaged_part_is_drawn_again_and_never_assembled() {
    let _turn = serial();
    let spec = spec();
    let (_vs, net) = network(&spec);
    let cfg = SampleConfig::of(&spec);
    let sampler = Sampler {
        cfg: &cfg,
        net: Generator::MeanFlow(&net),
        decoder: &Decoder::Pixels,
        device: tch::Device::Cpu,
    };
    let dir = temp_dir("damaged-part");
    let whole = dir.join("whole.npz");
    sampler.write_npz(&[1.0, 0.0], &whole).unwrap();

    let path = dir.join("resumed.npz");
    sampler.write_parts(&[1.0, 0.0], &path, 0, 1).unwrap();
    let part = path.with_extension("parts").join("batch-000001.npy");
    let bytes = std::fs::read(&part).unwrap();
    // A part whose header is whole but whose data stops short: never assembled...
    std::fs::write(&part, &bytes[..bytes.len() - 37]).unwrap();
    let err = format!(
        "{:#}",
        sampler
            .parts(&path)
            .assemble(&sampler.all_labels())
            .unwrap_err()
    );
    assert!(
        err.contains("batch-000001.npy") && err.contains("bytes"),
        "{err}"
    );
    assert!(!path.exists());
    // ...and drawn again from its seed by the next call, which then makes the same .npz.
    sampler.write_npz(&[1.0, 0.0], &path).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(&whole).unwrap()
    );

    // Parts with an empty header or a scalar shape are damaged parts too, not a panic.
    sampler.write_parts(&[1.0, 0.0], &path, 0, 1).unwrap();
    let parts = path.with_extension("parts");
    let empty_header = b"\x93NUMPY\x01\x00\x00\x00".to_vec();
    std::fs::write(parts.join("batch-000000.npy"), empty_header).unwrap();
    let scalar = meanflow_repro::data::npy::encode("|u1", &[], &[7]);
    std::fs::write(parts.join("batch-000002.npy"), scalar).unwrap();
    sampler.write_npz(&[1.0, 0.0], &path).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(&whole).unwrap()
    );
}
