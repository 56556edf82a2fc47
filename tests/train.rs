//! Training runs: exact resume, checkpoints that survive a crash mid-write, the latent reader,
//! EMA arithmetic, the NaN stop, and a short run that learns.
mod common;
use common::{serial, temp_dir};

use common::latent_tree;
use meanflow_repro::data::{self, latents::Latents, npy, Dataset};
use meanflow_repro::pipeline::{self, Options, Stage};
use meanflow_repro::rundir::{checkpoint, Contention, RunDir};
use meanflow_repro::spec::Spec;
use meanflow_repro::train::{ema, run, TrainConfig};
use std::path::Path;
use tch::{nn, Device, Tensor};

fn latent_spec(data: &Path, extra: &str) -> Spec {
    let text = format!(
        r#"
[experiment]
name = "t"
[model]
preset = "micro/2"
input_size = 4
in_channels = 1
num_classes = 3
[train]
data = "{}"
batch = 8
epochs = 2
lr = 1e-3
precision = "f64"
device = "cpu"
log_every = 1
checkpoint_every = 3
keep_checkpoints = 5
{extra}
"#,
        data.display()
    );
    Spec::parse(&text, "test.toml").unwrap()
}

/// Trains `spec` in the run directory `dir`.
fn train(spec: &Spec, dir: &Path) -> anyhow::Result<run::Trained> {
    let ds = data::open(&spec.train.data)?;
    run::train(&TrainConfig::of(spec), ds, &RunDir::new(dir))
}

fn weights(path: &Path, prefix: &str) -> Vec<(String, Tensor)> {
    checkpoint::read_tensors(path)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .collect()
}

#[test]
fn n_steps_then_resume_then_n_steps_equals_2n_steps_bit_for_bit() {
    let _turn = serial();
    let root = temp_dir("resume");
    latent_tree(&root.join("data"), 24, None);
    let spec = latent_spec(&root.join("data"), "");
    let whole = root.join("whole");
    let trained = train(&spec, &whole).unwrap();
    assert_eq!(trained.steps, 6);

    // An interrupted run: only the step-3 checkpoint exists, as after a kill at step 4 or 5.
    let resumed = root.join("resumed");
    std::fs::create_dir_all(resumed.join("checkpoints")).unwrap();
    let halfway = checkpoint::file_name(3);
    std::fs::copy(
        whole.join("checkpoints").join(&halfway),
        resumed.join("checkpoints").join(&halfway),
    )
    .unwrap();
    let again = train(&spec, &resumed).unwrap();

    let (a, b) = (
        weights(&trained.checkpoint, ""),
        weights(&again.checkpoint, ""),
    );
    assert_eq!(a.len(), b.len());
    assert!(
        a.iter().any(|(k, _)| k.starts_with("opt.exp_avg."))
            && a.iter().any(|(k, _)| k.starts_with("ema."))
    );
    for ((ka, ta), (kb, tb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert!(ta.equal(tb), "{ka} differs after resume");
    }
    // And the run did move: the final weights are not the step-3 weights.
    let mid = weights(
        &whole.join("checkpoints").join(&halfway),
        "model.blocks.0.attn.qkv.weight",
    );
    let end = weights(&trained.checkpoint, "model.blocks.0.attn.qkv.weight");
    assert!(!mid[0].1.equal(&end[0].1));
}

#[test]
fn a_write_interrupted_mid_file_leaves_the_previous_checkpoint() {
    let _turn = serial();
    let root = temp_dir("truncated");
    latent_tree(&root.join("data"), 24, None);
    let spec = latent_spec(&root.join("data"), "");
    let dir = root.join("run");
    train(&spec, &dir).unwrap();
    let ckpts = dir.join("checkpoints");
    // A crash mid-write leaves a temporary file; a damaged final file may exist too.
    std::fs::write(ckpts.join("step-00000009.safetensors.tmp"), b"partial").unwrap();
    let whole = std::fs::read(ckpts.join(checkpoint::file_name(6))).unwrap();
    std::fs::write(
        ckpts.join(checkpoint::file_name(7)),
        &whole[..whole.len() / 2],
    )
    .unwrap();
    assert!(
        checkpoint::read_state(&ckpts.join(checkpoint::file_name(7)))
            .unwrap_err()
            .to_string()
            .contains("truncated")
    );
    let (path, state) = checkpoint::latest(&ckpts).expect("the previous checkpoint is still there");
    assert_eq!(state.step, 6);
    assert_eq!(path, ckpts.join(checkpoint::file_name(6)));
}

#[test]
fn the_latent_reader_reads_the_repa_layout_and_names_bad_files() {
    let root = temp_dir("reader");
    latent_tree(&root, 5, None);
    let ds = Latents::open(&root).unwrap();
    assert_eq!(
        (ds.len(), ds.stored_shape(), ds.num_classes()),
        (5, [2, 4, 4], 3)
    );
    let mut out = vec![0f32; 32];
    assert_eq!(ds.read(4, &mut out).unwrap(), 1);
    assert_eq!(out[1], ((4 * 31 + 7) % 17) as f32 / 8.0 - 1.0);

    // A latent with no label.
    npy::write_f32(
        &root.join("vae-sd/00000/img-mean-std-00000099.npy"),
        &[2, 4, 4],
        &[0.0; 32],
    )
    .unwrap();
    let err = format!("{:#}", Latents::open(&root).err().unwrap());
    assert!(
        err.contains("no label for 00000/img-mean-std-00000099.npy"),
        "{err}"
    );
    std::fs::remove_file(root.join("vae-sd/00000/img-mean-std-00000099.npy")).unwrap();

    // A truncated latent.
    let file = root.join("vae-sd/00000/img-mean-std-00000002.npy");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 9]).unwrap();
    let err = format!("{:#}", ds.read(2, &mut out).unwrap_err());
    assert!(
        err.contains("img-mean-std-00000002.npy") && err.contains("truncated"),
        "{err}"
    );

    // A bad label file, and a missing directory.
    std::fs::write(root.join("vae-sd/dataset.json"), "{\"labels\": 3}").unwrap();
    let err = format!("{:#}", Latents::open(&root).err().unwrap());
    assert!(
        err.contains("dataset.json") && err.contains("expected {\"labels\""),
        "{err}"
    );
    let err = format!("{:#}", data::open("/nonexistent/latents").err().unwrap());
    assert!(
        err.contains("/nonexistent/latents/vae-sd/dataset.json"),
        "{err}"
    );
}

#[test]
fn ema_moves_by_one_minus_decay() {
    let (model, shadow) = (
        nn::VarStore::new(Device::Cpu),
        nn::VarStore::new(Device::Cpu),
    );
    let p = model.root().var("w", &[3], nn::Init::Const(0.0));
    let e = shadow.root().var("w", &[3], nn::Init::Const(0.0));
    tch::no_grad(|| {
        p.shallow_clone()
            .copy_(&Tensor::from_slice(&[1.0f32, 2.0, -4.0]));
        e.shallow_clone()
            .copy_(&Tensor::from_slice(&[10.0f32, 0.0, 4.0]));
    });
    ema::update(&shadow, &model, 0.75).unwrap();
    assert_eq!(Vec::<f32>::try_from(&e).unwrap(), vec![7.75, 0.5, 2.0]);
}

#[test]
fn a_non_finite_loss_stops_training_without_saving_it() {
    let _turn = serial();
    let root = temp_dir("nan");
    latent_tree(&root.join("data"), 24, Some(5));
    let spec = latent_spec(&root.join("data"), "");
    let dir = root.join("run");
    let err = format!(
        "{:#}",
        train(&spec, &dir)
            .err()
            .expect("NaN data must stop training")
    );
    assert!(err.contains("non-finite loss or gradient at step"), "{err}");
    assert!(
        checkpoint::list(&dir.join("checkpoints")).is_empty(),
        "a poisoned state was checkpointed"
    );
}

#[test]
fn a_short_run_on_the_digits_learns() {
    let _turn = serial();
    if data::open("digits").is_err() {
        panic!("the digits are missing: run `make setup` (it installs scikit-learn into .venv)");
    }
    let root = temp_dir("learn");
    let text = r#"
[experiment]
name = "learn"
[model]
preset = "micro/2"
input_size = 8
in_channels = 1
num_classes = 10
[train]
data = "digits"
batch = 64
epochs = 4
lr = 2e-3
precision = "f32"
device = "cpu"
log_every = 8
checkpoint_every = 1000
"#;
    let spec = Spec::parse(text, "learn.toml").unwrap();
    train(&spec, &root).unwrap();
    let stats = meanflow_repro::rundir::read_stats(&root.join("stats.jsonl")).unwrap();
    let (first, last) = (stats.first().unwrap().v_loss, stats.last().unwrap().v_loss);
    assert!(last < 0.7 * first, "v loss went from {first} to {last}");
}

#[test]
fn an_existing_run_of_another_spec_is_refused_by_key() {
    let _turn = serial();
    let root = temp_dir("immutable");
    latent_tree(&root.join("data"), 24, None);
    let spec_path = root.join("spec.toml");
    let write_spec = |lr: &str| {
        let text = format!(
            "[experiment]\nname = \"imm\"\n[model]\npreset = \"micro/2\"\ninput_size = 4\nin_channels = 1\nnum_classes = 3\n[train]\ndata = \"{}\"\nbatch = 8\nepochs = 1\nlr = {lr}\nprecision = \"f64\"\ndevice = \"cpu\"\n",
            root.join("data").display()
        );
        std::fs::write(&spec_path, text).unwrap();
    };
    // `mfr train`: the sample stage of latent data would wait for the SD-VAE weights.
    let opts = Options {
        results: root.join("results"),
        dry_run: false,
        resume: false,
        only: Some(Stage::Train),
        reports: None,
        contention: Contention::Refuse,
        point: None,
    };
    write_spec("1e-3");
    pipeline::run(&spec_path, &[], &opts).unwrap();
    // Finished: running again is a no-op, not an error.
    pipeline::run(&spec_path, &[], &opts).unwrap();
    write_spec("2e-3");
    let err = pipeline::run(&spec_path, &[], &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("different spec") && err.contains("train.lr"),
        "{err}"
    );
}

#[test]
fn a_sweep_makes_one_run_per_point() {
    let text = "[experiment]\nname = \"s\"\n[model]\npreset = \"micro/2\"\n[sweep]\n\"meanflow.data_proportion\" = [1.0, 0.75]\n\"meanflow.omega\" = [1.0, 2.0]\n";
    let spec = Spec::parse(text, "s.toml").unwrap();
    let points = spec.points("s.toml").unwrap();
    let names: Vec<&str> = points.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "data_proportion=1.0,omega=1.0",
            "data_proportion=1.0,omega=2.0",
            "data_proportion=0.75,omega=1.0",
            "data_proportion=0.75,omega=2.0"
        ]
    );
    assert_eq!(points[3].1.meanflow.omega, 2.0);
    assert!(points[3].1.sweep.is_empty());
    let bad = "[experiment]\nname = \"s\"\n[model]\npreset = \"micro/2\"\n[sweep]\n\"meanflow.kappa\" = [0.5, 1.5]\n";
    let err = Spec::parse(bad, "s.toml").unwrap_err().to_string();
    assert!(
        err.contains("`sweep.meanflow.kappa`") && err.contains("[0, 1)"),
        "{err}"
    );
}

#[test]
fn cuda_graphs_on_a_cpu_are_refused_with_the_switch_named() {
    let err = meanflow_repro::train::graph::StepGraph::new(Device::Cpu)
        .err()
        .expect("a CPU has no CUDA graphs")
        .to_string();
    assert!(err.contains("train.cuda_graph"), "{err}");
}
