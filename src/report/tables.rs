//! An experiment's results held against the paper (verdicts, orderings) and every table of a
//! report as typed cells, rendered to HTML and Markdown by the same template macros.
use super::frame::ResultRow;
use super::paper::{Paper, Row};
use super::runs::{Fid, RunResult};
use super::safe::{file_stem, Href};
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeSet;

/// How one of our numbers compares with the paper's.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    NotEvaluated,
    /// Why the run cannot be held to the row's number.
    NotComparable(String),
    /// Within `tolerance` (relative) of the paper's number.
    Reproduced {
        tolerance: f64,
    },
    Better,
    Missed,
}

impl Verdict {
    pub fn of(paper: f64, ours: Option<f64>, tolerance: f64, incomparable: Option<&str>) -> Self {
        match (ours, incomparable) {
            (None, _) => Verdict::NotEvaluated,
            (Some(_), Some(why)) => Verdict::NotComparable(why.to_owned()),
            (Some(v), None) if (v - paper).abs() <= tolerance * paper => {
                Verdict::Reproduced { tolerance }
            }
            (Some(v), None) if v < paper => Verdict::Better,
            (Some(_), None) => Verdict::Missed,
        }
    }

    pub fn words(&self) -> String {
        match self {
            Verdict::NotEvaluated => "not evaluated yet".to_owned(),
            Verdict::NotComparable(why) => format!("not comparable ({why})"),
            Verdict::Reproduced { tolerance } => {
                format!("reproduced (within {:.0}%)", tolerance * 100.0)
            }
            Verdict::Better => "better than the paper".to_owned(),
            Verdict::Missed => "missed: file its discrepancy report".to_owned(),
        }
    }

    /// The CSS class of its cell in index.html.
    pub fn class(&self) -> &'static str {
        match self {
            Verdict::Reproduced { .. } | Verdict::Better => "ok",
            Verdict::Missed => "miss",
            Verdict::NotEvaluated | Verdict::NotComparable(_) => "muted",
        }
    }

    /// The paper's number holds here (reproduced, or bettered).
    pub fn holds(&self) -> bool {
        matches!(self, Verdict::Reproduced { .. } | Verdict::Better)
    }
}

/// One run held against one paper row it matches.
pub struct Compared<'a> {
    pub run: &'a RunResult,
    pub row: &'a Row,
    pub nfe: i64,
    pub ours: Option<Fid>,
    /// Why the run cannot be held to the row's number (None when it can).
    pub incomparable: Option<String>,
    pub verdict: Verdict,
}

impl<'a> Compared<'a> {
    pub fn new(run: &'a RunResult, row: &'a Row) -> Compared<'a> {
        let nfe = row.nfe.unwrap_or(1);
        let ours = run.fid(nfe);
        let incomparable = row.incomparable(&run.spec);
        let verdict = Verdict::of(
            row.value,
            ours.map(|f| f.value),
            run.spec.paper.tolerance,
            incomparable.as_deref(),
        );
        Compared {
            run,
            row,
            nfe,
            ours,
            incomparable,
            verdict,
        }
    }
}

/// Every (run, paper row it matches), in the order the spec lists its rows (the paper's),
/// then by run.
pub fn comparisons<'a>(runs: &'a [RunResult], paper: &'a Paper) -> Result<Vec<Compared<'a>>> {
    let mut out = Vec::new();
    for run in runs {
        for row in run.rows(paper)? {
            out.push(Compared::new(run, row));
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
pub struct Ordering {
    pub nfe: i64,
    /// In the paper's order, best first.
    pub rows: Vec<Ranked>,
    /// Spearman's rank correlation of ours with the paper's (1: the same order).
    pub spearman: f64,
    /// How many pairs of the rows have overlapping intervals: their order is not resolved.
    pub unresolved: usize,
}

/// A row of an [`Ordering`]: which comparison (its index in the slice given to
/// [`orderings`]) and its two ranks.
pub struct Ranked {
    pub at: usize,
    pub paper_rank: f64,
    pub our_rank: f64,
}

/// The [`Ordering`] per NFE of the rows that are evaluated but not comparable in value, where
/// there are at least two.
pub fn orderings(compared: &[Compared]) -> Vec<Ordering> {
    let nfes: BTreeSet<i64> = compared.iter().map(|c| c.nfe).collect();
    let mut out = Vec::new();
    for nfe in nfes {
        let mut group: Vec<usize> = (0..compared.len())
            .filter(|&i| {
                let c = &compared[i];
                c.nfe == nfe && c.incomparable.is_some() && c.ours.is_some()
            })
            .collect();
        if group.len() < 2 {
            continue;
        }
        group.sort_by(|&a, &b| compared[a].row.value.total_cmp(&compared[b].row.value));
        let paper: Vec<f64> = group.iter().map(|&i| compared[i].row.value).collect();
        let ours: Vec<Option<Fid>> = group.iter().map(|&i| compared[i].ours).collect();
        let our_values: Vec<f64> = ours
            .iter()
            .map(|f| f.map_or(f64::NAN, |f| f.value))
            .collect();
        let (paper_ranks, our_ranks) = (ranks(&paper), ranks(&our_values));
        let intervals: Vec<_> = ours
            .iter()
            .filter_map(|f| f.and_then(|f| f.interval))
            .collect();
        let unresolved = intervals
            .iter()
            .enumerate()
            .map(|(i, a)| intervals[i + 1..].iter().filter(|b| a.overlaps(b)).count())
            .sum();
        out.push(Ordering {
            nfe,
            spearman: pearson(&paper_ranks, &our_ranks),
            rows: group
                .into_iter()
                .zip(paper_ranks.into_iter().zip(our_ranks))
                .map(|(at, (paper_rank, our_rank))| Ranked {
                    at,
                    paper_rank,
                    our_rank,
                })
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
    let with: Vec<(&RunResult, _)> = runs
        .iter()
        .filter_map(|r| Some((r, r.fid(nfe)?.interval?)))
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

/// A table of a report: rendered in index.html (with a link to its twin), in report.md and
/// alone as tables/<slug>.md.
#[derive(Debug, Serialize)]
pub struct Table {
    pub slug: &'static str,
    pub caption: String,
    /// tables/<slug>.md.
    pub twin: Href,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
}

impl Table {
    fn new(slug: &'static str, caption: String, columns: &[&str], rows: Vec<Vec<Cell>>) -> Table {
        Table {
            slug,
            caption,
            twin: Href::file(&format!("tables/{slug}.md")).expect("a table's slug is a file name"),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows,
        }
    }
}

/// A cell of a table, by what it holds; the templates decide how each kind looks.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Cell {
    Text {
        text: String,
    },
    /// A number (or "-") as this module formatted it: no string from a file gets here, so
    /// Markdown shows it unescaped ("34.96 [33.10, 37.20]", not "34.96 \[33.10, ...").
    Number {
        text: String,
    },
    Code {
        text: String,
    },
    Link {
        text: String,
        href: Href,
    },
    /// A run by its label, with its sweep point as hover text where the label is the paper's.
    Run {
        text: String,
        point: Option<String>,
    },
    Verdict {
        text: String,
        class: &'static str,
    },
}

impl Cell {
    pub fn text(text: impl Into<String>) -> Cell {
        Cell::Text { text: text.into() }
    }

    /// A number with `decimals` places, "-" when missing.
    pub fn number(value: Option<f64>, decimals: usize) -> Cell {
        Cell::Number {
            text: value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}")),
        }
    }

    /// A count or rank as Rust prints it ("3", "3.5"), "-" when missing.
    pub fn count<T: Into<f64>>(value: Option<T>) -> Cell {
        Cell::Number {
            text: value.map_or_else(|| "-".to_owned(), |v| v.into().to_string()),
        }
    }

    pub fn run(label: &str, name: &str) -> Cell {
        Cell::Run {
            text: label.to_owned(),
            point: (label != name).then(|| format!("spec: {name}")),
        }
    }

    pub fn fid(fid: Option<Fid>) -> Cell {
        Cell::Number {
            text: fid.map_or_else(|| "-".to_owned(), |f| f.to_string()),
        }
    }

    fn verdict(v: &Verdict) -> Cell {
        Cell::Verdict {
            text: v.words(),
            class: v.class(),
        }
    }
}

/// The file of a run's discrepancy report, beside the report.
pub fn discrepancy_file(run_name: &str) -> String {
    format!("discrepancy-{}.md", file_stem(run_name))
}

/// Each run: its label, the sweep point it stands for, the paper rows it matches and its
/// discrepancy report.
pub fn runs_table(runs: &[RunResult], paper: &Paper) -> Result<Table> {
    let mut rows = Vec::new();
    for r in runs {
        let own: Vec<&str> = r.rows(paper)?.iter().map(|row| row.id.as_str()).collect();
        let file = discrepancy_file(&r.name);
        rows.push(vec![
            Cell::run(&r.label, &r.name),
            Cell::Code {
                text: r.name.clone(),
            },
            Cell::text(match own.is_empty() {
                true => "-".to_owned(),
                false => own.join(", "),
            }),
            Cell::Link {
                href: Href::file(&file)?,
                text: file,
            },
        ]);
    }
    Ok(Table::new(
        "runs",
        "Runs (labels in the paper's terms; the spec's sweep point beside each)".to_owned(),
        &["run", "sweep point", "paper rows", "discrepancy report"],
        rows,
    ))
}

/// The comparison as the official README shows it: the paper's FID beside ours, and where the
/// runs cannot be held to the values, the two rankings.
pub fn comparison_table(compared: &[Compared], orderings: &[Ordering], level: &str) -> Table {
    let ranked = |i: usize| orderings.iter().flat_map(|o| &o.rows).find(|r| r.at == i);
    let with_ranks = orderings.iter().any(|o| !o.rows.is_empty());
    let rows = compared
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut row = vec![
                Cell::run(&c.run.label, &c.run.name),
                Cell::text(format!(
                    "Table {}: {} ({})",
                    c.row.table, c.row.label, c.row.id
                )),
                Cell::count(Some(c.nfe as f64)),
                Cell::number(Some(c.row.value), 2),
                Cell::fid(c.ours),
                Cell::number(c.ours.map(|o| o.value - c.row.value), 2),
            ];
            if with_ranks {
                row.push(Cell::count(ranked(i).map(|r| r.paper_rank)));
                row.push(Cell::count(ranked(i).map(|r| r.our_rank)));
            }
            row.push(Cell::verdict(&c.verdict));
            row
        })
        .collect();
    let ours = format!("ours [{level} interval]");
    let mut columns = vec!["run", "paper row", "NFE", "paper", ours.as_str(), "delta"];
    if with_ranks {
        columns.extend(["paper rank", "our rank"]);
    }
    columns.push("verdict");
    Table::new(
        "paper-vs-ours",
        "Paper / ours (FID; lower is better)".to_owned(),
        &columns,
        rows,
    )
}

/// The final weights' metrics per (run, NFE) from the results frame: FID with its interval,
/// and where the evaluate stage computed them, sFID, precision, recall and IS.
pub fn metrics_table(frame: &[ResultRow], caption: String, level: &str) -> Table {
    let rows = frame
        .iter()
        .filter(|r| r.is_final && r.nfe.is_some())
        .map(|r| {
            vec![
                Cell::run(&r.label, &r.run),
                Cell::count(r.nfe.map(|n| n as f64)),
                Cell::fid(r.fid()),
                Cell::number(r.sfid, 3),
                Cell::number(r.precision, 3),
                Cell::number(r.recall, 3),
                Cell::number(r.inception_score, 2),
            ]
        })
        .collect();
    let fid = format!("FID [{level} interval]");
    Table::new(
        "metrics",
        caption,
        &["run", "NFE", &fid, "sFID", "precision", "recall", "IS"],
        rows,
    )
}

/// Training done per run, from the results frame: steps, epochs, wall time, and over the last
/// tenth of the logged lines the v loss and the mean adaptive weight (the weighted loss itself
/// sits near 1 by construction with p = 1, so it says nothing).
pub fn training_table(frame: &[ResultRow]) -> Table {
    let mut seen = BTreeSet::new();
    let rows = frame
        .iter()
        .filter(|r| seen.insert(&r.run))
        .map(|r| {
            vec![
                Cell::run(&r.label, &r.run),
                Cell::count(r.training_steps.map(|n| n as f64)),
                Cell::count(r.epochs.map(|n| n as f64)),
                Cell::number(r.hours, 4),
                Cell::number(r.final_v_loss, 4),
                Cell::number(r.final_adaptive_weight, 4),
            ]
        })
        .collect();
    Table::new(
        "training",
        "Training".to_owned(),
        &[
            "run",
            "steps",
            "epochs",
            "hours",
            "final v loss",
            "final adaptive weight",
        ],
        rows,
    )
}

/// Where every number came from: the spec's hash, the code, the machine, the weights, the
/// samples, the Inception weights and the reference, by file name.
pub fn provenance_table(runs: &[RunResult]) -> Table {
    let rows = runs
        .iter()
        .map(|r| {
            let m = r.metrics.as_ref();
            let env = r.env.as_ref();
            let reference = m.and_then(|m| m.reference.as_ref()).map_or_else(
                || "training images".to_owned(),
                |_| {
                    crate::assets::find(&r.spec.eval.reference)
                        .map(|a| format!("{} ({})", a.name, a.pin.describe()))
                        .unwrap_or_else(|_| super::runs::file_name(&r.spec.eval.reference))
                },
            );
            let weights = match (&r.spec.model.weights, &r.state) {
                (Some(w), _) => super::runs::file_name(w),
                (None, Some(s)) => format!("step {} (EMA)", s.step),
                (None, None) => "-".to_owned(),
            };
            vec![
                Cell::run(&r.label, &r.name),
                Cell::Code {
                    text: r.spec.sha256()[..16].to_owned(),
                },
                Cell::text(env.map_or("-", |e| &e.code_commit)),
                Cell::text(env.map_or("-", |e| &e.device)),
                Cell::count(env.map(|e| e.world_size as f64)),
                Cell::text(weights),
                Cell::text(m.map_or("-".to_owned(), |m| {
                    format!(
                        "{} per schedule, seed {}",
                        m.num_samples, r.spec.sample.seed
                    )
                })),
                Cell::text(m.map_or("-".to_owned(), |m| {
                    super::runs::file_name(&m.inception_weights)
                })),
                Cell::text(reference),
            ]
        })
        .collect();
    Table::new(
        "provenance",
        "Provenance".to_owned(),
        &[
            "run",
            "spec sha256",
            "code",
            "device",
            "processes",
            "weights",
            "samples",
            "Inception",
            "reference",
        ],
        rows,
    )
}
