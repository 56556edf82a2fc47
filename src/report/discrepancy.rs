//! `mfr discrepancy RUN`: reports/<experiment>/discrepancy-<run>.md, a GitHub issue body an
//! upstream maintainer can act on: the gap with its interval, a control (the released weights
//! scored through the same pipeline), the configuration against the paper's recipe with the
//! official code's key for each departure, the training done, the environment with the hashes
//! of the files scored, and the known causes, each decided from the run's files. Paths are
//! printed relative to $MFR_CACHE or as file names with hashes, never one machine's folders.
use super::paper::{Departure, Paper, Row};
use super::tables::{self, file_name, RunResult};
use crate::eval::evaluator::content_sha256;
use crate::paths::default_cache;
use anyhow::{bail, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// `mfr discrepancy RUN`: renders the run's report under `root`/<experiment>.
pub fn discrepancy(run_dir: &Path, root: &Path) -> Result<PathBuf> {
    if !crate::rundir::RunDir::new(run_dir).exists() {
        bail!(
            "{}: not a run directory (no spec.toml): give results/<experiment>/<run>",
            run_dir.display()
        );
    }
    let (experiment, runs) = tables::collect(run_dir)?;
    let results = run_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    write(
        &runs[0],
        &controls(results),
        &Paper::bundled(),
        &root.join(experiment),
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
    let path = out.join(format!(
        "discrepancy-{}.md",
        run.name.replace(['=', ',', '/'], "_")
    ));
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
        .filter(|r| r.spec.model.weights.is_some() && r.metrics.is_some())
        .collect();
    out.sort_by(|a, b| a.dir.path().cmp(b.dir.path()));
    out
}

/// What must agree for two runs' FIDs to differ only by their weights: the reference, the
/// number of samples and their labels, the decoder and the Inception weights.
fn evaluation_settings(run: &RunResult) -> Option<(String, i64, Option<String>, String, String)> {
    let m = run.metrics.as_ref()?;
    Some((
        m.reference.as_deref().map(file_name).unwrap_or_default(),
        m.num_samples,
        m.inputs.vae.clone(),
        file_name(&m.inception_weights),
        m.inputs.labels.clone(),
    ))
}

/// The control of `run` at `nfe`: released weights of the same network, scored with the same
/// evaluation settings.
fn control<'a>(run: &RunResult, controls: &'a [RunResult], nfe: i64) -> Option<&'a RunResult> {
    let settings = evaluation_settings(run)?;
    controls.iter().find(|c| {
        c.dir.path() != run.dir.path()
            && c.spec.model.preset == run.spec.model.preset
            && c.fid(nfe).is_some()
            && evaluation_settings(c).as_ref() == Some(&settings)
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
fn shown(path: &Path) -> String {
    let cache = default_cache();
    let name = match path.strip_prefix(&cache) {
        Ok(rel) => format!("$MFR_CACHE/{}", rel.display()),
        Err(_) => file_name(&path.to_string_lossy()),
    };
    match content_sha256(path, &cache) {
        Ok(sha) => format!("`{name}` (sha256 `{sha}`)"),
        Err(_) => format!("`{name}` (not on this machine)"),
    }
}

/// The report's heading, from the verdicts of the run's rows.
fn headline(verdicts: &[String]) -> &'static str {
    let any = |p: &str| verdicts.iter().any(|v| v.starts_with(p));
    if verdicts.is_empty() {
        "names no paper row"
    } else if any("missed") {
        "misses the paper"
    } else if any("not evaluated") {
        "is not evaluated yet"
    } else if verdicts.iter().all(|v| v.starts_with("not comparable")) {
        "cannot be held to the paper's numbers"
    } else if any("not comparable") {
        "matches the paper where comparable"
    } else {
        "matches the paper"
    }
}

/// The report's Markdown: a GitHub issue body.
pub fn render(run: &RunResult, controls: &[RunResult], paper: &Paper) -> Result<String> {
    let spec = &run.spec;
    let rows = paper.rows_for(&spec.paper.rows, spec)?;
    let verdicts: Vec<String> = rows
        .iter()
        .map(|row| {
            let nfe = row.nfe.unwrap_or(1);
            let why = row.incomparable(spec);
            tables::verdict(
                row.value,
                run.fid(nfe),
                spec.paper.tolerance,
                why.as_deref(),
            )
        })
        .collect();
    let title = match run.label == run.name {
        true => format!("`{}/{}`", spec.experiment.name, run.name),
        false => format!("{} (`{}/{}`)", run.label, spec.experiment.name, run.name),
    };
    let mut s = format!(
        "### MeanFlow reproduction: {title} {}\n\n{}\n\n",
        headline(&verdicts),
        spec.experiment.description
    );
    gap(&mut s, run, controls, paper, &rows, &verdicts);
    let departures = departures(run, paper, &rows);
    s += "\n#### Known causes (each decided from this run's files)\n\n";
    for (applies, text) in causes(run, paper, &departures) {
        let _ = writeln!(s, "- [{}] {text}", if applies { "x" } else { " " });
    }
    configuration(&mut s, run, paper, &rows, &departures);
    training(&mut s, run);
    environment(&mut s, run);
    s += "\n<details><summary>Resolved spec</summary>\n\n```toml\n";
    s += &spec.to_toml();
    s += "```\n</details>\n";
    Ok(s)
}

/// The gap table, a control row per NFE where the results hold one, and what it tells.
fn gap(
    s: &mut String,
    run: &RunResult,
    controls: &[RunResult],
    paper: &Paper,
    rows: &[&Row],
    verdicts: &[String],
) {
    let spec = &run.spec;
    *s += "#### The gap\n\n| | NFE | paper | ours (± 95% CI) | delta | relative | verdict |\n|---|---|---|---|---|---|---|\n";
    if rows.is_empty() {
        *s +=
            "| (the spec names no paper row matching this run: set `[paper] rows`) | | | | | | |\n";
    }
    let fmt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    let relative = |o: Option<f64>, p: f64| {
        o.map_or("-".to_owned(), |o| format!("{:+.1}%", 100.0 * (o - p) / p))
    };
    let mut found = Vec::new();
    for (row, verdict) in rows.iter().zip(verdicts) {
        let nfe = row.nfe.unwrap_or(1);
        let ours = run.fid(nfe);
        let _ = writeln!(
            s,
            "| {} (`{}`, {}) | {nfe} | {:.2} | {} | {} | {} | {verdict} |",
            row.label,
            row.id,
            paper.source(&row.source),
            row.value,
            run.fid_text(nfe).unwrap_or_else(|| "-".to_owned()),
            fmt(ours.map(|o| o - row.value)),
            relative(ours, row.value),
        );
        for also in &row.also {
            let _ = writeln!(
                s,
                "| ... as {} gives it{} | {nfe} | {:.2} | | | | |",
                paper.source(&also.source),
                also.note
                    .as_deref()
                    .map_or(String::new(), |n| format!(" ({n})")),
                also.value
            );
        }
        if spec.model.weights.is_some() {
            continue;
        }
        if let Some(c) = control(run, controls, nfe) {
            // The control is held to its own paper row (the released weights' number).
            let own = paper
                .rows_for(&c.spec.paper.rows, &c.spec)
                .ok()
                .and_then(|rows| rows.into_iter().find(|r| r.nfe.unwrap_or(1) == nfe));
            let fid = c.fid(nfe);
            let (value, v) = match own {
                Some(r) => {
                    let why = r.incomparable(&c.spec);
                    let v = tables::verdict(r.value, fid, c.spec.paper.tolerance, why.as_deref());
                    (Some(r.value), v)
                }
                None => (None, "no paper row for the control".to_owned()),
            };
            let _ = writeln!(
                s,
                "| control: released weights `{}` through this pipeline (`{}/{}`{}) | {nfe} | {} | {} | {} | {} | {v} |",
                file_name(c.spec.model.weights.as_deref().unwrap_or_default()),
                c.spec.experiment.name,
                c.name,
                own.map_or_else(String::new, |r| format!(", row `{}`", r.id)),
                fmt(value),
                c.fid_text(nfe).unwrap_or_else(|| "-".to_owned()),
                fmt(fid.zip(value).map(|(f, p)| f - p)),
                value.map_or("-".to_owned(), |p| relative(fid, p)),
            );
            found.push(v);
        }
    }
    *s += "\n";
    if run.small_sample() {
        *s += "These are small-sample FIDs of the demo data, not FID-50K on ImageNet: no gap to the paper can be read from them, and no released weights exist for this data to serve as a control.\n";
    } else if spec.model.weights.is_some() {
        *s += "This run scores released weights: it is itself the control for runs trained with the same evaluation settings.\n";
    } else if found.is_empty() {
        *s += "No control in the results: score the released checkpoint with the same evaluation settings (`make reproduce-b4 CKPT=path/to/checkpoint`), then render this report again.\n";
    } else if found
        .iter()
        .all(|v| v.starts_with("reproduced") || v.starts_with("better"))
    {
        *s += "The control reproduces the paper through this pipeline: the gap lies in training, not in sampling or evaluation.\n";
    } else {
        *s += "The control misses the paper too: look at sampling and evaluation (VAE, reference batch, Inception) before training.\n";
    }
}

/// Table 4 against this run's network, and the recipe keys it departs in, with the official
/// code's key for each.
fn configuration(
    s: &mut String,
    run: &RunResult,
    paper: &Paper,
    rows: &[&Row],
    departures: &[Departure],
) {
    let spec = &run.spec;
    *s += "\n<details><summary>Configuration against the paper (Table 4 and the training recipe)</summary>\n\n";
    let cfg = spec.model_config();
    // The network the paper row used (a demo's tiny network is compared with it too).
    let preset = rows
        .first()
        .map(|r| r.model.as_str())
        .or(spec.model.preset.as_deref())
        .unwrap_or("custom");
    match paper.model(preset) {
        Some(m) => {
            let _ = writeln!(
                s,
                "| | paper (Table 4, {}) | this run |\n|---|---|---|\n| depth | {} | {} |\n| hidden | {} | {} |\n| heads | {} | {} |\n| patch | {} | {} |\n| epochs | {} | {} |",
                m.preset,
                m.depth,
                cfg.depth,
                m.hidden,
                cfg.hidden_size,
                m.heads,
                cfg.num_heads,
                m.patch,
                cfg.patch_size,
                m.epochs,
                spec.train.epochs
            );
        }
        None => {
            let _ = writeln!(s, "The network `{preset}` is not in the paper's Table 4.");
        }
    }
    if departures.is_empty() {
        *s += "\nEvery key of the paper's recipe (paper/meanflow.toml `[recipe]`) has the paper's value.\n";
    } else {
        *s += "\n| spec key | official config key | paper | this run | note |\n|---|---|---|---|---|\n";
        for (key, want, got) in departures {
            let _ = writeln!(
                s,
                "| `{key}` | {} | {} | {} | {} |",
                paper
                    .recipe
                    .official
                    .get(key)
                    .map_or("-".to_owned(), |k| format!("`{k}`")),
                value_text(want),
                got.as_ref().map_or("-".to_owned(), value_text),
                paper.recipe.port.get(key).map_or("", String::as_str)
            );
        }
    }
    *s += "</details>\n";
}

fn training(s: &mut String, run: &RunResult) {
    let spec = &run.spec;
    *s += "\n#### Training actually done\n\n";
    match (&spec.model.weights, &run.state) {
        (Some(w), _) => {
            let _ = writeln!(
                s,
                "None here: the weights were imported from {} (their training is the publisher's).",
                shown(Path::new(w))
            );
        }
        (None, Some(state)) => {
            let _ = writeln!(
                s,
                "{} steps, {} of {} epochs, {:.2} h of training (global batch {}).",
                state.step,
                state.epoch,
                spec.train.epochs,
                state.wall_s / 3600.0,
                spec.train.batch
            );
        }
        (None, None) => *s += "No checkpoint: the run has not trained yet.\n",
    }
    if let Some(last) = run.stats.last() {
        let weight = last
            .adaptive_weight
            .map_or_else(String::new, |w| format!(", mean adaptive weight {w:.4}"));
        let _ = writeln!(
            s,
            "Last logged step {}: v loss {:.4}{weight}.",
            last.step, last.v_loss
        );
    }
}

/// What ran (device, driver, CUDA, libtorch, processes, command) and the files scored.
fn environment(s: &mut String, run: &RunResult) {
    *s += "\n<details><summary>Environment and the files scored</summary>\n\n";
    match &run.env {
        Some(env) => {
            let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "- (no GPU)".to_owned());
            for (key, value) in [
                ("device", env.device.clone()),
                ("NVIDIA driver (CUDA version)", or_none(&env.cuda_driver)),
                ("CUDA runtime of libtorch", or_none(&env.cuda_runtime)),
                ("libtorch", env.libtorch.clone()),
                ("tch", env.tch.clone()),
                ("processes (world size)", env.world_size.to_string()),
                ("command", format!("`{}`", env.command)),
                ("code commit", env.code_commit.clone()),
                ("mfr version", env.mfr_version.clone()),
            ] {
                let _ = writeln!(s, "- {key}: {value}");
            }
        }
        None => *s += "- (not recorded: the run has no env.json)\n",
    }
    if let Some(m) = &run.metrics {
        let _ = writeln!(
            s,
            "- evaluation: {} samples per schedule (labels {}), Inception weights {}",
            m.num_samples,
            match m.inputs.labels.as_str() {
                "" => "not recorded",
                l => l,
            },
            shown(Path::new(&m.inception_weights))
        );
        let reference = match &m.reference {
            Some(r) => shown(Path::new(r)),
            None => match crate::data::digits_file() {
                Ok(f) if run.small_sample() => {
                    format!("the {} training images of {}", m.num_reference, shown(&f))
                }
                _ => "the training images".to_owned(),
            },
        };
        let _ = writeln!(s, "- reference: {reference}");
        for schedule in &m.inputs.schedules {
            let nfe = schedule.len() - 1;
            let npz = run.dir.samples_npz(None, nfe);
            let _ = writeln!(s, "- {nfe}-NFE samples: {}", shown(&npz));
        }
    }
    let _ = writeln!(s, "- spec sha256: `{}`", run.spec.sha256());
    *s += "</details>\n";
}

/// The recipe keys where the run departs from the paper, leaving out those its paper rows set
/// on purpose (an ablation's factor) and the VAE of pixel-space data (no VAE is used).
fn departures(run: &RunResult, paper: &Paper, rows: &[&Row]) -> Vec<Departure> {
    paper
        .recipe
        .departures(&run.spec)
        .into_iter()
        .filter(|(key, _, _)| !rows.iter().any(|r| r.settings.contains_key(key)))
        .filter(|(key, _, _)| !(run.small_sample() && key == "sample.vae"))
        .collect()
}

/// The causes users of the public code found behind FID gaps, and whether each applies here
/// (`departed`: the run's departures from the paper's recipe).
fn causes(run: &RunResult, paper: &Paper, departed: &[Departure]) -> Vec<(bool, String)> {
    let spec = &run.spec;
    let recipe = |key: &str| {
        paper
            .recipe
            .keys
            .get(key)
            .map(value_text)
            .unwrap_or_default()
    };
    let differs = |key: &str| departed.iter().any(|d| d.0 == key);
    let trained_here = spec.model.weights.is_none();
    let planned = spec.train.epochs;
    let done = run.state.as_ref().map(|s| s.epoch as i64);
    // Guidance is trained in (omega, kappa): a row the run is held to pins both (and then
    // agrees, or it would not match), or leaves ours unchecked against its number.
    let unpinned = paper
        .rows_for(&spec.paper.rows, spec)
        .unwrap_or_default()
        .into_iter()
        .find(|r| {
            !["meanflow.omega", "meanflow.kappa"]
                .iter()
                .all(|k| r.settings.contains_key(*k))
        })
        .map(|r| r.id.clone());
    vec![
        (
            differs("sample.vae"),
            format!(
                "VAE variant: samples decoded with `{}`; the paper encodes with `{}` (the PyTorch port decodes with ft-ema).",
                spec.sample.vae,
                recipe("sample.vae")
            ),
        ),
        (
            differs("train.batch"),
            format!(
                "Global batch: {} here (x{} accumulation) vs the paper's {}.",
                spec.train.batch,
                spec.train.grad_accumulation,
                recipe("train.batch")
            ),
        ),
        (
            trained_here && !run.small_sample(),
            "Cached vs online latents: this run trained on cached posterior moments, drawing a latent each step (REPA layout); online encoding with augmentation differs.".to_owned(),
        ),
        (
            differs("train.ema_decay"),
            format!(
                "EMA: decay {} vs the paper's {}; samples use the EMA weights.",
                spec.train.ema_decay,
                recipe("train.ema_decay")
            ),
        ),
        (
            differs("meanflow.norm_eps"),
            format!(
                "Adaptive-loss eps: {} vs the official {} (1e-3 in the CIFAR code, 1.0 in one PyTorch port's CLI).",
                spec.meanflow.norm_eps,
                recipe("meanflow.norm_eps")
            ),
        ),
        (
            differs("meanflow.class_dropout"),
            format!(
                "Label dropout: applied once here (rate {}); one public PyTorch port drops labels a second time inside the model.",
                spec.meanflow.class_dropout
            ),
        ),
        (
            spec.sample.num_samples != 50_000 || run.small_sample(),
            format!(
                "FID pipeline: our Inception port (TF1 bilinear resize to 299, ADM statistics in float64) on {} samples; FID-50K needs 50,000 against VIRTUAL_imagenet256_labeled.",
                spec.sample.num_samples
            ),
        ),
        (
            trained_here && done.is_none_or(|d| d < planned),
            format!(
                "Not fully trained: {} of {planned} epochs.",
                done.map_or("0".to_owned(), |d| d.to_string())
            ),
        ),
        (
            differs("train.precision"),
            format!(
                "Precision: {} here; the official code trains in float32 (fp16 produced NaN late in training for users).",
                format!("{:?}", spec.train.precision).to_lowercase()
            ),
        ),
        (
            unpinned.is_some(),
            format!(
                "Guidance: trained in with omega = {} and kappa = {}, sampled at scale 1 (trained-in guidance takes no CFG at sampling){}.",
                spec.meanflow.omega,
                spec.meanflow.kappa,
                unpinned.map_or_else(
                    || "; the paper rows pin the same values".to_owned(),
                    |id| format!("; the paper row `{id}` does not pin omega and kappa, so its number may rest on other guidance")
                )
            ),
        ),
    ]
}
