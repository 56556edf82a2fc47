//! Our safetensors files (checkpoints, converted weights, cached features): written through
//! [`AtomicFile`] one tensor on the host at a time, with the sha256 of the whole file in the
//! metadata (its header and metadata included, the checksum's own value read as zeros), so
//! [`verify`] finds a flipped bit anywhere, a step number as well as a weight; nothing
//! non-finite is ever written. Files from elsewhere (diffusers' SD-VAE) have no checksum and are
//! read with their sizes checked; a header that names a tensor or a metadata key twice is refused.
use crate::files::{hex, AtomicFile};
use anyhow::{bail, Context, Result};
use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The metadata key of the checksum over the whole file, its own 64 hex digits read as '0's.
const CHECKSUM: &str = "file_sha256";

/// The key of the checksum older versions wrote, over the tensor bytes only (the header and the
/// training state in it uncovered).
const TENSORS_CHECKSUM: &str = "tensors_sha256";

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
    let at = checksum_at(text.as_bytes()).expect("the placeholder is in the header");
    let mut file = AtomicFile::create(path)?;
    let mut written = || -> Result<String> {
        let mut hasher = Sha256::new();
        for part in [&(text.len() as u64).to_le_bytes()[..], text.as_bytes()] {
            hasher.update(part);
            file.write_all(part)?;
        }
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

/// Where the checksum's 64 hex digits start in a header's text: after `"file_sha256":"`, which
/// a header holds once (keys are unique, and the key's quotes cannot occur inside a JSON string
/// unescaped).
fn checksum_at(text: &[u8]) -> Option<usize> {
    let key = format!("\"{CHECKSUM}\":\"");
    let at = text.windows(key.len()).position(|w| w == key.as_bytes())? + key.len();
    (text.len() >= at + 64).then_some(at)
}

/// A file's header: its metadata and where its data starts, after checking that the file is a
/// regular file whose size is what the header declares.
pub struct Header {
    pub metadata: BTreeMap<String, String>,
    data_start: u64,
    /// The header's text, for the checksum over it.
    text: Vec<u8>,
}

/// The header of `path`, the data it declares all there (the data itself is not read).
pub fn header(path: &Path) -> Result<Header> {
    let corrupt = || {
        format!(
            "{}: truncated or corrupt safetensors header",
            path.display()
        )
    };
    let mut file = crate::readfile::open(path)?;
    let size = file
        .metadata()
        .with_context(|| format!("{}: cannot read", path.display()))?
        .len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).with_context(corrupt)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER || 8 + len > size {
        bail!(corrupt());
    }
    let mut text = vec![0u8; len as usize];
    file.read_exact(&mut text).with_context(corrupt)?;
    let header = serde_json::from_slice::<UniqueKeys>(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", corrupt()))?
        .0;
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
        text,
    })
}

/// [`header`] after recomputing the file's checksum: a flipped bit anywhere fails it. Files
/// without one (written elsewhere) pass on their size; files of older versions, whose checksum
/// covers the tensors only, on that.
pub fn verify(path: &Path) -> Result<Header> {
    let header = header(path)?;
    let damaged = |got: &str, want: &str| {
        anyhow::anyhow!(
            "{}: damaged (its sha256 is {}..., the file says {}...)",
            path.display(),
            &got[..12],
            &want[..12.min(want.len())]
        )
    };
    let mut file = crate::readfile::open(path)?;
    file.seek(SeekFrom::Start(header.data_start))?;
    let unreadable = || format!("{}: cannot read", path.display());
    if let Some(want) = header.metadata.get(CHECKSUM) {
        let mut text = header.text.clone();
        let at = checksum_at(&text).ok_or_else(|| damaged("(no checksum field)", want))?;
        text[at..at + 64].fill(b'0');
        let prefix = [&(text.len() as u64).to_le_bytes()[..], &text].concat();
        let got =
            crate::files::sha256_of(prefix.as_slice().chain(file)).with_context(unreadable)?;
        if &got != want {
            return Err(damaged(&got, want));
        }
    } else if let Some(want) = header.metadata.get(TENSORS_CHECKSUM) {
        let got = crate::files::sha256_of(file).with_context(unreadable)?;
        if &got != want {
            return Err(damaged(&got, want));
        }
    }
    Ok(header)
}

/// [`verify`] for a file that must be ours: one without the whole-file checksum (its metadata
/// unprotected: written elsewhere, by an older version, or with the checksum removed) is refused.
pub fn verify_ours(path: &Path) -> Result<Header> {
    let header = verify(path)?;
    if !header.metadata.contains_key(CHECKSUM) {
        bail!(
            "{}: no checksum over its header and metadata (written by another program or an older mfr), so it is not trusted",
            path.display()
        );
    }
    Ok(header)
}

/// A JSON value whose objects never name a key twice: serde_json keeps the last copy silently,
/// safetensors readers may keep either, so a header with a repeated name is refused.
struct UniqueKeys(serde_json::Value);

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

impl<'de> Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys(v.into()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys(v.into()))
    }
    fn visit_str<E>(self, v: &str) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys(v.into()))
    }
    fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys(serde_json::Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueKeys, A::Error> {
        let mut out = Vec::new();
        while let Some(UniqueKeys(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(UniqueKeys(out.into()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let UniqueKeys(value) = map.next_value()?;
            if out.insert(key.clone(), value).is_some() {
                return Err(A::Error::custom(format!("the name `{key}` appears twice")));
            }
        }
        Ok(UniqueKeys(out.into()))
    }
}

/// Every tensor of `path`, after [`verify`], each float tensor checked finite.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    verify(path)?;
    read_verified(path)
}

/// [`read`] for a file that must be ours ([`verify_ours`]).
pub fn read_ours(path: &Path) -> Result<Vec<(String, Tensor)>> {
    verify_ours(path)?;
    read_verified(path)
}

fn read_verified(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let list = Tensor::read_safetensors(path)
        .with_context(|| format!("{}: not a readable safetensors file", path.display()))?;
    for (name, t) in &list {
        if t.is_floating_point() && t.isfinite().all().int64_value(&[]) == 0 {
            bail!("{}: {name} holds NaN or infinity", path.display());
        }
    }
    Ok(list)
}
