//! What a report knows of a run: its records, read through [`crate::rundir`] only, named in
//! the paper's terms, and the scale it was trained and scored at.
use super::paper::{Paper, Row};
use crate::eval::bootstrap::Interval;
use crate::rundir::{
    checkpoint::{self, TrainState},
    Env, Metrics, RunDir, StatLine,
};
use crate::spec::Spec;
use anyhow::{bail, Result};
use std::fmt;
use std::path::Path;

/// What one run directory holds.
pub struct RunResult {
    /// The run directory's name: the sweep point ("data_proportion=0.75") or the experiment's.
    pub name: String,
    /// The run in the paper's terms ("25% r != t") where its sweep point maps to a paper row;
    /// else its name. Set by [`collect`].
    pub label: String,
    pub dir: RunDir,
    pub spec: Spec,
    /// None for a run prepared before env.json existed.
    pub env: Option<Env>,
    /// samples/metrics.json, once the evaluate stage ran.
    pub metrics: Option<Metrics>,
    /// The newest checkpoint's training state (none for imported weights).
    pub state: Option<TrainState>,
    pub stats: Vec<StatLine>,
}

/// A FID with its interval where the evaluate stage made one: "34.96 [33.10, 37.20]".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fid {
    pub value: f64,
    pub interval: Option<Bounds>,
}

/// The ends of an interval (its level and how it was made are said once per report).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub low: f64,
    pub high: f64,
}

impl Bounds {
    /// Whether two intervals share a point: the FIDs they belong to are not told apart.
    pub fn overlaps(&self, other: &Bounds) -> bool {
        self.low <= other.high && other.low <= self.high
    }
}

impl From<&Interval> for Bounds {
    fn from(i: &Interval) -> Bounds {
        Bounds {
            low: i.low,
            high: i.high,
        }
    }
}

impl fmt::Display for Fid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2}", self.value)?;
        match &self.interval {
            Some(i) => write!(f, " [{:.2}, {:.2}]", i.low, i.high),
            None => Ok(()),
        }
    }
}

/// How the FID intervals are made, said once per report (from the interval's own method).
pub fn interval_method(i: &Interval) -> String {
    format!(
        "{:.0}% interval from {} resamples: {}",
        i.level * 100.0,
        i.resamples,
        i.method.describe()
    )
}

/// The data a run trained on and the images it was scored on, as a person compares them with
/// the paper's (ImageNet 256 through the SD-VAE, FID-50K).
#[derive(Debug, Clone, PartialEq)]
pub struct Scale {
    /// Pixel-space data (no VAE) rather than latents.
    pub pixels: bool,
    /// The side of the images, in pixels.
    pub image: i64,
    /// The side of the latents (None for pixel-space data).
    pub latent: Option<i64>,
    /// The data's name: a file name or a bundled data set's.
    pub data: String,
}

/// The image side of the paper's data (ImageNet 256).
const PAPER_IMAGE: i64 = 256;
/// The SD-VAE's downsampling factor.
const VAE_FACTOR: i64 = 8;

impl Scale {
    pub fn of(spec: &Spec) -> Scale {
        let pixels = crate::data::is_pixels(&spec.train.data);
        let size = spec.model.input_size;
        Scale {
            pixels,
            image: if pixels { size } else { size * VAE_FACTOR },
            latent: (!pixels).then_some(size),
            data: file_name(&spec.train.data),
        }
    }

    /// ImageNet 256's scale: 256 x 256 images as 32 x 32 latents.
    pub fn is_papers(&self) -> bool {
        !self.pixels && self.image == PAPER_IMAGE
    }

    /// "8x8 pixel images (digits)" or "256x256 images as 32x32 latents (imagenet-latents)".
    pub fn describe(&self) -> String {
        let (i, data) = (self.image, &self.data);
        match self.latent {
            None => format!("{i}x{i} pixel images ({data})"),
            Some(l) => format!("{i}x{i} images as {l}x{l} latents ({data})"),
        }
    }
}

impl RunResult {
    pub fn read(dir: &RunDir) -> Result<RunResult> {
        Ok(RunResult {
            name: dir.name(),
            label: dir.name(),
            spec: dir.read_spec()?,
            env: dir.read_env()?,
            metrics: dir.read_metrics()?,
            state: checkpoint::latest(&dir.checkpoints()).map(|(_, s)| s),
            stats: dir.read_stats()?,
            dir: dir.clone(),
        })
    }

    /// The interval of the first FID that has one: its level and making, said once per report.
    pub fn first_interval(runs: &[RunResult]) -> Option<&Interval> {
        runs.iter()
            .flat_map(|r| r.metrics.iter().flat_map(|m| m.fid_interval.values()))
            .next()
    }

    pub fn scale(&self) -> Scale {
        Scale::of(&self.spec)
    }

    /// The final weights' FID per NFE, with intervals, by NFE.
    pub fn fids(&self) -> Vec<(i64, Fid)> {
        let Some(m) = &self.metrics else {
            return Vec::new();
        };
        m.fids()
            .into_iter()
            .map(|(nfe, value)| {
                let interval = m.fid_interval.get(&format!("{nfe}-NFE")).map(Bounds::from);
                (nfe, Fid { value, interval })
            })
            .collect()
    }

    pub fn fid(&self, nfe: i64) -> Option<Fid> {
        self.fids().into_iter().find(|p| p.0 == nfe).map(|p| p.1)
    }

    /// The rows of the spec's `[paper] rows` this run matches (its own, not the whole
    /// sweep's).
    pub fn rows<'p>(&self, paper: &'p Paper) -> Result<Vec<&'p Row>> {
        paper.rows_for(&self.spec.paper.rows, &self.spec)
    }

    /// The paper row this run stands for: of the rows it matches, the one set by a key its
    /// sweep point names (the first matched row without a sweep).
    pub fn paper_row<'p>(&self, paper: &'p Paper) -> Result<Option<&'p Row>> {
        let rows = self.rows(paper)?;
        let swept: Vec<&str> = self
            .name
            .split(',')
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
            .collect();
        Ok(rows
            .iter()
            .find(|r| {
                r.settings
                    .keys()
                    .any(|k| swept.iter().any(|s| k.rsplit('.').next() == Some(s)))
            })
            .or(rows.first())
            .copied())
    }

    /// Whether the run scored imported weights (released or foreign) rather than its own.
    pub fn imported(&self) -> bool {
        self.spec.model.weights.is_some()
    }
}

/// The runs of an experiment directory (results/<experiment>), or the one run `path` is.
pub fn collect(path: &Path) -> Result<(String, Vec<RunResult>)> {
    let one = RunDir::new(path);
    let dirs = match one.exists() {
        true => vec![one],
        false => crate::rundir::runs_of(path)?,
    };
    if dirs.is_empty() {
        bail!(
            "{}: holds no run directories (run `mfr run SPEC` first)",
            path.display()
        );
    }
    let mut runs = dirs
        .iter()
        .map(RunResult::read)
        .collect::<Result<Vec<_>>>()?;
    label_runs(&mut runs, &Paper::bundled())?;
    Ok((runs[0].spec.experiment.name.clone(), runs))
}

/// Names the points of a sweep by their paper rows ("25% r != t"); runs that share a row (seed
/// repeats) or match none keep their names.
fn label_runs(runs: &mut [RunResult], paper: &Paper) -> Result<()> {
    let mut labels = Vec::new();
    for r in runs.iter() {
        let row = r.paper_row(paper)?.filter(|_| r.name.contains('='));
        labels.push(row.map_or_else(|| r.name.clone(), |row| row.label.clone()));
    }
    for (i, r) in runs.iter_mut().enumerate() {
        let shared = labels.iter().filter(|l| **l == labels[i]).count() > 1;
        r.label = match shared && labels[i] != r.name {
            true => format!("{} ({})", labels[i], r.name),
            false => labels[i].clone(),
        };
    }
    Ok(())
}

/// A path's last component (the path itself when it has none): reports name files, not one
/// machine's folders.
pub fn file_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map_or_else(|| path.to_owned(), |f| f.to_string_lossy().into_owned())
}
