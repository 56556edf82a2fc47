//! `mfr discrepancy RUN`: reports/<experiment>/discrepancy-<run>.md, ready to paste into an issue
//! when a number misses the paper: the gap, the configuration against the paper's recipe and
//! Table 4, the training actually done, the environment, and the known causes, each ticked
//! where this run's files show it applies.
use super::paper::Paper;
use super::tables::{self, RunResult};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub fn discrepancy(run_dir: &Path, root: &Path) -> Result<PathBuf> {
    let dir = crate::rundir::RunDir::new(run_dir);
    if !dir.exists() {
        bail!(
            "{}: not a run directory (no spec.toml): give results/<experiment>/<run>",
            run_dir.display()
        );
    }
    let run = RunResult::read(&dir)?;
    let paper = Paper::bundled();
    let text = render(&run, &paper)?;
    let out = root.join(&run.spec.experiment.name);
    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create", out.display()))?;
    let path = out.join(format!(
        "discrepancy-{}.md",
        run.name.replace(['=', ','], "_")
    ));
    crate::files::write_atomic(&path, text.as_bytes())?;
    Ok(path)
}

fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The report's Markdown.
pub fn render(run: &RunResult, paper: &Paper) -> Result<String> {
    let spec = &run.spec;
    let rows = paper.rows_for(&spec.paper.rows, spec)?;
    let mut s = format!(
        "### MeanFlow reproduction: `{}/{}` does not match the paper\n\n{}\n\n",
        spec.experiment.name, run.name, spec.experiment.description
    );

    s += "#### The gap\n\n| paper row | NFE | paper | ours | delta | relative | verdict |\n|---|---|---|---|---|---|---|\n";
    if rows.is_empty() {
        s +=
            "| (the spec names no paper row matching this run: set `[paper] rows`) | | | | | | |\n";
    }
    for row in &rows {
        let nfe = row.nfe.unwrap_or(1);
        let ours = run.fid(nfe);
        let why = row.incomparable(spec);
        let fmt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        let _ = writeln!(
            s,
            "| {} (`{}`, {}) | {nfe} | {:.2} | {} | {} | {} | {} |",
            row.label,
            row.id,
            paper.source(&row.source),
            row.value,
            fmt(ours),
            fmt(ours.map(|o| o - row.value)),
            ours.map_or("-".to_owned(), |o| format!(
                "{:+.1}%",
                100.0 * (o - row.value) / row.value
            )),
            tables::verdict(row.value, ours, spec.paper.tolerance, why.as_deref()),
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
    }
    if run.small_sample() {
        s += "\nThese are small-sample FIDs of the demo data, not FID-50K on ImageNet: no gap to the paper can be read from them.\n";
    }

    s += "\n#### Configuration against the paper (Table 4 and the training recipe)\n\n";
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
    let departures = departures(run, paper, &rows);
    if departures.is_empty() {
        s += "\nEvery key of the paper's recipe (paper/meanflow.toml `[recipe]`) has the paper's value.\n";
    } else {
        s += "\n| spec key | paper | this run | note |\n|---|---|---|---|\n";
        for (key, want, got) in &departures {
            let _ = writeln!(
                s,
                "| `{key}` | {} | {} | {} |",
                value_text(want),
                got.as_ref().map_or("-".to_owned(), value_text),
                paper.recipe.port.get(key).map_or("", String::as_str)
            );
        }
    }

    s += "\n#### Training actually done\n\n";
    match (&spec.model.weights, &run.state) {
        (Some(w), _) => {
            let _ = writeln!(
                s,
                "None here: the weights were imported from `{w}` (their training is the publisher's)."
            );
        }
        (None, Some(state)) => {
            let _ = writeln!(
                s,
                "{} steps, {} of {} epochs, {:.1} h of training (global batch {}).",
                state.step,
                state.epoch,
                spec.train.epochs,
                state.wall_s / 3600.0,
                spec.train.batch
            );
        }
        (None, None) => s += "No checkpoint: the run has not trained yet.\n",
    }
    if let Some(last) = run.stats.last() {
        let _ = writeln!(
            s,
            "Last logged step {}: loss {:.4}, v loss {:.4}.",
            last.step, last.loss, last.v_loss
        );
    }

    s += "\n#### Environment\n\n";
    match &run.env {
        Some(env) => {
            for (key, value) in [
                ("code_commit", &env.code_commit),
                ("mfr_version", &env.mfr_version),
                ("tch", &env.tch),
                ("libtorch", &env.libtorch),
                ("device", &env.device),
            ] {
                let _ = writeln!(s, "- {key}: {value}");
            }
        }
        None => s += "- (not recorded: the run has no env.json)\n",
    }
    if let Some(m) = &run.metrics {
        let _ = writeln!(
            s,
            "- evaluation: {} samples per schedule, Inception weights `{}`, reference `{}`",
            m.num_samples,
            m.inception_weights,
            m.reference.as_deref().unwrap_or("training images")
        );
    }
    let _ = writeln!(s, "- spec sha256: {}", spec.sha256());

    s += "\n#### Known causes (ticked where this run's files show it applies)\n\n";
    for (applies, text) in causes(run, paper, &departures) {
        let _ = writeln!(s, "- [{}] {text}", if applies { "x" } else { " " });
    }
    s += "\n<details><summary>resolved spec</summary>\n\n```toml\n";
    s += &spec.to_toml();
    s += "```\n</details>\n";
    Ok(s)
}

/// The recipe keys where the run departs from the paper, leaving out those its paper rows set
/// on purpose (an ablation's factor) and the VAE of pixel-space data (no VAE is used).
fn departures(
    run: &RunResult,
    paper: &Paper,
    rows: &[&super::paper::Row],
) -> Vec<super::paper::Departure> {
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
fn causes(
    run: &RunResult,
    paper: &Paper,
    departed: &[super::paper::Departure],
) -> Vec<(bool, String)> {
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
    let planned = spec.train.epochs;
    let done = run.state.as_ref().map(|s| s.epoch as i64);
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
            false,
            "Cached vs online latents: this harness trains on cached posterior moments and draws a latent each step (REPA layout); online encoding with augmentation differs.".to_owned(),
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
            spec.model.weights.is_none() && done.is_none_or(|d| d < planned),
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
            false,
            "Sampling-time CFG: guidance is trained in (omega, kappa); this harness samples with scale 1, as it should.".to_owned(),
        ),
    ]
}
