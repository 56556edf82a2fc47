//! Parity with the public PyTorch re-implementation of MeanFlow (HaoyiZhu/MeanFlow-PyTorch: its
//! models/sit_meanflow.py network and meanflow.py loss), through golden fixtures it computed in
//! float64 on the CPU with random weights: one training step each (format in
//! tests/fixtures/README.md). Every *.safetensors file in $MFR_FIXTURES (default
//! tests/fixtures/meanflow, a copy of the shared fixtures) is checked; nothing here knows which
//! files ship.
//!
//! The reference computes its time sinusoid in float32 even in a float64 network, and libtorch
//! takes float32 exp/sin/cos from MKL's vector math, whose last bit depends on the code path MKL
//! picks for the CPU: on an AVX-512 machine, t_embedder's gradients then differ from fixtures
//! made on MKL's generic path by ~2e-9 (measured). MKL's conditional numerical reproducibility
//! mode pins that path, so the comparison is exact on any x86 CPU: this test sets
//! MKL_CBWR=COMPATIBLE unless the caller chose a mode.
mod common;

use common::rel_err;
use meanflow_repro::meanflow::loss::velocity;
use meanflow_repro::meanflow::{
    meanflow_loss, sampler, Draw, Guidance, JvpMethod, MeanFlowConfig, Tangent, TimeSampler,
};
use meanflow_repro::model::{
    load_state_dict, Conditioning, EmbedderInit, SiT, SiTConfig, TimeEmbedding,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Tensor};

/// An exact float64 port agrees to ~1e-12; 1e-9 is generous and still catches any real change.
const TOLERANCE: f64 = 1e-9;

fn fixture_dir() -> PathBuf {
    match std::env::var_os("MFR_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/meanflow"),
    }
}

fn meta(path: &Path) -> Result<Value, String> {
    let header = meanflow_repro::tensorfile::header(path).map_err(|e| format!("{e:#}"))?;
    let meta = header.metadata.get("meta").ok_or("no `meta` metadata")?;
    serde_json::from_str(meta).map_err(|e| format!("`meta` is not JSON: {e}"))
}

fn num(v: &Value, key: &str) -> Result<f64, String> {
    v[key]
        .as_f64()
        .ok_or_else(|| format!("meta has no number `{key}`"))
}

#[derive(Default)]
struct Checker {
    bad: Vec<String>,
    worst: f64,
}

impl Checker {
    fn compare(&mut self, name: &str, ours: &Tensor, theirs: &Tensor) {
        if ours.size() != theirs.size() {
            self.fail(format!(
                "{name}: shape {:?}, reference {:?}",
                ours.size(),
                theirs.size()
            ));
            return;
        }
        let err = rel_err(ours, theirs);
        self.worst = self.worst.max(err);
        if std::env::var_os("PARITY_VERBOSE").is_some() {
            println!("  {name}: {err:.2e}");
        }
        if err.is_nan() || err > TOLERANCE {
            self.fail(format!("{name}: relative error {err:.3e} > {TOLERANCE:e}"));
        }
    }

    fn fail(&mut self, msg: String) {
        self.bad.push(msg);
    }
}

/// Compares every tensor the fixture holds with ours: one line per mismatch, and the largest
/// relative error seen (for the record).
fn check_fixture(path: &Path, jvp: JvpMethod) -> Result<(Vec<String>, f64), String> {
    let meta = meta(path)?;
    let tensors = Tensor::read_safetensors(path).map_err(|e| format!("unreadable tensors: {e}"))?;
    let file: BTreeMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    let get = |k: &str| {
        file.get(k)
            .map(|t| t.shallow_clone())
            .ok_or_else(|| format!("fixture lacks `{k}`"))
    };
    let m = &meta["model"];
    let int = |k: &str| num(m, k).map(|v| v as i64);
    let config = SiTConfig {
        input_size: int("input_size")?,
        patch_size: int("patch_size")?,
        in_channels: int("in_channels")?,
        hidden_size: int("hidden_size")?,
        depth: int("depth")?,
        num_heads: int("num_heads")?,
        num_classes: int("num_classes")?,
        conditioning: Conditioning::THalf,
        time_embedding: TimeEmbedding::Float32,
        embedder_init: EmbedderInit::Port,
    };
    let g = &meta["guidance"];
    let cfg = MeanFlowConfig {
        time_sampler: TimeSampler::LogitNormal {
            p_mean: num(&meta, "P_mean")?,
            p_std: num(&meta, "P_std")?,
        },
        data_proportion: num(&meta, "data_proportion")?,
        guidance: Guidance {
            omega: num(g, "omega")?,
            kappa: num(g, "kappa")?,
            t_start: num(g, "t_start")?,
            t_end: num(g, "t_end")?,
        },
        class_dropout: 0.1,
        tangent: Tangent { dr: 0.0, dt: 1.0 },
        jvp,
        norm_p: num(&meta, "norm_p")?,
        norm_eps: num(&meta, "norm_eps")?,
    };
    let mut check = Checker::default();
    if num(&meta, "null_label")? as i64 != config.null_class() {
        check.fail(format!(
            "null label {} is not num_classes {}",
            meta["null_label"],
            config.null_class()
        ));
    }

    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = SiT::new(&vs.root(), &config);
    vs.double();
    check.compare(
        "pos_embed",
        &vs.variables()["pos_embed"],
        &get("weights.pos_embed")?,
    );
    load_state_dict(&vs, &tensors, "weights.", &path.display().to_string())
        .map_err(|e| e.to_string())?;

    let (x, labels) = (get("io.x")?, get("io.labels")?);
    let num_drop = meta["num_drop"]
        .as_i64()
        .ok_or("meta has no integer `num_drop`")?;
    let draw = Draw::new(&cfg, get("io.t")?, get("io.r")?, get("io.e")?, num_drop);
    check.compare("r after data_proportion", &draw.r, &get("io.r")?);
    let terms = meanflow_loss(&net, &cfg, &x, &labels, &draw).map_err(|e| e.to_string())?;
    let null = labels.full_like(config.null_class());
    check.compare("z_t", &terms.z_t, &get("io.z_t")?);
    check.compare("v", &terms.v, &get("io.v")?);
    check.compare(
        "v_uncond",
        &velocity(&net, &terms.z_t, &draw.t, &null),
        &get("io.v_uncond")?,
    );
    check.compare("v_g", &terms.v_g, &get("io.v_g")?);
    if terms.y_inp != get("io.y_inp")? {
        check.fail("y_inp: labels after dropout differ".to_owned());
    }
    check.compare("u", &terms.u, &get("io.u")?);
    // du/dt only where the target uses it: the r = t rows' tangent is not computed (manual JVP).
    let (from, b) = (draw.r_equals_t, x.size()[0]);
    check.compare(
        "du_dt (rows with t != r)",
        &terms.du_dt.narrow(0, from, b - from),
        &get("io.du_dt")?.narrow(0, from, b - from),
    );
    check.compare("u_tgt", &terms.u_tgt, &get("io.u_tgt")?);
    check.compare(
        "per_sample_loss",
        &terms.per_sample_loss,
        &get("io.per_sample_loss")?,
    );
    check.compare(
        "adaptive_weight",
        &terms.adaptive_weight,
        &get("io.adaptive_weight")?,
    );
    check.compare("loss", &terms.loss.reshape([1]), &get("io.loss")?);
    check.compare("v_loss", &terms.v_loss.reshape([1]), &get("io.v_loss")?);

    terms.loss.backward();
    let trainable: BTreeMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .filter(|(_, v)| v.requires_grad())
        .collect();
    for (name, var) in &trainable {
        match file.get(&format!("grad.{name}")) {
            Some(reference) => check.compare(&format!("grad.{name}"), &var.grad(), reference),
            None => check.fail(format!("grad.{name}: missing from the fixture")),
        }
    }
    for name in file.keys().filter_map(|k| k.strip_prefix("grad.")) {
        if !trainable.contains_key(name) {
            check.fail(format!(
                "grad.{name}: the fixture has a gradient for a parameter we do not train"
            ));
        }
    }
    let sample = sampler::sample(&net, &draw.e, &labels, &[1.0, 0.0]).map_err(|e| e.to_string())?;
    check.compare("sample_1nfe", &sample, &get("io.sample_1nfe")?);
    Ok((check.bad, check.worst))
}

#[test]
fn every_fixture_matches_the_reference_step() {
    // Before libtorch's first MKL call (this file holds one test, so no other thread races it).
    if std::env::var_os("MKL_CBWR").is_none() {
        std::env::set_var("MKL_CBWR", "COMPATIBLE");
    }
    let dir = fixture_dir();
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fixture directory {} unreadable: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no *.safetensors fixtures in {}",
        dir.display()
    );
    let mut report = Vec::new();
    // Both ways of computing du/dt must reproduce the reference step.
    for (path, jvp) in files
        .iter()
        .flat_map(|p| [(p, JvpMethod::Manual), (p, JvpMethod::ForwardAd)])
    {
        let name = format!("{} [{jvp:?}]", path.display());
        match check_fixture(path, jvp) {
            Ok((bad, worst)) if bad.is_empty() => {
                println!("{name}: largest relative error {worst:.2e}")
            }
            Ok((bad, _)) => report.extend(bad.into_iter().map(|b| format!("{name}: {b}"))),
            Err(e) => report.push(format!("{name}: {e}")),
        }
    }
    assert!(report.is_empty(), "parity failures:\n{}", report.join("\n"));
}
