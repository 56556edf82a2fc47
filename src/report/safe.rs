//! Strings from files, specs and paths made safe for where a report puts them. Run folder
//! names, experiment names, descriptions, weights paths and every string of a record may be
//! crafted: in Markdown they are escaped so that they stay text (no link, no emphasis, no HTML,
//! no table cell boundary); in HTML the templates escape them (templates.rs); in links they are
//! percent-encoded file names relative to the report, the only kind of link a report makes;
//! images are copied into a report only when they are regular files inside their run.
use crate::files::write_atomic;
use anyhow::{bail, Context, Result};
use serde::{Serialize, Serializer};
use std::io::Read as _;
use std::path::Path;

/// `s` on one line: control characters (newlines, tabs, escapes), Unicode line separators and
/// the bidirectional overrides that make text read backwards become spaces, so that no value
/// can end a table row, a list item or a paragraph, or disguise what follows it.
pub fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| match c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}') {
            true => ' ',
            false => c,
        })
        .collect()
}

/// `s` as Markdown text that renders as itself: the characters that start emphasis, links,
/// images, code, HTML, entities, table cells, strikethrough or (on GitHub) math are
/// backslash-escaped (CommonMark lets any ASCII punctuation be escaped), and so is a leading
/// character that would open a heading, list, quote or setext underline.
pub fn markdown(s: &str) -> String {
    let chars: Vec<char> = one_line(s).chars().collect();
    let mut out = String::with_capacity(chars.len() + 8);
    // "1. " or "1) " at the start opens an ordered list; "- ", "+ ", "# ", "--" or "==" a
    // list, a heading or a setext underline ("-263.91" or "#5" open nothing).
    let digits = chars.iter().take_while(|c| c.is_ascii_digit()).count();
    for (i, &c) in chars.iter().enumerate() {
        let next = chars.get(i + 1).copied();
        let leading = (i == 0
            && matches!(c, '-' | '+' | '=' | '#')
            && next.is_none_or(|n| !n.is_alphanumeric()))
            || (i == digits
                && digits > 0
                && matches!(c, '.' | ')')
                && next.is_none_or(|n| n == ' '));
        if leading
            || matches!(
                c,
                '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '|' | '~' | '&' | '$'
            )
        {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `s` as a Markdown code span where one holds it verbatim (no backtick, no pipe: a pipe ends
/// a table cell even inside code), else as escaped text.
pub fn markdown_code(s: &str) -> String {
    let line = one_line(s);
    match line.is_empty() || line.contains(['`', '|']) {
        true => markdown(&line),
        false => format!("`{line}`"),
    }
}

/// The fence of a Markdown code block around `text`: more backticks than any run inside it, so
/// no line of the text can close the block.
pub fn fence(text: &str) -> String {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    "`".repeat((longest + 1).max(3))
}

/// `s` escaped for HTML text and double-quoted attribute values.
pub fn html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// A link target of a report: a file of the report, by its path relative to the report's
/// folder, each component percent-encoded (a run named `seed%3D1%2Fx` keeps its name on disk and
/// its image still loads). No other kind of link can be made, so no string of a run becomes a
/// `javascript:` link or a path out of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Href(String);

impl Href {
    /// `path` relative to the report: components joined by '/', none empty, "." or "..".
    pub fn file(path: &str) -> Result<Href> {
        let mut out = Vec::new();
        for part in path.split('/') {
            if part.is_empty() || part == "." || part == ".." {
                bail!("{path:?}: not a path inside the report");
            }
            out.push(percent_encode(part));
        }
        Ok(Href(out.join("/")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `s` is a target a report may hold: a relative path of unreserved characters and
    /// percent escapes (what [`Href::file`] makes), or an https URL without quotes, spaces,
    /// angle brackets or control characters.
    pub fn is_safe(s: &str) -> bool {
        let relative = !s.is_empty()
            && !s.starts_with('/')
            && s.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%/".contains(&b));
        let https = s.strip_prefix("https://").is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .chars()
                    .all(|c| c.is_ascii_graphic() && !"\"'<>\\`".contains(c))
        });
        relative || https
    }
}

impl Serialize for Href {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// RFC 3986 percent-encoding of everything but the unreserved characters.
fn percent_encode(part: &str) -> String {
    part.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A run, experiment or data name as one file-name component of a report: letters, digits and
/// `-._~%+@` kept, everything else (`=`, `,`, slashes, spaces, quotes, control characters) an
/// underscore; never hidden or a parent reference; long names cut, with a hash of the whole
/// name so that two of them stay apart.
pub fn file_stem(name: &str) -> String {
    let mut stem: String = name
        .chars()
        .map(|c| match c.is_alphanumeric() || "-._~%+@".contains(c) {
            true => c,
            false => '_',
        })
        .collect();
    if stem.is_empty() || stem.starts_with('.') {
        stem.insert(0, '_');
    }
    const LONGEST: usize = 120;
    if stem.len() > LONGEST {
        let mut cut = LONGEST;
        while !stem.is_char_boundary(cut) {
            cut -= 1;
        }
        let hash = crate::files::hex(&<sha2::Sha256 as sha2::Digest>::digest(name.as_bytes()));
        stem = format!("{}-{}", &stem[..cut], &hash[..12]);
    }
    stem
}

/// The most bytes an image of a run may have to be copied into a report (a grid of 100 images
/// of 256 x 256 is a few MB).
const MAX_IMAGE_BYTES: u64 = 64 << 20;

/// Copies the PNG `from` of the run directory `run` to `to` when it is a regular file inside
/// the run (no symlink, FIFO or device; no path through a symlinked folder out of the run) of
/// at most 64 MiB that starts with PNG's signature. Returns whether it was copied; a file that
/// is absent is passed over silently, one that is refused with a warning naming it.
pub fn copy_run_image(from: &Path, run: &Path, to: &Path) -> Result<bool> {
    let meta = match std::fs::symlink_metadata(from) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            eprintln!("warning: {}: {e}; left out of the report", from.display());
            return Ok(false);
        }
    };
    if let Err(why) = image_inside(from, &meta, run) {
        eprintln!(
            "warning: {}: {why}; left out of the report (a report is made to be shared: it holds only the run's own images)",
            from.display()
        );
        return Ok(false);
    }
    let bytes = read_regular(from)?;
    if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        eprintln!(
            "warning: {}: not a PNG file; left out of the report",
            from.display()
        );
        return Ok(false);
    }
    write_atomic(to, &bytes)
        .with_context(|| format!("{}: cannot copy into the report", from.display()))?;
    Ok(true)
}

/// Why `from` (with its own metadata, links not followed) may not be copied, if it may not.
fn image_inside(from: &Path, meta: &std::fs::Metadata, run: &Path) -> Result<(), String> {
    if meta.file_type().is_symlink() {
        return Err("is a symbolic link".to_owned());
    }
    if !meta.file_type().is_file() {
        return Err("is not a regular file".to_owned());
    }
    if meta.len() > MAX_IMAGE_BYTES {
        return Err(format!(
            "holds {} bytes, more than the {MAX_IMAGE_BYTES} an image of a report may",
            meta.len()
        ));
    }
    let real = std::fs::canonicalize(from).map_err(|e| e.to_string())?;
    let root = std::fs::canonicalize(run).map_err(|e| e.to_string())?;
    if !real.starts_with(&root) {
        return Err(format!(
            "lies outside its run directory (at {})",
            real.display()
        ));
    }
    Ok(())
}

/// The bytes of `path`, opened without following a symlink that replaced it since it was
/// checked, and only if what was opened is a regular file.
fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let file = crate::readfile::open_no_follow(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_IMAGE_BYTES)
        .read_to_end(&mut bytes)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(bytes)
}
