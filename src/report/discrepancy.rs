//! `mfr discrepancy RUN`: reports/<experiment>/discrepancy-<run>.md, a GitHub issue body an
//! upstream maintainer can act on: the gap with its interval, a control (the released weights
//! scored through the same pipeline), the configuration against the paper's recipe with the
//! official code's key for each departure, the training done, the environment with the hashes
//! of the files scored, and the known causes (paper/meanflow.toml `[[cause]]`), each decided
//! from the run's files. Paths are printed relative to $MFR_CACHE or as file names with
//! hashes, never one machine's folders. Rendered by templates/discrepancy.md: every string of
//! the run is escaped as Markdown text.
use super::paper::{Departure, Paper, Row, When};
use super::runs::{self, file_name, interval_method, RunResult};
use super::tables::{discrepancy_file, Verdict};
use super::templates::{self, Prose};
use crate::eval::evaluator::content_sha256;
use crate::paths::default_cache;
use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `mfr discrepancy RUN`: renders the run's report under `root`/<experiment>.
pub fn discrepancy(run_dir: &Path, root: &Path) -> Result<PathBuf> {
    if !crate::rundir::RunDir::new(run_dir).exists() {
        bail!(
            "{}: not a run directory (no spec.toml): give results/<experiment>/<run>",
            run_dir.display()
        );
    }
    let (experiment, runs) = runs::collect(run_dir)?;
    let results = run_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    write(
        &runs[0],
        &controls(results),
        &Paper::bundled(),
        &root.join(super::safe::file_stem(&experiment)),
    )
}

/// Writes the report of `run` into the folder `out`; returns its path.
pub fn write(
    run: &RunResult,
    controls: &[RunResult],
    paper: &Paper,
    out: &Path,
) -> Result<PathBuf> {
    let text = render(run, controls, paper)?;
    std::fs::create_dir_all(out)
        .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", out.display()))?;
    let path = out.join(discrepancy_file(&run.name));
    crate::files::write_atomic(&path, text.as_bytes())?;
    Ok(path)
}

/// Every evaluated run under `results` (results/<experiment>/<run>) that scored imported
/// weights: the candidates for a control. Runs that cannot be read are passed over.
pub fn controls(results: &Path) -> Vec<RunResult> {
    let Ok(experiments) = std::fs::read_dir(results) else {
        return Vec::new();
    };
    let mut out: Vec<RunResult> = experiments
        .flatten()
        .filter_map(|e| crate::rundir::runs_of(&e.path()).ok())
        .flatten()
        .filter_map(|d| RunResult::read(&d).ok())
        .filter(|r| r.imported() && r.metrics.is_some())
        .collect();
    out.sort_by(|a, b| a.dir.path().cmp(b.dir.path()));
    out
}

/// What must agree for two runs' FIDs to differ only by their weights.
#[derive(Debug, PartialEq)]
struct EvalSettings {
    reference: String,
    num_samples: i64,
    vae: Option<String>,
    inception: String,
    labels: String,
}

impl EvalSettings {
    fn of(run: &RunResult) -> Option<EvalSettings> {
        let m = run.metrics.as_ref()?;
        Some(EvalSettings {
            reference: m.reference.as_deref().map(file_name).unwrap_or_default(),
            num_samples: m.num_samples,
            vae: m.inputs.vae.clone(),
            inception: file_name(&m.inception_weights),
            labels: m.inputs.labels.clone(),
        })
    }
}

/// The control of `run` at `nfe`: released weights of the same network, scored with the same
/// evaluation settings.
fn control<'a>(run: &RunResult, controls: &'a [RunResult], nfe: i64) -> Option<&'a RunResult> {
    let settings = EvalSettings::of(run)?;
    controls.iter().find(|c| {
        c.dir.path() != run.dir.path()
            && c.spec.model.preset == run.spec.model.preset
            && c.fid(nfe).is_some()
            && EvalSettings::of(c).as_ref() == Some(&settings)
    })
}

fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A file as a report names it: relative to $MFR_CACHE when it lies there, else its name;
/// with its sha256 where it can be read.
#[derive(Serialize)]
struct Shown {
    name: String,
    sha256: Option<String>,
}

impl Shown {
    fn of(path: &Path) -> Shown {
        let cache = default_cache();
        let name = match path.strip_prefix(&cache) {
            Ok(rel) => format!("$MFR_CACHE/{}", rel.display()),
            Err(_) => file_name(&path.to_string_lossy()),
        };
        Shown {
            name,
            sha256: content_sha256(path, &cache).ok(),
        }
    }
}

/// The report's heading, from the verdicts of the run's rows.
fn headline(verdicts: &[Verdict]) -> &'static str {
    let any = |f: fn(&Verdict) -> bool| verdicts.iter().any(f);
    let incomparable = |v: &Verdict| matches!(v, Verdict::NotComparable(_));
    if verdicts.is_empty() {
        "names no paper row"
    } else if any(|v| *v == Verdict::Missed) {
        "misses the paper"
    } else if any(|v| *v == Verdict::NotEvaluated) {
        "is not evaluated yet"
    } else if verdicts.iter().all(incomparable) {
        "cannot be held to the paper's numbers"
    } else if any(incomparable) {
        "matches the paper where comparable"
    } else {
        "matches the paper"
    }
}

/// A line of the gap table.
#[derive(Serialize)]
struct GapLine {
    what: Prose,
    nfe: i64,
    paper: String,
    ours: String,
    delta: String,
    relative: String,
    verdict: String,
}

/// What the gap table tells, said below it (templates/discrepancy.md words each).
#[derive(Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
enum GapNote {
    OtherScale,
    Imported,
    NoControl,
    ControlHolds,
    /// The control itself cannot be set against the paper (another network or sample count).
    ControlIncomparable,
    ControlMisses,
}

#[derive(Serialize)]
struct CauseLine {
    applies: bool,
    /// Markdown rendered from the cause's template, its values escaped.
    text: String,
}

#[derive(Serialize)]
struct Network {
    paper: String,
    rows: Vec<NetworkRow>,
}

#[derive(Serialize)]
struct NetworkRow {
    name: &'static str,
    paper: i64,
    ours: i64,
}

#[derive(Serialize)]
struct DepartureLine {
    key: String,
    official: Option<String>,
    paper: String,
    ours: String,
    note: String,
}

#[derive(Serialize)]
struct Trained {
    step: u64,
    epoch: u64,
    epochs: i64,
    hours: String,
    batch: i64,
}

#[derive(Serialize)]
struct LastLine {
    step: u64,
    v_loss: String,
    weight: Option<String>,
}

#[derive(Serialize)]
struct Fact {
    key: &'static str,
    value: String,
    code: bool,
}

#[derive(Serialize)]
struct Evaluation {
    samples: i64,
    labels: String,
    inception: Shown,
    reference: Option<Shown>,
    /// The data file the training images came from (pixel-space data scored against them).
    training_file: Option<Shown>,
    num_reference: usize,
    sample_files: Vec<SampleFile>,
}

#[derive(Serialize)]
struct SampleFile {
    nfe: usize,
    file: Shown,
}

/// Everything templates/discrepancy.md shows.
#[derive(Serialize)]
struct Page {
    label: Option<String>,
    run_path: String,
    headline: &'static str,
    description: String,
    level: String,
    gap: Vec<GapLine>,
    note: GapNote,
    scale: String,
    samples: i64,
    interval_method: Option<String>,
    causes: Vec<CauseLine>,
    preset: String,
    network: Option<Network>,
    departures: Vec<DepartureLine>,
    weights: Option<Shown>,
    state: Option<Trained>,
    last: Option<LastLine>,
    env: Option<Vec<Fact>>,
    evaluation: Option<Evaluation>,
    spec_sha256: String,
    spec_toml: String,
    fence: String,
}

/// The report's Markdown: a GitHub issue body.
pub fn render(run: &RunResult, controls: &[RunResult], paper: &Paper) -> Result<String> {
    let spec = &run.spec;
    let rows = run.rows(paper)?;
    let verdicts: Vec<Verdict> = rows
        .iter()
        .map(|row| super::tables::Compared::new(run, row).verdict)
        .collect();
    let (gap, note) = gap(run, controls, paper, &rows, &verdicts);
    let departures = departures(run, paper, &rows);
    let interval = RunResult::first_interval(std::slice::from_ref(run));
    let spec_toml = spec.to_toml();
    let page = Page {
        label: (run.label != run.name).then(|| run.label.clone()),
        run_path: format!("{}/{}", spec.experiment.name, run.name),
        headline: headline(&verdicts),
        description: spec.experiment.description.clone(),
        level: interval.map_or("95%".to_owned(), |i| format!("{:.0}%", i.level * 100.0)),
        gap,
        note,
        scale: run.scale().describe(),
        samples: spec.sample.num_samples,
        interval_method: interval.map(interval_method),
        causes: causes(run, paper, &rows, &departures)?,
        preset: spec.model.preset.clone().unwrap_or_else(|| "custom".into()),
        network: network(run, paper, &rows),
        departures: departures
            .iter()
            .map(|d| DepartureLine {
                key: d.key.clone(),
                official: paper.recipe.official.get(&d.key).cloned(),
                paper: value_text(&d.paper),
                ours: d.ours.as_ref().map_or("-".to_owned(), value_text),
                note: paper.recipe.port.get(&d.key).cloned().unwrap_or_default(),
            })
            .collect(),
        weights: spec
            .model
            .weights
            .as_deref()
            .map(|w| Shown::of(Path::new(w))),
        state: run.state.as_ref().map(|s| Trained {
            step: s.step,
            epoch: s.epoch,
            epochs: spec.train.epochs,
            hours: format!("{:.2}", s.wall_s / 3600.0),
            batch: spec.train.batch,
        }),
        last: run.stats.last().map(|l| LastLine {
            step: l.step,
            v_loss: format!("{:.4}", l.v_loss),
            weight: l.adaptive_weight.map(|w| format!("{w:.4}")),
        }),
        env: run.env.as_ref().map(environment),
        evaluation: evaluation(run),
        spec_sha256: spec.sha256(),
        fence: super::safe::fence(&spec_toml),
        spec_toml: spec_toml.trim_end().to_owned(),
    };
    templates::render("discrepancy.md", page)
}

/// The gap lines: per paper row, ours against it, the other sources' values, and a control
/// row where the results hold one; and what they tell.
fn gap(
    run: &RunResult,
    controls: &[RunResult],
    paper: &Paper,
    rows: &[&Row],
    verdicts: &[Verdict],
) -> (Vec<GapLine>, GapNote) {
    let mut lines = Vec::new();
    let mut found: Vec<Verdict> = Vec::new();
    for (row, verdict) in rows.iter().zip(verdicts) {
        let nfe = row.nfe.unwrap_or(1);
        let ours = run.fid(nfe);
        let value = ours.map(|o| o.value);
        lines.push(GapLine {
            what: Prose::new()
                .text(format!("{} (", row.label))
                .code(&row.id)
                .text(format!(", {})", paper.source(&row.source))),
            nfe,
            paper: format!("{:.2}", row.value),
            ours: ours.map_or("-".to_owned(), |f| f.to_string()),
            delta: two_places(value.map(|o| o - row.value)),
            relative: relative(value, Some(row.value)),
            verdict: verdict.words(),
        });
        for also in &row.also {
            let note = also
                .note
                .as_deref()
                .map_or(String::new(), |n| format!(" ({n})"));
            lines.push(GapLine {
                what: Prose::new().text(format!(
                    "... as {} gives it{note}",
                    paper.source(&also.source)
                )),
                nfe,
                paper: format!("{:.2}", also.value),
                ours: String::new(),
                delta: String::new(),
                relative: String::new(),
                verdict: String::new(),
            });
        }
        if run.imported() {
            continue;
        }
        if let Some((line, verdict)) = control_line(run, controls, paper, nfe) {
            lines.push(line);
            found.push(verdict);
        }
    }
    let note = if !run.scale().is_papers() {
        GapNote::OtherScale
    } else if run.imported() {
        GapNote::Imported
    } else if found.is_empty() {
        GapNote::NoControl
    } else if found.iter().all(Verdict::holds) {
        GapNote::ControlHolds
    } else if found.iter().any(|v| matches!(v, Verdict::NotComparable(_))) {
        GapNote::ControlIncomparable
    } else {
        GapNote::ControlMisses
    };
    (lines, note)
}

/// The control's line at `nfe` where the results hold one, and its verdict against its own
/// paper row (the released weights' number).
fn control_line(
    run: &RunResult,
    controls: &[RunResult],
    paper: &Paper,
    nfe: i64,
) -> Option<(GapLine, Verdict)> {
    let c = control(run, controls, nfe)?;
    let own = c
        .rows(paper)
        .ok()
        .and_then(|rows| rows.into_iter().find(|r| r.nfe.unwrap_or(1) == nfe));
    let fid = c.fid(nfe);
    let verdict = own.map(|r| super::tables::Compared::new(c, r).verdict);
    let value = own.map(|r| r.value);
    let mut what = Prose::new()
        .text("control: released weights ")
        .code(file_name(
            c.spec.model.weights.as_deref().unwrap_or_default(),
        ))
        .text(" through this pipeline (")
        .code(format!("{}/{}", c.spec.experiment.name, c.name));
    if let Some(r) = own {
        what = what.text(", row ").code(&r.id);
    }
    let line = GapLine {
        what: what.text(")"),
        nfe,
        paper: two_places(value),
        ours: fid.map_or("-".to_owned(), |f| f.to_string()),
        delta: two_places(fid.zip(value).map(|(f, p)| f.value - p)),
        relative: relative(fid.map(|f| f.value), value),
        verdict: verdict
            .as_ref()
            .map_or("no paper row for the control".to_owned(), Verdict::words),
    };
    Some((line, verdict.unwrap_or(Verdict::NotEvaluated)))
}

fn two_places(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{v:.2}"))
}

/// `ours` against `paper` in percent ("+31.0%"), "-" where either is missing.
fn relative(ours: Option<f64>, paper: Option<f64>) -> String {
    match (ours, paper) {
        (Some(o), Some(p)) => format!("{:+.1}%", 100.0 * (o - p) / p),
        _ => "-".to_owned(),
    }
}

/// Table 4 against this run's network: the network the paper row used (a demo's tiny network
/// is compared with it too).
fn network(run: &RunResult, paper: &Paper, rows: &[&Row]) -> Option<Network> {
    let spec = &run.spec;
    let preset = rows
        .first()
        .map(|r| r.model.as_str())
        .or(spec.model.preset.as_deref())?;
    let m = paper.model(preset)?;
    let cfg = spec.model_config();
    let row = |name, paper, ours| NetworkRow { name, paper, ours };
    Some(Network {
        paper: m.preset.clone(),
        rows: vec![
            row("depth", m.depth, cfg.depth),
            row("hidden", m.hidden, cfg.hidden_size),
            row("heads", m.heads, cfg.num_heads),
            row("patch", m.patch, cfg.patch_size),
            row("epochs", m.epochs, spec.train.epochs),
        ],
    })
}

/// What ran (device, driver, CUDA, libtorch, processes, command).
fn environment(env: &crate::rundir::Env) -> Vec<Fact> {
    let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "- (no GPU)".to_owned());
    let fact = |key, value, code| Fact { key, value, code };
    vec![
        fact("device", env.device.clone(), false),
        fact(
            "NVIDIA driver (CUDA version)",
            or_none(&env.cuda_driver),
            false,
        ),
        fact(
            "CUDA runtime of libtorch",
            or_none(&env.cuda_runtime),
            false,
        ),
        fact("libtorch", env.libtorch.clone(), false),
        fact("tch", env.tch.clone(), false),
        fact("processes (world size)", env.world_size.to_string(), false),
        fact("command", env.command.clone(), true),
        fact("code commit", env.code_commit.clone(), false),
        fact("mfr version", env.mfr_version.clone(), false),
    ]
}

/// The files scored: Inception weights, reference, samples.
fn evaluation(run: &RunResult) -> Option<Evaluation> {
    let m = run.metrics.as_ref()?;
    let training_file = match (&m.reference, run.scale().pixels) {
        (None, true) => crate::data::digits_file().ok().map(|f| Shown::of(&f)),
        _ => None,
    };
    Some(Evaluation {
        samples: m.num_samples,
        labels: match m.inputs.labels.as_str() {
            "" => "not recorded".to_owned(),
            l => l.to_owned(),
        },
        inception: Shown::of(Path::new(&m.inception_weights)),
        reference: m.reference.as_deref().map(|r| Shown::of(Path::new(r))),
        training_file,
        num_reference: m.num_reference,
        sample_files: m
            .inputs
            .schedules
            .iter()
            .map(|s| {
                let nfe = s.len() - 1;
                SampleFile {
                    nfe,
                    file: Shown::of(&run.dir.samples_npz(None, nfe)),
                }
            })
            .collect(),
    })
}

/// The recipe keys where the run departs from the paper, leaving out those its paper rows set
/// on purpose (an ablation's factor) and the VAE of pixel-space data (no VAE is used).
fn departures(run: &RunResult, paper: &Paper, rows: &[&Row]) -> Vec<Departure> {
    let pixels = run.scale().pixels;
    paper
        .recipe
        .departures(&run.spec)
        .into_iter()
        .filter(|d| !rows.iter().any(|r| r.settings.contains_key(&d.key)))
        .filter(|d| !(pixels && d.key == "sample.vae"))
        .filter(|d| !meanflow_only(run, &d.key))
        .collect()
}

/// Whether a recipe key (or a cause's template) is about MeanFlow's objective or SiT, and the
/// run is of another method (whose own sections hold its settings).
fn meanflow_only(run: &RunResult, text: &str) -> bool {
    run.spec.method != crate::spec::Method::MeanFlow
        && ["meanflow.", "model.embedder_init"]
            .iter()
            .any(|k| text.contains(k))
}

/// The known causes (paper/meanflow.toml `[[cause]]`) that bear on the run's data, each ticked
/// when it applies (`departed`: the run's departures from the paper's recipe).
fn causes(
    run: &RunResult,
    paper: &Paper,
    rows: &[&Row],
    departed: &[Departure],
) -> Result<Vec<CauseLine>> {
    let spec = &run.spec;
    let scale = run.scale();
    let done = run.state.as_ref().map(|s| s.epoch as i64);
    // Guidance is trained in (omega, kappa): a row the run is held to pins both (and then
    // agrees, or it would not match), or leaves ours unchecked against its number.
    let unpinned = rows
        .iter()
        .find(|r| {
            !["meanflow.omega", "meanflow.kappa"]
                .iter()
                .all(|k| r.settings.contains_key(*k))
        })
        .map(|r| r.id.clone());
    let scored_fid50k = spec.sample.num_samples == 50_000
        && run.metrics.as_ref().is_none_or(|m| m.reference.is_some());
    let context = minijinja::context! {
        run => spec,
        recipe => paper.recipe.keys.iter().map(|(k, v)| (k.clone(), value_text(v))).collect::<BTreeMap<_, _>>(),
        port => &paper.recipe.port,
        epochs_done => done.unwrap_or(0),
        unpinned_row => &unpinned,
    };
    let mut out = Vec::new();
    for (i, cause) in paper.causes.iter().enumerate() {
        if cause.latents_only && scale.pixels
            || meanflow_only(run, &cause.text)
            || cause.key.as_ref().is_some_and(|k| meanflow_only(run, k))
        {
            continue;
        }
        let applies = match cause.when {
            When::Departs => departed.iter().any(|d| Some(&d.key) == cause.key.as_ref()),
            When::TrainedOnLatents => !run.imported() && !scale.pixels,
            When::NotFid50k => !scored_fid50k,
            When::Undertrained => !run.imported() && done.is_none_or(|d| d < spec.train.epochs),
            When::GuidanceUnpinned => unpinned.is_some(),
        };
        let what = format!("paper/meanflow.toml, cause {}", i + 1);
        out.push(CauseLine {
            applies,
            text: templates::render_markdown(&what, &cause.text, &context)?,
        });
    }
    Ok(out)
}
