//! Our safetensors files (checkpoints, converted weights, cached features): written through
//! [`AtomicFile`] one tensor on the host at a time, with the sha256 of every tensor byte in the
//! metadata, so [`verify`] finds a flipped bit; nothing non-finite is ever written. Files from
//! elsewhere (diffusers' SD-VAE) have no checksum and are read with their sizes checked.
use crate::files::{hex, AtomicFile};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The metadata key of the checksum over every tensor byte (the file after its header).
const CHECKSUM: &str = "tensors_sha256";

/// A header larger than this is not one we wrote (a SiT-XL/2 checkpoint's is ~60 KB).
const MAX_HEADER: u64 = 64 << 20;

fn dtype_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Double => "F64",
        Kind::Float => "F32",
        Kind::BFloat16 => "BF16",
        Kind::Half => "F16",
        Kind::Int64 => "I64",
        Kind::Uint8 => "U8",
        other => bail!("cannot store a {other:?} tensor"),
    })
}

/// Writes `tensors` (any device) and the (key, text) `metadata` as `path`, atomically, with the
/// checksum. A tensor holding NaN or infinity is refused, naming it.
pub fn write(path: &Path, tensors: &[(String, Tensor)], metadata: &[(&str, String)]) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    for (k, v) in metadata {
        meta.insert((*k).into(), v.clone().into());
    }
    // A placeholder of the checksum's length, overwritten once the data is written.
    let placeholder = "0".repeat(64);
    meta.insert(CHECKSUM.into(), placeholder.clone().into());
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
    let at = text
        .find(&format!("\"{CHECKSUM}\":\"{placeholder}\""))
        .expect("the placeholder is in the header")
        + CHECKSUM.len()
        + 4;
    let mut file = AtomicFile::create(path)?;
    let mut written = || -> Result<String> {
        file.write_all(&(text.len() as u64).to_le_bytes())?;
        file.write_all(text.as_bytes())?;
        let mut hasher = Sha256::new();
        for (name, t) in tensors {
            let host = t.detach().to_device(Device::Cpu).contiguous();
            if host.is_floating_point() && host.isfinite().all().int64_value(&[]) == 0 {
                bail!("{name} holds NaN or infinity: nothing non-finite is written");
            }
            let mut bytes = vec![0u8; host.numel() * host.kind().elt_size_in_bytes()];
            host.copy_data_u8(&mut bytes, host.numel());
            hasher.update(&bytes);
            file.write_all(&bytes)?;
        }
        Ok(hex(&hasher.finalize()))
    };
    let checksum = written().with_context(|| format!("{}: cannot write", path.display()))?;
    file.patch(8 + at as u64, checksum.as_bytes())?;
    file.commit()
}

/// A file's header: its metadata and where its data starts, after checking that the file is a
/// regular file whose size is what the header declares.
pub struct Header {
    pub metadata: BTreeMap<String, String>,
    data_start: u64,
}

/// The header of `path`, the data it declares all there (the data itself is not read).
pub fn header(path: &Path) -> Result<Header> {
    let corrupt = || {
        format!(
            "{}: truncated or corrupt safetensors header",
            path.display()
        )
    };
    let meta =
        std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    let size = meta.len();
    let mut file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).with_context(corrupt)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER || 8 + len > size {
        bail!(corrupt());
    }
    let mut text = vec![0u8; len as usize];
    file.read_exact(&mut text).with_context(corrupt)?;
    let header: serde_json::Value = serde_json::from_slice(&text).with_context(corrupt)?;
    let entries = header.as_object().with_context(corrupt)?;
    let end = entries
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| v["data_offsets"][1].as_u64())
        .try_fold(0u64, |m, e| e.map(|e| m.max(e)))
        .with_context(corrupt)?;
    if 8 + len + end != size {
        bail!(
            "{}: truncated ({size} bytes, {} declared)",
            path.display(),
            8 + len + end
        );
    }
    let metadata = entries
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect();
    Ok(Header {
        metadata,
        data_start: 8 + len,
    })
}

/// [`header`] after recomputing the checksum of every tensor byte: a flipped bit anywhere fails
/// it. Files without a checksum (written elsewhere, or before checksums) pass on their size.
pub fn verify(path: &Path) -> Result<Header> {
    let header = header(path)?;
    if let Some(want) = header.metadata.get(CHECKSUM) {
        let mut file = std::fs::File::open(path)?;
        file.seek(SeekFrom::Start(header.data_start))?;
        let got = crate::files::sha256_of(file)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        if &got != want {
            bail!(
                "{}: damaged (its tensors' sha256 is {}..., the file says {}...)",
                path.display(),
                &got[..12],
                &want[..12.min(want.len())]
            );
        }
    }
    Ok(header)
}

/// Every tensor of `path`, after [`verify`], each float tensor checked finite.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    verify(path)?;
    let list = Tensor::read_safetensors(path)
        .with_context(|| format!("{}: not a readable safetensors file", path.display()))?;
    for (name, t) in &list {
        if t.is_floating_point() && t.isfinite().all().int64_value(&[]) == 0 {
            bail!("{}: {name} holds NaN or infinity", path.display());
        }
    }
    Ok(list)
}
