//! `mfr run`: a spec's runs (one, or one per sweep point) in immutable run directories
//! results/<experiment>/<run>/, each going through its stages (train, sample, curves). A stage
//! whose outputs are present for unchanged inputs is skipped, so any run can be rerun or resumed.
use crate::data::{self, Dataset};
use crate::dist::World;
use crate::meanflow::sampler;
use crate::report;
use crate::spec::Spec;
use crate::train::{self, checkpoint, run::Networks};
use anyhow::{bail, Context, Result};
use sha2::Digest;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

pub struct Options {
    pub results: PathBuf,
    pub dry_run: bool,
    pub resume: bool,
    /// Only the train stage (`mfr train`).
    pub train_only: bool,
}

/// The stages of a run, in order.
const STAGES: [&str; 4] = ["train", "sample", "evaluate", "curves"];

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

/// Runs the spec's runs: alone, or as one rank of the training processes a launcher started
/// (torchrun, srun or `mfr launch`). Then every rank trains; rank 0 alone prints, prepares run
/// directories and runs the other stages while the rest wait.
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
            println!("{} training processes (this is rank 0)", world.size);
        }
    }
    let mut summary = BTreeMap::new();
    // Opening a dataset lists every file: once per data directory, shared by the sweep's points.
    let mut datasets: BTreeMap<String, Result<Arc<dyn Dataset>, String>> = BTreeMap::new();
    for (name, point) in &points {
        let dir = exp_dir.join(name);
        let ds = datasets
            .entry(point.train.data.clone())
            .or_insert_with(|| data::open(&point.train.data).map_err(|e| format!("{e:#}")))
            .clone();
        // Rank 0 plans and prepares; the others learn which stages are to run (bit i: STAGES[i]).
        let plan_of = || -> Result<i64> {
            let stages = plan(point, &dir, &ds);
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
            let ds = ds.clone().map_err(anyhow::Error::msg)?;
            prepare(&dir, point, opts.resume, total_steps(point, ds.as_ref()))?;
            Ok(STAGES
                .iter()
                .enumerate()
                .filter(|(_, name)| {
                    stages.iter().any(|s| {
                        s.name == **name
                            && matches!(s.status, Status::Todo(_))
                            && (!opts.train_only || s.name == "train")
                    })
                })
                .map(|(i, _)| 1i64 << i)
                .sum())
        };
        let planned = if main { plan_of() } else { Ok(0) };
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
        let ds = ds.map_err(anyhow::Error::msg)?;
        for (i, stage) in STAGES.iter().enumerate() {
            if todo & (1 << i) == 0 {
                continue;
            }
            if *stage == "train" {
                let trained = train::run::train_in(point, ds.clone(), &dir, world)?;
                if main {
                    println!("  trained: {}", trained.checkpoint.display());
                }
            } else if *stage == "evaluate" {
                // Every rank samples and featurises its share; rank 0 computes the metrics.
                evaluate_pixels(
                    point,
                    &dir,
                    ds.as_ref(),
                    total_steps(point, ds.as_ref()),
                    world,
                )?;
            } else {
                if main {
                    execute(stage, point, &dir, &ds)?;
                }
                world.barrier(&format!("rank 0's {stage} stage"))?;
            }
        }
        summary.insert(name.clone(), dir.clone());
    }
    if !main {
        return world.barrier("the end of the run");
    }
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
    world.barrier("the end of the run")
}

fn total_steps(spec: &Spec, ds: &dyn Dataset) -> u64 {
    data::Loader::steps_per_epoch(ds, spec.train.batch as usize) * spec.train.epochs as u64
}

fn final_checkpoint(spec: &Spec, dir: &Path, total: u64) -> Option<PathBuf> {
    let path = dir.join("checkpoints").join(checkpoint::file_name(total));
    let state = checkpoint::read_state(&path).ok()?;
    (state.spec_sha256 == spec.sha256()).then_some(path)
}

fn samples_marker(dir: &Path) -> PathBuf {
    dir.join("samples").join("inputs.json")
}

fn plan(spec: &Spec, dir: &Path, ds: &Result<Arc<dyn Dataset>, String>) -> Vec<Stage> {
    let ds = match ds {
        Ok(ds) => ds,
        Err(e) => {
            return vec![Stage {
                name: "train",
                status: Status::Waiting(e.clone()),
            }]
        }
    };
    let total = total_steps(spec, ds.as_ref());
    let trained = final_checkpoint(spec, dir, total);
    let train = match (&trained, checkpoint::latest(&dir.join("checkpoints"))) {
        (Some(_), _) => Status::Done(format!("{total} steps")),
        (None, Some((_, s))) => Status::Todo(format!("resume at step {} of {total}", s.step)),
        (None, None) => Status::Todo(format!("{total} steps on {}", spec.train.device)),
    };
    let sample = if ds.is_posterior() {
        Status::Waiting(
            "latent samples need the SD-VAE decoder for grids (a later release)".to_owned(),
        )
    } else {
        let wanted = checkpoint::file_name(total);
        let have = std::fs::read_to_string(samples_marker(dir)).ok();
        let nfe: Vec<String> = spec
            .sample
            .schedules
            .iter()
            .map(|s| format!("{}-NFE", s.len() - 1))
            .collect();
        match have {
            Some(h) if h.contains(&wanted) => Status::Done(format!("grids for {}", nfe.join(", "))),
            _ => Status::Todo(format!("EMA grids for {}", nfe.join(", "))),
        }
    };
    vec![
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
            status: evaluate_status(spec, dir, ds.as_ref(), total),
        },
        Stage {
            name: "curves",
            status: Status::Todo("loss and v loss curves (PNG, SVG)".to_owned()),
        },
    ]
}

fn metrics_file(dir: &Path) -> PathBuf {
    dir.join("samples").join("metrics.json")
}

fn evaluate_status(spec: &Spec, dir: &Path, ds: &dyn Dataset, total: u64) -> Status {
    if ds.is_posterior() {
        return Status::Waiting(
            "FID of latent samples needs the SD-VAE decoder (a later release)".to_owned(),
        );
    }
    let what = format!(
        "small-sample FID: {} samples per schedule vs all {} training images",
        spec.sample.num_samples,
        ds.len()
    );
    match std::fs::read_to_string(metrics_file(dir)) {
        Ok(text) if text.contains(&checkpoint::file_name(total)) => Status::Done(what),
        _ => Status::Todo(what),
    }
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
        let started = dir
            .join("checkpoints")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some());
        if started && !resume && final_checkpoint(spec, dir, total).is_none() {
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

fn execute(stage: &str, spec: &Spec, dir: &Path, ds: &Arc<dyn Dataset>) -> Result<()> {
    match stage {
        "sample" => sample_grids(spec, dir, total_steps(spec, ds.as_ref()))?,
        "curves" => {
            let stats = report::read_stats(&dir.join("stats.jsonl"))?;
            report::loss_curves(&stats, &spec.experiment.name, &dir.join("loss"))?;
            println!("  curves: {}", dir.join("loss.png").display());
        }
        other => bail!("unknown stage {other}"),
    }
    Ok(())
}

/// One grid per schedule from the EMA weights: a column per class, the same noise for every
/// schedule so the grids compare sample for sample.
fn sample_grids(spec: &Spec, dir: &Path, total: u64) -> Result<()> {
    let ckpt = final_checkpoint(spec, dir, total).context("no finished training to sample from")?;
    let nets = Networks::new(spec)?;
    nets.load_ema(&ckpt)?;
    let device = nets.vs.device();
    let classes = spec.model.num_classes.min(10);
    let per_class = 10;
    let n = classes * per_class;
    let labels = Tensor::arange(n, (Kind::Int64, device)).remainder(classes);
    tch::manual_seed(data::mix(spec.sample.seed, 0) as i64);
    let kind = train::input_kind(spec.train.precision);
    let shape = [
        n,
        spec.model.in_channels,
        spec.model.input_size,
        spec.model.input_size,
    ];
    let noise = Tensor::randn(shape, (kind, device));
    let out = dir.join("samples");
    std::fs::create_dir_all(&out)?;
    for schedule in &spec.sample.schedules {
        let images = sampler::sample(&nets.ema, &noise, &labels, schedule)?;
        let path = out.join(format!("grid-{}nfe.png", schedule.len() - 1));
        report::sample_grid(&images, classes, 6, &path)?;
        println!("  samples: {}", path.display());
    }
    let marker = serde_json::json!({"checkpoint": checkpoint::file_name(total), "schedules": spec.sample.schedules});
    std::fs::write(
        samples_marker(dir),
        serde_json::to_string_pretty(&marker)? + "\n",
    )?;
    Ok(())
}

/// Pixel-space samples in [-1, 1], (N, 1 or 3, H, W), as uint8 RGB NHWC for the Inception.
fn to_rgb_u8(images: &Tensor) -> Tensor {
    let rgb = if images.size()[1] == 1 {
        images.repeat([1, 3, 1, 1])
    } else {
        images.shallow_clone()
    };
    ((rgb.to_kind(Kind::Float).clamp(-1.0, 1.0) + 1.0) * 127.5)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous()
}

/// FID of `sample.num_samples` EMA samples per schedule against every training image, for data
/// in pixel space (the demo). A small-sample FID: comparable between the runs of one spec, not
/// with FID-50K numbers. The training images' features are cached by content. Under a launcher
/// the sample batches are dealt round-robin to the ranks (batch i to rank i mod N, each drawn
/// from its own seed as one process would), their Inception features gathered to rank 0.
fn evaluate_pixels(
    spec: &Spec,
    dir: &Path,
    ds: &dyn Dataset,
    total: u64,
    world: &World,
) -> Result<()> {
    use crate::eval::evaluator::{cached_features, default_cache, featurise, weights_tag, Source};
    use crate::eval::{frechet_distance, Stats};
    use crate::model::inception;
    let main = world.is_main();
    let device = world.device(crate::device::parse(&spec.train.device)?);
    let nets = Networks::on(spec, device)?;
    if main {
        let ckpt =
            final_checkpoint(spec, dir, total).context("no finished training to evaluate")?;
        nets.load_ema(&ckpt)?;
    }
    if let Some(group) = world.group() {
        let mut ema: Vec<(String, Tensor)> = nets.ema_vs.variables().into_iter().collect();
        ema.sort_by(|a, b| a.0.cmp(&b.0));
        let ema: Vec<Tensor> = ema.into_iter().map(|(_, v)| v).collect();
        group.broadcast(&ema, 0, "rank 0's EMA weights")?;
    }
    let weights = inception::bundled_torchscript()?;
    let (_ivs, net) = inception::load(&weights, device)?;
    let batch = spec.sample.batch as usize;

    // Every training image, and a content hash of them for the cache key (rank 0 only).
    let ref_stats = if main {
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
        let key = format!("{}-{hash}-{}", spec.train.data, weights_tag(&weights));
        let reference = Tensor::from_slice(&pixels).view([ds.len() as i64, c, h, w]);
        let (ref_pool, _) = cached_features(&default_cache(), &key, || {
            let mut source = Source::Memory {
                images: to_rgb_u8(&reference),
                next: 0,
            };
            let (pool, spatial, _) =
                featurise(&net, &mut source, batch, device, "training images")?;
            Ok((pool, spatial))
        })?;
        Some(Stats::of(&ref_pool)?)
    } else {
        None
    };

    let n = spec.sample.num_samples;
    let classes = spec.model.num_classes;
    let kind = train::input_kind(spec.train.precision);
    let starts: Vec<i64> = (0..n).step_by(batch).collect();
    let mut fids = serde_json::Map::new();
    for schedule in &spec.sample.schedules {
        let nfe = format!("{}-NFE", schedule.len() - 1);
        let mut mine = Vec::new();
        for (i, &start) in starts.iter().enumerate() {
            if i % world.size != world.rank {
                continue;
            }
            let b = (batch as i64).min(n - start);
            tch::manual_seed(data::mix(spec.sample.seed, 1 + i as u64) as i64);
            let noise = Tensor::randn(
                [
                    b,
                    spec.model.in_channels,
                    spec.model.input_size,
                    spec.model.input_size,
                ],
                (kind, device),
            );
            let labels = (Tensor::arange(b, (Kind::Int64, device)) + start).remainder(classes);
            mine.push(to_rgb_u8(&sampler::sample(
                &nets.ema, &noise, &labels, schedule,
            )?));
        }
        let pool = if mine.is_empty() {
            // More ranks than batches: this one has nothing to add.
            Tensor::zeros([0, inception::POOL_FEATURES], (Kind::Double, Device::Cpu))
        } else {
            let mut source = Source::Memory {
                images: Tensor::cat(&mine, 0),
                next: 0,
            };
            featurise(&net, &mut source, batch, device, &nfe)?.0
        };
        // Back in the batches' order: rank r's k-th batch is batch k * N + r.
        let parts = world.gather_rows(&pool, &format!("the {nfe} sample features"))?;
        let Some(ref_stats) = &ref_stats else {
            continue;
        };
        let mut offsets = vec![0i64; world.size];
        let ordered: Vec<Tensor> = starts
            .iter()
            .enumerate()
            .map(|(i, &start)| {
                let (r, b) = (i % world.size, (batch as i64).min(n - start));
                let rows = parts[r].narrow(0, offsets[r], b);
                offsets[r] += b;
                rows
            })
            .collect();
        let fid = frechet_distance(ref_stats, &Stats::of(&Tensor::cat(&ordered, 0))?)?;
        println!(
            "  FID ({nfe}, {n} samples vs {} training images): {fid:.2}",
            ds.len()
        );
        fids.insert(nfe, fid.into());
    }
    if !main {
        return Ok(());
    }
    let metrics = serde_json::json!({
        "fid": fids,
        "num_samples": n,
        "num_reference": ds.len(),
        "note": "small-sample FID of pixel-space samples (Inception features of upscaled images): compare runs of one spec, not FID-50K numbers",
        "checkpoint": checkpoint::file_name(total),
        "inception_weights": weights.display().to_string(),
    });
    std::fs::write(
        metrics_file(dir),
        serde_json::to_string_pretty(&metrics)? + "\n",
    )?;
    Ok(())
}
