//! `mfr run`: a spec's runs (one, or one per sweep or ablation point), each in its run directory
//! (results/<experiment>/<run>/) going through its stages in order, then the report. A stage
//! whose outputs are present for unchanged inputs is skipped ([`plan`]), so any run can be
//! rerun or resumed; the run's lock keeps a second writer out.
mod evaluate;
mod plan;
mod preflight;
pub mod sample;
mod summary;

pub use evaluate::evaluate_files;
pub use preflight::preflight;

use crate::data::{self, Dataset};
use crate::dist::World;
use crate::rundir::{Contention, Env, RunDir, RunLock};
use crate::spec::Spec;
use anyhow::{bail, Context, Result};
use plan::Status;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The stages of a run, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Train,
    Sample,
    Evaluate,
    Curves,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Train, Stage::Sample, Stage::Evaluate, Stage::Curves];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Train => "train",
            Stage::Sample => "sample",
            Stage::Evaluate => "evaluate",
            Stage::Curves => "curves",
        }
    }

    /// The stage's bit in the set of stages rank 0 shares with the others.
    fn bit(self) -> i64 {
        1 << Stage::ALL.iter().position(|s| *s == self).expect("listed")
    }
}

pub struct Options {
    pub results: PathBuf,
    pub dry_run: bool,
    pub resume: bool,
    /// Run the stages up to this one only (`mfr train`, `mfr sample`); those before it must be
    /// done.
    pub only: Option<Stage>,
    /// Render reports/<experiment>/ at the end (None: no report).
    pub reports: Option<PathBuf>,
    /// A run directory another process is writing: wait for it rather than refuse.
    pub contention: Contention,
    /// Run one point of the spec only: its index in the plan (0, 1, ...; a SLURM array task's
    /// `$SLURM_ARRAY_TASK_ID`) or its name.
    pub point: Option<String>,
}

/// One run of a spec: its point of the sweep, its directory, and its length once known.
pub struct Run<'a> {
    pub name: &'a str,
    pub spec: &'a Spec,
    pub dir: RunDir,
    /// The run's last step (None: given weights, which need no training data).
    pub total: Option<u64>,
}

/// A spec as every command reads it: resolved with its overrides, and its `[paper] rows` all
/// rows of the paper data (a misspelt row would otherwise surface only in the report, after the
/// training).
pub fn load_spec(spec_path: &Path, sets: &[String]) -> Result<Spec> {
    let spec = Spec::load_with(spec_path, sets)?;
    crate::report::paper::Paper::bundled()
        .rows_for(&spec.paper.rows, &spec)
        .with_context(|| format!("{}: [paper] rows", spec_path.display()))?;
    Ok(spec)
}

/// Runs the spec's runs: alone, or as one rank of the processes a launcher started (torchrun,
/// srun or `mfr launch`). Every rank trains and samples its share; rank 0 alone prints, holds
/// the run directories' locks, evaluates, draws and reports, while the others wait.
pub fn run(spec_path: &Path, sets: &[String], opts: &Options) -> Result<()> {
    let spec = load_spec(spec_path, sets)?;
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

/// The training data of a run: opened once per data directory and shared by a sweep's points
/// (opening lists every file), a failure to open it as well.
#[derive(Default)]
struct DataCache(BTreeMap<String, Result<Arc<dyn Dataset>, Unreadable>>);

/// Why a run's data cannot be read, shared by every run that names it.
#[derive(Debug, Clone)]
pub struct Unreadable(Arc<anyhow::Error>);

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Unreadable {}

impl DataCache {
    fn get(&mut self, name: &str) -> Result<Arc<dyn Dataset>, Unreadable> {
        self.0
            .entry(name.to_owned())
            .or_insert_with(|| data::open(name).map_err(|e| Unreadable(Arc::new(e))))
            .clone()
    }
}

/// The points `selector` picks: all of them, or the one of that index or name.
fn select(
    points: Vec<(String, Spec)>,
    selector: Option<&str>,
) -> Result<Vec<(usize, String, Spec)>> {
    let all: Vec<(usize, String, Spec)> = points
        .into_iter()
        .enumerate()
        .map(|(i, (name, spec))| (i, name, spec))
        .collect();
    let Some(selector) = selector else {
        return Ok(all);
    };
    let n = all.len();
    let names: Vec<String> = all.iter().map(|(_, name, _)| name.clone()).collect();
    let chosen: Vec<(usize, String, Spec)> = all
        .into_iter()
        .filter(|(i, name, _)| selector == name || selector.parse::<usize>() == Ok(*i))
        .collect();
    if chosen.is_empty() {
        bail!(
            "--point {selector}: the spec has {n} run(s), 0 to {} by index (`mfr run SPEC --dry-run` lists them): {}",
            n.saturating_sub(1),
            names.join(", ")
        );
    }
    Ok(chosen)
}

fn run_in(spec: &Spec, spec_path: &Path, opts: &Options, world: &World) -> Result<()> {
    let main = world.is_main();
    let all = spec.points(&spec_path.display().to_string())?;
    let count = all.len();
    let points = select(all, opts.point.as_deref())?;
    let exp_dir = opts.results.join(&spec.experiment.name);
    if main {
        let selected = match opts.point {
            Some(_) => format!(" (running 1 of {count})"),
            None => String::new(),
        };
        println!(
            "{}: {count} run(s) under {}{selected}",
            spec_path.display(),
            exp_dir.display()
        );
        if world.size > 1 {
            println!("{} processes (this is rank 0)", world.size);
        }
    }
    let mut data = DataCache::default();
    let mut blocked = Vec::new();
    for (index, name, point) in &points {
        // Given weights need data only for a pixel-space FID (its reference is the data).
        let needs_data = point.model.weights.is_none() || data::is_pixels(&point.train.data);
        let ds = needs_data.then(|| data.get(&point.train.data));
        let total = match &ds {
            Some(Ok(ds)) => Ok(data::Loader::steps_per_epoch(
                ds.as_ref(),
                point.train.batch as usize,
            ) * point.train.epochs as u64),
            Some(Err(e)) => Err(e.clone()),
            None => Ok(0),
        };
        let run = Run {
            name,
            spec: point,
            dir: RunDir::new(exp_dir.join(name)),
            total: total.as_ref().ok().copied(),
        };
        // Rank 0 plans, locks and prepares; the others learn which stages run.
        let planned = if main {
            plan_and_prepare(*index, world.size, &run, &total, opts, &mut blocked)
        } else {
            Ok((0, None))
        };
        if opts.dry_run {
            planned?;
            continue;
        }
        let todo = world.share(
            &[planned.as_ref().map_or(-1, |(todo, _)| *todo)],
            "the run's plan",
        )?[0];
        let (_, _lock) = planned?;
        if todo < 0 {
            bail!(
                "rank 0 could not prepare {}: its error is the cause",
                run.dir.path().display()
            );
        }
        let ds = ds.transpose()?;
        for stage in Stage::ALL.into_iter().filter(|s| todo & s.bit() != 0) {
            crate::signals::check(|| format!("before the {} stage of {name}", stage.name()))?;
            run_stage(stage, &run, ds.as_ref(), world)?;
        }
    }
    if !main {
        return world.barrier("the end of the run");
    }
    let out = summary::summarise(spec, spec_path, opts, &exp_dir, &blocked);
    world.barrier("the end of the run")?;
    out
}

fn run_stage(stage: Stage, run: &Run, ds: Option<&Arc<dyn Dataset>>, world: &World) -> Result<()> {
    let main = world.is_main();
    match stage {
        Stage::Train => {
            let ds = ds.context("training needs the data")?.clone();
            let trained = crate::train::run::train_in(
                &crate::train::TrainConfig::of(run.spec),
                ds,
                &run.dir,
                world,
            )?;
            if main {
                println!("  trained: {}", trained.checkpoint.display());
            }
            Ok(())
        }
        Stage::Sample => sample::stage(run, world),
        Stage::Evaluate | Stage::Curves => {
            if main {
                match stage {
                    Stage::Evaluate => evaluate::stage(run, ds)?,
                    _ => curves(run)?,
                }
            }
            world.barrier(&format!("rank 0's {} stage", stage.name()))
        }
    }
}

/// Loss and v loss against step, beside the run's files.
fn curves(run: &Run) -> Result<()> {
    let stats = run.dir.read_stats()?;
    let stem = run.dir.loss_curves();
    crate::report::loss_curves(&[("", &stats)], &run.spec.experiment.name, &stem)?;
    println!("  curves: {}", stem.with_extension("png").display());
    Ok(())
}

/// Prints a run's plan; unless it is a dry run, takes the run's lock, prepares its directory and
/// returns the stages to run as a bit set. Stages that cannot run are recorded in `blocked`.
fn plan_and_prepare(
    index: usize,
    world_size: usize,
    run: &Run,
    total: &Result<u64, Unreadable>,
    opts: &Options,
    blocked: &mut Vec<String>,
) -> Result<(i64, Option<RunLock>)> {
    let stages = plan::plan(run, total);
    println!(
        "\n[{index}] {} (spec sha256 {})",
        run.name,
        &run.spec.sha256()[..12]
    );
    for (stage, status) in &stages {
        let (mark, what) = match status {
            Status::Done(w) => ("done", w),
            Status::Todo(w) => ("todo", w),
            Status::Waiting(w) => ("later", w),
        };
        println!("  {:<8} {mark:<5} {what}", stage.name());
    }
    if opts.dry_run {
        return Ok((0, None));
    }
    total.clone()?;
    let command = match opts.only {
        None => "mfr run".to_owned(),
        Some(stage) => format!("mfr {}", stage.name()),
    };
    let lock = run.dir.lock(&command, opts.contention)?;
    let env = Env::current(crate::device::parse(&run.spec.train.device), world_size);
    run.dir.prepare(run.spec, &env, &lock)?;
    let unfinished = run.spec.model.weights.is_none()
        && run.dir.has_checkpoints()
        && plan::weights(run).is_none();
    if unfinished && !opts.resume {
        bail!(
            "{} holds an unfinished run of this spec: continue it with --resume",
            run.dir.path().display()
        );
    }
    let wanted = opts
        .only
        .and_then(|only| stages.iter().position(|(s, _)| *s == only));
    // Stages run in order up to the first that cannot; every stage that cannot run is named
    // with what it lacks, so one look shows everything to provide.
    let mut todo = 0i64;
    let mut stopped = false;
    for (i, (stage, status)) in stages.iter().enumerate() {
        if wanted.is_some_and(|w| i > w) {
            break;
        }
        let name = stage.name();
        match status {
            Status::Waiting(why) => {
                blocked.push(format!("{}: the {name} stage cannot run: {why}", run.name));
                stopped = true;
            }
            Status::Todo(_) if wanted.is_some_and(|w| i < w) => {
                blocked.push(format!(
                    "{}: the {name} stage must run first (`mfr {name} SPEC`)",
                    run.name
                ));
                stopped = true;
            }
            Status::Todo(_) if !stopped => todo |= stage.bit(),
            _ => {}
        }
    }
    Ok((todo, Some(lock)))
}
