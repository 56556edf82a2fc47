//! `mfr report RUN_OR_EXPERIMENT`: reports/<experiment>/index.html and report.md with the
//! runs in the paper's terms, paper / ours (or, across scales, the two orderings), the metrics
//! with their intervals, training, plots (PNG and SVG), real and sampled images, each run's
//! discrepancy report and where every number came from. Every table also stands alone as
//! Markdown in tables/. Both pages and the twins come from one set of typed tables, notes and
//! figures, rendered by templates/ (templates.rs says how each value is escaped).
use super::discrepancy;
use super::frame::{self, ResultRow};
use super::paper::Paper;
use super::plots::{self, Bar, FidPoint, Series};
use super::runs::{self, interval_method, RunResult};
use super::safe::{copy_run_image, file_stem, Href};
use super::tables::{self, Compared, Ordering, Table};
use super::templates::{self, Prose};
use crate::files::write_atomic;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A picture of the report: its file (relative to the report), caption, and whether it is an
/// image grid (grids sit side by side).
#[derive(Debug, Serialize)]
struct Figure {
    file: Href,
    caption: String,
    grid: bool,
}

/// Everything templates/report.{html,md} show.
#[derive(Serialize)]
struct Page<'a> {
    experiment: &'a str,
    description: &'a str,
    notes: &'a [Prose],
    tables: &'a [Table],
    figures: &'a [Figure],
    commit: &'static str,
    style: &'static str,
}

/// Renders the report of `path` (results/<experiment> or one run directory) under `root`,
/// with each run's discrepancy report beside it.
pub fn report(path: &Path, root: &Path) -> Result<PathBuf> {
    let (experiment, runs) = runs::collect(path)?;
    distinct_files(&runs)?;
    let paper = Paper::bundled();
    let out = root.join(file_stem(&experiment));
    for sub in ["plots", "grids", "tables"] {
        std::fs::create_dir_all(out.join(sub))
            .with_context(|| format!("{}: cannot create", out.join(sub).display()))?;
    }
    let compared = tables::comparisons(&runs, &paper)?;
    let orderings = tables::orderings(&compared);
    let results = ResultRow::read(&ResultRow::frame(&frame::rows(&runs, &paper)?)?)?;

    let controls = discrepancy::controls(&results_root(&runs));
    for run in &runs {
        discrepancy::write(run, &controls, &paper, &out)?;
    }
    let level = level(&runs);
    let mut tables = vec![tables::runs_table(&runs, &paper)?];
    if !compared.is_empty() {
        tables.push(tables::comparison_table(&compared, &orderings, &level));
    }
    if results.iter().any(|r| r.fid.is_some()) {
        tables.push(tables::metrics_table(
            &results,
            metrics_caption(&runs),
            &level,
        ));
    }
    tables.push(tables::training_table(&results));
    tables.push(tables::provenance_table(&runs));
    for t in &tables {
        let twin = out.join("tables").join(format!("{}.md", t.slug));
        write_atomic(
            &twin,
            templates::render("table.md", minijinja::context! { t })?.as_bytes(),
        )?;
    }

    let mut figures = plot_figures(&runs, &results, &compared, &orderings, &experiment, &out)?;
    figures.extend(grid_figures(&runs, &out)?);
    let notes = notes(&runs, &compared, &orderings);
    let page = Page {
        experiment: &experiment,
        description: &runs[0].spec.experiment.description,
        notes: &notes,
        tables: &tables,
        figures: &figures,
        commit: env!("MFR_GIT_COMMIT"),
        style: STYLE,
    };
    write_atomic(
        &out.join("report.md"),
        templates::render("report.md", &page)?.as_bytes(),
    )?;
    write_atomic(
        &out.join("index.html"),
        templates::render("report.html", &page)?.as_bytes(),
    )?;
    Ok(out)
}

/// Two runs whose names give the same file name in the report (names that differ only in
/// characters a file name may not hold) would overwrite each other's grids and reports.
fn distinct_files(runs: &[RunResult]) -> Result<()> {
    let mut seen = std::collections::BTreeMap::new();
    for r in runs {
        if let Some(other) = seen.insert(file_stem(&r.name), &r.name) {
            bail!(
                "runs `{other}` and `{}` would share the report's file names ({}): rename one of their folders",
                r.name,
                file_stem(&r.name)
            );
        }
    }
    Ok(())
}

/// The results folder the runs live in (results/, above results/<experiment>/<run>).
fn results_root(runs: &[RunResult]) -> PathBuf {
    runs[0]
        .dir
        .path()
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// "95%": the level of the runs' intervals, as column headers say it.
fn level(runs: &[RunResult]) -> String {
    let level = RunResult::first_interval(runs).map_or(0.95, |i| i.level);
    format!("{:.0}%", level * 100.0)
}

fn metrics_caption(runs: &[RunResult]) -> String {
    let what = match runs.iter().find_map(|r| Some((r, r.metrics.as_ref()?))) {
        Some((_, m)) if m.reference.is_none() => format!(
            "{} samples per run vs {} training images: a small-sample FID, not FID-50K",
            m.num_samples, m.num_reference
        ),
        Some((_, m)) if m.num_samples == 50_000 => "FID-50K".to_owned(),
        Some((_, m)) if m.num_samples % 1000 == 0 => format!(
            "FID-{}K against the reference batch: a small-sample FID, not FID-50K",
            m.num_samples / 1000
        ),
        Some((_, m)) => format!(
            "{} samples per run against the reference batch: a small-sample FID, not FID-50K",
            m.num_samples
        ),
        None => String::new(),
    };
    let method = RunResult::first_interval(runs).map_or_else(String::new, |i| {
        format!("; in brackets the {}", interval_method(i))
    });
    format!("Metrics of the final weights ({what}{method})")
}

/// The plots under plots/ (PNG and SVG), each with the question it answers.
fn plot_figures(
    runs: &[RunResult],
    results: &[ResultRow],
    compared: &[Compared],
    orderings: &[Ordering],
    experiment: &str,
    out: &Path,
) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    let mut add = |name: &str, caption: String| -> Result<()> {
        figures.push(Figure {
            file: Href::file(&format!("plots/{name}.png"))?,
            caption,
            grid: false,
        });
        Ok(())
    };
    let stem = |name: &str| out.join("plots").join(name);
    let with_stats: Vec<(&str, &[crate::rundir::StatLine])> = runs
        .iter()
        .filter(|r| !r.stats.is_empty())
        .map(|r| (r.label.as_str(), r.stats.as_slice()))
        .collect();
    if !with_stats.is_empty() {
        plots::loss_curves(&with_stats, experiment, &stem("loss"))?;
        add("loss", "Is training still improving, and did the runs train alike? The v loss (mean ||u - v||^2) and the batch mean of the adaptive weight against step (SVG beside each PNG)".into())?;
    }
    let by_nfe = series(
        results,
        |r| r.is_final,
        |r| r.nfe.map(|n| n as f64),
        |r| r.label.clone(),
    );
    if !by_nfe.is_empty() {
        plots::fid_by_nfe(&by_nfe, experiment, &stem("fid-by-nfe"))?;
        add("fid-by-nfe", "Does a second step help, and are the runs told apart? FID of the final weights against the number of network evaluations, with the intervals of the metrics table as error bars".into())?;
    }
    let by_step: Vec<Series> = series(
        results,
        |_| true,
        |r| r.step.map(|s| s as f64),
        |r| format!("{} {}-NFE", r.label, r.nfe.unwrap_or(0)),
    )
    .into_iter()
    .filter(|s| s.points.len() > 1)
    .collect();
    if !by_step.is_empty() {
        plots::fid_by_step(&by_step, experiment, &stem("fid-by-step"))?;
        add("fid-by-step", "Is FID still falling when training stops? FID against training step (the checkpoints of eval.steps and the final one)".into())?;
    }
    let bars: Vec<Bar> = compared
        .iter()
        .filter(|c| c.incomparable.is_none())
        .map(|c| Bar {
            label: short(&c.row.label),
            paper: c.row.value,
            ours: c.ours.map(|f| f.value),
        })
        .collect();
    if !bars.is_empty() {
        plots::paper_vs_ours(&bars, experiment, &stem("paper-vs-ours"))?;
        add("paper-vs-ours", "How far are we from the paper? Its FID beside ours, for the rows this run can be held to".into())?;
    }
    for o in orderings {
        let rows: Vec<plots::Ranked> = o
            .rows
            .iter()
            .map(|r| {
                let c = &compared[r.at];
                plots::Ranked {
                    label: c.run.label.clone(),
                    paper: c.row.value,
                    ours: c.ours.map_or(f64::NAN, |f| f.value),
                    interval: c.ours.and_then(|f| f.interval),
                }
            })
            .collect();
        let name = format!("ordering-{}nfe", o.nfe);
        plots::ordering(&rows, experiment, &stem(&name))?;
        add(&name, format!("Do our runs order the paper's rows as the paper does? Our {}-NFE FID (with its interval) for the rows from the paper's best to its worst: the points rise left to right where the orders agree (Spearman's rho {:.2})", o.nfe, o.spearman))?;
    }
    Ok(figures)
}

/// The lines of a FID chart from the results frame: the rows `keep` selects with an x and a
/// FID, one line per `name`, in the frame's order, sorted by x.
fn series(
    results: &[ResultRow],
    keep: fn(&ResultRow) -> bool,
    x: fn(&ResultRow) -> Option<f64>,
    name: impl Fn(&ResultRow) -> String,
) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for r in results.iter().filter(|r| keep(r)) {
        let (Some(x), Some(fid)) = (x(r), r.fid()) else {
            continue;
        };
        let name = name(r);
        let point = FidPoint {
            x,
            fid: fid.value,
            interval: fid.interval,
        };
        match out.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push(point),
            None => out.push(Series {
                name,
                points: vec![point],
            }),
        }
    }
    for s in &mut out {
        s.points.sort_by(|a, b| a.x.total_cmp(&b.x));
    }
    out
}

/// Real images (once per data set) and each run's sample grids, copied from the runs when
/// they are the runs' own regular files.
fn grid_figures(runs: &[RunResult], out: &Path) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    let mut real_seen = BTreeSet::new();
    for r in runs {
        let data = file_stem(&runs::file_name(&r.spec.train.data));
        if real_seen.contains(&data) {
            continue;
        }
        let file = format!("grids/real-{data}.png");
        if copy_run_image(&r.dir.real_grid(), r.dir.path(), &out.join(&file))? {
            real_seen.insert(data);
            let what = match r.scale().pixels {
                true => "training images, a column per class",
                false => "images of the reference batch",
            };
            figures.push(Figure {
                file: Href::file(&file)?,
                caption: format!("Real {what}, to look at beside the samples"),
                grid: true,
            });
        }
    }
    for r in runs {
        for nfe in r.spec.sample.schedules.iter().map(|s| s.len() - 1) {
            let file = format!("grids/{}-{nfe}nfe.png", file_stem(&r.name));
            if copy_run_image(&r.dir.grid(nfe), r.dir.path(), &out.join(&file))? {
                figures.push(Figure {
                    file: Href::file(&file)?,
                    caption: format!(
                        "{}: {nfe}-NFE samples, a column per class (EMA weights)",
                        r.label
                    ),
                    grid: true,
                });
            }
        }
    }
    Ok(figures)
}

/// A label short enough for a bar: the part after the colon.
fn short(label: &str) -> String {
    label.rsplit(':').next().unwrap_or(label).trim().to_owned()
}

/// The notes above the tables: scale, which runs the intervals do not tell apart, whether the
/// orderings agree, and what could not be computed.
fn notes(runs: &[RunResult], compared: &[Compared], orderings: &[Ordering]) -> Vec<Prose> {
    let mut notes = Vec::new();
    if let Some(c) = compared.iter().find(|c| !c.run.scale().is_papers()) {
        notes.push(scale_note(c));
    }
    let nfes: BTreeSet<i64> = runs.iter().flat_map(|r| r.fids()).map(|p| p.0).collect();
    for nfe in nfes {
        let with = runs
            .iter()
            .filter(|r| r.fid(nfe).is_some_and(|f| f.interval.is_some()))
            .count();
        if with < 2 {
            continue;
        }
        let pairs = tables::overlapping(runs, nfe);
        notes.push(Prose::new().text(match pairs.is_empty() {
            true => format!("{nfe}-NFE: no two runs' FID intervals overlap: the FIDs order the runs."),
            false => format!(
                "{nfe}-NFE: these runs' FID intervals overlap, so their FIDs do not tell them apart at this sample size: {}.",
                pairs
                    .iter()
                    .map(|(a, b)| format!("{} and {}", a.label, b.label))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }));
    }
    for o in orderings {
        let order = |rank: fn(&tables::Ranked) -> f64| {
            let mut rows: Vec<_> = o.rows.iter().collect();
            rows.sort_by(|a, b| rank(a).total_cmp(&rank(b)));
            rows.iter()
                .map(|r| compared[r.at].run.label.clone())
                .collect::<Vec<_>>()
                .join(", then ")
        };
        notes.push(Prose::new().text(format!(
            "Ordering at {}-NFE (rows these runs cannot match in value): the paper has {}; ours {} (best first; Spearman's rho {:.2}).{}",
            o.nfe,
            order(|r| r.paper_rank),
            order(|r| r.our_rank),
            o.spearman,
            match o.unresolved {
                0 => String::new(),
                n => format!(" {n} of the pairs have overlapping intervals: their order is not resolved by this sample size."),
            }
        )));
    }
    if runs.iter().any(|r| {
        r.metrics
            .as_ref()
            .is_some_and(|m| m.adm.values().any(|v| v.inception_score.is_none()))
    }) {
        notes.push(
            Prose::new()
                .text("IS is unavailable where the Inception weights have no softmax layer (the bundled TorchScript copy): ")
                .code("mfr fetch pt_inception")
                .text(" and ")
                .code("mfr import")
                .text(" it."),
        );
    }
    notes
}

/// Why values cannot be compared: the scale a run trained and scored at against the paper's,
/// from its data, device and sample count.
fn scale_note(c: &Compared) -> Prose {
    let run = c.run;
    let preset = run
        .spec
        .model
        .preset
        .as_deref()
        .unwrap_or("a custom network");
    let device = run
        .env
        .as_ref()
        .map_or_else(String::new, |e| format!(" on {}", e.device));
    let scored = match &run.metrics {
        Some(m) if m.reference.is_none() => format!(
            " and score FID on {} samples against {} training images",
            m.num_samples, m.num_reference
        ),
        Some(m) => format!(" and score FID on {} samples", m.num_samples),
        None => String::new(),
    };
    Prose::new().text(format!(
        "Scales differ: these runs train {preset} on {}{device}{scored}; the paper's numbers are {} of {} on ImageNet 256. Compare the ordering across rows, not the values.",
        run.scale().describe(),
        c.row.metric,
        c.row.model,
    ))
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}\
table{border-collapse:collapse;margin:1.2em 0;font-size:14px}caption{text-align:left;font-weight:600;padding:.4em 0}\
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f3f3f3}\
td[title]{text-decoration:underline dotted;cursor:help}a.twin{font-weight:400;font-size:12px;margin-left:.6em}\
td.ok{background:#e6f4e6}td.miss{background:#fbe3e3}td.muted{color:#666}\
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.6em 1em}.muted{color:#666}\
figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:14px}\
.grids{display:flex;flex-wrap:wrap;gap:1em}.grids figure{margin:0;flex:0 0 auto;max-width:380px}";
