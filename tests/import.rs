//! `mfr import` and the torch.save reader, against files torch.save itself wrote: golden data from
//! tests/make_import_fixtures.py (`make test` runs it first; the directory is
//! $MFR_IMPORT_FIXTURES, default target/import-fixtures), the values it wrote exported beside
//! them as safetensors, compared bit for bit.
//!
//! The Inception comparison runs pytorch-fid's own InceptionV3 (FID blocks, built by its
//! fid_inception_v3 with random weights in place of the download) on 299 x 299 inputs in [-1, 1],
//! with BatchNorm scales drawn in [0.5, 1.5] so that the scale our import folds into each
//! convolution (weight and mean times gamma) matters. Tolerances, float32, relative L2:
//!   - 1e-6 against pytorch-fid running the same folded weights (folded by torch in the
//!     generator): the port and the name mapping. Same libtorch, same convolutions; measured 1.1e-7
//!     (pool_3) and 2.1e-7 (logits), a few ulps, where a swapped branch or a wrong pool gives O(1).
//!   - 1e-4 against pytorch-fid as built (unfolded): the rounding of gamma * W and gamma * mean
//!     (one ulp each), which this random, calibrated-on-4-images network amplifies to 2.0e-5 -
//!     the same 2.0e-5 that pytorch-fid itself shows between its folded and unfolded weights, so
//!     it is the folding's, not the port's. TF's graph has no scale, so the converted file's
//!     scales should all be 1, where folding multiplies by 1.0 and is exact (`mfr import` says
//!     whether any scale differs from 1).
//!
//! The Inception Score from `mfr evaluate` with those weights matches numpy's ADM formula on
//! pytorch-fid's logits to 1e-5 relative (measured 4e-8).
mod common;
use common::temp_dir;

use common::{import_fixture as fixture, rel_err};
use meanflow_repro::eval::evaluator::Options;
use meanflow_repro::eval::npz::write_images;
use meanflow_repro::import::inception;
use meanflow_repro::import::torch_file::{self, Value};
use meanflow_repro::import::{self, detect, FileKind};
use meanflow_repro::pipeline::evaluate_files;
use meanflow_repro::rundir::checkpoint;
use meanflow_repro::spec::Spec;
use meanflow_repro::train::{optim::AdamW, run, trainable, Networks, TrainConfig};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Tensor};

fn expected(name: &str) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(fixture(name))
        .unwrap()
        .into_iter()
        .collect()
}

fn bytes(t: &Tensor) -> Vec<u8> {
    let c = t.contiguous();
    let mut out = vec![0u8; c.numel() * c.kind().elt_size_in_bytes()];
    c.copy_data_u8(&mut out, c.numel());
    out
}

/// Same dtype, shape and bits.
fn assert_same(name: &str, ours: &Tensor, theirs: &Tensor) {
    assert_eq!(ours.kind(), theirs.kind(), "{name}: dtype");
    assert_eq!(ours.size(), theirs.size(), "{name}: shape");
    assert!(bytes(ours) == bytes(theirs), "{name}: values differ");
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
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

#[test]
fn tensors_of_every_dtype_and_shared_views_equal_what_torch_saved() {
    let want = expected("tensors_expected.safetensors");
    for file in ["tensors.pth", "tensors_p4.pth"] {
        let value = torch_file::load(&fixture(file)).unwrap();
        let tensors = value.get("tensors").unwrap();
        assert_eq!(tensors.keys().len(), want.len(), "{file}");
        for (name, t) in &want {
            let ours = tensors.get(name).and_then(Value::as_tensor).unwrap();
            assert_same(&format!("{file} {name}"), ours, t);
        }
        // The views are views of the base's storage, as torch rebuilt them.
        let get = |k: &str| tensors.get(k).and_then(Value::as_tensor).unwrap();
        let (base, view_t, slice) = (get("base"), get("view_t"), get("view_slice"));
        assert_eq!(view_t.stride(), [1, 6]);
        assert_eq!(view_t.data_ptr(), base.data_ptr());
        assert_eq!(slice.stride(), [6, 2]);
        assert_eq!(slice.data_ptr() as usize, base.data_ptr() as usize + 6 * 4);

        let plain = value.get("plain").unwrap();
        let int = |k: &str| plain.get(k).and_then(Value::as_int).unwrap();
        assert_eq!((int("int"), int("neg"), int("big")), (5, -7, 1 << 40));
        assert_eq!(int("np_i64"), -3);
        assert_eq!(plain.get("float").and_then(Value::as_f64), Some(0.25));
        assert_eq!(plain.get("np_f64").and_then(Value::as_f64), Some(1.5));
        assert_eq!(plain.get("str").and_then(Value::as_str), Some("héllo"));
        assert!(matches!(plain.get("none"), Some(Value::None)));
        assert!(matches!(plain.get("yes"), Some(Value::Bool(true))));
        assert!(matches!(plain.get("bytes"), Some(Value::Bytes(b)) if b == &[0, 255]));
        assert!(
            matches!(plain.get("list"), Some(Value::List(l)) if l.len() == 2 && l[1].as_int() == Some(2))
        );
        assert!(matches!(plain.get("tuple"), Some(Value::Tuple(t)) if t[1].as_str() == Some("a")));
        assert_eq!(
            plain
                .get("ns")
                .and_then(|n| n.get("a"))
                .and_then(Value::as_int),
            Some(1)
        );
    }
}

#[test]
fn a_pickle_that_calls_os_system_is_refused_and_runs_nothing() {
    let file = fixture("evil.pth");
    let marker = file.with_file_name("PWNED");
    let err = err_of(torch_file::load(&file));
    assert!(
        err.contains("evil.pth: refusing to load: pickle global posix.system is not a tensor"),
        "{err}"
    );
    let err = err_of(import_to(
        &file,
        &temp_dir("evil").join("out.safetensors"),
        None,
    ));
    assert!(err.contains("posix.system"), "{err}");
    assert!(!marker.exists(), "the payload ran: {}", marker.display());
}

#[test]
fn opcodes_outside_torch_saves_are_refused() {
    let err = err_of(torch_file::load(&fixture("opcode_inst.pth")));
    assert!(
        err.contains("opcode_inst.pth: refusing to load: pickle opcode INST (0x69)"),
        "{err}"
    );
    let err = err_of(torch_file::load(&fixture("opcode_unknown.pth")));
    assert!(
        err.contains("opcode_unknown.pth: refusing to load: unknown pickle opcode 0xff"),
        "{err}"
    );
    assert!(!fixture("opcode_inst.pth").with_file_name("PWNED").exists());
}

#[test]
fn truncated_legacy_and_foreign_files_get_one_clear_sentence() {
    let dir = temp_dir("bad");
    let whole = std::fs::read(fixture("tensors.pth")).unwrap();
    let cut = dir.join("cut.pth");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let err = err_of(torch_file::load(&cut));
    assert!(
        err.contains("cut.pth: not a readable zip archive") && err.contains("truncated"),
        "{err}"
    );
    let err = err_of(torch_file::load(&fixture("pickle_truncated.pth")));
    assert!(
        err.contains("pickle_truncated.pth: malformed pickle") && err.contains("truncated"),
        "{err}"
    );
    let err = err_of(torch_file::load(&fixture("legacy.pth")));
    assert!(
        err.contains("legacy.pth: a legacy (non-zip) torch.save file")
            && err.contains("re-save it"),
        "{err}"
    );
    assert_eq!(
        detect(&fixture("legacy.pth")).unwrap(),
        FileKind::LegacyTorchSave
    );
    let script = inception::bundled_torchscript().unwrap();
    assert_eq!(detect(&script).unwrap(), FileKind::TorchScript);
    let err = err_of(torch_file::load(&script));
    assert!(err.contains("a TorchScript archive"), "{err}");
    let junk = dir.join("junk.pth");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    let err = err_of(import_to(&junk, &dir.join("out.safetensors"), None));
    assert!(err.contains("junk.pth: neither a torch.save file"), "{err}");
}

#[test]
fn a_flat_state_dict_imports_as_model_and_ema_with_prefixes_stripped() {
    let dir = temp_dir("flat");
    let out = dir.join("flat.safetensors");
    let summary = import_to(&fixture("sit_flat.pth"), &out, None).unwrap();
    assert_eq!(summary.preset.as_deref(), Some("micro/2 (t,t-r)"));
    let want = expected("sit_flat_expected.safetensors");
    let got = checkpoint::read_tensors(&out).unwrap();
    assert_eq!(got.len(), 2 * want.len(), "model.* and ema.*, no optimizer");
    for (name, t) in &want {
        assert_same(&format!("model.{name}"), &got[&format!("model.{name}")], t);
        assert_same(&format!("ema.{name}"), &got[&format!("ema.{name}")], t);
    }
    let meta = checkpoint::read_metadata(&out).unwrap();
    let record: serde_json::Value = serde_json::from_str(&meta["import"]).unwrap();
    assert!(record["optimizer"].as_str().unwrap().starts_with("none"));
}

fn micro_spec() -> Spec {
    Spec::parse(
        r#"
[experiment]
name = "imported"
[model]
preset = "micro/2"
[train]
data = "unused"
precision = "f32"
device = "cpu"
"#,
        "import-test.toml",
    )
    .unwrap()
}

#[test]
fn a_training_checkpoint_imports_and_restores_through_the_trainer() {
    let dir = temp_dir("nested");
    let out = dir.join("nested.safetensors");
    let file = fixture("sit_nested.pth");
    let summary = import_to(&file, &out, None).unwrap();
    println!("{summary}");
    let want = expected("sit_nested_expected.safetensors");
    let got = checkpoint::read_tensors(&out).unwrap();
    for (name, t) in &want {
        let ours = if name.starts_with("exp_avg") {
            format!("opt.{name}")
        } else {
            name.clone()
        };
        assert_same(name, &got[&ours], t);
    }
    // pos_embed is fixed: the optimizer holds no moments for it, and neither do we.
    assert!(!got.contains_key("opt.exp_avg.pos_embed"));
    assert_eq!(got.len(), want.len());

    let state = checkpoint::read_state(&out).unwrap();
    assert_eq!((state.step, state.adam_step), (1234, 2));
    let meta = checkpoint::read_metadata(&out).unwrap();
    let record: serde_json::Value = serde_json::from_str(&meta["import"]).unwrap();
    let sha = meanflow_repro::files::sha256_file(&file).unwrap();
    assert_eq!(record["source_sha256"], sha);
    assert_eq!(state.spec_sha256, format!("imported:{sha}"));
    assert_eq!(record["preset"], "micro/2");

    // The trainer's own resume path loads it, every name and shape checked.
    let spec = micro_spec();
    let nets = Networks::on(&TrainConfig::of(&spec), Device::Cpu, true).unwrap();
    let ema_vs = &nets.ema.as_ref().unwrap().0;
    let mut opt = AdamW::new(trainable(&nets.vs), 1e-4, [0.9, 0.95], 0.0);
    run::restore(&out, &state, &nets.vs, Some(ema_vs), &mut opt).unwrap();
    for (name, v) in nets.vs.variables() {
        assert_same(&name, &v, &want[&format!("model.{name}")]);
    }
    for (name, v) in ema_vs.variables() {
        assert_same(&name, &v, &want[&format!("ema.{name}")]);
    }
    assert_eq!(opt.step(), 2);
    for p in &opt.params {
        let name = &p.name;
        assert_same(name, &p.exp_avg, &want[&format!("exp_avg.{name}")]);
        assert_same(name, &p.exp_avg_sq, &want[&format!("exp_avg_sq.{name}")]);
    }
}

#[test]
fn an_ema_only_checkpoint_fills_the_model_and_reads_a_numpy_step() {
    let dir = temp_dir("ema");
    let out = dir.join("ema.safetensors");
    import_to(&fixture("sit_ema_only.pth"), &out, None).unwrap();
    let want = expected("sit_flat_expected.safetensors");
    let got = checkpoint::read_tensors(&out).unwrap();
    for (name, t) in &want {
        assert_same(name, &got[&format!("model.{name}")], t);
        assert_same(name, &got[&format!("ema.{name}")], t);
    }
    assert_eq!(checkpoint::read_state(&out).unwrap().step, 99);
    let nets = Networks::on(&TrainConfig::of(&micro_spec()), Device::Cpu, false).unwrap();
    checkpoint::load_ema(&nets.vs, &out).unwrap();
}

#[test]
fn a_wrong_shape_a_missing_key_or_another_preset_is_refused_by_name() {
    let dir = temp_dir("wrong");
    let out = dir.join("out.safetensors");
    let err = err_of(import_to(&fixture("sit_wrong_shape.pth"), &out, None));
    assert!(
        err.contains("wrong shapes: blocks.1.mlp.fc1.weight is [128, 33] in the file, [128, 32] in the network"),
        "{err}"
    );
    let err = err_of(import_to(&fixture("sit_missing_key.pth"), &out, None));
    assert!(
        err.contains("missing keys: final_layer.linear.bias"),
        "{err}"
    );
    let err = err_of(import_to(&fixture("sit_flat.pth"), &out, Some("SiT-B/4")));
    assert!(
        err.contains(
            "x_embedder.proj.weight is [32, 4, 2, 2] in the file, [768, 4, 4, 4] in the network"
        ),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written for a refused file");
}

#[test]
fn pytorch_fid_weights_give_pytorch_fids_pool_3_and_logits() {
    let f = expected("inception_expected.safetensors");
    let (_vs, net) = inception::load(&fixture("pt_inception_random.pth"), Device::Cpu).unwrap();
    let features = tch::no_grad(|| net.features(&f["input"]));
    let logits = tch::no_grad(|| net.logits(&features.pool)).expect("a softmax layer");
    let err = |ours: &Tensor, key: &str| rel_err(ours, &f[key]);
    let (pool_folded, logits_folded) = (
        err(&features.pool, "pool_folded"),
        err(&logits, "logits_folded"),
    );
    let (pool, logits) = (err(&features.pool, "pool"), err(&logits, "logits"));
    println!("vs pytorch-fid with the scales folded in torch: pool_3 {pool_folded:.2e}, logits {logits_folded:.2e}");
    println!("vs pytorch-fid as built: pool_3 {pool:.2e}, logits {logits:.2e}");
    // The port and the names: the same arithmetic as pytorch-fid on the same folded weights.
    assert!(pool_folded < 1e-6, "pool_3 (folded): {pool_folded:.2e}");
    assert!(logits_folded < 1e-6, "logits (folded): {logits_folded:.2e}");
    // The folding: the rounding of gamma * W and gamma * mean, amplified by this network.
    assert!(pool < 1e-4, "pool_3: {pool:.2e}");
    assert!(logits < 1e-4, "logits: {logits:.2e}");
    for i in 0..4 {
        let e = rel_err(&features.pool.get(i), &f["pool"].get(i));
        assert!(e < 1e-4, "image {i}: {e:.2e}");
    }
}

#[test]
fn importing_pytorch_fid_keeps_the_softmax_layer_and_the_network() {
    let dir = temp_dir("pt-inception");
    let out = dir.join("inception.safetensors");
    let file = fixture("pt_inception_random.pth");
    let summary = import_to(&file, &out, None).unwrap();
    assert_eq!(summary.tensors, 94 * 4 + 1);
    assert!(summary.details.contains("dropped fc.bias"), "{summary}");
    let f = expected("inception_expected.safetensors");
    let (_a, direct) = inception::load(&file, Device::Cpu).unwrap();
    let (_b, imported) = inception::load(&out, Device::Cpu).unwrap();
    let x = f["input"].narrow(0, 0, 1);
    let (p, q) = tch::no_grad(|| (direct.features(&x).pool, imported.features(&x).pool));
    assert_same("pool_3", &q, &p);
    assert!(imported.has_softmax());
    let err = err_of(import_to(&file, &out, Some("micro/2")));
    assert!(
        err.contains("--preset micro/2 applies to SiT checkpoints"),
        "{err}"
    );
}

#[test]
fn evaluate_reports_adms_inception_score_with_pytorch_fid_weights() {
    let dir = temp_dir("is");
    let f = expected("inception_expected.safetensors");
    let images = dir.join("images.npz");
    write_images(&images, &f["images"]).unwrap();
    let opts = Options {
        batch: 4,
        device: Device::Cpu,
        bootstrap: 0,
        cache: dir.join("cache"),
    };
    let weights = fixture("pt_inception_random.pth");
    let report = evaluate_files(&images, &images, Some(&weights), &opts).unwrap();
    let want = f["is"].double_value(&[0]);
    let is = report.inception_score.expect("IS with the softmax layer");
    println!("IS {is} (pytorch-fid logits: {want})");
    assert!((is - want).abs() / want < 1e-5, "IS {is} vs {want}");
    assert!(report
        .adm_lines()
        .starts_with(&format!("Inception Score: {is}\n")));
    assert!(
        report.fid.abs() < 1e-3,
        "FID of a set with itself: {}",
        report.fid
    );
}

#[test]
fn mfr_import_prints_one_line() {
    let dir = temp_dir("cli");
    let out = dir.join("b.safetensors");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_mfr"))
        .args(["import"])
        .arg(fixture("sit_nested.pth"))
        .arg("--out")
        .arg(&out)
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
        stdout.contains("sit_nested.pth: SiT checkpoint micro/2 (t,t-r), 142 tensors")
            && stdout.contains("AdamW moments of 35 parameters at step 2")
            && stdout.trim_end().ends_with(&out.display().to_string()),
        "{stdout}"
    );
    let evil = std::process::Command::new(env!("CARGO_BIN_EXE_mfr"))
        .args(["import"])
        .arg(fixture("evil.pth"))
        .output()
        .unwrap();
    assert!(!evil.status.success());
    let stderr = String::from_utf8_lossy(&evil.stderr);
    assert!(
        stderr.starts_with("error: ")
            && stderr.contains("posix.system")
            && stderr.lines().count() == 1,
        "{stderr}"
    );
}

fn flax_fixture(rest: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/flax")
        .join(rest)
}

#[test]
fn an_official_flax_checkpoint_imports_and_computes_what_the_flax_network_computes() {
    let dir = temp_dir("flax");
    let out = dir.join("official.safetensors");
    let summary = import_to(&flax_fixture("msgpack/checkpoint_1234"), &out, None).unwrap();
    assert_eq!(summary.preset.as_deref(), Some("micro/2 (t,t-r)"));
    assert!(
        summary.details.contains("EMA from ema_params/net"),
        "{summary}"
    );
    let state = checkpoint::read_state(&out).unwrap();
    assert_eq!(state.step, 1234);
    let got = checkpoint::read_tensors(&out).unwrap();
    // Every EMA weight as the flax network holds it, through the name rule, bit for bit.
    let want = expected_flax();
    let mut n = 0;
    for (key, t) in &want {
        let Some(path) = key.strip_prefix("ema.") else {
            continue;
        };
        let (torch, layout) = meanflow_repro::import::flax::torch_name(path, t.dim()).unwrap();
        assert_same(&torch, &got[&format!("ema.{torch}")], &layout.apply(t));
        n += 1;
    }
    assert_eq!(n, 35);
    // The imported network on the generator's input: the flax network's u. The flax network
    // computes its position table itself; ours is built for the fixture's 8 x 8 input.
    let config = meanflow_repro::model::SiTConfig {
        input_size: 8,
        in_channels: 4,
        num_classes: 10,
        ..meanflow_repro::model::SiTConfig::preset("micro/2").unwrap()
    };
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let net = meanflow_repro::model::SiT::new(&vs.root(), &config);
    let mut weights: Vec<(String, Tensor)> = got
        .iter()
        .filter_map(|(k, t)| Some((k.strip_prefix("ema.")?.to_owned(), t.shallow_clone())))
        .filter(|(k, _)| k != "pos_embed")
        .collect();
    weights.push((
        "pos_embed".to_owned(),
        vs.variables()["pos_embed"].shallow_clone(),
    ));
    meanflow_repro::model::load_state_dict(&vs, &weights, "", "the import").unwrap();
    let nchw = |t: &Tensor| t.permute([0, 3, 1, 2]);
    let (t, r) = (&want["t"], &want["r"]);
    let u = tch::no_grad(|| {
        net.forward(
            &nchw(&want["x"]),
            t,
            r,
            &want["y"],
            meanflow_repro::model::AttentionKernel::Explicit,
        )
    });
    // float32 on both sides, XLA's kernels against ATen's: rounding of ~1e-7 per operation
    // through a two-block network; 1e-5 relative is ~20x what it gives and far below what a
    // wrong name, layout or transposition does (the non-EMA weights differ by 1.26).
    let err = rel_err(&u.permute([0, 2, 3, 1]), &want["u"]);
    println!("imported network vs the flax network: {err:.2e} relative");
    assert!(err < 1e-5, "u differs from the flax network's by {err:.3e}");
    assert!(
        rel_err(&want["u_params"], &want["u"]) > 0.1,
        "the fixture tells EMA from model"
    );
}

#[test]
fn an_orbax_tensorstore_checkpoint_names_the_export_step() {
    let dir = temp_dir("ocdbt");
    let err = err_of(import_to(
        &flax_fixture("ocdbt/checkpoint_1234"),
        &dir.join("x.safetensors"),
        None,
    ));
    assert!(
        err.contains("OCDBT") && err.contains("make flax-export"),
        "{err}"
    );
}

fn expected_flax() -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(flax_fixture("expected.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}
