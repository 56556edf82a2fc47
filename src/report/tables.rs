//! An experiment's results as tables (polars DataFrames), read from its run directories only
//! (through [`crate::rundir`]'s records).
use super::paper::{Paper, Row};
use crate::rundir::{
    checkpoint::{self, TrainState},
    Env, Metrics, RunDir, StatLine,
};
use crate::spec::Spec;
use anyhow::{bail, Result};
use polars::prelude::*;
use std::path::Path;

/// What one run directory holds.
pub struct RunResult {
    pub name: String,
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

impl RunResult {
    pub fn read(dir: &RunDir) -> Result<RunResult> {
        Ok(RunResult {
            name: dir.name(),
            spec: dir.read_spec()?,
            env: dir.read_env()?,
            metrics: dir.read_metrics()?,
            state: checkpoint::latest(&dir.checkpoints()).map(|(_, s)| s),
            stats: dir.read_stats()?,
            dir: dir.clone(),
        })
    }

    /// FID per NFE, e.g. [(1, 61.2), (2, 55.0)].
    pub fn fids(&self) -> Vec<(i64, f64)> {
        self.metrics.as_ref().map(Metrics::fids).unwrap_or_default()
    }

    /// FID against training step from metrics.json's history: (NFE label, [(step, FID)]).
    pub fn history(&self) -> Vec<(String, Vec<(f64, f64)>)> {
        let mut by_nfe: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
        for point in self.metrics.iter().flat_map(|m| &m.history) {
            by_nfe
                .entry(point.nfe.clone())
                .or_default()
                .push((point.step as f64, point.fid));
        }
        by_nfe
            .into_iter()
            .map(|(nfe, mut points)| {
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                (nfe, points)
            })
            .collect()
    }

    pub fn fid(&self, nfe: i64) -> Option<f64> {
        self.fids().into_iter().find(|p| p.0 == nfe).map(|p| p.1)
    }

    /// Whether the FIDs are the demo's small-sample kind rather than FID-50K.
    pub fn small_sample(&self) -> bool {
        crate::data::is_pixels(&self.spec.train.data)
    }
}

/// The runs of an experiment directory (results/<experiment>), or the one run `path` is.
pub fn collect(path: &Path) -> Result<(String, Vec<RunResult>)> {
    let one = RunDir::new(path);
    if one.exists() {
        let run = RunResult::read(&one)?;
        return Ok((run.spec.experiment.name.clone(), vec![run]));
    }
    let dirs = crate::rundir::runs_of(path)?;
    if dirs.is_empty() {
        bail!(
            "{}: holds no run directories (run `mfr run SPEC` first)",
            path.display()
        );
    }
    let runs = dirs
        .iter()
        .map(RunResult::read)
        .collect::<Result<Vec<_>>>()?;
    Ok((runs[0].spec.experiment.name.clone(), runs))
}

/// How a number compares with the paper's.
pub fn verdict(
    paper: f64,
    ours: Option<f64>,
    tolerance: f64,
    incomparable: Option<&str>,
) -> String {
    match (ours, incomparable) {
        (None, _) => "not evaluated yet".to_owned(),
        (Some(_), Some(why)) => format!("not comparable ({why})"),
        (Some(v), None) if (v - paper).abs() <= tolerance * paper => {
            format!("reproduced (within {:.0}%)", tolerance * 100.0)
        }
        (Some(v), None) if v < paper => "better than the paper".to_owned(),
        (Some(_), None) => "missed: file `mfr discrepancy`".to_owned(),
    }
}

/// One line per (run, paper row it matches): paper / ours / delta and the verdict.
pub fn comparison(runs: &[RunResult], paper: &Paper) -> Result<DataFrame> {
    let mut cols: (Vec<String>, Vec<String>, Vec<String>, Vec<i64>) = Default::default();
    let (mut paper_v, mut ours, mut delta, mut verdicts) = (vec![], vec![], vec![], vec![]);
    let mut order = Vec::new();
    for run in runs {
        for row in paper.rows_for(&run.spec.paper.rows, &run.spec)? {
            order.push(
                run.spec
                    .paper
                    .rows
                    .iter()
                    .position(|id| *id == row.id)
                    .unwrap_or(0) as i64,
            );
            let nfe = row.nfe.unwrap_or(1);
            let got = run.fid(nfe);
            let why = row.incomparable(&run.spec);
            cols.0.push(run.name.clone());
            cols.1.push(row.id.clone());
            cols.2.push(row_label(row));
            cols.3.push(nfe);
            paper_v.push(row.value);
            ours.push(got);
            delta.push(got.map(|g| g - row.value));
            verdicts.push(verdict(
                row.value,
                got,
                run.spec.paper.tolerance,
                why.as_deref(),
            ));
        }
    }
    // In the order the spec lists its rows (the paper's order), then by run.
    let df = df!(
        "order" => order,
        "run" => cols.0,
        "row" => cols.1,
        "label" => cols.2,
        "nfe" => cols.3,
        "paper" => paper_v,
        "ours" => ours,
        "delta" => delta,
        "verdict" => verdicts,
    )?;
    Ok(df
        .sort(["order", "run"], SortMultipleOptions::default())?
        .drop("order")?)
}

fn row_label(row: &Row) -> String {
    format!("Table {}: {}", row.table, row.label)
}

/// ADM's five metrics per (run, NFE), where the evaluate stage computed them.
pub fn adm_metrics(runs: &[RunResult]) -> Result<DataFrame> {
    let (mut run, mut nfe) = (Vec::new(), Vec::new());
    let (mut is, mut fid, mut sfid, mut prec, mut rec) = (vec![], vec![], vec![], vec![], vec![]);
    for r in runs {
        for (k, m) in r.metrics.iter().flat_map(|m| &m.adm) {
            run.push(r.name.clone());
            nfe.push(k.clone());
            is.push(m.inception_score);
            fid.push(m.fid);
            sfid.push(m.sfid);
            prec.push(m.precision);
            rec.push(m.recall);
        }
    }
    Ok(df!(
        "run" => run,
        "NFE" => nfe,
        "IS" => is,
        "FID" => fid,
        "sFID" => sfid,
        "precision" => prec,
        "recall" => rec,
    )?)
}

/// Training done per run: steps, epochs, wall time, and the loss and v loss over the last tenth
/// of the logged lines (the weighted loss sits near 1 with p = 1; the v loss says more).
pub fn training(runs: &[RunResult]) -> Result<DataFrame> {
    let (mut name, mut steps, mut epochs, mut hours) = (vec![], vec![], vec![], vec![]);
    let (mut loss, mut v_loss) = (vec![], vec![]);
    for r in runs {
        name.push(r.name.clone());
        steps.push(r.state.as_ref().map(|s| s.step as i64));
        epochs.push(r.state.as_ref().map(|s| s.epoch as i64));
        hours.push(r.state.as_ref().map(|s| s.wall_s / 3600.0));
        let tail = &r.stats[r.stats.len() - r.stats.len().div_ceil(10)..];
        let mean = |f: fn(&StatLine) -> f64| {
            (!tail.is_empty()).then(|| tail.iter().map(f).sum::<f64>() / tail.len() as f64)
        };
        loss.push(mean(|s| s.loss));
        v_loss.push(mean(|s| s.v_loss));
    }
    let df = df!(
        "run" => name,
        "steps" => steps,
        "epochs" => epochs,
        "hours" => hours,
        "final loss" => loss,
        "final v loss" => v_loss,
    )?;
    Ok(df)
}

/// A DataFrame's cells as text, numbers with `decimals` places, missing values as "-".
pub fn cells(df: &DataFrame, decimals: usize) -> (Vec<String>, Vec<Vec<String>>) {
    let header: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|n| n.to_string())
        .collect();
    let rows = (0..df.height())
        .map(|i| {
            df.columns()
                .iter()
                .map(|c| match c.get(i) {
                    Ok(AnyValue::Null) | Err(_) => "-".to_owned(),
                    Ok(AnyValue::Float64(v)) => format!("{v:.decimals$}"),
                    Ok(AnyValue::String(s)) => s.to_owned(),
                    Ok(AnyValue::StringOwned(s)) => s.to_string(),
                    Ok(other) => other.to_string(),
                })
                .collect()
        })
        .collect();
    (header, rows)
}
