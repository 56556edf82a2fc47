//! An experiment's results as tables (polars DataFrames), read from its run directories only
//! (through [`crate::rundir`]'s records).
use super::paper::{Paper, Row};
use crate::eval::bootstrap::Interval;
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

    /// The 95% bootstrap interval of the final FID at `nfe`, where the evaluate stage made one.
    pub fn interval(&self, nfe: i64) -> Option<Interval> {
        self.metrics
            .as_ref()?
            .fid_interval
            .get(&format!("{nfe}-NFE"))
            .copied()
    }

    /// "34.96 [33.10, 37.20]", or the FID alone without an interval.
    pub fn fid_text(&self, nfe: i64) -> Option<String> {
        let fid = self.fid(nfe)?;
        Some(match self.interval(nfe) {
            Some(i) => format!("{fid:.2} {i}"),
            None => format!("{fid:.2}"),
        })
    }

    /// The paper row this run stands for: of the rows it matches, the one set by a key its
    /// sweep point names (the first matched row without a sweep).
    pub fn paper_row<'p>(&self, paper: &'p Paper) -> Result<Option<&'p Row>> {
        let rows = paper.rows_for(&self.spec.paper.rows, &self.spec)?;
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

    /// Whether the FIDs are the demo's small-sample kind rather than FID-50K.
    pub fn small_sample(&self) -> bool {
        crate::data::is_pixels(&self.spec.train.data)
    }
}

/// The runs of an experiment directory (results/<experiment>), or the one run `path` is.
pub fn collect(path: &Path) -> Result<(String, Vec<RunResult>)> {
    let one = RunDir::new(path);
    if one.exists() {
        let mut runs = vec![RunResult::read(&one)?];
        label_runs(&mut runs, &Paper::bundled())?;
        return Ok((runs[0].spec.experiment.name.clone(), runs));
    }
    let dirs = crate::rundir::runs_of(path)?;
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

/// One run held against one paper row it matches.
pub struct Compared<'a> {
    pub run: &'a RunResult,
    pub row: &'a Row,
    pub nfe: i64,
    pub ours: Option<f64>,
    pub interval: Option<Interval>,
    /// Why the run cannot be held to the row's number (None when it can).
    pub incomparable: Option<String>,
    pub verdict: String,
}

/// Every (run, paper row it matches), in the order the spec lists its rows (the paper's),
/// then by run.
pub fn comparisons<'a>(runs: &'a [RunResult], paper: &'a Paper) -> Result<Vec<Compared<'a>>> {
    let mut out = Vec::new();
    for run in runs {
        for row in paper.rows_for(&run.spec.paper.rows, &run.spec)? {
            let nfe = row.nfe.unwrap_or(1);
            let ours = run.fid(nfe);
            let incomparable = row.incomparable(&run.spec);
            let verdict = verdict(
                row.value,
                ours,
                run.spec.paper.tolerance,
                incomparable.as_deref(),
            );
            out.push(Compared {
                run,
                row,
                nfe,
                ours,
                interval: run.interval(nfe),
                incomparable,
                verdict,
            });
        }
    }
    let position = |c: &Compared| c.run.spec.paper.rows.iter().position(|id| *id == c.row.id);
    out.sort_by(|a, b| {
        position(a)
            .cmp(&position(b))
            .then(a.run.name.cmp(&b.run.name))
    });
    Ok(out)
}

/// Whether our runs order a group of rows as the paper does: rows of one NFE the runs cannot
/// be held to in value (another scale), ranked by FID both ways (1 = best).
pub struct Ordering<'a> {
    pub nfe: i64,
    /// In the paper's order, best first: (compared, paper rank, our rank).
    pub rows: Vec<(&'a Compared<'a>, f64, f64)>,
    /// Spearman's rank correlation of ours with the paper's (1: the same order).
    pub spearman: f64,
    /// Pairs of rows (labels) whose 95% intervals overlap: their order is not resolved.
    pub unresolved: Vec<(String, String)>,
}

/// The [`Ordering`] per NFE of the rows that are evaluated but not comparable in value, where
/// there are at least two.
pub fn orderings<'a>(compared: &'a [Compared<'a>]) -> Vec<Ordering<'a>> {
    let nfes: std::collections::BTreeSet<i64> = compared.iter().map(|c| c.nfe).collect();
    let mut out = Vec::new();
    for nfe in nfes {
        let mut group: Vec<&Compared> = compared
            .iter()
            .filter(|c| c.nfe == nfe && c.incomparable.is_some() && c.ours.is_some())
            .collect();
        if group.len() < 2 {
            continue;
        }
        group.sort_by(|a, b| a.row.value.total_cmp(&b.row.value));
        let paper_ranks = ranks(&group.iter().map(|c| c.row.value).collect::<Vec<_>>());
        let our_ranks = ranks(
            &group
                .iter()
                .map(|c| c.ours.unwrap_or(f64::NAN))
                .collect::<Vec<_>>(),
        );
        let mut unresolved = Vec::new();
        for (i, a) in group.iter().enumerate() {
            for b in &group[i + 1..] {
                if let (Some(x), Some(y)) = (a.interval, b.interval) {
                    if x.overlaps(&y) {
                        unresolved.push((a.run.label.clone(), b.run.label.clone()));
                    }
                }
            }
        }
        out.push(Ordering {
            nfe,
            spearman: pearson(&paper_ranks, &our_ranks),
            rows: group
                .into_iter()
                .zip(paper_ranks.into_iter().zip(our_ranks))
                .map(|(c, (p, o))| (c, p, o))
                .collect(),
            unresolved,
        });
    }
    out
}

/// Ranks of `values` from 1 (smallest), ties sharing their mean rank (as Spearman's rho takes
/// them).
pub fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut out = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        for &k in &order[i..=j] {
            out[k] = (i + j) as f64 / 2.0 + 1.0;
        }
        i = j + 1;
    }
    out
}

/// Pearson's correlation (of ranks: Spearman's rho); NaN where either side is constant.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    cov / (vx * vy).sqrt()
}

/// Pairs of runs whose FID intervals at `nfe` overlap: their FIDs do not tell them apart.
pub fn overlapping(runs: &[RunResult], nfe: i64) -> Vec<(&RunResult, &RunResult)> {
    let with: Vec<(&RunResult, Interval)> = runs
        .iter()
        .filter_map(|r| Some((r, r.interval(nfe)?)))
        .collect();
    let mut out = Vec::new();
    for (i, (a, x)) in with.iter().enumerate() {
        for (b, y) in &with[i + 1..] {
            if x.overlaps(y) {
                out.push((*a, *b));
            }
        }
    }
    out
}

/// The comparisons as a table: one line per (run, paper row), paper / ours / delta and the
/// verdict; where the group is ordered instead, the two ranks.
pub fn comparison(compared: &[Compared], orderings: &[Ordering]) -> Result<DataFrame> {
    let rank = |c: &Compared, pick: fn(&(&Compared, f64, f64)) -> f64| {
        orderings
            .iter()
            .flat_map(|o| &o.rows)
            .find(|r| std::ptr::eq(r.0, c))
            .map(|r| format!("{}", pick(r)))
    };
    let ranked = orderings.iter().any(|o| !o.rows.is_empty());
    let mut df = df!(
        "run" => compared.iter().map(|c| c.run.label.clone()).collect::<Vec<_>>(),
        "paper row" => compared.iter().map(|c| format!("{} ({})", row_label(c.row), c.row.id)).collect::<Vec<_>>(),
        "NFE" => compared.iter().map(|c| c.nfe).collect::<Vec<_>>(),
        "paper" => compared.iter().map(|c| c.row.value).collect::<Vec<_>>(),
        "ours (± 95% CI)" => compared.iter().map(|c| c.run.fid_text(c.nfe)).collect::<Vec<_>>(),
        "delta" => compared.iter().map(|c| c.ours.map(|o| o - c.row.value)).collect::<Vec<_>>(),
    )?;
    if ranked {
        df.with_column(Column::new(
            "paper rank".into(),
            compared
                .iter()
                .map(|c| rank(c, |r| r.1))
                .collect::<Vec<_>>(),
        ))?;
        df.with_column(Column::new(
            "our rank".into(),
            compared
                .iter()
                .map(|c| rank(c, |r| r.2))
                .collect::<Vec<_>>(),
        ))?;
    }
    df.with_column(Column::new(
        "verdict".into(),
        compared
            .iter()
            .map(|c| c.verdict.clone())
            .collect::<Vec<_>>(),
    ))?;
    Ok(df)
}

fn row_label(row: &Row) -> String {
    format!("Table {}: {}", row.table, row.label)
}

/// The metrics per (run, NFE) of the final weights: FID with its 95% bootstrap half-width, and
/// where the evaluate stage computed them, sFID, precision, recall and IS.
pub fn metrics(runs: &[RunResult]) -> Result<DataFrame> {
    let (mut run, mut nfe, mut fid) = (Vec::new(), Vec::new(), Vec::new());
    let (mut sfid, mut prec, mut rec, mut is) = (vec![], vec![], vec![], vec![]);
    for r in runs {
        for (n, _) in r.fids() {
            let adm = r
                .metrics
                .as_ref()
                .and_then(|m| m.adm.get(&format!("{n}-NFE")));
            run.push(r.label.clone());
            nfe.push(n);
            fid.push(r.fid_text(n));
            sfid.push(adm.and_then(|a| a.sfid));
            prec.push(adm.and_then(|a| a.precision));
            rec.push(adm.and_then(|a| a.recall));
            is.push(adm.and_then(|a| a.inception_score));
        }
    }
    Ok(df!(
        "run" => run,
        "NFE" => nfe,
        "FID (± 95% CI)" => fid,
        "sFID" => sfid,
        "precision" => prec,
        "recall" => rec,
        "IS" => is,
    )?)
}

/// Training done per run: steps, epochs, wall time, and over the last tenth of the logged
/// lines the v loss and the mean adaptive weight (the weighted loss itself sits near 1 by
/// construction with p = 1, so it says nothing).
pub fn training(runs: &[RunResult]) -> Result<DataFrame> {
    let (mut name, mut steps, mut epochs, mut hours) = (vec![], vec![], vec![], vec![]);
    let (mut v_loss, mut weight) = (vec![], vec![]);
    for r in runs {
        name.push(r.label.clone());
        steps.push(r.state.as_ref().map(|s| s.step as i64));
        epochs.push(r.state.as_ref().map(|s| s.epoch as i64));
        hours.push(r.state.as_ref().map(|s| s.wall_s / 3600.0));
        let tail = &r.stats[r.stats.len() - r.stats.len().div_ceil(10)..];
        let mean = |f: &dyn Fn(&StatLine) -> Option<f64>| {
            let v: Vec<f64> = tail.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        v_loss.push(mean(&|s| Some(s.v_loss)));
        weight.push(mean(&|s| s.adaptive_weight));
    }
    let df = df!(
        "run" => name,
        "steps" => steps,
        "epochs" => epochs,
        "hours" => hours,
        "final v loss" => v_loss,
        "final adaptive weight" => weight,
    )?;
    Ok(df)
}

/// A path's last component (the path itself when it has none): reports name files, not one
/// machine's folders.
pub fn file_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map_or_else(|| path.to_owned(), |f| f.to_string_lossy().into_owned())
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
