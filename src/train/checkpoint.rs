//! Checkpoints: one safetensors file per saved step holding the model, the EMA and the AdamW
//! moments, with the training state as JSON in its metadata. Written to `<name>.tmp`, synced,
//! then renamed, so a crash mid-write leaves the previous checkpoint as the newest whole one.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

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

pub fn file_name(step: u64) -> String {
    format!("step-{step:08}.safetensors")
}

fn dtype_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Double => "F64",
        Kind::Float => "F32",
        Kind::BFloat16 => "BF16",
        Kind::Half => "F16",
        Kind::Int64 => "I64",
        other => bail!("cannot checkpoint a {other:?} tensor"),
    })
}

/// Streams `tensors` into a safetensors file (one tensor on the host at a time), atomically.
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
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("state".into(), serde_json::to_string(state)?.into());
    for (k, v) in extra {
        meta.insert((*k).into(), v.clone().into());
    }
    header.insert("__metadata__".into(), meta.into());
    let mut offset = 0usize;
    for (name, t) in tensors {
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype_name(t.kind())?, "shape": t.size(), "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::to_string(&header)?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let tmp = path.with_extension("safetensors.tmp");
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?,
    );
    file.write_all(&(text.len() as u64).to_le_bytes())?;
    file.write_all(text.as_bytes())?;
    for (_, t) in tensors {
        let host = t.detach().to_device(Device::Cpu).contiguous();
        let mut bytes = vec![0u8; host.numel() * host.kind().elt_size_in_bytes()];
        host.copy_data_u8(&mut bytes, host.numel());
        file.write_all(&bytes)?;
    }
    let file = file.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
        .with_context(|| format!("{}: cannot sync", tmp.display()))?;
    drop(file);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).ok();
    }
    Ok(())
}

/// The state stored in a checkpoint, after checking the file is whole (its header parses and
/// the data it declares is all there).
pub fn read_state(path: &Path) -> Result<TrainState> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .with_context(|| format!("{}: truncated checkpoint", path.display()))?;
    let len = u64::from_le_bytes(len) as usize;
    let size = file.metadata()?.len() as usize;
    if len > size {
        bail!("{}: truncated checkpoint header", path.display());
    }
    let mut text = vec![0u8; len];
    file.read_exact(&mut text)?;
    let header: serde_json::Value = serde_json::from_slice(&text)
        .with_context(|| format!("{}: corrupt checkpoint header", path.display()))?;
    let end = header
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, v)| v["data_offsets"][1].as_u64())
        .max()
        .unwrap_or(0) as usize;
    if 8 + len + end != size {
        bail!(
            "{}: truncated checkpoint ({size} bytes, {} declared)",
            path.display(),
            8 + len + end
        );
    }
    let state = header["__metadata__"]["state"]
        .as_str()
        .with_context(|| format!("{}: no training state in the checkpoint", path.display()))?;
    serde_json::from_str(state)
        .with_context(|| format!("{}: unreadable training state", path.display()))
}

/// The metadata entries of a checkpoint (`state`, and an import's `import`).
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    read_state(path)?;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let mut text = vec![0u8; u64::from_le_bytes(len) as usize];
    file.read_exact(&mut text)?;
    let header: serde_json::Value = serde_json::from_slice(&text)?;
    Ok(header["__metadata__"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect())
}

/// All tensors of a checkpoint, by name.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let list = Tensor::read_safetensors(path)
        .with_context(|| format!("{}: cannot read tensors", path.display()))?;
    Ok(list.into_iter().collect())
}

/// Checkpoints in `dir`, oldest first (temporary files are not checkpoints).
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name
                .strip_prefix("step-")?
                .strip_suffix(".safetensors")?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The newest whole checkpoint, skipping (and naming) any that is damaged.
pub fn latest(dir: &Path) -> Option<(PathBuf, TrainState)> {
    for (_, path) in list(dir).into_iter().rev() {
        match read_state(&path) {
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
