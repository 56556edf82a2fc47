//! The SD-VAE port against diffusers' AutoencoderKL, through golden data that
//! tests/make_vae_fixtures.py computes with it (`make test` runs it first; the directory is
//! $MFR_VAE_FIXTURES, default target/vae-fixtures): networks with every parameter drawn at random
//! (no GroupNorm scale 1, no bias 0), saved by diffusers' own save_pretrained, then decode of
//! random latents and encode (posterior mean and std) of random images.
//!
//! Tolerances, as ||ours - diffusers|| / ||diffusers|| over the whole output. Measured (libtorch
//! 2.11, CPU): exactly 0 in every comparison, float32 and float64 alike, since the port calls the
//! same libtorch kernels in the same order. The bounds allow for a libtorch or a device that picks
//! other kernels (another reduction order, another conv algorithm), and no more:
//! - float64 (tiny config): such a change moves the output by float64 rounding, ~1e-15; 1e-10 is
//!   far above that and far below any wrong operation (eps 1e-5 for 1e-6 in the GroupNorms, the
//!   smallest slip tried, moves it by 1e-5).
//! - float32: how far diffusers' float32 output is from exact arithmetic bounds how far another
//!   correct float32 ordering can land. Measured against float64 runs of the same weights and
//!   inputs: tiny 9.4e-7 (decode), 6.4e-7 (mean), 2.0e-7 (std); SD 3.6e-6, 1.3e-6, 4.3e-7, the SD
//!   decoder accumulating over its ~30 convolutions, 30 GroupNorms and the 64 x 64 attention. The
//!   bounds are about five times the worst of each: 5e-6 (tiny), 2e-5 (SD). Slips below that
//!   size are the float64 test's to catch.
mod common;

use common::rel_err;
use meanflow_repro::model::vae::{self, AutoencoderKl, VaeConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{nn::VarStore, Device, Kind, Tensor};

const F64: f64 = 1e-10;
const TINY_F32: f64 = 5e-6;
const SD_F32: f64 = 2e-5;

fn fixtures() -> PathBuf {
    std::env::var_os("MFR_VAE_FIXTURES").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/vae-fixtures"),
        PathBuf::from,
    )
}

/// A fixture's path, or a failure that says how to make it: no test here skips silently.
fn fixture(name: &str) -> PathBuf {
    let path = fixtures().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `make test`, which writes the fixtures first (or `.venv/bin/python tests/make_vae_fixtures.py {}`)",
        path.display(),
        fixtures().display()
    );
    path
}

fn io(name: &str) -> BTreeMap<String, Tensor> {
    let path = fixture(name);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn weights(dir: &str) -> PathBuf {
    fixture(&format!("{dir}/diffusion_pytorch_model.safetensors"))
}

fn load(dir: &str, cfg: &VaeConfig) -> (tch::nn::VarStore, AutoencoderKl) {
    meanflow_repro::import::vae::load(&weights(dir), cfg, Device::Cpu).unwrap()
}

/// Compares decode and encode with diffusers' outputs `decoded`, `mean`, `std` (+ `suffix`).
fn check(net: &AutoencoderKl, f: &BTreeMap<String, Tensor>, suffix: &str, tol: f64) {
    let decoded = net.decode(&f[&format!("latents{suffix}")]);
    let (mean, std) = net.encode(&f[&format!("images{suffix}")]);
    for (what, ours) in [("decoded", decoded), ("mean", mean), ("std", std)] {
        let theirs = &f[&format!("{what}{suffix}")];
        assert_eq!(ours.size(), theirs.size(), "{what}{suffix}");
        assert_eq!(ours.kind(), theirs.kind(), "{what}{suffix}");
        let err = rel_err(&ours, theirs);
        println!("{what}{suffix}: relative error {err:.2e}");
        assert!(
            err < tol,
            "{what}{suffix}: relative error {err:.2e} >= {tol:.0e}"
        );
    }
}

#[test]
fn tiny_config_matches_diffusers_in_float64() {
    let (mut vs, net) = load("tiny", &VaeConfig::tiny());
    vs.double();
    check(&net, &io("tiny-io.safetensors"), "_f64", F64);
}

#[test]
fn tiny_config_matches_diffusers_in_float32() {
    let (_vs, net) = load("tiny", &VaeConfig::tiny());
    check(&net, &io("tiny-io.safetensors"), "", TINY_F32);
}

#[test]
fn sd_config_matches_diffusers_in_float32() {
    let (_vs, net) = load("sd", &VaeConfig::sd());
    let f = io("sd-io.safetensors");
    // The SD shapes: 8x down, 4 latent channels.
    assert_eq!(f["decoded"].size(), [2, 3, 48, 64]);
    assert_eq!(f["mean"].size(), [2, 4, 6, 8]);
    check(&net, &f, "", SD_F32);
}

/// Every variable of `a` equals the one of the same name in `b`, and there are as many.
fn assert_same_weights(a: &VarStore, b: &VarStore) {
    let (a, b) = (a.variables(), b.variables());
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} differs");
    }
}

#[test]
fn legacy_attention_names_load_to_the_same_network() {
    let legacy_names = Tensor::read_safetensors(weights("tiny-legacy")).unwrap();
    let old = legacy_names
        .iter()
        .filter(|(n, _)| {
            [".query.", ".key.", ".value.", ".proj_attn."]
                .iter()
                .any(|o| n.contains(o))
        })
        .count();
    assert_eq!(
        old, 16,
        "the legacy fixture should hold 2 blocks x 4 projections x (weight, bias)"
    );
    let cfg = VaeConfig::tiny();
    assert_same_weights(&load("tiny", &cfg).0, &load("tiny-legacy", &cfg).0);
}

/// Writes `tensors` to a temporary safetensors file and loads it as the tiny config.
fn load_edited(tag: &str, tensors: Vec<(String, Tensor)>) -> anyhow::Result<VarStore> {
    let path =
        std::env::temp_dir().join(format!("mfr-vae-{tag}-{}.safetensors", std::process::id()));
    Tensor::write_safetensors(&tensors, &path).unwrap();
    let result = meanflow_repro::import::vae::load(&path, &VaeConfig::tiny(), Device::Cpu)
        .map(|(vs, _net)| vs);
    std::fs::remove_file(&path).unwrap();
    result
}

fn tiny_weights() -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(weights("tiny")).unwrap()
}

#[test]
fn attention_weights_stored_as_1x1_convolutions_load_too() {
    let conv_shaped: Vec<(String, Tensor)> = tiny_weights()
        .into_iter()
        .map(|(name, t)| {
            let projection = name.contains(".attentions.0.to_") && name.ends_with(".weight");
            let t = if projection {
                t.unsqueeze(-1).unsqueeze(-1)
            } else {
                t
            };
            (name, t)
        })
        .collect();
    let reshaped = conv_shaped
        .iter()
        .filter(|(_, t)| t.dim() == 4 && t.size()[2] == 1)
        .count();
    // 8 projections, plus the 1x1 quant convs and conv shortcuts, which were 4-d already.
    assert_eq!(reshaped, 8 + 2 + 4);
    let vs = load_edited("conv", conv_shaped).unwrap();
    assert_same_weights(&vs, &load("tiny", &VaeConfig::tiny()).0);
}

#[test]
fn a_missing_key_is_refused_by_name() {
    let missing = "decoder.mid_block.attentions.0.to_k.bias";
    let tensors = tiny_weights()
        .into_iter()
        .filter(|(n, _)| n != missing)
        .collect();
    let err = load_edited("missing", tensors).unwrap_err().to_string();
    assert!(err.contains(&format!("missing keys: {missing}")), "{err}");
    assert!(!err.contains("unexpected"), "{err}");
}

#[test]
fn an_unknown_key_is_refused_by_name() {
    let mut tensors = tiny_weights();
    tensors.push((
        "decoder.conv_extra.weight".into(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    ));
    let err = load_edited("extra", tensors).unwrap_err().to_string();
    assert!(
        err.contains("unexpected keys: decoder.conv_extra.weight"),
        "{err}"
    );
}

#[test]
fn an_attention_weight_under_both_names_is_refused() {
    let mut tensors = tiny_weights();
    let old = "encoder.mid_block.attentions.0.query.weight";
    let q = tensors
        .iter()
        .find(|(n, _)| n.ends_with("encoder.mid_block.attentions.0.to_q.weight"))
        .unwrap()
        .1
        .copy();
    tensors.push((old.into(), q));
    let err = format!("{:#}", load_edited("both", tensors).unwrap_err());
    assert!(
        err.contains("encoder.mid_block.attentions.0.to_q.weight"),
        "{err}"
    );
    assert!(err.contains("both its old and its new"), "{err}");
}

#[test]
fn uint8_conversion_rounds_half_up_clamps_and_goes_nhwc() {
    // One image, 1 x 4 pixels; each row below is one channel (R, G, B) across the 4 pixels.
    // 127.5 x + 128, truncated: -1 -> 0.5 -> 0; 0 -> 128 (ADM's floor of 127.5 (x + 1) gives
    // 127); 1 -> 255.5 -> 255; out of range clamps; 2^-7 -> 128.996 -> 128; -2^-7 -> 127.004 -> 127.
    let x = Tensor::from_slice(&[
        -1.0f32, 0.0, 1.0, 2.0, //
        -3.0, -0.5, 0.5, 0.0078125, //
        0.25, -0.25, -0.0078125, 0.99,
    ])
    .reshape([1, 3, 1, 4]);
    let u = vae::to_uint8_nhwc(&x);
    assert_eq!(u.size(), [1, 1, 4, 3]);
    assert_eq!(u.kind(), Kind::Uint8);
    let got = Vec::<u8>::try_from(u.flatten(0, -1)).unwrap();
    #[rustfmt::skip]
    let expected = [
        0, 0, 159, //
        128, 64, 96, //
        255, 191, 127, //
        255, 128, 254,
    ];
    assert_eq!(got, expected);
    // Any float dtype in, the same bytes out.
    assert!(vae::to_uint8_nhwc(&x.to_kind(Kind::Double)).equal(&u));
}
