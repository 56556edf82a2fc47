//! The .npy format (version 1-3): a header naming dtype, order and shape, then raw data. Reads
//! little-endian float16/32/64 in C order, which is what numpy writes for the REPA latents.
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;

/// A float array as read: its shape and values widened to f32.
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

pub fn read(path: &Path) -> Result<NpyArray> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("{}: cannot read", path.display()))?;
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

/// The header's dict: `{'descr': ..., 'fortran_order': ..., 'shape': (...), }`.
fn parse_dict(text: &[u8]) -> Result<Header> {
    let header = std::str::from_utf8(text).context("the .npy header is not text")?;
    let descr = field(header, "descr").context("header has no descr")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"').to_owned();
    if field(header, "fortran_order").is_some_and(|v| v.starts_with("True")) {
        bail!("Fortran-ordered arrays are not supported");
    }
    let shape_text = field(header, "shape").context("header has no shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.find(')').map(|end| &s[..end]))
        .context("malformed shape")?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().context("malformed shape"))
        .collect::<Result<_>>()?;
    Ok(Header {
        descr,
        shape,
        data_offset: 0,
    })
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

/// The text after `'key':` in a numpy header dict, up to the next top-level comma.
fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    Some(rest.trim())
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
