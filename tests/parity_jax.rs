//! Parity with the official JAX code (Gsunshine/meanflow) through golden steps it computed
//! itself, eagerly on the CPU in float64 (format: tests/fixtures/meanflow-jax/README.md). Every
//! *.safetensors file in $MFR_JAX_FIXTURES (default tests/fixtures/meanflow-jax) is checked the
//! same way; nothing here knows which files ship. Per file: our flax -> PyTorch name rule
//! (src/import/flax.rs) must give the file's own table (`meta.flax_to_torch`); the network is
//! built from the metadata (the time embedding in the dtype it names); the weights load through
//! that rule; and z_t, v, the guidance velocities, v_g, u, du/dt (every row, as the official JVP
//! covers r = t rows too), u_tgt, the per-sample losses, the loss, the v loss, every gradient,
//! the 1-NFE sample and `generate`'s 1- and 2-step samples must agree within 1e-9 relative, for
//! both ways of computing du/dt. Image tensors are NHWC in the files, NCHW here.
mod common;
use common::parity::{
    fixture_dir, fixtures_in, flax_weights, nchw, num, perturbed, read, Checker, Tensors,
};
use meanflow_repro::import::flax;
use meanflow_repro::meanflow::loss::{guide, u_and_du_dt, velocity};
use meanflow_repro::meanflow::{
    meanflow_loss, sampler, Draw, Guidance, JvpMethod, MeanFlowConfig, Tangent, TimeSampler,
};
use meanflow_repro::model::{
    load_state_dict, Conditioning, EmbedderInit, SiT, SiTConfig, TimeEmbedding,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{nn, Device, Tensor};

/// An exact float64 port agrees to ~1e-12; 1e-9 is generous and still fails a tensor that is
/// off by 1e-6 (checked below).
const TOLERANCE: f64 = 1e-9;

fn fixtures() -> Vec<PathBuf> {
    fixtures_in(&fixture_dir(
        "MFR_JAX_FIXTURES",
        "tests/fixtures/meanflow-jax",
    ))
}

/// Everything the fixture holds against ours: the mismatches, and the largest relative error.
fn check(meta: &Value, file: &Tensors, jvp: JvpMethod) -> Result<(Vec<String>, f64), String> {
    let get = |k: &str| {
        file.get(k)
            .map(|t| t.shallow_clone())
            .ok_or_else(|| format!("fixture lacks `{k}`"))
    };
    let m = &meta["model"];
    let int = |k: &str| num(m, k).map(|v| v as i64);
    let time_embedding = match meta["time_embedding_dtype"].as_str() {
        Some("float64") => TimeEmbedding::Float64,
        Some("float32") | None => TimeEmbedding::Float32,
        Some(other) => return Err(format!("time_embedding_dtype `{other}`")),
    };
    let config = SiTConfig {
        input_size: int("input_size")?,
        patch_size: int("patch_size")?,
        in_channels: int("in_channels")?,
        hidden_size: int("hidden_size")?,
        depth: int("depth")?,
        num_heads: int("num_heads")?,
        num_classes: int("num_classes")?,
        conditioning: Conditioning::THalf,
        time_embedding,
        embedder_init: EmbedderInit::Official,
    };
    let g = &meta["guidance"];
    let cfg = MeanFlowConfig {
        time_sampler: TimeSampler::LogitNormal {
            p_mean: num(meta, "P_mean")?,
            p_std: num(meta, "P_std")?,
        },
        data_proportion: num(meta, "data_proportion")?,
        guidance: Guidance {
            omega: num(g, "omega")?,
            kappa: num(g, "kappa")?,
            t_start: num(g, "t_start")?,
            t_end: num(g, "t_end")?,
        },
        class_dropout: num(meta, "class_dropout_prob")?,
        tangent: Tangent { dr: 0.0, dt: 1.0 },
        jvp,
        norm_p: num(meta, "norm_p")?,
        norm_eps: num(meta, "norm_eps")?,
    };
    let mut check = Checker::new(TOLERANCE);
    if num(meta, "null_label")? as i64 != config.null_class() {
        check.bad.push(format!(
            "null label {} is not num_classes",
            meta["null_label"]
        ));
    }

    // The name rule against the file's own table, then the weights through it.
    let params = flax_weights(meta, file, flax::torch_name, &mut check)?;
    let mut state = flax::to_state_dict(&params).map_err(|e| e.to_string())?;
    state.push(("pos_embed".to_owned(), get("const.pos_embed")?.unsqueeze(0)));

    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = SiT::new(&vs.root(), &config);
    vs.double();
    check.compare(
        "pos_embed",
        &vs.variables()["pos_embed"],
        &state.last().unwrap().1,
    );
    load_state_dict(&vs, &state, "", "the fixture").map_err(|e| e.to_string())?;

    let (x, labels) = (nchw(&get("io.x")?), get("io.labels")?);
    let num_drop = meta["num_drop"]
        .as_i64()
        .ok_or("meta has no integer num_drop")?;
    let draw = Draw::new(
        &cfg,
        get("io.t")?,
        get("io.r")?,
        nchw(&get("io.e")?),
        num_drop,
    );
    check.compare("r after data_proportion", &draw.r, &get("io.r")?);
    let terms = meanflow_loss(&net, &cfg, &x, &labels, &draw).map_err(|e| e.to_string())?;
    let image = |name: &str| get(name).map(|t| nchw(&t));
    check.compare("z_t", &terms.z_t, &image("io.z_t")?);
    check.compare("v", &terms.v, &image("io.v")?);
    let (v_g_guided, v_uncond) = guide(&net, &cfg.guidance, &terms.z_t, &draw.t, &terms.v, &labels);
    let null = labels.full_like(config.null_class());
    check.compare(
        "v_uncond",
        &v_uncond.unwrap_or_else(|| velocity(&net, &terms.z_t, &draw.t, &null)),
        &image("io.v_uncond")?,
    );
    if let Some(v_cond) = file.get("io.v_cond") {
        check.compare(
            "v_cond",
            &velocity(&net, &terms.z_t, &draw.t, &labels),
            &nchw(v_cond),
        );
    }
    check.compare(
        "v_g before label dropout",
        &v_g_guided,
        &image("io.v_g_guided")?,
    );
    check.compare("v_g", &terms.v_g, &image("io.v_g")?);
    if terms.y_inp != get("io.y_inp")? {
        check
            .bad
            .push("y_inp: labels after dropout differ".to_owned());
    }
    check.compare("u", &terms.u, &image("io.u")?);
    // The official JVP covers every row; ours skips the r = t rows in training, so du/dt of all
    // rows is taken here the same way with nothing skipped.
    let (_, du_dt) = u_and_du_dt(
        &net,
        &cfg,
        &terms.z_t,
        &draw.t,
        &draw.r,
        &terms.y_inp,
        &terms.v_g,
        0,
    )
    .map_err(|e| e.to_string())?;
    check.compare("du_dt", &du_dt, &image("io.du_dt")?);
    let (from, b) = (draw.r_equals_t, x.size()[0]);
    check.compare(
        "du_dt of the training step (rows t != r)",
        &terms.du_dt.narrow(0, from, b - from),
        &image("io.du_dt")?.narrow(0, from, b - from),
    );
    check.compare("u_tgt", &terms.u_tgt, &image("io.u_tgt")?);
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
    let grads: BTreeMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .filter(|(_, v)| v.requires_grad())
        .map(|(k, v)| (k, v.grad()))
        .collect();
    for (path, t) in file
        .iter()
        .filter_map(|(k, t)| Some((k.strip_prefix("grad.")?, t)))
    {
        let (torch, layout) = flax::torch_name(path, t.dim()).map_err(|e| e.to_string())?;
        match grads.get(&torch) {
            Some(ours) => check.compare(&format!("grad {torch}"), ours, &layout.apply(t)),
            None => check
                .bad
                .push(format!("grad.{path}: no parameter {torch} here")),
        }
    }
    let graded = file.keys().filter(|k| k.starts_with("grad.")).count();
    if graded != grads.len() {
        check.bad.push(format!(
            "{graded} gradients in the file, {} parameters here",
            grads.len()
        ));
    }

    let sample = sampler::sample(&net, &draw.e, &labels, &[1.0, 0.0]).map_err(|e| e.to_string())?;
    check.compare("sample_1nfe", &sample, &image("io.sample_1nfe")?);
    let (noise, gen_labels) = (image("gen.noise")?, get("gen.labels")?);
    let steps: Vec<f64> =
        Vec::try_from(&get("gen.t_steps_2nfe")?).map_err(|e: tch::TchError| e.to_string())?;
    let one = sampler::sample(&net, &noise, &gen_labels, &[1.0, 0.0]).map_err(|e| e.to_string())?;
    check.compare("generate, 1 step", &one, &image("gen.sample_1nfe")?);
    let two = sampler::sample(&net, &noise, &gen_labels, &steps).map_err(|e| e.to_string())?;
    check.compare("generate, 2 steps", &two, &image("gen.sample_2nfe")?);
    Ok((check.bad, check.worst))
}

#[test]
fn every_official_jax_fixture_matches_our_step() {
    if std::env::var_os("MKL_CBWR").is_none() {
        std::env::set_var("MKL_CBWR", "COMPATIBLE");
    }
    let mut report = Vec::new();
    for path in fixtures() {
        let (meta, file) = read(&path);
        for jvp in [JvpMethod::Manual, JvpMethod::ForwardAd] {
            let name = format!("{} [{jvp:?}]", path.display());
            match check(&meta, &file, jvp) {
                Ok((bad, worst)) if bad.is_empty() => {
                    println!("{name}: largest relative error {worst:.2e}")
                }
                Ok((bad, _)) => report.extend(bad.into_iter().map(|b| format!("{name}: {b}"))),
                Err(e) => report.push(format!("{name}: {e}")),
            }
        }
    }
    assert!(
        report.is_empty(),
        "JAX parity failures:\n{}",
        report.join("\n")
    );
}

#[test]
fn a_tensor_off_by_one_in_a_million_fails_the_check() {
    let path = &fixtures()[0];
    let (meta, file) = read(path);
    for key in ["io.u", "io.du_dt", "io.loss"] {
        let (bad, _) = check(&meta, &perturbed(&file, key), JvpMethod::Manual).unwrap();
        assert!(!bad.is_empty(), "{key} off by 1e-6 relative passed");
    }
    // And a weight: every output moves.
    let weight = file
        .keys()
        .find(|k| k.starts_with("weights.") && k.ends_with("qkv/_flax_linear/kernel"))
        .unwrap()
        .clone();
    let (bad, _) = check(&meta, &perturbed(&file, &weight), JvpMethod::Manual).unwrap();
    assert!(!bad.is_empty(), "{weight} off by 1e-6 relative passed");
}
