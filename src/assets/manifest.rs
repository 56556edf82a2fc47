//! The manifest as data: `assets/manifest.toml`, compiled in, plus the file named by
//! $MFR_MANIFEST (a site's mirror list, a test's stand-ins). Both are read with the same schema
//! (unknown keys refused) and every entry is checked before any traffic: names and cache file
//! names are one safe path component, URLs are http(s) with a host, a size or a cap bounds every
//! download, and each entry says what its hash is (or that the first download records it).
use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// The manifest shipped with the binary.
const SHIPPED: &str = include_str!("../../assets/manifest.toml");
const SHIPPED_NAME: &str = "the built-in manifest (assets/manifest.toml)";

/// Google Drive's direct-download link; `{id}` is the file's id.
const DRIVE_DIRECT: &str = "https://drive.google.com/uc?export=download&id=";

/// The largest size or cap an entry may state (the largest public file, an iMF-XL/2 training
/// state, is ~10.5 GB).
pub const MAX_SIZE: u64 = 64 << 30;

/// The most of a $MFR_MANIFEST file that is read (the shipped one is ~15 KB).
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Suffixes of the files the fetcher keeps beside an asset: no asset's own name may end so.
pub(super) const RESERVED_SUFFIXES: [&str; 5] =
    [".part", ".lock", ".sha256", ".rejected", ".recorded-sha256"];

/// What a download is checked against.
#[derive(Debug, Clone, PartialEq)]
pub enum Pin {
    Sha256(String),
    /// The first hex digits of the sha256 (torch.hub's file-name convention).
    Sha256Prefix(String),
    /// No published hash: the first download's sha256 is recorded beside it in the cache, and
    /// every later download must match the record.
    Record,
}

/// How the file is served: what the fetcher must do beyond a GET.
#[derive(Debug, Clone, PartialEq)]
pub enum Served {
    Http,
    /// Hugging Face's `/resolve/<revision>/` URLs (a redirect to its CDN).
    HuggingFace,
    /// Google Drive: an HTML interstitial (the virus-scan warning's form, or the older cookie
    /// token) may stand before the file.
    GoogleDrive {
        id: String,
    },
}

/// What the first bytes of the file must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// A zip archive (flax checkpoint directories as released).
    Zip,
    /// numpy's .npz (a zip archive).
    Npz,
    /// torch.save: a zip archive, or a legacy pickle.
    Torch,
    Safetensors,
    Any,
}

impl Format {
    /// The format as a message names it.
    pub fn name(self) -> &'static str {
        match self {
            Format::Zip => "zip",
            Format::Npz => "numpy .npz",
            Format::Torch => "torch.save",
            Format::Safetensors => "safetensors",
            Format::Any => "any",
        }
    }
}

/// How large the file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// Exactly this many bytes.
    Exact(u64),
    /// Unknown, but never more than this many.
    AtMost(u64),
}

impl Size {
    /// The most bytes a download of the asset may hold.
    pub fn limit(self) -> u64 {
        match self {
            Size::Exact(n) | Size::AtMost(n) => n,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Asset {
    pub name: String,
    pub served: Served,
    /// Where it is fetched from (for Google Drive, its direct link unless the entry gives one).
    pub url: String,
    /// File name in the cache (and under a mirror base URL).
    pub file: String,
    pub size: Size,
    pub pin: Pin,
    pub format: Format,
    pub licence: String,
    pub used_by: String,
    /// What the file is.
    pub purpose: String,
    /// The page its url, id, size and hash were read from.
    pub source: String,
    pub note: String,
}

impl Asset {
    /// Where a person can download it by hand (a Drive file's page, else its URL).
    pub fn page(&self) -> String {
        match &self.served {
            Served::GoogleDrive { id } => format!("https://drive.google.com/file/d/{id}/view"),
            _ => self.url.clone(),
        }
    }
}

impl Pin {
    /// The pin as a report shows it.
    pub fn describe(&self) -> String {
        match self {
            Pin::Sha256(h) => format!("sha256 {}", &h[..16.min(h.len())]),
            Pin::Sha256Prefix(p) => format!("sha256 {p}..."),
            Pin::Record => "sha256 recorded on first download".to_owned(),
        }
    }
}

/// Every asset the harness knows, in manifest order.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub assets: Vec<Asset>,
}

/// One `[[asset]]` as written; every key optional here so that an override may give only
/// what it changes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: Option<String>,
    served: Option<ServedKey>,
    url: Option<String>,
    drive_id: Option<String>,
    file: Option<String>,
    size: Option<u64>,
    max_size: Option<u64>,
    sha256: Option<String>,
    sha256_prefix: Option<String>,
    format: Option<Format>,
    licence: Option<String>,
    used_by: Option<String>,
    purpose: Option<String>,
    source: Option<String>,
    note: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ServedKey {
    Http,
    HuggingFace,
    GoogleDrive,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    #[serde(default)]
    asset: Vec<Entry>,
}

impl Manifest {
    /// The shipped manifest.
    pub fn shipped() -> Result<Manifest> {
        Manifest::merged(SHIPPED, SHIPPED_NAME, None)
    }

    /// The shipped manifest with the file named by $MFR_MANIFEST over it, when that is set.
    pub fn load() -> Result<Manifest> {
        match std::env::var_os("MFR_MANIFEST").filter(|v| !v.is_empty()) {
            Some(path) => Manifest::with_overrides(Path::new(&path)),
            None => Manifest::shipped(),
        }
    }

    /// The shipped manifest with the entries of `path` added, or replacing the keys they give
    /// of the shipped entry of the same name.
    pub fn with_overrides(path: &Path) -> Result<Manifest> {
        let origin = format!("MFR_MANIFEST file {}", path.display());
        let text = read_bounded(path).map_err(|e| {
            anyhow!("{origin}: {e}: fix $MFR_MANIFEST, or unset it to use the built-in manifest")
        })?;
        Manifest::merged(SHIPPED, SHIPPED_NAME, Some((&text, &origin)))
    }

    fn merged(base: &str, base_origin: &str, extra: Option<(&str, &str)>) -> Result<Manifest> {
        let mut entries = parse(base, base_origin)?;
        let mut origins = vec![base_origin; entries.len()];
        if let Some((text, origin)) = extra {
            for over in parse(text, origin)? {
                let name = over.name.clone().unwrap_or_default();
                match entries
                    .iter()
                    .position(|e| e.name.as_deref() == Some(&name))
                {
                    Some(i) => {
                        entries[i] = overlay(entries[i].clone(), over);
                        origins[i] = origin;
                    }
                    None => {
                        entries.push(over);
                        origins.push(origin);
                    }
                }
            }
        }
        let assets = entries
            .into_iter()
            .zip(&origins)
            .map(|(e, origin)| checked(e, origin))
            .collect::<Result<Vec<_>>>()?;
        let mut files = BTreeMap::new();
        for (a, origin) in assets.iter().zip(&origins) {
            if let Some(other) = files.insert(a.file.as_str(), a.name.as_str()) {
                bail!(
                    "{origin}: assets `{other}` and `{}` both use the cache file `{}`: give one of them another `file`",
                    a.name,
                    a.file
                );
            }
        }
        Ok(Manifest { assets })
    }

    /// Parses and checks one manifest text on its own (what the tests of a manifest call).
    pub fn parse(text: &str, origin: &str) -> Result<Manifest> {
        let assets = parse(text, origin)?
            .into_iter()
            .map(|e| checked(e, origin))
            .collect::<Result<Vec<_>>>()?;
        Ok(Manifest { assets })
    }

    pub fn find(&self, name: &str) -> Result<&Asset> {
        self.assets.iter().find(|a| a.name == name).ok_or_else(|| {
            anyhow!(
                "unknown asset `{name}`: `mfr fetch` lists them ({})",
                self.assets
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }
}

/// A regular file's text, at most MAX_MANIFEST_BYTES of it; a FIFO or device is refused
/// before it is opened (reading one would hang or never end).
fn read_bounded(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read it ({e})"))?;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(format!(
            "{} bytes, more than a manifest's {MAX_MANIFEST_BYTES}",
            meta.len()
        ));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_MANIFEST_BYTES).read_to_string(&mut text))
        .map_err(|e| format!("cannot read it as UTF-8 text ({e})"))?;
    Ok(text)
}

/// The entries of one TOML text, with every name given once.
fn parse(text: &str, origin: &str) -> Result<Vec<Entry>> {
    let file: ManifestFile = serde_path_to_error::deserialize(toml::Deserializer::new(text))
        .map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let at = inner.span().map_or_else(String::new, |s| {
                let before = &text[..s.start.min(text.len())];
                format!(" line {}", before.matches('\n').count() + 1)
            });
            let message = inner.message().trim().replace('\n', "; ");
            let key = match key.as_str() {
                "." | "" => "invalid TOML".to_owned(),
                key => format!("`{key}`"),
            };
            anyhow!("{origin}:{at}: {key}: {message}: fix it (the keys are listed at the top of assets/manifest.toml)")
        })?;
    let mut seen = BTreeMap::new();
    for (i, entry) in file.asset.iter().enumerate() {
        let Some(name) = &entry.name else {
            bail!("{origin}: [[asset]] number {}: missing key `name`", i + 1);
        };
        if seen.insert(name.clone(), i).is_some() {
            bail!("{origin}: asset `{name}` is listed twice: keep one entry per name");
        }
    }
    Ok(file.asset)
}

/// `over`'s keys on top of `base`. A pin, a size or a way of serving replaces the whole group
/// it belongs to (a new url keeps the pin: a mirror cannot change what the file must be).
fn overlay(mut base: Entry, over: Entry) -> Entry {
    if over.served.is_some() {
        (base.url, base.drive_id) = (None, None);
    }
    if over.sha256.is_some() || over.sha256_prefix.is_some() {
        (base.sha256, base.sha256_prefix) = (None, None);
    }
    if over.size.is_some() || over.max_size.is_some() {
        (base.size, base.max_size) = (None, None);
    }
    macro_rules! take {
        ($($field:ident),*) => { $( if over.$field.is_some() { base.$field = over.$field; } )* };
    }
    take!(
        served,
        url,
        drive_id,
        file,
        size,
        max_size,
        sha256,
        sha256_prefix,
        format,
        licence,
        used_by,
        purpose,
        source,
        note
    );
    base
}

/// A key that is wrong, and why.
type KeyError = (&'static str, String);

/// One entry as an Asset, or the sentence saying which key is wrong and why.
fn checked(e: Entry, origin: &str) -> Result<Asset> {
    let name = e.name.clone().unwrap_or_default();
    to_asset(e).map_err(|(key, why)| anyhow!("{origin}: asset `{name}`: `{key}` {why}"))
}

fn to_asset(e: Entry) -> Result<Asset, KeyError> {
    let name = e.name.unwrap_or_default();
    component(&name).map_err(|why| ("name", why))?;
    let file = need("file", e.file)?;
    component(&file).map_err(|why| ("file", why))?;
    if let Some(suffix) = RESERVED_SUFFIXES.iter().find(|s| file.ends_with(*s)) {
        let why = format!("ends with `{suffix}`, which the fetcher's own files use");
        return Err(("file", why));
    }
    let served = served_of(e.served, e.drive_id)?;
    let url = match (&served, e.url) {
        (_, Some(url)) => url,
        (Served::GoogleDrive { id }, None) => format!("{DRIVE_DIRECT}{id}"),
        (_, None) => return Err(("url", "is missing".to_owned())),
    };
    check_url(&url).map_err(|why| ("url", why))?;
    Ok(Asset {
        size: size_of(e.size, e.max_size)?,
        pin: pin_of(e.sha256, e.sha256_prefix)?,
        format: e.format.ok_or(("format", "is missing".to_owned()))?,
        licence: line("licence", e.licence)?,
        used_by: line("used_by", e.used_by)?,
        purpose: line("purpose", e.purpose)?,
        source: line("source", e.source)?,
        note: e
            .note
            .map_or(Ok(String::new()), |n| line("note", Some(n)))?,
        name,
        served,
        url,
        file,
    })
}

fn need(key: &'static str, value: Option<String>) -> Result<String, KeyError> {
    value.ok_or((key, "is missing".to_owned()))
}

/// Text that is printed to a terminal: one line, no control characters (no escape sequences).
fn line(key: &'static str, value: Option<String>) -> Result<String, KeyError> {
    let value = need(key, value)?;
    match value.chars().any(char::is_control) || value.trim().is_empty() {
        true => Err((key, "must be one line of text".to_owned())),
        false => Ok(value),
    }
}

fn served_of(served: Option<ServedKey>, drive_id: Option<String>) -> Result<Served, KeyError> {
    match (served, drive_id) {
        (None, _) => Err(("served", "is missing".to_owned())),
        (Some(ServedKey::GoogleDrive), Some(id)) => {
            let ok = (10..=128).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            match ok {
                true => Ok(Served::GoogleDrive { id }),
                false => Err(("drive_id", "is not a Google Drive file id".to_owned())),
            }
        }
        (Some(ServedKey::GoogleDrive), None) => {
            Err(("drive_id", "is missing (google-drive)".to_owned()))
        }
        (Some(_), Some(_)) => Err((
            "drive_id",
            "is only for served = \"google-drive\"".to_owned(),
        )),
        (Some(ServedKey::Http), None) => Ok(Served::Http),
        (Some(ServedKey::HuggingFace), None) => Ok(Served::HuggingFace),
    }
}

fn size_of(size: Option<u64>, max_size: Option<u64>) -> Result<Size, KeyError> {
    let size = match (size, max_size) {
        (Some(n), None) => Size::Exact(n),
        (None, Some(n)) => Size::AtMost(n),
        _ => {
            let why = "or `max_size`: give exactly one (the exact size, or a cap when unknown)";
            return Err(("size", why.to_owned()));
        }
    };
    match (1..=MAX_SIZE).contains(&size.limit()) {
        true => Ok(size),
        false => Err(("size", format!("must be between 1 and {MAX_SIZE} bytes"))),
    }
}

fn pin_of(sha256: Option<String>, prefix: Option<String>) -> Result<Pin, KeyError> {
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    match (sha256, prefix) {
        (Some(h), None) if h == "record" => Ok(Pin::Record),
        (Some(h), None) if h.len() == 64 && hex(&h) => Ok(Pin::Sha256(h.to_ascii_lowercase())),
        (Some(_), None) => Err(("sha256", "must be 64 hex digits, or \"record\"".to_owned())),
        (None, Some(p)) if (8..64).contains(&p.len()) && hex(&p) => {
            Ok(Pin::Sha256Prefix(p.to_ascii_lowercase()))
        }
        (None, Some(_)) => Err(("sha256_prefix", "must be 8 to 63 hex digits".to_owned())),
        _ => Err((
            "sha256",
            "or `sha256_prefix`: give exactly one (\"record\" when no hash is published)"
                .to_owned(),
        )),
    }
}

/// A name that is one path component anywhere: ASCII letters, digits, `.`, `_`, `-`, not
/// starting with a dot or a dash, at most 128 bytes.
fn component(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    match ok {
        true => Ok(()),
        false => Err(format!(
            "{s:?} is not a plain name (letters, digits, `.`, `_`, `-`; not starting with `.` or `-`)"
        )),
    }
}

/// An http(s) URL with a host.
pub(super) fn check_url(url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("`{url}` is not a URL ({e})"))?;
    match matches!(parsed.scheme(), "http" | "https") && parsed.host_str().is_some() {
        true => Ok(parsed),
        false => Err(format!(
            "`{url}`: expected an http:// or https:// URL with a host"
        )),
    }
}
