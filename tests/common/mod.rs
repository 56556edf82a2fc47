//! Helpers shared by the integration tests.
#![allow(dead_code)]
pub mod parity;
use meanflow_repro::data::npy;
use meanflow_repro::model::{Conditioning, EmbedderInit, SiT, SiTConfig, TimeEmbedding};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

/// ||a - b|| / ||b|| in f64 (||b|| floored at 1e-300 so an all-zero reference still compares).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let diff = (&a - &b).norm().double_value(&[]);
    diff / b.norm().double_value(&[]).max(1e-300)
}

pub fn small_config(conditioning: Conditioning) -> SiTConfig {
    SiTConfig {
        input_size: 8,
        patch_size: 2,
        in_channels: 3,
        hidden_size: 24,
        depth: 2,
        num_heads: 3,
        num_classes: 5,
        conditioning,
        time_embedding: TimeEmbedding::Float32,
        embedder_init: EmbedderInit::Port,
    }
}

/// A float64 CPU network with every trainable parameter drawn at random (nothing zero), so
/// that every output and derivative is non-trivial.
pub fn random_network(config: &SiTConfig, seed: i64) -> (nn::VarStore, SiT) {
    tch::manual_seed(seed);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = SiT::new(&vs.root(), config);
    vs.double();
    tch::no_grad(|| {
        for mut v in vs.trainable_variables() {
            let noise = v.randn_like() * 0.1;
            v.copy_(&noise);
        }
    });
    (vs, net)
}

/// A golden file written by tests/make_eval_fixtures.py (`make test` runs it first) into
/// $MFR_EVAL_FIXTURES, default target/eval-fixtures.
pub fn eval_fixture(name: &str) -> BTreeMap<String, Tensor> {
    let dir = std::env::var_os("MFR_EVAL_FIXTURES").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/eval-fixtures"),
        PathBuf::from,
    );
    let path = dir.join(name);
    let tensors = Tensor::read_safetensors(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run `make test`, which writes the fixtures first)",
            path.display()
        )
    });
    tensors.into_iter().collect()
}

/// Writes root/spec.toml: a micro/2 network trained in float64 on the CPU (so reruns are bit for
/// bit) on 24 random latents under root/data (made once), batch 8, so 3 steps an epoch. `train`
/// is the rest of the [train] table (epochs, log_every, checkpoint_every, ...) and may open
/// further tables after it.
pub fn micro_spec(root: &Path, name: &str, train: &str) -> PathBuf {
    let data = root.join("data");
    if !data.exists() {
        latent_tree(&data, 24, None);
    }
    let spec = root.join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            "[experiment]\nname = \"{name}\"\n[model]\npreset = \"micro/2\"\ninput_size = 4\n\
             in_channels = 1\nnum_classes = 3\n[train]\ndata = \"{}\"\nbatch = 8\nlr = 1e-3\n\
             precision = \"f64\"\ndevice = \"cpu\"\n{train}",
            data.display()
        ),
    )
    .unwrap();
    spec
}

/// A REPA-layout tree of `n` posterior moments (2 x 4 x 4) with labels in 0..3.
pub fn latent_tree(root: &Path, n: usize, poison: Option<usize>) {
    latents_of(root, n, [1, 4, 3], poison);
}

/// A REPA-layout tree of `n` posterior moments of `channels` x `side` x `side` latents (the
/// means, then stds of 0.1) with labels in 0..`classes`; sample `poison` holds a NaN.
pub fn latents_of(
    root: &Path,
    n: usize,
    [channels, side, classes]: [usize; 3],
    poison: Option<usize>,
) {
    let dir = root.join("vae-sd").join("00000");
    std::fs::create_dir_all(&dir).unwrap();
    let mut labels = Vec::new();
    let half = channels * side * side;
    for i in 0..n {
        let name = format!("img-mean-std-{i:08}.npy");
        let mut values: Vec<f32> = (0..2 * half)
            .map(|j| ((i * 31 + j * 7) % 17) as f32 / 8.0 - 1.0)
            .collect();
        values[half..].iter_mut().for_each(|s| *s = 0.1);
        if poison == Some(i) {
            values[0] = f32::NAN;
        }
        npy::write_f32(&dir.join(&name), &[2 * channels, side, side], &values).unwrap();
        labels.push(serde_json::json!([format!("00000/{name}"), i % classes]));
    }
    let index = serde_json::json!({ "labels": labels });
    std::fs::write(root.join("vae-sd/dataset.json"), index.to_string()).unwrap();
}

/// A file written by tests/make_import_fixtures.py (`make test` runs it first) into
/// $MFR_IMPORT_FIXTURES, default target/import-fixtures.
pub fn import_fixture(name: &str) -> PathBuf {
    generated("MFR_IMPORT_FIXTURES", "target/import-fixtures", name)
}

/// The file `name` that a generator the Makefile runs before the tests wrote into the folder
/// `$<var>`, default `<default>` in the repository.
pub fn generated(var: &str, default: &str, name: &str) -> PathBuf {
    let dir = std::env::var_os(var).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(default),
        PathBuf::from,
    );
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{}: missing (run `make test`, which writes the fixtures first)",
        path.display()
    );
    path
}

/// Runs a Python snippet in the project's .venv with `args`, asserting it succeeds.
pub fn run_python<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) {
    let status = std::process::Command::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
    )
    .arg("-c")
    .arg(script)
    .args(args)
    .status()
    .expect("the project's .venv python (make setup)");
    assert!(status.success());
}

/// A fresh, empty directory for one test (tempfile's, under the system's temporary folder,
/// named after the test), removed with everything in it when the value is dropped.
pub fn temp_dir(name: &str) -> TempDir {
    TempDir(
        tempfile::Builder::new()
            .prefix(&format!("mfr-test-{name}-"))
            .tempdir()
            .unwrap(),
    )
}

/// A test's directory: a `Path` wherever one is asked for.
pub struct TempDir(tempfile::TempDir);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}

/// Training and sampling seed torch's one global generator per step or batch: tests that do
/// either take turns, or one test's draws would interleave with another's.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
