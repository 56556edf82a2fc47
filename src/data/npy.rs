//! The .npy format (version 1-3): a header naming dtype, order and shape, then raw data. Reads
//! little-endian float16/32/64 in C order, which is what numpy writes for the REPA latents.
//!
//! The header is read here rather than by npyz or ndarray-npy: both allocate whatever length
//! the preamble declares (up to 4 GiB), and both read the header dict into a map, so a key
//! given twice is taken once without a word (npyz also ignores unknown keys, which numpy
//! refuses). Here the length is bounded before anything is allocated and the dict is parsed
//! strictly: exactly numpy's three keys, each once.
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;

/// A float array as read: its shape and values widened to f32.
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The largest .npy file [`read`] takes whole (a latent is a few KB; a 512 x 512 one 256 KB).
const MAX_FILE: u64 = 1 << 30;

pub fn read(path: &Path) -> Result<NpyArray> {
    let bytes = crate::readfile::read(path, MAX_FILE)?;
    parse(&bytes).with_context(|| format!("{}: not a readable .npy array", path.display()))
}

/// What an .npy header says: the dtype (e.g. `<f4`, `|u1`), the shape, and where data starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub descr: String,
    pub shape: Vec<usize>,
    pub data_offset: usize,
}

impl Header {
    /// The number of elements, or an error when the shape's product overflows.
    pub fn count(&self) -> Result<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .with_context(|| {
                format!(
                    "shape {:?} has more elements than can be counted",
                    self.shape
                )
            })
    }
}

/// A header longer than this is not one numpy writes (it pads to 64 bytes; a few KB at most).
const MAX_HEADER: usize = 1 << 16;

/// Reads an .npy header from the start of `reader`, leaving it at the first data byte. Every
/// length is checked before anything is allocated for it.
pub fn read_header(mut reader: impl Read) -> Result<Header> {
    let mut preamble = [0u8; 10];
    reader
        .read_exact(&mut preamble)
        .context("truncated: no .npy preamble")?;
    if &preamble[..6] != b"\x93NUMPY" {
        bail!("missing the .npy magic");
    }
    let (start, len) = match preamble[6] {
        1 => (10, u16::from_le_bytes([preamble[8], preamble[9]]) as usize),
        2 | 3 => {
            let mut rest = [0u8; 2];
            reader
                .read_exact(&mut rest)
                .context("truncated .npy preamble")?;
            let len = u32::from_le_bytes([preamble[8], preamble[9], rest[0], rest[1]]);
            (12, len as usize)
        }
        v => bail!("unsupported .npy version {v}"),
    };
    if !(2..=MAX_HEADER).contains(&len) {
        bail!("an .npy header of {len} bytes is not one numpy writes");
    }
    let mut text = vec![0u8; len];
    reader
        .read_exact(&mut text)
        .context("truncated .npy header")?;
    let mut header = parse_dict(&text)?;
    header.data_offset = start + len;
    Ok(header)
}

/// The header of a whole .npy file's bytes.
pub fn parse_header(bytes: &[u8]) -> Result<Header> {
    read_header(bytes)
}

/// The header's dict, `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }` padded
/// with spaces: a Python literal as numpy writes it (either quote, a trailing comma, Python
/// 2's `3L`), with exactly the keys numpy requires, each once.
fn parse_dict(text: &[u8]) -> Result<Header> {
    let text = std::str::from_utf8(text).context("the .npy header is not text")?;
    let mut p = Literal { rest: text };
    p.expect('{')?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    while !p.eat('}') {
        let key = p.string()?;
        p.expect(':')?;
        let first = match key.as_str() {
            "descr" => descr.replace(p.string()?).is_none(),
            "fortran_order" => fortran.replace(p.boolean()?).is_none(),
            "shape" => shape.replace(p.tuple()?).is_none(),
            other => {
                bail!("header key {other:?} is not one of numpy's (descr, fortran_order, shape)")
            }
        };
        if !first {
            bail!("the header gives `{key}` twice, which numpy would read as its last");
        }
        if !p.eat(',') {
            p.expect('}')?;
            break;
        }
    }
    if !p.rest.trim().is_empty() {
        bail!("text after the header's dict");
    }
    if fortran.context("header has no fortran_order")? {
        bail!("Fortran-ordered arrays are not supported");
    }
    Ok(Header {
        descr: descr.context("header has no descr")?,
        shape: shape.context("header has no shape")?,
        data_offset: 0,
    })
}

/// A cursor over the header's Python literal.
struct Literal<'a> {
    rest: &'a str,
}

impl Literal<'_> {
    /// What comes next, for messages: a few characters, never the whole header.
    fn next(&self) -> String {
        self.rest.chars().take(16).collect()
    }

    /// Takes `c` (after any whitespace) if it comes next.
    fn eat(&mut self, c: char) -> bool {
        self.rest = self.rest.trim_start();
        match self.rest.strip_prefix(c) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    fn expect(&mut self, c: char) -> Result<()> {
        if !self.eat(c) {
            bail!("malformed header: `{c}` expected before {:?}", self.next());
        }
        Ok(())
    }

    /// A quoted string without escapes (dtype names have none).
    fn string(&mut self) -> Result<String> {
        self.rest = self.rest.trim_start();
        let quote = self
            .rest
            .chars()
            .next()
            .filter(|q| matches!(q, '\'' | '"'))
            .with_context(|| format!("malformed header: a string expected at {:?}", self.next()))?;
        let body = &self.rest[1..];
        let end = body
            .find([quote, '\\'])
            .filter(|&i| body[i..].starts_with(quote))
            .context("malformed header: an unterminated or escaped string")?;
        self.rest = &body[end + 1..];
        Ok(body[..end].to_owned())
    }

    fn boolean(&mut self) -> Result<bool> {
        self.rest = self.rest.trim_start();
        for (word, value) in [("True", true), ("False", false)] {
            if let Some(rest) = self.rest.strip_prefix(word) {
                self.rest = rest;
                return Ok(value);
            }
        }
        bail!("malformed header: fortran_order is neither True nor False")
    }

    /// A tuple of dimensions: `()`, `(5,)`, `(2, 3)`.
    fn tuple(&mut self) -> Result<Vec<usize>> {
        self.expect('(')?;
        let mut dims = Vec::new();
        loop {
            if self.eat(')') {
                break;
            }
            self.rest = self.rest.trim_start();
            let digits = self.rest.len()
                - self
                    .rest
                    .trim_start_matches(|c: char| c.is_ascii_digit())
                    .len();
            let dim = self.rest[..digits]
                .parse::<usize>()
                .map_err(|_| anyhow::anyhow!("malformed shape at {:?}", self.next()))?;
            self.rest = self.rest[digits..]
                .strip_prefix('L')
                .unwrap_or(&self.rest[digits..]);
            dims.push(dim);
            if !self.eat(',') {
                self.expect(')')?;
                if dims.len() == 1 {
                    bail!("malformed shape: `({dim})` is a number, not a tuple");
                }
                break;
            }
        }
        Ok(dims)
    }
}

/// The bytes of one value of a little-endian float dtype.
pub fn float_width(descr: &str) -> Result<usize> {
    Ok(match descr {
        "<f2" => 2,
        "<f4" => 4,
        "<f8" => 8,
        other => bail!("dtype {other} is not a little-endian float"),
    })
}

/// Little-endian floats of any width, widened to f64.
pub fn floats(descr: &str, body: &[u8], count: usize) -> Result<Vec<f64>> {
    let width = float_width(descr)?;
    if count.checked_mul(width).is_none_or(|n| body.len() < n) {
        bail!(
            "truncated data: {} bytes for {count} values of {width} bytes",
            body.len()
        );
    }
    Ok(body[..count * width]
        .chunks_exact(width)
        .map(|c| match width {
            2 => half::f16::from_le_bytes([c[0], c[1]]).to_f64(),
            4 => f32::from_le_bytes(c.try_into().unwrap()) as f64,
            _ => f64::from_le_bytes(c.try_into().unwrap()),
        })
        .collect())
}

pub fn parse(bytes: &[u8]) -> Result<NpyArray> {
    let header = parse_header(bytes)?;
    let count = header.count()?;
    let data = floats(&header.descr, &bytes[header.data_offset..], count)?
        .into_iter()
        .map(|v| v as f32)
        .collect();
    Ok(NpyArray {
        shape: header.shape,
        data,
    })
}

/// Writes a little-endian float32 C-order array, whole or not at all.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let body: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    crate::files::write_atomic(path, &encode("<f4", shape, &body))
}

/// A version-1 .npy file: the header for `descr` and `shape` (padded to 64 bytes, as numpy
/// writes it), then `body`, C order.
pub fn encode(descr: &str, shape: &[usize], body: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + body.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
    out
}
