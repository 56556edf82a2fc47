//! The results frame: every evaluated (run, weights, NFE) of the runs under results/ as one
//! polars DataFrame, a row per final-weights FID and per FID of a checkpoint of `eval.steps`
//! (a run not evaluated yet has one row without FIDs). `mfr results` writes it as CSV and
//! Parquet for analysis elsewhere; a report's metrics and training tables and its FID plots are
//! read from the same frame, so what a report shows and what the files hold agree.
use super::paper::Paper;
use super::runs::{self, Bounds, Fid, RunResult};
use crate::files::write_atomic;
use anyhow::{anyhow, bail, Context, Result};
use polars::prelude::*;
use std::path::{Path, PathBuf};

/// A type a frame column holds, read back from one of its cells.
trait FromCell: Sized {
    fn from_cell(v: AnyValue) -> Option<Self>;
}

impl FromCell for String {
    fn from_cell(v: AnyValue) -> Option<Self> {
        match v {
            AnyValue::String(s) => Some(s.to_owned()),
            AnyValue::StringOwned(s) => Some(s.to_string()),
            _ => None,
        }
    }
}

/// `FromCell` for a type polars holds as one `AnyValue` variant.
macro_rules! from_cell {
    ($($ty:ty => $variant:ident),*) => {$(
        impl FromCell for $ty {
            fn from_cell(v: AnyValue) -> Option<Self> {
                match v {
                    AnyValue::$variant(x) => Some(x),
                    _ => None,
                }
            }
        }
    )*};
}

from_cell!(bool => Boolean, f64 => Float64, i64 => Int64, u64 => UInt64);

impl<T: FromCell> FromCell for Option<T> {
    fn from_cell(v: AnyValue) -> Option<Self> {
        match v {
            AnyValue::Null => Some(None),
            v => T::from_cell(v).map(Some),
        }
    }
}

/// The row type of the frame, its columns named once: the struct, its frame and its reading
/// back come from one list.
macro_rules! frame_row {
    ($(#[doc = $doc:expr])* pub struct $name:ident {
        $($(#[doc = $fdoc:expr])* $field:ident: $ty:ty,)*
    }) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $($(#[doc = $fdoc])* pub $field: $ty,)*
        }

        impl $name {
            /// The rows as a DataFrame, a column per field (named as the field).
            pub fn frame(rows: &[$name]) -> Result<DataFrame> {
                let columns = vec![$(Column::new(
                    stringify!($field).into(),
                    rows.iter().map(|r| r.$field.clone()).collect::<Vec<$ty>>(),
                ),)*];
                Ok(DataFrame::new(rows.len(), columns)?)
            }

            /// The rows of a frame made by [`Self::frame`].
            pub fn read(df: &DataFrame) -> Result<Vec<$name>> {
                (0..df.height())
                    .map(|i| {
                        Ok($name {$($field: {
                            let cell = df.column(stringify!($field))?.get(i)?;
                            <$ty as FromCell>::from_cell(cell).with_context(|| {
                                format!("the results frame's column {} holds another type", stringify!($field))
                            })?
                        },)*})
                    })
                    .collect()
            }
        }
    };
}

frame_row! {
    /// One FID of one run (or a run without any), with what it was measured on.
    pub struct ResultRow {
        experiment: String,
        /// The run directory's name (its sweep point).
        run: String,
        /// The run in the paper's terms ("25% r != t").
        label: String,
        /// The paper rows the run matches, by id (comma-separated).
        paper_rows: String,
        /// The training data: a bundled set's name or a folder's name.
        data: String,
        preset: Option<String>,
        /// The imported weights' file name (None: weights trained by the run).
        weights: Option<String>,
        /// The final weights (false: a checkpoint of `eval.steps`).
        is_final: bool,
        /// The training step of the weights scored (None: imported weights).
        step: Option<u64>,
        nfe: Option<i64>,
        fid: Option<f64>,
        fid_low: Option<f64>,
        fid_high: Option<f64>,
        /// The interval's level (0.95).
        fid_level: Option<f64>,
        fid_resamples: Option<u64>,
        sfid: Option<f64>,
        precision: Option<f64>,
        recall: Option<f64>,
        inception_score: Option<f64>,
        num_samples: Option<i64>,
        /// The reference batch's file name, or "training images".
        reference: Option<String>,
        /// The Inception weights' file name.
        inception: Option<String>,
        training_steps: Option<u64>,
        epochs: Option<u64>,
        hours: Option<f64>,
        /// Over the last tenth of the logged lines: the v loss and the mean adaptive weight.
        final_v_loss: Option<f64>,
        final_adaptive_weight: Option<f64>,
    }
}

impl ResultRow {
    pub fn fid(&self) -> Option<Fid> {
        let interval = self
            .fid_low
            .zip(self.fid_high)
            .map(|(low, high)| Bounds { low, high });
        self.fid.map(|value| Fid { value, interval })
    }
}

/// The rows of the runs of one experiment: the final weights' FIDs per NFE, then the FIDs of
/// the other evaluated steps.
pub fn rows(runs: &[RunResult], paper: &Paper) -> Result<Vec<ResultRow>> {
    let mut out = Vec::new();
    for r in runs {
        let base = base_row(r, paper)?;
        let final_step = r.state.as_ref().map(|s| s.step).filter(|_| !r.imported());
        let before = out.len();
        let Some(m) = &r.metrics else {
            out.push(base);
            continue;
        };
        for (nfe, fid) in r.fids() {
            let key = format!("{nfe}-NFE");
            let interval = m.fid_interval.get(&key);
            let adm = m.adm.get(&key);
            out.push(ResultRow {
                step: final_step,
                nfe: Some(nfe),
                fid: Some(fid.value),
                fid_low: interval.map(|i| i.low),
                fid_high: interval.map(|i| i.high),
                fid_level: interval.map(|i| i.level),
                fid_resamples: interval.map(|i| i.resamples as u64),
                sfid: adm.and_then(|a| a.sfid),
                precision: adm.and_then(|a| a.precision),
                recall: adm.and_then(|a| a.recall),
                inception_score: adm.and_then(|a| a.inception_score),
                ..base.clone()
            });
        }
        for point in &m.history {
            if Some(point.step) == final_step {
                continue;
            }
            let interval = point.fid_interval.as_ref();
            out.push(ResultRow {
                is_final: false,
                step: Some(point.step),
                nfe: point.nfe.strip_suffix("-NFE").and_then(|n| n.parse().ok()),
                fid: Some(point.fid),
                fid_low: interval.map(|i| i.low),
                fid_high: interval.map(|i| i.high),
                fid_level: interval.map(|i| i.level),
                fid_resamples: interval.map(|i| i.resamples as u64),
                ..base.clone()
            });
        }
        if out.len() == before {
            out.push(base);
        }
    }
    Ok(out)
}

/// What every row of run `r` shares: its names, data, scoring and training.
fn base_row(r: &RunResult, paper: &Paper) -> Result<ResultRow> {
    let own: Vec<&str> = r.rows(paper)?.iter().map(|row| row.id.as_str()).collect();
    let m = r.metrics.as_ref();
    let tail = &r.stats[r.stats.len() - r.stats.len().div_ceil(10)..];
    let mean = |f: &dyn Fn(&crate::rundir::StatLine) -> Option<f64>| {
        let v: Vec<f64> = tail.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    Ok(ResultRow {
        experiment: r.spec.experiment.name.clone(),
        run: r.name.clone(),
        label: r.label.clone(),
        paper_rows: own.join(", "),
        data: runs::file_name(&r.spec.train.data),
        preset: r.spec.model.preset.clone(),
        weights: r.spec.model.weights.as_deref().map(runs::file_name),
        is_final: true,
        step: None,
        nfe: None,
        fid: None,
        fid_low: None,
        fid_high: None,
        fid_level: None,
        fid_resamples: None,
        sfid: None,
        precision: None,
        recall: None,
        inception_score: None,
        num_samples: m.map(|m| m.num_samples),
        reference: m.map(|m| {
            m.reference
                .as_deref()
                .map_or_else(|| "training images".to_owned(), runs::file_name)
        }),
        inception: m.map(|m| runs::file_name(&m.inception_weights)),
        training_steps: r.state.as_ref().map(|s| s.step),
        epochs: r.state.as_ref().map(|s| s.epoch),
        hours: r.state.as_ref().map(|s| s.wall_s / 3600.0),
        final_v_loss: mean(&|s| Some(s.v_loss)),
        final_adaptive_weight: mean(&|s| s.adaptive_weight),
    })
}

/// Every run of every experiment under `results` (results/<experiment>/<run>) as one frame.
/// An experiment whose runs cannot be read is left out with a warning naming it.
pub fn gather(results: &Path) -> Result<DataFrame> {
    let entries = std::fs::read_dir(results).with_context(|| {
        format!(
            "{}: cannot read the results folder (run `mfr run SPEC` first, or give the folder)",
            results.display()
        )
    })?;
    let mut experiments: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    experiments.sort();
    let paper = Paper::bundled();
    let mut all = Vec::new();
    for dir in experiments {
        if crate::rundir::runs_of(&dir).map_or(true, |r| r.is_empty()) {
            continue;
        }
        match runs::collect(&dir).and_then(|(_, runs)| rows(&runs, &paper)) {
            Ok(rows) => all.extend(rows),
            Err(e) => eprintln!("warning: {}: {e:#}; left out of the results", dir.display()),
        }
    }
    if all.is_empty() {
        bail!(
            "{}: holds no run directories (run `mfr run SPEC` first)",
            results.display()
        );
    }
    ResultRow::frame(&all)
}

/// Writes `df` as `out`/results.csv and `out`/results.parquet; returns their paths.
pub fn write(df: &mut DataFrame, out: &Path) -> Result<[PathBuf; 2]> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let (csv, parquet) = (out.join("results.csv"), out.join("results.parquet"));
    let mut bytes = Vec::new();
    CsvWriter::new(&mut bytes)
        .finish(df)
        .map_err(|e| anyhow!("{}: cannot write CSV: {e}", csv.display()))?;
    write_atomic(&csv, &bytes)?;
    let mut bytes = Vec::new();
    ParquetWriter::new(&mut bytes)
        .finish(df)
        .map_err(|e| anyhow!("{}: cannot write Parquet: {e}", parquet.display()))?;
    write_atomic(&parquet, &bytes)?;
    Ok([csv, parquet])
}
