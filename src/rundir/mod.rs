//! The run directory as a type: every file of a run with its record and its path, written
//! whole or not at all ([`crate::files::AtomicFile`]) by the one process holding the run's
//! lock. Nothing else in the project spells a run's file names.
//!
//! ```text
//! results/<experiment>/runs.json          ExperimentIndex
//! results/<experiment>/<run>/spec.toml    the resolved spec (its sha256 in spec.sha256)
//!                            env.json     Env (of the session that started the run)
//!                            lock         the writer's lock (pid, host, command)
//!                            stats.jsonl  StatLine per line, append-only
//!                            checkpoints/step-<8 digits>.safetensors
//!                            samples/inputs.json, metrics.json, grid-<n>nfe.png, grid-real.png,
//!                                    samples-<n>nfe.npz (+ .parts/ while sampling),
//!                                    step-<8 digits>/samples-<n>nfe.npz
//!                            loss.png, loss.svg
//!                            tensorboard/events.out.tfevents.0.mfr
//! ```
pub mod checkpoint;
mod records;
pub mod samples;
mod stats;
mod tensorboard;

pub use crate::files::{Contention, Lock as RunLock};
pub use records::{Env, ExperimentIndex, HistoryPoint, Metrics, SampleInputs, StatLine};
pub use stats::{read_stats, StatsLog};
pub use tensorboard::Events;

use crate::files::write_atomic;
use crate::spec::Spec;
use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::path::{Path, PathBuf};

/// One run's directory, results/<experiment>/<run>/.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    root: PathBuf,
}

/// A JSON record of a run, None when the file is absent.
fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => bail!("{}: cannot read ({e})", path.display()),
    };
    serde_json::from_str(&text).map(Some).with_context(|| {
        format!(
            "{}: not a record this version reads (written by another version of mfr? run the stage again to rewrite it)",
            path.display()
        )
    })
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    write_atomic(
        path,
        (serde_json::to_string_pretty(value)? + "\n").as_bytes(),
    )
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> RunDir {
        RunDir { root: root.into() }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The run's name: its folder's.
    pub fn name(&self) -> String {
        self.root
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    }

    pub fn spec_file(&self) -> PathBuf {
        self.root.join("spec.toml")
    }

    fn env_file(&self) -> PathBuf {
        self.root.join("env.json")
    }

    pub fn stats_file(&self) -> PathBuf {
        self.root.join("stats.jsonl")
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// The checkpoint of `step`.
    pub fn checkpoint(&self, step: u64) -> PathBuf {
        self.checkpoints().join(checkpoint::file_name(step))
    }

    pub fn samples(&self) -> PathBuf {
        self.root.join("samples")
    }

    /// The sample batch of `nfe` steps from the final weights (`step` None) or a step's
    /// checkpoint.
    pub fn samples_npz(&self, step: Option<u64>, nfe: usize) -> PathBuf {
        let name = format!("samples-{nfe}nfe.npz");
        match step {
            None => self.samples().join(name),
            Some(s) => self.samples().join(format!("step-{s:08}")).join(name),
        }
    }

    /// Real images in the sample grids' layout (PNG), written by the evaluate stage.
    pub fn real_grid(&self) -> PathBuf {
        self.samples().join("grid-real.png")
    }

    /// The sample grid of `nfe` steps (PNG).
    pub fn grid(&self, nfe: usize) -> PathBuf {
        self.samples().join(format!("grid-{nfe}nfe.png"))
    }

    fn sample_inputs_file(&self) -> PathBuf {
        self.samples().join("inputs.json")
    }

    fn metrics_file(&self) -> PathBuf {
        self.samples().join("metrics.json")
    }

    /// The loss curves' path without extension (`.png` and `.svg` are drawn).
    pub fn loss_curves(&self) -> PathBuf {
        self.root.join("loss")
    }

    /// Whether a run was ever prepared here.
    pub fn exists(&self) -> bool {
        self.spec_file().is_file()
    }

    pub fn read_spec(&self) -> Result<Spec> {
        let path = self.spec_file();
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: not a run directory (no spec.toml); give results/<experiment> or one of its runs",
                self.root.display()
            )
        })?;
        Ok(Spec::parse(&text, &path.display().to_string())?)
    }

    pub fn read_env(&self) -> Result<Option<Env>> {
        read_json(&self.env_file())
    }

    pub fn read_stats(&self) -> Result<Vec<StatLine>> {
        read_stats(&self.stats_file())
    }

    /// The log to append to, continuing after step `resumed_at`.
    pub fn stats_log(&self, resumed_at: u64) -> Result<StatsLog> {
        StatsLog::continue_after(&self.stats_file(), resumed_at, self.events())
    }

    /// The run's TensorBoard event file.
    pub fn events(&self) -> Events {
        Events::of(&self.root)
    }

    pub fn read_sample_inputs(&self) -> Result<Option<SampleInputs>> {
        read_json(&self.sample_inputs_file())
    }

    pub fn write_sample_inputs(&self, inputs: &SampleInputs) -> Result<()> {
        write_json(&self.sample_inputs_file(), inputs)
    }

    pub fn read_metrics(&self) -> Result<Option<Metrics>> {
        read_json(&self.metrics_file())
    }

    /// Writes metrics.json, and the event file anew: the training scalars and the FID history.
    pub fn write_metrics(&self, metrics: &Metrics) -> Result<()> {
        write_json(&self.metrics_file(), metrics)?;
        let events = self.events();
        events.rewrite(&self.read_stats()?)?;
        for point in &metrics.history {
            events.fid(point.step, &point.nfe, point.fid)?;
        }
        Ok(())
    }

    /// Takes the run's lock for `command` (creating the directory if needed), and removes what
    /// killed writers of this host left behind.
    pub fn lock(&self, command: &str, contention: Contention) -> Result<RunLock> {
        let lock = RunLock::acquire(&self.root.join("lock"), &self.root, command, contention)?;
        for dir in [self.root.clone(), self.checkpoints(), self.samples()] {
            crate::files::remove_stale_temporaries(&dir);
        }
        Ok(lock)
    }

    /// Makes this the directory of `spec`'s run: creates it (env.json, spec.sha256, then
    /// spec.toml last, so an interrupted preparation leaves no spec.toml claiming it), or checks
    /// that the run it holds is of this very spec. Call with the lock held.
    pub fn prepare(&self, spec: &Spec, env: &Env, _lock: &RunLock) -> Result<()> {
        let spec_file = self.spec_file();
        if spec_file.exists() {
            let old_text = std::fs::read_to_string(&spec_file)
                .with_context(|| format!("{}: cannot read", spec_file.display()))?;
            let old = Spec::parse(&old_text, &spec_file.display().to_string())?;
            if old.sha256() != spec.sha256() {
                bail!(
                    "{} holds a run of a different spec (keys that differ: {}): use another experiment name, or remove the directory",
                    self.root.display(),
                    differing_keys(&old, spec).join(", ")
                );
            }
            if old_text != spec.to_toml() {
                // Only the paper rows changed (they are not part of the hash): keep them current.
                write_atomic(&spec_file, spec.to_toml().as_bytes())?;
            }
            return Ok(());
        }
        write_atomic(
            &self.root.join("spec.sha256"),
            (spec.sha256() + "\n").as_bytes(),
        )?;
        write_json(&self.env_file(), env)?;
        write_atomic(&spec_file, spec.to_toml().as_bytes())
    }

    /// Whether training has begun here (any checkpoint file).
    pub fn has_checkpoints(&self) -> bool {
        !checkpoint::list(&self.checkpoints()).is_empty()
    }
}

/// results/<experiment>/runs.json.
pub fn write_index(experiment_dir: &Path, index: &ExperimentIndex) -> Result<()> {
    write_json(&experiment_dir.join("runs.json"), index)
}

/// The run directories under results/<experiment> (folders holding a spec.toml), sorted.
pub fn runs_of(experiment_dir: &Path) -> Result<Vec<RunDir>> {
    let mut dirs: Vec<RunDir> = std::fs::read_dir(experiment_dir)
        .with_context(|| {
            format!(
                "{}: cannot read (run `mfr run SPEC` first?)",
                experiment_dir.display()
            )
        })?
        .flatten()
        .map(|e| RunDir::new(e.path()))
        .filter(RunDir::exists)
        .collect();
    dirs.sort_by(|a, b| a.root.cmp(&b.root));
    Ok(dirs)
}

/// Dotted keys whose values differ between two resolved specs.
pub fn differing_keys(a: &Spec, b: &Spec) -> Vec<String> {
    use std::collections::{BTreeMap, BTreeSet};
    fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => t
                .iter()
                .for_each(|(k, v)| flatten(&format!("{prefix}{k}."), v, out)),
            other => {
                out.insert(prefix.trim_end_matches('.').to_owned(), other.to_string());
            }
        }
    }
    let (mut fa, mut fb) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &toml::Value::try_from(a).expect("TOML"), &mut fa);
    flatten("", &toml::Value::try_from(b).expect("TOML"), &mut fb);
    let keys: BTreeSet<&String> = fa.keys().chain(fb.keys()).collect();
    keys.into_iter()
        .filter(|k| fa.get(*k) != fb.get(*k))
        .cloned()
        .collect()
}
