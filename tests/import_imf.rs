//! `mfr import` of the official improved-MeanFlow checkpoints, against tiny ones the official
//! code's own save path wrote (tests/fixtures/imf-checkpoint, by tools/make_imf_checkpoint.py; its
//! README says how): the training state with its v-head (`full`) and the evaluation state without
//! (`inference`), as flax's msgpack writer and as orbax writes them (OCDBT, which only orbax reads:
//! `make flax-export` turns it into the msgpack the `msgpack/` files are). Every form a release
//! comes in (the zip, the folder it unpacks to, a checkpoint folder, a msgpack file) imports to
//! the same weights, and the imported network computes what the official network computes on
//! them: u and v, and the official `generate` at 1 and 2 NFE.
//!
//! Tolerances, relative L2 (measured on this 2-core Xeon: 2.4e-16 and 1.05e-7 at most):
//!   - 1e-9 in float64, against the official network run in float64 on the same float32 weights
//!     (the golden steps' numerics, tests/fixtures/imeanflow-jax): an exact port agrees to
//!     rounding (the parity test's 1e-9 and its reasons), a wrong name, layout or transposition
//!     gives O(1).
//!   - 2e-6 in float32, against the official float32 network under jit: the official code rounds
//!     its RoPE angles pos * f to float32 (absolute error up to ~2e-6 rad at this sequence's 34
//!     tokens) where ours rounds cos and sin of float64 angles, and XLA's float32 kernels differ
//!     from ATen's by an ulp per operation. The generator measures 1.6e-7 between its own float32
//!     and float64 outputs; 2e-6 is more than ten times either, and far below what an import
//!     error gives.
mod common;
use common::{rel_err, temp_dir};
use meanflow_repro::imf::sampler::{self, SamplingGuidance};
use meanflow_repro::import::flax::Layout;
use meanflow_repro::import::{self, imf};
use meanflow_repro::model::imf::{Conditions, Heads};
use meanflow_repro::model::{load_state_dict, AttentionKernel, ImfDiT, TimeEmbedding};
use meanflow_repro::rundir::checkpoint;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

const FLOAT64_TOLERANCE: f64 = 1e-9;
const FLOAT32_TOLERANCE: f64 = 2e-6;
const STEP: u64 = 2345;

fn fixture(rest: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/imf-checkpoint")
        .join(rest)
}

fn expected() -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(fixture("expected.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn import_to(file: &Path, out: &Path, preset: Option<&str>) -> anyhow::Result<import::Summary> {
    import::import(
        file,
        &import::Options {
            out: Some(out.to_owned()),
            preset: preset.map(str::to_owned),
            cache: out.parent().unwrap().join("cache"),
        },
    )
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// A zip of `dir`'s contents (paths relative to it), as the releases are zipped.
fn zip_folder(dir: &Path, zip: &Path) {
    fn walk(root: &Path, dir: &Path, w: &mut zip::ZipWriter<std::fs::File>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let name = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                w.add_directory(name, Default::default()).unwrap();
                walk(root, &p, w);
            } else {
                w.start_file(name, Default::default()).unwrap();
                w.write_all(&std::fs::read(&p).unwrap()).unwrap();
            }
        }
    }
    let mut w = zip::ZipWriter::new(std::fs::File::create(zip).unwrap());
    walk(dir, dir, &mut w);
    w.finish().unwrap();
}

/// The imported EMA network in `kind` (float64 or float32 variables).
fn imported_network(out: &Path, kind: Kind) -> (nn::VarStore, ImfDiT) {
    let metadata = checkpoint::read_metadata(out).unwrap();
    let time_embedding = match kind {
        Kind::Double => TimeEmbedding::Float64,
        _ => TimeEmbedding::Float32,
    };
    let mut config = imf::config_of(&metadata, time_embedding).unwrap();
    config.input_size = 8;
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = ImfDiT::new(&vs.root(), &config).unwrap();
    if kind == Kind::Double {
        vs.double();
    }
    let weights: Vec<(String, Tensor)> = checkpoint::read_tensors(out)
        .unwrap()
        .into_iter()
        .filter_map(|(k, t)| Some((k.strip_prefix("ema.")?.to_owned(), t)))
        .collect();
    load_state_dict(&vs, &weights, "", "the import").unwrap();
    (vs, net)
}

fn nchw(t: &Tensor) -> Tensor {
    t.permute([0, 3, 1, 2])
}

/// u, v (when the network has its v-head) and the two samples of the imported network, against
/// the official ones in `prefix` ("f64." or "f32."); returns the largest relative error.
fn compare_outputs(net: &ImfDiT, want: &BTreeMap<String, Tensor>, prefix: &str, tol: f64) -> f64 {
    let kind = if prefix == "f64." {
        Kind::Double
    } else {
        Kind::Float
    };
    let inputs = |k: &str| want[&format!("f32.{k}")].to_kind(kind);
    let theirs = |k: &str| {
        let t = &want[&format!("{prefix}{k}")];
        if t.dim() == 4 {
            nchw(t)
        } else {
            t.shallow_clone()
        }
    };
    let (t, r) = (inputs("t"), inputs("r"));
    let (omega, t_min, t_max) = (inputs("omega"), inputs("t_min"), inputs("t_max"));
    let cond = Conditions {
        omega: &omega,
        t_min: &t_min,
        t_max: &t_max,
        y: &want["f32.y"],
    };
    let x = nchw(&inputs("x"));
    let (u, v) =
        tch::no_grad(|| net.forward(&x, &(&t - &r), &cond, Heads::Both, AttentionKernel::Fused));
    let mut worst = 0f64;
    let mut check = |name: &str, ours: &Tensor, theirs: &Tensor| {
        let err = rel_err(ours, theirs);
        println!("  {prefix}{name}: {err:.2e}");
        assert!(
            err < tol,
            "{prefix}{name}: relative error {err:.3e} > {tol:e}"
        );
        worst = worst.max(err);
    };
    let want_u = if net.config.v_head {
        "u"
    } else {
        "u_inference"
    };
    check("u", &u.unwrap(), &theirs(want_u));
    match v {
        Some(v) => check("v", &v, &theirs("v")),
        None => assert!(!net.config.v_head),
    }
    let g = SamplingGuidance {
        omega: 8.0,
        t_min: 0.4,
        t_max: 0.65,
    };
    let noise = theirs("gen_noise");
    for steps in [1, 2] {
        let ours = sampler::sample(
            net,
            &noise,
            &want[&format!("{prefix}gen_labels")],
            &sampler::uniform_schedule(steps),
            &g,
        )
        .unwrap();
        check(
            &format!("generate, {steps} NFE"),
            &ours,
            &theirs(&format!("gen_sample_{steps}nfe")),
        );
    }
    worst
}

/// Imports `source`, checks what was written, and the network it holds against the official
/// outputs in float64 and float32.
fn imports_and_computes(source: &Path, full: bool, label: &str) {
    let dir = temp_dir(&format!("imf-{label}"));
    let out = dir.join("imported.safetensors");
    let summary = import_to(source, &out, None).unwrap();
    println!("{summary}");
    let variant = if full { "full" } else { "inference" };
    assert!(
        summary
            .preset
            .as_deref()
            .unwrap_or_default()
            .contains(variant),
        "{summary}"
    );
    let state = checkpoint::read_state(&out).unwrap();
    assert_eq!(state.step, STEP);
    let got = checkpoint::read_tensors(&out).unwrap();
    // Every EMA weight of the official state, through the name rule, bit for bit (the inference
    // state is the full one's without the v-head blocks).
    let want = expected();
    let mut n = 0;
    for (key, t) in &want {
        let Some(path) = key.strip_prefix("ema.") else {
            continue;
        };
        let (torch, layout) = imf::torch_name(path, t.dim()).unwrap();
        match got.get(&format!("ema.{torch}")) {
            Some(ours) => {
                assert_eq!(ours, &layout.apply(t), "{torch}");
                n += 1;
            }
            None => assert!(!full && path.contains("/v_heads_"), "{torch} missing"),
        }
    }
    let ema = got.keys().filter(|k| k.starts_with("ema.")).count();
    assert_eq!(n, ema, "EMA tensors written vs the official state's");
    assert_eq!(
        got.keys().filter(|k| k.starts_with("model.")).count(),
        ema,
        "the model holds the same parameters as the EMA"
    );
    // AdamW's moments: after one update in the full state (count 1), fresh in the inference one.
    let moments = got.keys().filter(|k| k.starts_with("opt.exp_avg.")).count();
    assert_eq!(moments, ema, "a first moment per parameter");
    assert_eq!(state.adam_step, i64::from(full), "{summary}");
    let m = &got["opt.exp_avg.net.u_heads.0.mlp.w1._flax_linear.weight"];
    assert_eq!(m.abs().max().double_value(&[]) > 0.0, full, "moments");

    let (_vs, net) = imported_network(&out, Kind::Double);
    assert_eq!(net.config.v_head, full);
    let worst64 = compare_outputs(&net, &want, "f64.", FLOAT64_TOLERANCE);
    let (_vs, net) = imported_network(&out, Kind::Float);
    let worst32 = compare_outputs(&net, &want, "f32.", FLOAT32_TOLERANCE);
    println!(
        "{}: largest relative error {worst64:.2e} (float64), {worst32:.2e} (float32)",
        source.display()
    );
}

#[test]
fn a_released_zip_imports_as_the_official_network() {
    for (variant, full) in [("full", true), ("inference", false)] {
        let dir = temp_dir(&format!("imf-zip-{variant}"));
        let zip = dir.join(format!("iMF-tiny-{variant}.zip"));
        zip_folder(&fixture(&format!("legacy/{variant}")), &zip);
        imports_and_computes(&zip, full, &format!("zip-{variant}-out"));
    }
}

#[test]
fn the_unpacked_folder_and_the_checkpoint_in_it_import_alike() {
    imports_and_computes(&fixture("legacy/full"), true, "folder");
    imports_and_computes(
        &fixture("legacy/inference/checkpoint_2345"),
        false,
        "checkpoint-file",
    );
}

#[test]
fn an_exported_orbax_checkpoint_imports() {
    imports_and_computes(&fixture("msgpack/full.msgpack"), true, "exported-full");
    imports_and_computes(
        &fixture("msgpack/inference.msgpack"),
        false,
        "exported-inference",
    );
}

#[test]
fn an_orbax_tensorstore_checkpoint_names_the_export_step() {
    let dir = temp_dir("imf-ocdbt");
    let zip = dir.join("iMF-tiny.zip");
    zip_folder(&fixture("orbax/inference"), &zip);
    for source in [
        zip.clone(),
        fixture("orbax/inference"),
        fixture("orbax/inference/checkpoint_2345"),
    ] {
        let err = err_of(import_to(&source, &dir.join("x.safetensors"), None));
        assert!(
            err.contains("OCDBT") && err.contains("make flax-export"),
            "{err}"
        );
    }
    assert!(
        std::fs::read_dir(&dir).unwrap().count() == 1,
        "nothing is left behind but the zip"
    );
}

#[test]
fn a_preset_that_is_not_the_checkpoints_is_refused() {
    let dir = temp_dir("imf-preset");
    let err = err_of(import_to(
        &fixture("msgpack/inference.msgpack"),
        &dir.join("x.safetensors"),
        Some("iMF-B/2"),
    ));
    assert!(
        err.contains("--preset iMF-B/2") && err.contains("depth 3"),
        "{err}"
    );
}

#[test]
fn a_zip_member_outside_its_folder_or_a_swollen_zip_is_refused() {
    let dir = temp_dir("imf-evil-zip");
    let evil = dir.join("evil.zip");
    let mut w = zip::ZipWriter::new(std::fs::File::create(&evil).unwrap());
    w.start_file("checkpoint_1/checkpoint", Default::default())
        .unwrap();
    w.write_all(b"x").unwrap();
    w.start_file("checkpoint_1/../../escaped", Default::default())
        .unwrap();
    w.write_all(b"x").unwrap();
    w.finish().unwrap();
    let err = err_of(import_to(&evil, &dir.join("x.safetensors"), None));
    assert!(err.contains("outside the folder"), "{err}");
    assert!(!dir.join("escaped").exists() && !dir.parent().unwrap().join("escaped").exists());

    // 64 MB of zeros deflate to ~64 kB: more unpacked than a checkpoint archive can hold.
    let swollen = dir.join("swollen.zip");
    let mut w = zip::ZipWriter::new(std::fs::File::create(&swollen).unwrap());
    let deflated =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    w.start_file("checkpoint_1", deflated).unwrap();
    w.write_all(&vec![0u8; 64 << 20]).unwrap();
    w.finish().unwrap();
    let err = err_of(import_to(&swollen, &dir.join("y.safetensors"), None));
    assert!(err.contains("more than 4 times its own size"), "{err}");
}

#[test]
fn a_zipped_meanflow_checkpoint_is_not_taken_for_an_imf_one() {
    let dir = temp_dir("imf-meanflow-zip");
    let zip = dir.join("meanflow.zip");
    zip_folder(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flax/msgpack"),
        &zip,
    );
    // MeanFlow's own importer takes it (the zip is its release form too).
    let summary = import_to(&zip, &dir.join("x.safetensors"), None).unwrap();
    assert_eq!(summary.kind, "official JAX (flax) checkpoint", "{summary}");
}

/// (flax path, rank, the port's key, layout): one of each kind of parameter.
const PATHS: [(&str, usize, &str, Layout); 9] = [
    (
        "net/shared_blocks_0/attn/q_proj/_flax_linear/kernel",
        2,
        "net.shared_blocks.0.attn.q_proj._flax_linear.weight",
        Layout::Transpose,
    ),
    (
        "params/net/v_heads_11/mlp/w2/_flax_linear/kernel",
        2,
        "net.v_heads.11.mlp.w2._flax_linear.weight",
        Layout::Transpose,
    ),
    (
        "net/h_embedder/mlp/layers_2/_flax_linear/bias",
        1,
        "net.h_embedder.mlp.2._flax_linear.bias",
        Layout::Same,
    ),
    (
        "net/x_embedder/proj/kernel",
        4,
        "net.x_embedder.proj.weight",
        Layout::HwioToOihw,
    ),
    (
        "net/u_heads_1/attn/k_norm/kernel",
        1,
        "net.u_heads.1.attn.k_norm.weight",
        Layout::Same,
    ),
    (
        "net/u_final_layer/norm/kernel",
        1,
        "net.u_final_layer.norm.weight",
        Layout::Same,
    ),
    (
        "net/y_embedder/embedding_table/_flax_embedding/embedding",
        2,
        "net.y_embedder.embedding_table._flax_embedding.weight",
        Layout::Same,
    ),
    ("net/t_max_tokens", 2, "net.t_max_tokens", Layout::Same),
    (
        "net/u_heads_0/mlp_scale",
        1,
        "net.u_heads.0.mlp_scale",
        Layout::Same,
    ),
];

#[test]
fn flax_paths_map_by_rule_and_anything_else_is_refused() {
    for (path, rank, key, layout) in PATHS {
        assert_eq!(
            imf::torch_name(path, rank).unwrap(),
            (key.to_owned(), layout),
            "{path}"
        );
    }
    for (path, rank) in [
        ("shared_blocks_0/attn/q_proj/_flax_linear/kernel", 2),
        ("net/shared_blocks_0/attn/q_proj/_flax_linear/kernel", 1),
        ("net/shared_blocks_0/attn/q_norm/scale", 1),
        ("net/blocks/layers_0/attn/qkv/_flax_linear/kernel", 3),
        ("net/class_tokens", 1),
    ] {
        let err = imf::torch_name(path, rank).unwrap_err().to_string();
        assert!(err.contains(path), "{err}");
    }
    // `shared_blocks_01` is not block 1: it stays a name, and the network has no such module.
    assert_eq!(
        imf::torch_name("net/shared_blocks_01/attn_scale", 1)
            .unwrap()
            .0,
        "net.shared_blocks_01.attn_scale"
    );
    let t = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    let twice = [
        ("net/u_heads_0/attn_scale".to_owned(), t.shallow_clone()),
        ("params/net/u_heads_0/attn_scale".to_owned(), t),
    ];
    assert!(imf::to_state_dict(&twice).is_err());
}

#[test]
fn mfr_import_of_the_zip_prints_one_line() {
    let dir = temp_dir("imf-cli");
    let zip = dir.join("iMF-tiny.zip");
    zip_folder(&fixture("legacy/full"), &zip);
    let out = dir.join("out.safetensors");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_mfr"))
        .arg("import")
        .arg(&zip)
        .arg("--out")
        .arg(&out)
        .env("MFR_CACHE", dir.join("cache"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains("official iMF (flax) checkpoint") && stdout.contains("full"),
        "{stdout}"
    );
    assert!(out.is_file());
}
