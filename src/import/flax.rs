//! The official JAX code's parameters (flax, Gsunshine/meanflow) under our PyTorch names. A flax
//! path such as `net/blocks/layers_0/attn/qkv/_flax_linear/kernel` maps by rule, not by a table:
//! `net/` and the wrappers' levels (`_flax_linear`, `_flax_embedding`) go, `layers_<i>` is the
//! index `<i>` (flax's Sequential counts the parameter-free SiLU as PyTorch's does), and the
//! leaf says the layout:
//!   - `kernel` of a Dense, (in, out): the transpose, torch's (out, in) `weight`;
//!   - `kernel` of the patch convolution, HWIO (p, p, C, D): permuted to OIHW (D, C, p, p);
//!   - `embedding` of the class table, (K + 1, D): `weight`, unchanged; `bias`: unchanged.
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// How a flax array becomes the PyTorch tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Biases and the class table.
    Same,
    /// A Dense kernel (in, out) -> torch's (out, in).
    Transpose,
    /// A convolution kernel HWIO -> OIHW.
    HwioToOihw,
}

impl Layout {
    pub fn apply(self, t: &Tensor) -> Tensor {
        match self {
            Layout::Same => t.shallow_clone(),
            Layout::Transpose => t.tr().contiguous(),
            Layout::HwioToOihw => t.permute([3, 2, 0, 1]).contiguous(),
        }
    }
}

/// The PyTorch key and layout of flax parameter `path` (joined with '/'; a leading `params/`
/// and `net/` are dropped) holding an array of `rank` dimensions.
pub fn torch_name(path: &str, rank: usize) -> Result<(String, Layout)> {
    let mut parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    while matches!(parts.first(), Some(&"params" | &"net")) {
        parts.remove(0);
    }
    let Some((&leaf, modules)) = parts.split_last() else {
        bail!("flax parameter `{path}`: an empty path");
    };
    let mut names: Vec<String> = modules
        .iter()
        .filter(|m| !matches!(**m, "_flax_linear" | "_flax_embedding"))
        .map(|m| match m.strip_prefix("layers_") {
            Some(i) if !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()) => i.to_owned(),
            _ => (*m).to_owned(),
        })
        .collect();
    let (name, layout) = match (leaf, rank) {
        ("kernel", 2) => ("weight", Layout::Transpose),
        ("kernel", 4) => ("weight", Layout::HwioToOihw),
        ("bias", 1) => ("bias", Layout::Same),
        ("embedding", 2) => ("weight", Layout::Same),
        _ => bail!(
            "flax parameter `{path}`: a {rank}-D `{leaf}` is not a SiT parameter (expected a 2-D or 4-D kernel, a bias or the class table's embedding)"
        ),
    };
    names.push(name.to_owned());
    Ok((names.join("."), layout))
}

/// Every (flax path, array) as (PyTorch key, tensor in torch's layout); two paths that map to
/// one key are an error.
pub fn to_state_dict(params: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
    renamed(params, torch_name)
}

/// Every (flax path, array) as (torch key, tensor in torch's layout) by a network's own naming
/// rule; two paths that map to one key are an error.
pub fn renamed(
    params: &[(String, Tensor)],
    torch_name: impl Fn(&str, usize) -> Result<(String, Layout)>,
) -> Result<Vec<(String, Tensor)>> {
    let mut seen = std::collections::BTreeMap::new();
    params
        .iter()
        .map(|(path, t)| {
            let (key, layout) = torch_name(path, t.dim())?;
            if let Some(other) = seen.insert(key.clone(), path.clone()) {
                bail!("flax parameters `{other}` and `{path}` both map to `{key}`");
            }
            Ok((key, layout.apply(t)))
        })
        .collect()
}

/// A value of a flax msgpack checkpoint (flax.serialization / orbax's msgpack file): maps with
/// string keys, arrays, scalars, and arrays of numbers as tensors (ext types 1 and 3).
#[derive(Debug)]
pub enum Msg {
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bin(Vec<u8>),
    Array(Vec<Msg>),
    Map(Vec<(String, Msg)>),
    Tensor(Tensor),
}

impl Msg {
    pub fn get(&self, key: &str) -> Option<&Msg> {
        match self {
            Msg::Map(items) => items.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            // Tuples saved as dicts of '0', '1', ... or as arrays alike.
            Msg::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        }
    }

    /// An integer, or a 0-d integer array (how training states store their step).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Msg::Int(i) => Some(*i),
            Msg::Tensor(t) if t.numel() == 1 && !t.is_floating_point() => Some(t.int64_value(&[])),
            _ => None,
        }
    }

    /// Every tensor under this value, by its path of keys joined with '/'.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        fn walk(v: &Msg, prefix: &str, out: &mut Vec<(String, Tensor)>) {
            let join = |k: &str| match prefix {
                "" => k.to_owned(),
                p => format!("{p}/{k}"),
            };
            match v {
                Msg::Tensor(t) => out.push((prefix.to_owned(), t.shallow_clone())),
                Msg::Map(items) => items.iter().for_each(|(k, v)| walk(v, &join(k), out)),
                Msg::Array(items) => items
                    .iter()
                    .enumerate()
                    .for_each(|(i, v)| walk(v, &join(&i.to_string()), out)),
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(self, "", &mut out);
        out
    }
}

/// Nesting a checkpoint never needs more of (rmpv counts about two levels per container).
const MAX_DEPTH: usize = 128;

/// Values (map entries, array items, scalars) a checkpoint may hold. rmpv builds the whole tree
/// at ~40 bytes a value, so a crafted file of one-byte values would expand 40-fold; the largest
/// SiT training state (params, EMA and two moments of ~700 arrays) needs ~10^5 reads.
const MAX_READS: u64 = 4_000_000;

/// The file's bytes to rmpv, read at most [`MAX_READS`] times: rmpv reads each value's first
/// byte with its own call, so this bounds the values (and the tree) before they are built.
struct Metered<R> {
    inner: R,
    reads_left: u64,
}

impl<R: std::io::Read> std::io::Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reads_left = self
            .reads_left
            .checked_sub(1)
            .ok_or_else(|| std::io::Error::other(TOO_MANY))?;
        self.inner.read(buf)
    }
}

const TOO_MANY: &str = "more values than a checkpoint holds";

/// Reads a flax msgpack file: rmpv decodes the tree, then maps take string keys (each once),
/// arrays become tensors, chunked arrays are put back together, every size checked first.
pub fn read_msgpack(path: &Path) -> Result<Msg> {
    let file = path.display().to_string();
    let fail = |what: String| anyhow::anyhow!("{file}: not a flax msgpack checkpoint: {what}");
    let mut reader = Metered {
        inner: std::io::BufReader::new(crate::readfile::open(path)?),
        reads_left: MAX_READS,
    };
    let value = rmpv::decode::read_value_with_max_depth(&mut reader, MAX_DEPTH).map_err(|e| {
        fail(match &e {
            rmpv::decode::Error::DepthLimitExceeded => "nesting deeper than a checkpoint's".into(),
            _ if e.to_string().contains(TOO_MANY) => {
                format!("{TOO_MANY} ({MAX_READS} reads); refusing a file that would expand far past its size")
            }
            _ => format!("{e} (truncated or not msgpack)"),
        })
    })?;
    let mut rest = [0u8; 1];
    reader.reads_left = 1;
    if std::io::Read::read(&mut reader, &mut rest).map_err(|e| fail(e.to_string()))? != 0 {
        return Err(fail("bytes after the checkpoint's end".into()));
    }
    convert(value, "").map_err(|e| fail(format!("{e:#}")))
}

/// rmpv's tree as ours, consumed as it goes (each array's bytes are freed once its tensor is
/// made). `at` is the path of keys, for messages.
fn convert(value: rmpv::Value, at: &str) -> Result<Msg> {
    use rmpv::Value as V;
    let at_or_root = || if at.is_empty() { "the root" } else { at };
    Ok(match value {
        V::Nil => Msg::Nil,
        V::Boolean(b) => Msg::Bool(b),
        V::Integer(i) => Msg::Int(
            i.as_i64()
                .with_context(|| format!("an integer beyond i64 at {}", at_or_root()))?,
        ),
        V::F32(f) => Msg::Float(f64::from(f)),
        V::F64(f) => Msg::Float(f),
        V::String(s) => Msg::Str(
            s.into_str()
                .with_context(|| format!("a string that is not UTF-8 at {}", at_or_root()))?,
        ),
        V::Binary(b) => Msg::Bin(b),
        V::Array(items) => Msg::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| convert(v, &format!("{at}/{i}")))
                .collect::<Result<_>>()?,
        ),
        V::Map(entries) => {
            let mut items: Vec<(String, Msg)> = Vec::with_capacity(entries.len());
            let mut seen = std::collections::HashSet::new();
            for (k, v) in entries {
                let key = match k {
                    V::String(s) => s.into_str().context("a map key that is not UTF-8")?,
                    V::Integer(i) => i.to_string(),
                    _ => bail!("a map key at {} that is not a string", at_or_root()),
                };
                if !seen.insert(key.clone()) {
                    bail!(
                        "the map at {} has the key `{key}` twice (flax would take the last): a damaged or crafted file",
                        at_or_root()
                    );
                }
                let value = convert(v, &format!("{at}/{key}"))?;
                items.push((key, value));
            }
            let map = Msg::Map(items);
            if map.get("__msgpack_chunked_array__").is_some() {
                unchunk(&map).with_context(|| format!("the chunked array at {}", at_or_root()))?
            } else {
                map
            }
        }
        V::Ext(code, payload) => {
            array(code, &payload).with_context(|| format!("the array at {}", at_or_root()))?
        }
    })
}

/// flax's dtype names and their torch kinds.
fn kind_of(dtype: &[u8]) -> Result<Kind> {
    Ok(match dtype {
        b"float32" => Kind::Float,
        b"float64" => Kind::Double,
        b"float16" => Kind::Half,
        b"bfloat16" => Kind::BFloat16,
        b"int32" => Kind::Int,
        b"int64" => Kind::Int64,
        b"uint8" => Kind::Uint8,
        b"bool" => Kind::Bool,
        other => bail!("array dtype `{}`", String::from_utf8_lossy(other)),
    })
}

/// Dimensions an array may have (numpy's own limit is 64).
const MAX_RANK: u32 = 32;

/// Ext 1 (an ndarray) and 3 (a numpy scalar): msgpack of (shape, dtype name, C-order bytes),
/// read with rmp's low-level decoders so nothing is allocated before the sizes agree.
fn array(code: i8, payload: &[u8]) -> Result<Msg> {
    if code != 1 && code != 3 {
        bail!("msgpack extension {code} (flax writes 1 for arrays, 3 for numpy scalars)");
    }
    let malformed = || anyhow::anyhow!("an array extension without (shape, dtype, bytes)");
    let mut rd = payload;
    if rmp::decode::read_array_len(&mut rd).map_err(|_| malformed())? != 3 {
        return Err(malformed());
    }
    let rank = rmp::decode::read_array_len(&mut rd).map_err(|_| malformed())?;
    if rank > MAX_RANK {
        bail!("an array of {rank} dimensions");
    }
    let shape: Vec<i64> = (0..rank)
        .map(|_| {
            rmp::decode::read_int::<i64, _>(&mut rd)
                .ok()
                .filter(|d| *d >= 0)
                .ok_or_else(|| anyhow::anyhow!("a negative or non-integer array dimension"))
        })
        .collect::<Result<_>>()?;
    let dtype = str_or_bin(&mut rd).ok_or_else(malformed)?;
    let kind = kind_of(dtype)?;
    let bytes = str_or_bin(&mut rd).ok_or_else(malformed)?;
    if !rd.is_empty() {
        return Err(malformed());
    }
    let count = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .and_then(|n| n.checked_mul(kind.elt_size_in_bytes() as u64));
    if count != Some(bytes.len() as u64) {
        bail!(
            "shape {shape:?} x {} holds {} bytes",
            String::from_utf8_lossy(dtype),
            bytes.len()
        );
    }
    Tensor::f_from_data_size(bytes, &shape, kind)
        .map(Msg::Tensor)
        .map_err(|e| anyhow::anyhow!("libtorch refused it ({e})"))
}

/// A msgpack string or binary (flax writes the dtype name as one and the data as the other;
/// msgpack-python's raw mode reads both as bytes).
fn str_or_bin<'a>(rd: &mut &'a [u8]) -> Option<&'a [u8]> {
    let mut probe = *rd;
    let len = match rmp::decode::read_str_len(&mut probe) {
        Ok(n) => n,
        Err(_) => {
            probe = *rd;
            rmp::decode::read_bin_len(&mut probe).ok()?
        }
    } as usize;
    if probe.len() < len {
        return None;
    }
    let (body, rest) = probe.split_at(len);
    *rd = rest;
    Some(body)
}

/// A map of `"0"`, `"1"`, ... as flax's `_dict_to_tuple` reads it: every index once, in order.
fn tuple_of<'a>(map: Option<&'a Msg>, what: &str) -> Result<Vec<&'a Msg>> {
    let Some(Msg::Map(items)) = map else {
        bail!("no {what}");
    };
    (0..items.len())
        .map(|i| {
            map.and_then(|m| m.get(&i.to_string()))
                .with_context(|| format!("its {what} lack entry {i}"))
        })
        .collect()
}

/// flax's encoding of arrays over 1 GiB, `{__msgpack_chunked_array__: true, shape, chunks}`,
/// put back together as flax's `_unchunk` does (the chunks concatenated, then reshaped), after
/// checking what it would find: 1-D chunks of one dtype whose sizes add up to the shape's.
fn unchunk(map: &Msg) -> Result<Msg> {
    let shape: Vec<i64> = tuple_of(map.get("shape"), "shape")?
        .into_iter()
        .map(|d| {
            d.as_int()
                .filter(|d| *d >= 0)
                .context("a bad dimension in its shape")
        })
        .collect::<Result<_>>()?;
    if shape.len() > MAX_RANK as usize {
        bail!("a shape of {} dimensions", shape.len());
    }
    let chunks: Vec<&Tensor> = tuple_of(map.get("chunks"), "chunks")?
        .into_iter()
        .enumerate()
        .map(|(i, c)| match c {
            Msg::Tensor(t) if t.dim() == 1 => Ok(t),
            Msg::Tensor(t) => bail!("chunk {i} is {:?}, not 1-D", t.size()),
            _ => bail!("chunk {i} is not an array"),
        })
        .collect::<Result<_>>()?;
    let Some(first) = chunks.first() else {
        bail!("no chunks");
    };
    if let Some(i) = chunks.iter().position(|c| c.kind() != first.kind()) {
        bail!(
            "chunk {i} is {:?}, chunk 0 {:?}",
            chunks[i].kind(),
            first.kind()
        );
    }
    let declared = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
    let stored: u64 = chunks.iter().map(|c| c.numel() as u64).sum();
    if declared != Some(stored) {
        bail!("shape {shape:?}, but its chunks hold {stored} values");
    }
    let parts: Vec<Tensor> = chunks.iter().map(|c| c.shallow_clone()).collect();
    Tensor::f_cat(&parts, 0)
        .and_then(|whole| whole.f_reshape(shape.as_slice()))
        .map(Msg::Tensor)
        .map_err(|e| anyhow::anyhow!("libtorch refused it ({e})"))
}

/// The msgpack file of a checkpoint path: the file itself; in an orbax checkpoint directory
/// (`checkpoint_<step>/`), its `checkpoint` file; in a folder of checkpoints, the newest's.
/// An orbax checkpoint stored as tensorstore (OCDBT) is exported to msgpack first, by the
/// pinned Python step `make flax-export`.
pub fn msgpack_file(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_owned());
    }
    if let Some(file) = checkpoint_in(path)? {
        return Ok(file);
    }
    let newest = std::fs::read_dir(path)
        .with_context(|| format!("{}: cannot list", path.display()))?
        .flatten()
        .filter_map(|e| {
            let step = e
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint_")?
                .parse::<u64>()
                .ok()?;
            Some((step, e.path()))
        })
        .max();
    // One level down only: a `checkpoint_<step>` that is itself a folder of checkpoints (or a
    // link back up) is not an orbax layout.
    match newest {
        Some((_, p)) if !p.is_dir() => Ok(p),
        Some((_, p)) => checkpoint_in(&p)?.with_context(|| {
            format!(
                "{}: an orbax checkpoint folder without its `checkpoint` file",
                p.display()
            )
        }),
        None => bail!(
            "{}: a folder with no checkpoint file, no orbax checkpoint and no checkpoint_<step> inside",
            path.display()
        ),
    }
}

/// The `checkpoint` file of an orbax checkpoint folder, None when it has none; OCDBT is named.
fn checkpoint_in(dir: &Path) -> Result<Option<PathBuf>> {
    if dir.join("checkpoint").exists() {
        return Ok(Some(dir.join("checkpoint")));
    }
    if dir.join("manifest.ocdbt").exists() || dir.join("_METADATA").exists() {
        bail!(
            "{}: an orbax checkpoint stored as tensorstore (OCDBT), which only orbax reads: export it with `make flax-export CKPT={}` (pinned jax, flax and orbax in .venv-jax) and import the .msgpack it writes",
            dir.display(),
            dir.display()
        );
    }
    Ok(None)
}

/// Whether a file's first bytes are a msgpack map (a flax state dict).
pub fn looks_like_msgpack(head: &[u8]) -> bool {
    matches!(head.first(), Some(0x80..=0x8f | 0xde | 0xdf))
}

/// The official JAX code's training state (`{step, params, ema_params, opt_state}`, flax
/// msgpack as flax and orbax write it), read from `file` of the checkpoint `source` as given (a
/// zip, a folder or the msgpack file; see [`locate`]) -> our checkpoint at `out`: `params/net` as
/// the model, `ema_params/net` as the EMA, AdamW's `mu` and `nu` as the moments and their `count`
/// as the Adam step. The record names the release as given (a zip's own hash, not that of the
/// file unpacked from it), or the checkpoint file read inside a folder.
pub fn import(
    source: &Path,
    file: &Path,
    state: &Msg,
    preset: Option<&str>,
    out: &Path,
) -> Result<super::Summary> {
    let file = if source.is_dir() { file } else { source };
    let name = file.display().to_string();
    let net = |key: &str| -> Result<Option<Vec<(String, Tensor)>>> {
        state
            .get(key)
            .and_then(|p| p.get("net"))
            .map(|n| to_state_dict(&n.tensors()).with_context(|| format!("{name} [{key}/net]")))
            .transpose()
    };
    let copy = |v: &[(String, Tensor)]| {
        v.iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect::<Vec<_>>()
    };
    let (model, model_from, ema, ema_from) = match (net("params")?, net("ema_params")?) {
        (Some(m), Some(e)) => (m, "params/net", e, "ema_params/net"),
        (Some(m), None) => (copy(&m), "params/net", m, "params/net (no ema_params)"),
        (None, Some(e)) => (copy(&e), "ema_params/net (no params)", e, "ema_params/net"),
        (None, None) => bail!(
            "{name}: a msgpack file without params/net or ema_params/net: not the official MeanFlow code's training state"
        ),
    };
    // optax.adamw's state: (ScaleByAdamState(count, mu, nu), EmptyState, EmptyState).
    let adam = state.get("opt_state").and_then(|o| o.get("0"));
    let moments = adam.and_then(|a| {
        let m = to_state_dict(&a.get("mu")?.get("net")?.tensors()).ok()?;
        let v = to_state_dict(&a.get("nu")?.get("net")?.tensors()).ok()?;
        let v: std::collections::BTreeMap<String, Tensor> = v.into_iter().collect();
        m.into_iter()
            .map(|(k, m)| Some((k.clone(), m, v.get(&k)?.shallow_clone())))
            .collect::<Option<Vec<_>>>()
    });
    let adam_step = adam.and_then(|a| a.get("count")?.as_int()).unwrap_or(0);
    let steps = state
        .get("step")
        .and_then(Msg::as_int)
        .unwrap_or(adam_step)
        .max(0) as u64;
    let (moments, optimizer) = match moments {
        Some(m) => {
            let what = format!(
                "AdamW moments of {} parameters at step {adam_step}",
                m.len()
            );
            (m, what)
        }
        None => (
            Vec::new(),
            "no optax AdamW state: the checkpoint samples but cannot resume".to_owned(),
        ),
    };
    super::sit::write(super::sit::Imported {
        file,
        kind: "official JAX (flax) checkpoint",
        model: super::sit::Weights {
            tensors: model,
            from: model_from,
        },
        ema: super::sit::Weights {
            tensors: ema,
            from: ema_from,
        },
        moments,
        optimizer,
        adam_step,
        steps,
        preset,
        out,
    })
}

/// A flax checkpoint as released, ready to read: the msgpack file, and the folder a zip was
/// unpacked into (removed when this is dropped).
pub struct Located {
    pub file: PathBuf,
    unpacked: Option<PathBuf>,
}

impl Drop for Located {
    fn drop(&mut self) {
        if let Some(dir) = &self.unpacked {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Where the checkpoint is in `path`: a msgpack file, a checkpoint folder (`checkpoint_<step>/`),
/// a folder of them (the official `restore_checkpoint` is given that folder), or a zip of any of
/// these (as MeanFlow's and improved MeanFlow's releases are), unpacked beside `out` into a
/// folder removed when the [`Located`] is dropped.
pub fn locate(path: &Path, out: &Path) -> Result<Located> {
    if path.is_dir() {
        return Ok(Located {
            file: msgpack_file(&single_folder(path))?,
            unpacked: None,
        });
    }
    let mut head = [0u8; 4];
    let n = crate::readfile::open(path)?
        .read(&mut head)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    if &head[..n] != b"PK\x03\x04" {
        return Ok(Located {
            file: path.to_owned(),
            unpacked: None,
        });
    }
    let dir = out.with_extension("unzipped.tmp");
    let _ = std::fs::remove_dir_all(&dir);
    // Made now, so that whatever fails below leaves nothing behind.
    let mut located = Located {
        file: PathBuf::new(),
        unpacked: Some(dir.clone()),
    };
    let files = unzip(path, &dir)?;
    if files.iter().any(|f| f.ends_with("manifest.ocdbt")) {
        bail!(
            "{}: the zip holds an orbax checkpoint stored as tensorstore (OCDBT), which only orbax reads: unpack it (`unzip {} -d DIR`), export it with `make flax-export CKPT=DIR/checkpoint_<step>` and import the .msgpack that writes",
            path.display(),
            path.display()
        );
    }
    located.file = match files.as_slice() {
        // A zip of the msgpack file alone, whatever its name.
        [only] => only.clone(),
        _ => msgpack_file(&single_folder(&dir))?,
    };
    Ok(located)
}

/// The folder itself, or the one folder it holds and nothing else (a zip of a folder), repeated.
fn single_folder(dir: &Path) -> PathBuf {
    let mut dir = dir.to_owned();
    loop {
        let entries: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(e) => e.flatten().map(|e| e.path()).collect(),
            Err(_) => return dir,
        };
        match entries.as_slice() {
            [only] if only.is_dir() && !is_checkpoint_folder(only) => dir = only.clone(),
            _ => return dir,
        }
    }
}

/// `checkpoint_<step>`: a checkpoint, not a folder holding one.
pub fn is_checkpoint_folder(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str()?.strip_prefix("checkpoint_")?.parse::<u64>().ok())
        .is_some()
}

/// Unpacks a zip into `dir`: regular files only, at paths inside `dir` (no absolute or `..`
/// names), within the sizes the archive declares. Returns the files' paths.
fn unzip(path: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .with_context(|| format!("{}: not a readable zip archive", path.display()))?;
    // Float arrays barely compress: a member declaring far more than the archive holds is
    // refused before anything is written.
    let budget = std::fs::metadata(path)?.len().saturating_mul(4) + (1 << 20);
    let mut declared_total = 0u64;
    for i in 0..archive.len() {
        declared_total = declared_total.saturating_add(archive.by_index_raw(i)?.size());
    }
    if declared_total > budget {
        bail!(
            "{}: the zip declares {declared_total} bytes unpacked, more than 4 times its own size: not a checkpoint archive",
            path.display()
        );
    }
    let mut files = Vec::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i)?;
        let Some(rel) = entry.enclosed_name().map(Path::to_owned) else {
            bail!(
                "{}: the zip member `{}` points outside the folder it unpacks to",
                path.display(),
                entry.name()
            );
        };
        let target = dir.join(rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&target)?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut sink = std::fs::File::create(&target)
            .with_context(|| format!("{}: cannot create", target.display()))?;
        let declared = entry.size();
        let copied = std::io::copy(&mut (&mut entry).take(declared), &mut sink)
            .with_context(|| format!("{}: cannot unpack `{}`", path.display(), entry.name()))?;
        if copied != declared {
            bail!(
                "{}: the zip member `{}` is truncated ({copied} of {declared} bytes)",
                path.display(),
                entry.name()
            );
        }
        files.push(target);
    }
    Ok(files)
}
