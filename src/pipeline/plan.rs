//! What each stage of a run needs and whether it is done, read from the run directory only: a
//! stage whose outputs name the same inputs is done, so any run can be rerun or resumed.
use super::{Run, Stage};
use crate::data;
use crate::rundir::{checkpoint, SampleInputs};
use crate::spec::Spec;
use anyhow::Result;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Done(String),
    Todo(String),
    /// Cannot run here: why, and what provides it.
    Waiting(String),
}

/// The weights the sample and evaluate stages use: `model.weights` when the spec gives them,
/// else the run's final checkpoint (only if it was trained from this very spec).
pub fn weights(run: &Run) -> Option<PathBuf> {
    if let Some(w) = &run.spec.model.weights {
        return Some(PathBuf::from(w)).filter(|p| p.is_file());
    }
    let path = run.dir.checkpoint(run.total?);
    let state = checkpoint::read_state(&path).ok()?;
    (state.spec_sha256 == run.spec.sha256()).then_some(path)
}

/// The checkpoints of `eval.steps` this run has (trained from this very spec), by step.
pub fn intermediate(run: &Run) -> Vec<(u64, PathBuf)> {
    if run.spec.model.weights.is_some() {
        return Vec::new();
    }
    let mut steps = run.spec.eval.steps.clone();
    steps.sort_unstable();
    steps.dedup();
    steps
        .into_iter()
        .filter(|s| run.total.is_some_and(|t| *s < t))
        .filter_map(|s| {
            let path = run.dir.checkpoint(s);
            let state = checkpoint::read_state(&path).ok()?;
            (state.spec_sha256 == run.spec.sha256()).then_some((s, path))
        })
        .collect()
}

/// What the sample stage makes from `weights`; the stages after it are current when their
/// records name the same.
pub fn sample_inputs(spec: &Spec, weights: &Path) -> SampleInputs {
    SampleInputs {
        weights: weights.display().to_string(),
        schedules: spec.sample.schedules.clone(),
        num_samples: spec.sample.num_samples,
        seed: spec.sample.seed,
        vae: (!data::is_pixels(&spec.train.data)).then(|| spec.sample.vae.clone()),
        steps: spec.eval.steps.clone(),
        precision: serde_json::to_value(spec.sample.precision)
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .unwrap_or_default(),
        labels: serde_json::to_value(spec.sample.labels)
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .unwrap_or_default(),
    }
}

/// `sample.vae` as a file: a diffusers safetensors path, or the cached asset of that name.
pub fn vae_weights(name: &str) -> Result<PathBuf> {
    crate::assets::local(name, "the SD-VAE")
}

/// The cached reference batch of `eval.reference` (a path, or an asset name).
pub fn reference_batch(spec: &Spec) -> Result<PathBuf> {
    crate::assets::local(&spec.eval.reference, "the reference batch")
}

/// Each stage of `run` with its status. `total` is the run's step count, or why its data
/// cannot be read.
pub fn plan(run: &Run, total: &Result<u64, super::Unreadable>) -> Vec<(Stage, Status)> {
    let spec = run.spec;
    let train = match (&spec.model.weights, total) {
        (Some(w), _) if Path::new(w).is_file() => Status::Done(format!("weights given: {w}")),
        (Some(w), _) => Status::Waiting(format!(
            "model.weights = {w} does not exist (make it with `mfr import CHECKPOINT --out {w}`)"
        )),
        (None, Err(e)) => Status::Waiting(e.to_string()),
        (None, Ok(total)) => match (weights(run), checkpoint::latest(&run.dir.checkpoints())) {
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
    let current = weights(run);
    let wanted = current.as_deref().map(|w| sample_inputs(spec, w));
    let sampled = wanted.is_some() && run.dir.read_sample_inputs().ok().flatten() == wanted;
    let what = format!(
        "{} EMA samples per schedule ({}) + grids",
        spec.sample.num_samples,
        nfe.join(", ")
    );
    let vae_missing = (!data::is_pixels(&spec.train.data))
        .then(|| vae_weights(&spec.sample.vae).err())
        .flatten();
    let sample = match (&vae_missing, sampled) {
        (_, true) => Status::Done(what),
        (Some(e), false) => Status::Waiting(format!("{e:#}")),
        (None, false) => Status::Todo(what),
    };
    let evaluated = wanted.is_some()
        && run
            .dir
            .read_metrics()
            .ok()
            .flatten()
            .is_some_and(|m| Some(m.inputs) == wanted);
    let mut stages = vec![
        (Stage::Train, train),
        (Stage::Sample, sample),
        (Stage::Evaluate, evaluate_status(spec, evaluated)),
    ];
    if spec.model.weights.is_none() {
        stages.push((
            Stage::Curves,
            Status::Todo("v loss and adaptive weight curves (PNG, SVG)".to_owned()),
        ));
    }
    stages
}

fn evaluate_status(spec: &Spec, done: bool) -> Status {
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
