//! An experiment's results as tables (polars DataFrames), read from its run directories only:
//! spec.toml, env.json, stats.jsonl, checkpoints/ and samples/metrics.json.
use super::paper::{Paper, Row};
use super::plots::{read_stats, StatLine};
use crate::spec::Spec;
use crate::train::checkpoint::{self, TrainState};
use anyhow::{bail, Context, Result};
use polars::prelude::*;
use std::path::{Path, PathBuf};

/// What one run directory holds.
pub struct RunResult {
    pub name: String,
    pub dir: PathBuf,
    pub spec: Spec,
    /// env.json: code commit, libtorch, device.
    pub env: serde_json::Value,
    /// samples/metrics.json, once the evaluate stage ran.
    pub metrics: Option<serde_json::Value>,
    /// The newest checkpoint's training state (none for imported weights).
    pub state: Option<TrainState>,
    pub stats: Vec<StatLine>,
}

impl RunResult {
    pub fn read(dir: &Path) -> Result<RunResult> {
        let spec_file = dir.join("spec.toml");
        let text = std::fs::read_to_string(&spec_file).with_context(|| {
            format!(
                "{}: not a run directory (no spec.toml); give results/<experiment> or one of its runs",
                dir.display()
            )
        })?;
        let spec = Spec::parse(&text, &spec_file.display().to_string())?;
        let json = |p: PathBuf| -> Option<serde_json::Value> {
            serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
        };
        let stats_file = dir.join("stats.jsonl");
        Ok(RunResult {
            name: dir
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            env: json(dir.join("env.json")).unwrap_or_default(),
            metrics: json(dir.join("samples").join("metrics.json")),
            state: checkpoint::latest(&dir.join("checkpoints")).map(|(_, s)| s),
            stats: if stats_file.exists() {
                read_stats(&stats_file)?
            } else {
                Vec::new()
            },
            dir: dir.to_owned(),
            spec,
        })
    }

    /// FID per NFE from metrics.json, e.g. [(1, 61.2), (2, 55.0)].
    pub fn fids(&self) -> Vec<(i64, f64)> {
        let Some(m) = self.metrics.as_ref().and_then(|m| m["fid"].as_object()) else {
            return Vec::new();
        };
        let mut out: Vec<(i64, f64)> = m
            .iter()
            .filter_map(|(k, v)| Some((k.strip_suffix("-NFE")?.parse().ok()?, v.as_f64()?)))
            .collect();
        out.sort_by_key(|p| p.0);
        out
    }

    /// FID against training step from metrics.json's history: (NFE label, [(step, FID)]).
    pub fn history(&self) -> Vec<(String, Vec<(f64, f64)>)> {
        let mut by_nfe: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
        let lines = self.metrics.as_ref().and_then(|m| m["history"].as_array());
        for line in lines.into_iter().flatten() {
            if let (Some(nfe), Some(step), Some(fid)) = (
                line["nfe"].as_str(),
                line["step"].as_f64(),
                line["fid"].as_f64(),
            ) {
                by_nfe.entry(nfe.to_owned()).or_default().push((step, fid));
            }
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
    if path.join("spec.toml").exists() {
        let run = RunResult::read(path)?;
        return Ok((run.spec.experiment.name.clone(), vec![run]));
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| {
            format!(
                "{}: cannot read (run `mfr run SPEC` first?)",
                path.display()
            )
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("spec.toml").exists())
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        bail!(
            "{}: holds no run directories (run `mfr run SPEC` first)",
            path.display()
        );
    }
    let runs = dirs
        .iter()
        .map(|d| RunResult::read(d))
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
        let Some(adm) = r.metrics.as_ref().and_then(|m| m["adm"].as_object()) else {
            continue;
        };
        for (k, m) in adm {
            run.push(r.name.clone());
            nfe.push(k.clone());
            is.push(m["inception_score"].as_f64());
            fid.push(m["fid"].as_f64());
            sfid.push(m["sfid"].as_f64());
            prec.push(m["precision"].as_f64());
            rec.push(m["recall"].as_f64());
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
