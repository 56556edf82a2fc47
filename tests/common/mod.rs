//! Helpers shared by the integration tests.
#![allow(dead_code)]
use meanflow_repro::model::{Conditioning, SiT, SiTConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;
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

/// A file written by tests/make_import_fixtures.py (`make test` runs it first) into
/// $MFR_IMPORT_FIXTURES, default target/import-fixtures.
pub fn import_fixture(name: &str) -> PathBuf {
    let dir = std::env::var_os("MFR_IMPORT_FIXTURES").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/import-fixtures"),
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
