//! Checkpoints: one safetensors file per saved step holding the model, the EMA and the AdamW
//! moments, with the training state in its metadata. Written atomically with a checksum
//! ([`crate::tensorfile`]), so a crash mid-write leaves the previous checkpoint as the newest
//! whole one and [`verify`] finds a flipped bit before a resume builds on it.
use crate::tensorfile;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn, Tensor};

/// Everything besides tensors that resuming needs. The data order and every random draw are
/// functions of (seed, step), so the step is the whole RNG and data-loader state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub step: u64,
    pub epoch: u64,
    pub adam_step: i64,
    pub seed: u64,
    pub spec_sha256: String,
    /// Training wall time so far, across resumes.
    pub wall_s: f64,
}

/// Name prefixes of the checkpoint layout: the trained weights, their EMA, and AdamW's moments
/// (`opt.exp_avg.<parameter>`, `opt.exp_avg_sq.<parameter>`).
pub const MODEL: &str = "model.";
pub const EMA: &str = "ema.";
pub const EXP_AVG: &str = "opt.exp_avg.";
pub const EXP_AVG_SQ: &str = "opt.exp_avg_sq.";

/// The tensors of a checkpoint in its layout: the model's and the EMA's variables (each sorted
/// by name), then the two moments of each named parameter.
pub fn layout<'a>(
    model: &nn::VarStore,
    ema: &nn::VarStore,
    moments: impl IntoIterator<Item = (&'a str, &'a Tensor, &'a Tensor)>,
) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for (prefix, vs) in [(MODEL, model), (EMA, ema)] {
        out.extend(
            crate::model::sorted_variables(vs)
                .into_iter()
                .map(|(k, v)| (format!("{prefix}{k}"), v)),
        );
    }
    for (name, m, v) in moments {
        out.push((format!("{EXP_AVG}{name}"), m.shallow_clone()));
        out.push((format!("{EXP_AVG_SQ}{name}"), v.shallow_clone()));
    }
    out
}

pub fn file_name(step: u64) -> String {
    format!("step-{step:08}.safetensors")
}

/// Streams `tensors` into a checkpoint file, atomically, with its checksum (see
/// [`crate::tensorfile`]): a checkpoint is always a whole, finite state to resume from.
pub fn write(path: &Path, tensors: &[(String, Tensor)], state: &TrainState) -> Result<()> {
    write_with_metadata(path, tensors, state, &[])
}

/// [`write`], with more (key, text) entries in the metadata beside `state` (an imported
/// checkpoint records its source there).
pub fn write_with_metadata(
    path: &Path,
    tensors: &[(String, Tensor)],
    state: &TrainState,
    extra: &[(&str, String)],
) -> Result<()> {
    let mut metadata = vec![("state", serde_json::to_string(state)?)];
    metadata.extend(extra.iter().cloned());
    tensorfile::write(path, tensors, &metadata)
}

fn state_of(path: &Path, metadata: &BTreeMap<String, String>) -> Result<TrainState> {
    let state = metadata
        .get("state")
        .with_context(|| format!("{}: no training state in the checkpoint", path.display()))?;
    serde_json::from_str(state)
        .with_context(|| format!("{}: unreadable training state", path.display()))
}

/// The state stored in a checkpoint, after checking the file is whole (its header parses and
/// the data it declares is all there). Cheap: the data is not read.
pub fn read_state(path: &Path) -> Result<TrainState> {
    state_of(path, &tensorfile::header(path)?.metadata)
}

/// [`read_state`] after recomputing the checksum of the whole file: a flipped bit anywhere (the
/// step in the state as well as a weight) fails it, and so does a file without that checksum.
pub fn verify(path: &Path) -> Result<TrainState> {
    state_of(path, &tensorfile::verify_ours(path)?.metadata)
}

/// The metadata entries of a checkpoint (`state`, the checksum, and an import's `import`).
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    Ok(tensorfile::header(path)?.metadata)
}

/// All tensors of a checkpoint, by name, verified (the whole file) and finite.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    Ok(tensorfile::read_ours(path)?.into_iter().collect())
}

/// Loads the EMA weights of a checkpoint (ours: a run's, or one `mfr import` wrote) into a
/// network's store, every name and shape checked (what sampling uses).
pub fn load_ema(vs: &nn::VarStore, path: &Path) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = read_tensors(path)?.into_iter().collect();
    crate::model::load_state_dict(vs, &tensors, EMA, &path.display().to_string())
}

/// Checkpoints in `dir`, oldest first: regular files named `step-<8 digits>.safetensors`
/// (temporaries, folders and other files are not checkpoints).
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let digits = name.strip_prefix("step-")?.strip_suffix(".safetensors")?;
            if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let path = e.path();
            std::fs::metadata(&path).ok()?.is_file().then_some(())?;
            Some((digits.parse().ok()?, path))
        })
        .collect();
    found.sort();
    found
}

/// The newest checkpoint whose header is whole, skipping (and naming) any that is not. Cheap:
/// what planning shows; resuming uses [`newest_verified`].
pub fn latest(dir: &Path) -> Option<(PathBuf, TrainState)> {
    for (_, path) in list(dir).into_iter().rev() {
        match read_state(&path) {
            Ok(state) => return Some((path, state)),
            Err(e) => eprintln!("warning: skipping {e:#}"),
        }
    }
    None
}

/// The newest checkpoint that passes [`verify`], warning about each newer one that does not.
pub fn newest_verified(dir: &Path) -> Option<(PathBuf, TrainState)> {
    for (_, path) in list(dir).into_iter().rev() {
        match verify(&path) {
            Ok(state) => return Some((path, state)),
            Err(e) => eprintln!("warning: skipping {e:#}"),
        }
    }
    None
}

/// Deletes all but the newest `keep` checkpoints; the steps in `pinned` are kept besides.
pub fn prune(dir: &Path, keep: usize, pinned: &[u64]) -> Result<()> {
    let unpinned: Vec<(u64, PathBuf)> = list(dir)
        .into_iter()
        .filter(|(s, _)| !pinned.contains(s))
        .collect();
    let excess = unpinned.len().saturating_sub(keep);
    for (_, path) in unpinned.into_iter().take(excess) {
        std::fs::remove_file(&path)
            .with_context(|| format!("{}: cannot remove", path.display()))?;
    }
    Ok(())
}
