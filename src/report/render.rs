//! `mfr report RUN_OR_EXPERIMENT`: reports/<experiment>/report.md and index.html with the
//! paper / ours table, training and metric tables, plots (PNG and SVG) and sample grids, and
//! where every number came from.
use super::paper::Paper;
use super::plots::{self, Bar};
use super::tables::{self, cells, RunResult};
use crate::files::write_atomic;
use anyhow::{Context, Result};
use polars::prelude::*;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A table as rendered: a caption, its header and its rows of text.
struct Table {
    caption: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn from_frame(caption: &str, df: &DataFrame, decimals: usize) -> Table {
        let (header, rows) = cells(df, decimals);
        Table {
            caption: caption.to_owned(),
            header,
            rows,
        }
    }

    fn markdown(&self) -> String {
        let mut s = format!("**{}**\n\n| {} |\n|", self.caption, self.header.join(" | "));
        s += &"---|".repeat(self.header.len());
        for row in &self.rows {
            let _ = write!(s, "\n| {} |", row.join(" | "));
        }
        s + "\n"
    }

    fn html(&self) -> String {
        let mut s = format!("<table>\n<caption>{}</caption>\n<tr>", esc(&self.caption));
        for h in &self.header {
            let _ = write!(s, "<th>{}</th>", esc(h));
        }
        s += "</tr>\n";
        for row in &self.rows {
            s += "<tr>";
            for (i, c) in row.iter().enumerate() {
                let class = if self.header[i] == "verdict" {
                    verdict_class(c)
                } else {
                    ""
                };
                let _ = write!(s, "<td class=\"{class}\">{}</td>", esc(c));
            }
            s += "</tr>\n";
        }
        s + "</table>\n"
    }
}

fn verdict_class(v: &str) -> &'static str {
    if v.starts_with("reproduced") || v.starts_with("better") {
        "ok"
    } else if v.starts_with("missed") {
        "miss"
    } else {
        "muted"
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The comparison as the official README shows it: "paper / ours" in one cell.
fn comparison_table(df: &DataFrame) -> Result<Table> {
    let (_, rows) = cells(df, 2);
    let header = [
        "run",
        "paper row",
        "NFE",
        "paper / ours",
        "delta",
        "verdict",
    ];
    let rows = rows
        .into_iter()
        .map(|r| {
            // Columns of tables::comparison: run, row, label, nfe, paper, ours, delta, verdict.
            vec![
                r[0].clone(),
                format!("{} ({})", r[2], r[1]),
                r[3].clone(),
                format!("{} / {}", r[4], r[5]),
                r[6].clone(),
                r[7].clone(),
            ]
        })
        .collect();
    Ok(Table {
        caption: "Paper / ours (FID; lower is better)".to_owned(),
        header: header.iter().map(|s| s.to_string()).collect(),
        rows,
    })
}

/// A picture of the report: its file (relative to the report) and caption.
struct Figure {
    file: String,
    caption: String,
}

/// Renders the report of `path` (results/<experiment> or one run directory) under `root`.
pub fn report(path: &Path, root: &Path) -> Result<PathBuf> {
    let (experiment, runs) = tables::collect(path)?;
    let paper = Paper::bundled();
    let out = root.join(&experiment);
    std::fs::create_dir_all(out.join("plots"))
        .with_context(|| format!("{}: cannot create", out.display()))?;
    std::fs::create_dir_all(out.join("grids"))?;

    let comparison = tables::comparison(&runs, &paper)?;
    let adm = tables::adm_metrics(&runs)?;
    let training = tables::training(&runs)?;
    let mut tables = Vec::new();
    if comparison.height() > 0 {
        tables.push(comparison_table(&comparison)?);
    }
    let fids = fid_frame(&runs)?;
    if fids.height() > 0 {
        tables.push(Table::from_frame(&fid_caption(&runs), &fids, 2));
    }
    if adm.height() > 0 {
        let reference = runs
            .iter()
            .find_map(|r| r.metrics.as_ref()?.reference.clone())
            .map_or_else(String::new, |p| {
                Path::new(&p)
                    .file_name()
                    .map_or(p.clone(), |f| f.to_string_lossy().into_owned())
            });
        tables.push(Table::from_frame(
            &format!("ADM evaluator metrics (against {reference})"),
            &adm,
            4,
        ));
    }
    tables.push(Table::from_frame("Training", &training, 4));

    let figures = figures(&runs, &comparison, &paper, &experiment, &out)?;
    let notes = notes(&runs);
    let provenance = provenance(&runs)?;

    let md = markdown(&experiment, &runs, &tables, &figures, &notes, &provenance);
    let html = html(&experiment, &runs, &tables, &figures, &notes, &provenance);
    write_atomic(&out.join("report.md"), md.as_bytes())?;
    write_atomic(&out.join("index.html"), html.as_bytes())?;
    Ok(out)
}

/// FID per run and NFE, wide: a column per NFE.
fn fid_frame(runs: &[RunResult]) -> Result<DataFrame> {
    let nfes: std::collections::BTreeSet<i64> =
        runs.iter().flat_map(|r| r.fids()).map(|p| p.0).collect();
    let evaluated: Vec<&RunResult> = runs.iter().filter(|r| !r.fids().is_empty()).collect();
    let mut columns = vec![Column::new(
        "run".into(),
        evaluated.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
    )];
    for nfe in nfes {
        columns.push(Column::new(
            format!("FID {nfe}-NFE").into(),
            evaluated.iter().map(|r| r.fid(nfe)).collect::<Vec<_>>(),
        ));
    }
    Ok(DataFrame::new_infer_height(columns)?)
}

fn fid_caption(runs: &[RunResult]) -> String {
    match runs.iter().find(|r| r.metrics.is_some()) {
        Some(r) if r.small_sample() => {
            let m = r.metrics.as_ref().expect("checked");
            format!(
                "FID per run ({} samples per run vs {} training images: a small-sample FID, not FID-50K)",
                m.num_samples, m.num_reference
            )
        }
        Some(r) if r.spec.sample.num_samples % 1000 == 0 => {
            format!("FID-{}K per run", r.spec.sample.num_samples / 1000)
        }
        Some(r) => format!("FID per run ({} samples)", r.spec.sample.num_samples),
        None => "FID per run".to_owned(),
    }
}

fn figures(
    runs: &[RunResult],
    comparison: &DataFrame,
    paper: &Paper,
    experiment: &str,
    out: &Path,
) -> Result<Vec<Figure>> {
    let mut figs = Vec::new();
    let with_stats: Vec<(&str, &[crate::rundir::StatLine])> = runs
        .iter()
        .filter(|r| !r.stats.is_empty())
        .map(|r| (r.name.as_str(), r.stats.as_slice()))
        .collect();
    if !with_stats.is_empty() {
        plots::loss_curves(&with_stats, experiment, &out.join("plots").join("loss"))?;
        figs.push(Figure {
            file: "plots/loss.png".into(),
            caption: "Weighted loss and v loss against training step, one line per run (SVG beside the PNG)".into(),
        });
    }
    let fids: Vec<(String, Vec<(i64, f64)>)> = runs
        .iter()
        .map(|r| (r.name.clone(), r.fids()))
        .filter(|(_, f)| !f.is_empty())
        .collect();
    if !fids.is_empty() {
        plots::fid_by_nfe(&fids, experiment, &out.join("plots").join("fid-by-nfe"))?;
        figs.push(Figure {
            file: "plots/fid-by-nfe.png".into(),
            caption: "FID at the final step against the number of network evaluations".into(),
        });
    }
    // FID against training step, where the runs evaluated several checkpoints (eval.steps).
    let by_step: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .flat_map(|r| {
            r.history()
                .into_iter()
                .map(move |(nfe, points)| (format!("{} {nfe}", r.name), points))
        })
        .filter(|(_, points)| points.len() > 1)
        .collect();
    if !by_step.is_empty() {
        plots::fid_by_step(&by_step, experiment, &out.join("plots").join("fid-by-step"))?;
        figs.push(Figure {
            file: "plots/fid-by-step.png".into(),
            caption: "FID against training step (the checkpoints of eval.steps and the final one)"
                .into(),
        });
    }
    if comparison.height() > 0 {
        let (_, rows) = cells(comparison, 6);
        let bars: Vec<Bar> = rows
            .iter()
            .map(|r| Bar {
                label: paper
                    .row(&r[1])
                    .map_or(r[1].clone(), |row| short(&row.label)),
                paper: r[4].parse().unwrap_or(f64::NAN),
                ours: r[5].parse().ok(),
            })
            .collect();
        plots::paper_vs_ours(&bars, experiment, &out.join("plots").join("paper-vs-ours"))?;
        figs.push(Figure {
            file: "plots/paper-vs-ours.png".into(),
            caption: "The paper's FID beside ours, per matched row".into(),
        });
    }
    for r in runs {
        for nfe in r.spec.sample.schedules.iter().map(|s| s.len() - 1) {
            let grid = r.dir.grid(nfe);
            if grid.exists() {
                let file = format!("grids/{}-{nfe}nfe.png", r.name.replace(['=', ','], "_"));
                std::fs::copy(&grid, out.join(&file))
                    .with_context(|| format!("{}: cannot copy", grid.display()))?;
                figs.push(Figure {
                    file,
                    caption: format!(
                        "{}: {nfe}-NFE samples, a column per class (EMA weights)",
                        r.name
                    ),
                });
            }
        }
    }
    Ok(figs)
}

/// A label short enough for a bar: the part after the colon.
fn short(label: &str) -> String {
    label.rsplit(':').next().unwrap_or(label).trim().to_owned()
}

fn notes(runs: &[RunResult]) -> Vec<String> {
    let mut notes = Vec::new();
    if runs.iter().any(RunResult::small_sample) {
        let preset = runs[0].spec.model.preset.clone().unwrap_or_default();
        notes.push(format!(
            "Scales differ: these runs train {preset} on 8x8 digits on a CPU and score a small-sample FID against the digits; the paper's numbers are FID-50K of SiT-B/4 on ImageNet 256. Compare the ordering across rows, not the values."
        ));
    }
    if runs.iter().any(|r| {
        r.metrics
            .as_ref()
            .is_some_and(|m| m.adm.values().any(|v| v.inception_score.is_none()))
    }) {
        notes.push("IS is unavailable where the Inception weights have no softmax layer (the bundled TorchScript copy): `mfr fetch pt_inception` and `mfr import` it.".to_owned());
    }
    notes
}

fn provenance(runs: &[RunResult]) -> Result<Table> {
    let header = [
        "run",
        "spec sha256",
        "code",
        "device",
        "weights",
        "samples",
        "Inception",
        "reference",
    ];
    let rows = runs
        .iter()
        .map(|r| {
            let m = r.metrics.as_ref();
            let text = |v: Option<&str>| {
                v.map_or("-".to_owned(), |s| {
                    Path::new(s)
                        .file_name()
                        .map_or(s.to_owned(), |f| f.to_string_lossy().into_owned())
                })
            };
            let reference = m.and_then(|m| m.reference.as_ref()).map_or_else(
                || "training images".to_owned(),
                |_| {
                    crate::assets::find(&r.spec.eval.reference)
                        .map(|a| format!("{} ({})", a.name, a.pin.describe()))
                        .unwrap_or_else(|_| r.spec.eval.reference.clone())
                },
            );
            vec![
                r.name.clone(),
                r.spec.sha256()[..16].to_owned(),
                r.env.as_ref().map_or("-", |e| &e.code_commit).to_owned(),
                r.env.as_ref().map_or("-", |e| &e.device).to_owned(),
                r.spec
                    .model
                    .weights
                    .clone()
                    .or_else(|| r.state.as_ref().map(|s| format!("step {} (EMA)", s.step)))
                    .unwrap_or_else(|| "-".to_owned()),
                m.map_or("-".to_owned(), |m| {
                    format!(
                        "{} per schedule, seed {}",
                        m.num_samples, r.spec.sample.seed
                    )
                }),
                text(m.map(|m| m.inception_weights.as_str())),
                reference,
            ]
        })
        .collect();
    Ok(Table {
        caption: "Provenance".to_owned(),
        header: header.iter().map(|s| s.to_string()).collect(),
        rows,
    })
}

fn title(experiment: &str, runs: &[RunResult]) -> (String, String) {
    (
        format!("meanflow-repro report: {experiment}"),
        runs[0].spec.experiment.description.clone(),
    )
}

fn markdown(
    experiment: &str,
    runs: &[RunResult],
    tables: &[Table],
    figures: &[Figure],
    notes: &[String],
    provenance: &Table,
) -> String {
    let (title, description) = title(experiment, runs);
    let mut s = format!("# {title}\n\n{description}\n\n");
    for n in notes {
        let _ = writeln!(s, "> {n}\n");
    }
    for t in tables {
        s += &t.markdown();
        s += "\n";
    }
    for f in figures {
        let _ = writeln!(s, "![{}]({})\n\n*{}*\n", f.caption, f.file, f.caption);
    }
    s += &provenance.markdown();
    let _ = write!(
        s,
        "\nPaper numbers: paper/meanflow.toml. Rendered by `mfr report` ({}).\n",
        env!("MFR_GIT_COMMIT")
    );
    s
}

fn html(
    experiment: &str,
    runs: &[RunResult],
    tables: &[Table],
    figures: &[Figure],
    notes: &[String],
    provenance: &Table,
) -> String {
    let (title, description) = title(experiment, runs);
    let mut s = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>{STYLE}</style></head>\n<body>\n<h1>{t}</h1>\n<p>{d}</p>\n",
        t = esc(&title),
        d = esc(&description)
    );
    for n in notes {
        let _ = writeln!(s, "<p class=\"note\">{}</p>", esc(n));
    }
    for t in tables {
        s += &t.html();
    }
    for f in figures {
        let _ = writeln!(
            s,
            "<figure><img src=\"{}\" alt=\"{c}\"><figcaption>{c}</figcaption></figure>",
            esc(&f.file),
            c = esc(&f.caption)
        );
    }
    s += &provenance.html();
    let _ = write!(
        s,
        "<p class=\"muted\">Paper numbers: paper/meanflow.toml. Rendered by <code>mfr report</code> ({}).</p>\n</body></html>\n",
        env!("MFR_GIT_COMMIT")
    );
    s
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}\
table{border-collapse:collapse;margin:1.2em 0;font-size:14px}caption{text-align:left;font-weight:600;padding:.4em 0}\
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f3f3f3}\
td.ok{background:#e6f4e6}td.miss{background:#fbe3e3}td.muted{color:#666}\
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.6em 1em}.muted{color:#666}\
figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:14px}";
