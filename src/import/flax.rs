//! The official JAX code's parameters (flax, Gsunshine/meanflow) under our PyTorch names. A flax
//! path such as `net/blocks/layers_0/attn/qkv/_flax_linear/kernel` maps by rule, not by a table:
//! `net/` and the wrappers' levels (`_flax_linear`, `_flax_embedding`) go, `layers_<i>` is the
//! index `<i>` (flax's Sequential counts the parameter-free SiLU as PyTorch's does), and the
//! leaf says the layout:
//!   - `kernel` of a Dense, (in, out): the transpose, torch's (out, in) `weight`;
//!   - `kernel` of the patch convolution, HWIO (p, p, C, D): permuted to OIHW (D, C, p, p);
//!   - `embedding` of the class table, (K + 1, D): `weight`, unchanged; `bias`: unchanged.
use anyhow::{bail, Context, Result};
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

/// Nesting a checkpoint never needs more of.
const MAX_DEPTH: usize = 64;

/// A bounded msgpack reader: every length is checked against the bytes left before anything is
/// allocated for it, so a crafted file cannot ask for more memory than it holds.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Reader<'a> {
    fn fail(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "{}: not a flax msgpack checkpoint: {what} at byte {}",
            self.file,
            self.pos
        )
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.data.len() - self.pos < n {
            return Err(self.fail(&format!("{n} bytes asked for past the end")));
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn be(&mut self, n: usize) -> Result<u64> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |v, &b| v << 8 | u64::from(b)))
    }

    /// A count of items, each at least one byte: never more than the bytes left.
    fn count(&mut self, n: u64) -> Result<usize> {
        if n > (self.data.len() - self.pos) as u64 {
            return Err(self.fail(&format!("a container of {n} items in fewer bytes")));
        }
        Ok(n as usize)
    }

    fn text(&mut self, n: usize) -> Result<String> {
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.fail("a string that is not UTF-8"))
    }

    fn value(&mut self, depth: usize) -> Result<Msg> {
        if depth > MAX_DEPTH {
            return Err(self.fail("nesting deeper than a checkpoint's"));
        }
        let b = self.take(1)?[0];
        Ok(match b {
            0x00..=0x7f => Msg::Int(i64::from(b)),
            0xe0..=0xff => Msg::Int(i64::from(b as i8)),
            0xc0 => Msg::Nil,
            0xc2 => Msg::Bool(false),
            0xc3 => Msg::Bool(true),
            0xcc..=0xcf => {
                let v = self.be(1 << (b - 0xcc))?;
                Msg::Int(i64::try_from(v).map_err(|_| self.fail("an integer beyond i64"))?)
            }
            0xd0..=0xd3 => {
                let width = 1usize << (b - 0xd0);
                let v = self.be(width)?;
                let shift = 64 - 8 * width as u32;
                Msg::Int(((v << shift) as i64) >> shift)
            }
            0xca => Msg::Float(f64::from(f32::from_bits(self.be(4)? as u32))),
            0xcb => Msg::Float(f64::from_bits(self.be(8)?)),
            0xa0..=0xbf => Msg::Str(self.text(usize::from(b & 0x1f))?),
            0xd9..=0xdb => {
                let n = self.be(1 << (b - 0xd9))? as usize;
                Msg::Str(self.text(n)?)
            }
            0xc4..=0xc6 => {
                let n = self.be(1 << (b - 0xc4))? as usize;
                Msg::Bin(self.take(n)?.to_vec())
            }
            0x90..=0x9f | 0xdc | 0xdd => {
                let n = match b {
                    0xdc => self.be(2)?,
                    0xdd => self.be(4)?,
                    _ => u64::from(b & 0x0f),
                };
                let n = self.count(n)?;
                Msg::Array(
                    (0..n)
                        .map(|_| self.value(depth + 1))
                        .collect::<Result<_>>()?,
                )
            }
            0x80..=0x8f | 0xde | 0xdf => {
                let n = match b {
                    0xde => self.be(2)?,
                    0xdf => self.be(4)?,
                    _ => u64::from(b & 0x0f),
                };
                let n = self.count(n)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let key = match self.value(depth + 1)? {
                        Msg::Str(k) => k,
                        Msg::Int(i) => i.to_string(),
                        _ => return Err(self.fail("a map key that is not a string")),
                    };
                    items.push((key, self.value(depth + 1)?));
                }
                chunked(Msg::Map(items)).map_err(|e| self.fail(&e.to_string()))?
            }
            0xd4..=0xd8 | 0xc7..=0xc9 => {
                let n = match b {
                    0xc7..=0xc9 => self.be(1 << (b - 0xc7))? as usize,
                    _ => 1usize << (b - 0xd4),
                };
                let code = self.take(1)?[0] as i8;
                let payload = self.take(n)?;
                self.ext(code, payload, depth)?
            }
            other => return Err(self.fail(&format!("byte 0x{other:02x} begins no msgpack value"))),
        })
    }

    /// Ext 1 (an ndarray) and 3 (a numpy scalar): msgpack of (shape, dtype name, C-order bytes).
    fn ext(&self, code: i8, payload: &[u8], depth: usize) -> Result<Msg> {
        if code != 1 && code != 3 {
            return Err(self.fail(&format!("msgpack extension {code} (not an array)")));
        }
        let mut inner = Reader {
            data: payload,
            pos: 0,
            file: self.file,
        };
        let Msg::Array(parts) = inner.value(depth + 1)? else {
            return Err(self.fail("an array extension without (shape, dtype, bytes)"));
        };
        let [Msg::Array(shape), Msg::Str(dtype), Msg::Bin(bytes)] = &parts[..] else {
            return Err(self.fail("an array extension without (shape, dtype, bytes)"));
        };
        let shape: Vec<i64> = shape
            .iter()
            .map(|d| match d {
                Msg::Int(d) if *d >= 0 => Ok(*d),
                _ => Err(self.fail("a negative or non-integer array dimension")),
            })
            .collect::<Result<_>>()?;
        let kind = match dtype.as_str() {
            "float32" => Kind::Float,
            "float64" => Kind::Double,
            "float16" => Kind::Half,
            "bfloat16" => Kind::BFloat16,
            "int32" => Kind::Int,
            "int64" => Kind::Int64,
            "uint8" => Kind::Uint8,
            "bool" => Kind::Bool,
            other => return Err(self.fail(&format!("array dtype `{other}`"))),
        };
        let count = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d as usize))
            .and_then(|n| n.checked_mul(kind.elt_size_in_bytes()));
        if count != Some(bytes.len()) {
            return Err(self.fail(&format!(
                "an array of shape {shape:?} x {dtype} with {} bytes",
                bytes.len()
            )));
        }
        Tensor::f_from_data_size(bytes, &shape, kind)
            .map(Msg::Tensor)
            .map_err(|e| self.fail(&e.to_string()))
    }
}

/// flax's encoding of arrays over 1 GiB, `{__msgpack_chunked_array__: true, shape, chunks}`,
/// put back together; other maps as they are.
fn chunked(map: Msg) -> Result<Msg> {
    if !matches!(map.get("__msgpack_chunked_array__"), Some(Msg::Bool(true))) {
        return Ok(map);
    }
    let dims = |v: Option<&Msg>| -> Result<Vec<i64>> {
        match v {
            Some(Msg::Map(items)) => items
                .iter()
                .map(|(_, d)| {
                    d.as_int()
                        .filter(|d| *d >= 0)
                        .ok_or_else(|| anyhow::anyhow!("a bad chunked shape"))
                })
                .collect(),
            _ => bail!("a chunked array without its shape"),
        }
    };
    let shape = dims(map.get("shape"))?;
    let Some(Msg::Map(chunks)) = map.get("chunks") else {
        bail!("a chunked array without its chunks");
    };
    let parts: Vec<Tensor> = chunks
        .iter()
        .map(|(_, c)| match c {
            Msg::Tensor(t) => Ok(t.reshape([-1])),
            _ => bail!("a chunk that is not an array"),
        })
        .collect::<Result<_>>()?;
    let whole = Tensor::f_cat(&parts, 0)?;
    Ok(Msg::Tensor(whole.f_reshape(shape.as_slice())?))
}

/// Reads a flax msgpack file.
pub fn read_msgpack(path: &std::path::Path) -> Result<Msg> {
    use anyhow::Context;
    let file = path.display().to_string();
    let data = std::fs::read(path).with_context(|| format!("{file}: cannot read"))?;
    let mut reader = Reader {
        data: &data,
        pos: 0,
        file: &file,
    };
    let value = reader.value(0)?;
    if reader.pos != data.len() {
        return Err(reader.fail("bytes after the checkpoint's end"));
    }
    Ok(value)
}

/// The msgpack file of a checkpoint path: the file itself; in an orbax checkpoint directory
/// (`checkpoint_<step>/`), its `checkpoint` file; in a folder of checkpoints, the newest's.
/// An orbax checkpoint stored as tensorstore (OCDBT) is exported to msgpack first, by the
/// pinned Python step `make flax-export`.
pub fn msgpack_file(path: &std::path::Path) -> Result<std::path::PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_owned());
    }
    if path.join("checkpoint").is_file() {
        return Ok(path.join("checkpoint"));
    }
    if path.join("manifest.ocdbt").exists() || path.join("_METADATA").exists() {
        bail!(
            "{}: an orbax checkpoint stored as tensorstore (OCDBT), which only orbax reads: export it with `make flax-export CKPT={}` (pinned jax, flax and orbax in .venv-jax) and import the .msgpack it writes",
            path.display(),
            path.display()
        );
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
    match newest {
        Some((_, p)) => msgpack_file(&p),
        None => bail!(
            "{}: a folder with no checkpoint file, no orbax checkpoint and no checkpoint_<step> inside",
            path.display()
        ),
    }
}

/// Whether a file's first bytes are a msgpack map (a flax state dict).
pub fn looks_like_msgpack(head: &[u8]) -> bool {
    matches!(head.first(), Some(0x80..=0x8f | 0xde | 0xdf))
}

/// The official JAX code's training state (`{step, params, ema_params, opt_state}`, flax
/// msgpack as flax and orbax write it) -> our checkpoint at `out`: `params/net` as the model,
/// `ema_params/net` as the EMA, AdamW's `mu` and `nu` as the moments and their `count` as the
/// Adam step.
pub fn import(
    path: &std::path::Path,
    preset: Option<&str>,
    out: &std::path::Path,
) -> Result<super::Summary> {
    let file = msgpack_file(path)?;
    let state = read_msgpack(&file)?;
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
        file: &file,
        kind: "official JAX (flax) checkpoint",
        model: (model, model_from),
        ema: (ema, ema_from),
        moments,
        optimizer,
        adam_step,
        steps,
        preset,
        out,
    })
}
