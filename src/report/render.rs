//! `mfr report RUN_OR_EXPERIMENT`: reports/<experiment>/index.html and report.md with the
//! runs in the paper's terms, paper / ours (or, across scales, the two orderings), the metrics
//! with their bootstrap intervals, training, plots (PNG and SVG), real and sampled images, each
//! run's discrepancy report and where every number came from. Every table also stands alone as
//! Markdown in tables/.
use super::discrepancy;
use super::paper::Paper;
use super::plots::{self, Bar, FidPoint, Ranked};
use super::tables::{self, cells, file_name, Compared, Ordering, RunResult};
use crate::files::write_atomic;
use anyhow::{Context, Result};
use polars::prelude::*;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A table as rendered: a caption, its header and its rows of text. A cell "[text](href)" is
/// a link; a first cell naming a run by its paper label carries the run's sweep point.
struct Table {
    /// The Markdown twin's file name under tables/.
    slug: &'static str,
    caption: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    /// Per row, the hover text of its first cell (the spec key a paper label stands for).
    hover: Vec<Option<String>>,
}

impl Table {
    fn new(
        slug: &'static str,
        caption: String,
        header: Vec<String>,
        rows: Vec<Vec<String>>,
    ) -> Self {
        let hover = vec![None; rows.len()];
        Table {
            slug,
            caption,
            header,
            rows,
            hover,
        }
    }

    fn from_frame(slug: &'static str, caption: &str, df: &DataFrame, decimals: usize) -> Table {
        let (header, rows) = cells(df, decimals);
        Table::new(slug, caption.to_owned(), header, rows)
    }

    /// Hover text on first cells that are a run's paper label: the run's sweep point.
    fn with_run_keys(mut self, runs: &[RunResult]) -> Table {
        self.hover = self
            .rows
            .iter()
            .map(|row| {
                let run = runs.iter().find(|r| Some(&r.label) == row.first())?;
                (run.label != run.name).then(|| format!("spec: {}", run.name))
            })
            .collect();
        self
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
        let mut s = format!(
            "<table>\n<caption>{} <a class=\"twin\" href=\"tables/{}.md\">Markdown</a></caption>\n<tr>",
            esc(&self.caption),
            self.slug
        );
        for h in &self.header {
            let _ = write!(s, "<th>{}</th>", esc(h));
        }
        s += "</tr>\n";
        for (row, hover) in self.rows.iter().zip(&self.hover) {
            s += "<tr>";
            for (i, c) in row.iter().enumerate() {
                let class = match self.header[i].as_str() {
                    "verdict" => verdict_class(c),
                    _ => "",
                };
                let title = match (i, hover) {
                    (0, Some(h)) => format!(" title=\"{}\"", esc(h)),
                    _ => String::new(),
                };
                let _ = write!(s, "<td class=\"{class}\"{title}>{}</td>", cell_html(c));
            }
            s += "</tr>\n";
        }
        s + "</table>\n"
    }
}

/// A cell's HTML: "[text](href)" as a link, anything else as text.
fn cell_html(cell: &str) -> String {
    let link = cell
        .strip_prefix('[')
        .and_then(|c| c.strip_suffix(')'))
        .and_then(|c| c.split_once("]("));
    match link {
        Some((text, href)) if !href.contains(char::is_whitespace) => {
            format!("<a href=\"{}\">{}</a>", esc(href), esc(text))
        }
        _ => esc(cell),
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

/// A picture of the report: its file (relative to the report), caption, and whether it is an
/// image grid (grids sit side by side).
struct Figure {
    file: String,
    caption: String,
    grid: bool,
}

/// Renders the report of `path` (results/<experiment> or one run directory) under `root`,
/// with each run's discrepancy report beside it.
pub fn report(path: &Path, root: &Path) -> Result<PathBuf> {
    let (experiment, runs) = tables::collect(path)?;
    let paper = Paper::bundled();
    let out = root.join(&experiment);
    for sub in ["plots", "grids", "tables"] {
        std::fs::create_dir_all(out.join(sub))
            .with_context(|| format!("{}: cannot create", out.join(sub).display()))?;
    }
    let compared = tables::comparisons(&runs, &paper)?;
    let orderings = tables::orderings(&compared);

    let controls = discrepancy::controls(&results_root(&runs));
    let mut reports = Vec::new();
    for run in &runs {
        reports.push(discrepancy::write(run, &controls, &paper, &out)?);
    }
    let mut tables = vec![runs_table(&runs, &reports)];
    if !compared.is_empty() {
        tables.push(comparison_table(&compared, &orderings)?);
    }
    let metrics = tables::metrics(&runs)?;
    if metrics.height() > 0 {
        tables.push(Table::from_frame(
            "metrics",
            &metrics_caption(&runs),
            &metrics,
            3,
        ));
    }
    tables.push(Table::from_frame(
        "training",
        "Training",
        &tables::training(&runs)?,
        4,
    ));
    tables.push(provenance(&runs));
    let tables: Vec<Table> = tables.into_iter().map(|t| t.with_run_keys(&runs)).collect();
    for t in &tables {
        write_atomic(
            &out.join("tables").join(format!("{}.md", t.slug)),
            t.markdown().as_bytes(),
        )?;
    }

    let figures = figures(&runs, &compared, &orderings, &experiment, &out)?;
    let notes = notes(&runs, &orderings);
    let md = markdown(&experiment, &runs, &tables, &figures, &notes);
    let html = html(&experiment, &runs, &tables, &figures, &notes);
    write_atomic(&out.join("report.md"), md.as_bytes())?;
    write_atomic(&out.join("index.html"), html.as_bytes())?;
    Ok(out)
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

/// Each run: its label, the sweep point it stands for, its paper row and discrepancy report.
fn runs_table(runs: &[RunResult], reports: &[PathBuf]) -> Table {
    let rows = runs
        .iter()
        .zip(reports)
        .map(|(r, report)| {
            let file = file_name(&report.to_string_lossy());
            vec![
                r.label.clone(),
                format!("`{}`", r.name),
                r.spec.paper.rows.join(", "),
                format!("[{file}]({file})"),
            ]
        })
        .collect();
    Table::new(
        "runs",
        "Runs (labels in the paper's terms; the spec's sweep point beside each)".to_owned(),
        ["run", "sweep point", "paper rows", "discrepancy report"]
            .map(String::from)
            .to_vec(),
        rows,
    )
}

/// The comparison as the official README shows it: "paper / ours" in one cell, and where the
/// runs cannot be held to the values, the two rankings.
fn comparison_table(compared: &[Compared], orderings: &[Ordering]) -> Result<Table> {
    let df = tables::comparison(compared, orderings)?;
    Ok(Table::from_frame(
        "paper-vs-ours",
        "Paper / ours (FID; lower is better)",
        &df,
        2,
    ))
}

fn metrics_caption(runs: &[RunResult]) -> String {
    let what = match runs.iter().find(|r| r.metrics.is_some()) {
        Some(r) if r.small_sample() => {
            let m = r.metrics.as_ref().expect("checked");
            format!(
                "{} samples per run vs {} training images: a small-sample FID, not FID-50K",
                m.num_samples, m.num_reference
            )
        }
        Some(r) if r.spec.sample.num_samples % 1000 == 0 => {
            format!("FID-{}K", r.spec.sample.num_samples / 1000)
        }
        Some(r) => format!("{} samples", r.spec.sample.num_samples),
        None => String::new(),
    };
    let level = runs
        .iter()
        .flat_map(|r| r.metrics.iter().flat_map(|m| m.fid_interval.values()))
        .next()
        .map_or_else(String::new, |i| {
            format!(
                "; ± the half-width of FID's 95% interval from {} bootstrap resamples of the samples",
                i.resamples
            )
        });
    format!("Metrics of the final weights ({what}{level})")
}

fn figures(
    runs: &[RunResult],
    compared: &[Compared],
    orderings: &[Ordering],
    experiment: &str,
    out: &Path,
) -> Result<Vec<Figure>> {
    let mut figs = Vec::new();
    let mut add = |file: String, caption: String| {
        figs.push(Figure {
            grid: file.starts_with("grids/"),
            file,
            caption,
        })
    };
    let plot = |name: &str| out.join("plots").join(name);
    let with_stats: Vec<(&str, &[crate::rundir::StatLine])> = runs
        .iter()
        .filter(|r| !r.stats.is_empty())
        .map(|r| (r.label.as_str(), r.stats.as_slice()))
        .collect();
    if !with_stats.is_empty() {
        plots::loss_curves(&with_stats, experiment, &plot("loss"))?;
        add(
            "plots/loss.png".into(),
            "Is training still improving, and did the runs train alike? The v loss (mean ||u - v||^2) and the batch mean of the adaptive weight against step (SVG beside each PNG)".into(),
        );
    }
    let fids: Vec<(String, Vec<FidPoint>)> = runs
        .iter()
        .map(|r| {
            let points = r
                .fids()
                .into_iter()
                .map(|(n, f)| (n as f64, f, r.interval(n).map(|i| (i.low, i.high))))
                .collect();
            (r.label.clone(), points)
        })
        .filter(|(_, f): &(String, Vec<FidPoint>)| !f.is_empty())
        .collect();
    if !fids.is_empty() {
        plots::fid_by_nfe(&fids, experiment, &plot("fid-by-nfe"))?;
        add(
            "plots/fid-by-nfe.png".into(),
            "Does a second step help, and are the runs told apart? FID of the final weights against the number of network evaluations, with 95% bootstrap intervals".into(),
        );
    }
    let by_step: Vec<(String, Vec<FidPoint>)> = runs
        .iter()
        .flat_map(|r| {
            r.history().into_iter().map(move |(nfe, points)| {
                let points = points.into_iter().map(|(s, f)| (s, f, None)).collect();
                (format!("{} {nfe}", r.label), points)
            })
        })
        .filter(|(_, points): &(String, Vec<FidPoint>)| points.len() > 1)
        .collect();
    if !by_step.is_empty() {
        plots::fid_by_step(&by_step, experiment, &plot("fid-by-step"))?;
        add(
            "plots/fid-by-step.png".into(),
            "Is FID still falling when training stops? FID against training step (the checkpoints of eval.steps and the final one)".into(),
        );
    }
    let bars: Vec<Bar> = compared
        .iter()
        .filter(|c| c.incomparable.is_none())
        .map(|c| Bar {
            label: short(&c.row.label),
            paper: c.row.value,
            ours: c.ours,
        })
        .collect();
    if !bars.is_empty() {
        plots::paper_vs_ours(&bars, experiment, &plot("paper-vs-ours"))?;
        add(
            "plots/paper-vs-ours.png".into(),
            "How far are we from the paper? Its FID beside ours, for the rows this run can be held to".into(),
        );
    }
    for o in orderings {
        let rows: Vec<Ranked> = o
            .rows
            .iter()
            .map(|(c, _, _)| Ranked {
                label: c.run.label.clone(),
                paper: c.row.value,
                ours: c.ours.unwrap_or(f64::NAN),
                interval: c.interval.map(|i| (i.low, i.high)),
            })
            .collect();
        let name = format!("ordering-{}nfe", o.nfe);
        plots::ordering(&rows, experiment, &plot(&name))?;
        add(
            format!("plots/{name}.png"),
            format!(
                "Do our runs order the paper's rows as the paper does? Our {}-NFE FID (95% intervals) with the rows from the paper's best to its worst: the points rise left to right where the orders agree (Spearman's rho {:.2})",
                o.nfe, o.spearman
            ),
        );
    }
    let mut real_seen = std::collections::BTreeSet::new();
    for r in runs {
        let real = r.dir.real_grid();
        if real.exists() && real_seen.insert(r.spec.train.data.clone()) {
            let file = format!(
                "grids/real-{}.png",
                file_safe(&file_name(&r.spec.train.data))
            );
            copy(&real, &out.join(&file))?;
            let what = match r.small_sample() {
                true => "training images, a column per class",
                false => "images of the reference batch",
            };
            add(file, format!("Real {what}, to look at beside the samples"));
        }
    }
    for r in runs {
        for nfe in r.spec.sample.schedules.iter().map(|s| s.len() - 1) {
            let grid = r.dir.grid(nfe);
            if grid.exists() {
                let file = format!("grids/{}-{nfe}nfe.png", file_safe(&r.name));
                copy(&grid, &out.join(&file))?;
                add(
                    file,
                    format!(
                        "{}: {nfe}-NFE samples, a column per class (EMA weights)",
                        r.label
                    ),
                );
            }
        }
    }
    Ok(figs)
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("{}: cannot read", from.display()))?;
    write_atomic(to, &bytes)
}

/// A file name part from a run name or data path ("data_proportion=0.75" -> "data_proportion_0.75").
fn file_safe(name: &str) -> String {
    name.replace(['=', ',', '/', ' '], "_")
}

/// A label short enough for a bar: the part after the colon.
fn short(label: &str) -> String {
    label.rsplit(':').next().unwrap_or(label).trim().to_owned()
}

fn notes(runs: &[RunResult], orderings: &[Ordering]) -> Vec<String> {
    let mut notes = Vec::new();
    if runs.iter().any(RunResult::small_sample) {
        let preset = runs[0].spec.model.preset.clone().unwrap_or_default();
        notes.push(format!(
            "Scales differ: these runs train {preset} on 8x8 digits on a CPU and score a small-sample FID against the digits; the paper's numbers are FID-50K of SiT-B/4 on ImageNet 256. Compare the ordering across rows, not the values."
        ));
    }
    let nfes: std::collections::BTreeSet<i64> =
        runs.iter().flat_map(|r| r.fids()).map(|p| p.0).collect();
    for nfe in nfes {
        let with: Vec<&RunResult> = runs.iter().filter(|r| r.interval(nfe).is_some()).collect();
        if with.len() < 2 {
            continue;
        }
        let pairs = tables::overlapping(runs, nfe);
        notes.push(match pairs.is_empty() {
            true => format!("{nfe}-NFE: no two runs' 95% FID intervals overlap: the FIDs order the runs."),
            false => format!(
                "{nfe}-NFE: these runs' 95% FID intervals overlap, so their FIDs do not tell them apart at this sample size: {}.",
                pairs
                    .iter()
                    .map(|(a, b)| format!("{} and {}", a.label, b.label))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        });
    }
    for o in orderings {
        let order = |rank: fn(&(&Compared, f64, f64)) -> f64| {
            let mut rows: Vec<_> = o.rows.iter().collect();
            rows.sort_by(|a, b| rank(a).total_cmp(&rank(b)));
            rows.iter()
                .map(|r| r.0.run.label.clone())
                .collect::<Vec<_>>()
                .join(", then ")
        };
        notes.push(format!(
            "Ordering at {}-NFE (rows these runs cannot match in value): the paper has {}; ours {} (best first; Spearman's rho {:.2}).{}",
            o.nfe,
            order(|r| r.1),
            order(|r| r.2),
            o.spearman,
            match o.unresolved.len() {
                0 => String::new(),
                n => format!(" {n} of the pairs have overlapping intervals: their order is not resolved by this sample size."),
            }
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

fn provenance(runs: &[RunResult]) -> Table {
    let header = [
        "run",
        "spec sha256",
        "code",
        "device",
        "processes",
        "weights",
        "samples",
        "Inception",
        "reference",
    ];
    let rows = runs
        .iter()
        .map(|r| {
            let m = r.metrics.as_ref();
            let reference = m.and_then(|m| m.reference.as_ref()).map_or_else(
                || "training images".to_owned(),
                |_| {
                    crate::assets::find(&r.spec.eval.reference)
                        .map(|a| format!("{} ({})", a.name, a.pin.describe()))
                        .unwrap_or_else(|_| r.spec.eval.reference.clone())
                },
            );
            vec![
                r.label.clone(),
                r.spec.sha256()[..16].to_owned(),
                r.env.as_ref().map_or("-", |e| &e.code_commit).to_owned(),
                r.env.as_ref().map_or("-", |e| &e.device).to_owned(),
                r.env
                    .as_ref()
                    .map_or("-".to_owned(), |e| e.world_size.to_string()),
                r.spec
                    .model
                    .weights
                    .as_deref()
                    .map(file_name)
                    .or_else(|| r.state.as_ref().map(|s| format!("step {} (EMA)", s.step)))
                    .unwrap_or_else(|| "-".to_owned()),
                m.map_or("-".to_owned(), |m| {
                    format!(
                        "{} per schedule, seed {}",
                        m.num_samples, r.spec.sample.seed
                    )
                }),
                m.map_or("-".to_owned(), |m| file_name(&m.inception_weights)),
                reference,
            ]
        })
        .collect();
    Table::new(
        "provenance",
        "Provenance".to_owned(),
        header.map(String::from).to_vec(),
        rows,
    )
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
) -> String {
    let (title, description) = title(experiment, runs);
    let mut s = format!("# {title}\n\n{description}\n\n");
    for n in notes {
        let _ = writeln!(s, "> {n}\n");
    }
    let (last, rest) = tables.split_last().expect("a report has tables");
    for t in rest {
        s += &t.markdown();
        s += "\n";
    }
    for f in figures {
        let _ = writeln!(s, "![{}]({})\n\n*{}*\n", f.caption, f.file, f.caption);
    }
    s += &last.markdown();
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
    let (last, rest) = tables.split_last().expect("a report has tables");
    for t in rest {
        s += &t.html();
    }
    let figure = |f: &Figure| {
        format!(
            "<figure><img src=\"{}\" alt=\"{c}\"><figcaption>{c}</figcaption></figure>\n",
            esc(&f.file),
            c = esc(&f.caption)
        )
    };
    for f in figures.iter().filter(|f| !f.grid) {
        s += &figure(f);
    }
    if figures.iter().any(|f| f.grid) {
        s += "<div class=\"grids\">\n";
        for f in figures.iter().filter(|f| f.grid) {
            s += &figure(f);
        }
        s += "</div>\n";
    }
    s += &last.html();
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
td[title]{text-decoration:underline dotted;cursor:help}a.twin{font-weight:400;font-size:12px;margin-left:.6em}\
td.ok{background:#e6f4e6}td.miss{background:#fbe3e3}td.muted{color:#666}\
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.6em 1em}.muted{color:#666}\
figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:14px}\
.grids{display:flex;flex-wrap:wrap;gap:1em}.grids figure{margin:0;flex:0 0 auto;max-width:380px}";
