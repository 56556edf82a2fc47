//! Assets too large or too licensed to ship: a manifest pinned by sha256, and a fetcher that
//! never lets a partial or unverified file into the cache. Downloads stream into `<file>.part`,
//! hashing as they go, resume with an HTTP Range request after a cut, retry with backoff, and
//! are renamed into the cache only once the hash matches; a mismatch is kept aside as
//! `<file>.rejected` and reported, never used.
use crate::progress::Progress;
use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a download is checked against.
#[derive(Debug, Clone, PartialEq)]
pub enum Pin {
    Sha256(String),
    /// The first hex digits of the sha256 (torch.hub's file-name convention).
    Sha256Prefix(String),
    /// No published hash: fetching needs `--sha256 HEX` from the user.
    Unpinned,
}

#[derive(Debug, Clone)]
pub struct Asset {
    pub name: String,
    pub url: String,
    /// File name in the cache (and under a mirror base URL).
    pub file: String,
    pub size: Option<u64>,
    pub pin: Pin,
    pub licence: String,
    pub used_by: String,
    pub note: String,
}

/// Every asset the harness knows.
pub fn manifest() -> Vec<Asset> {
    let asset =
        |name: &str, url: &str, size, pin, licence: &str, used_by: &str, note: &str| Asset {
            name: name.to_owned(),
            // Both SD-VAE files are called diffusion_pytorch_model.safetensors upstream.
            file: match url.rsplit('/').next() {
                Some("diffusion_pytorch_model.safetensors") | None => format!("{name}.safetensors"),
                Some(file) => file.to_owned(),
            },
            url: url.to_owned(),
            size,
            pin,
            licence: licence.to_owned(),
            used_by: used_by.to_owned(),
            note: note.to_owned(),
        };
    vec![
        asset(
            "VIRTUAL_imagenet256_labeled",
            "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz",
            Some(2_037_122_530),
            Pin::Sha256("b32732719497e42660a9affb4a966068cba0855ac449b82015e34ec376d20758".to_owned()),
            "MIT (openai/guided-diffusion)",
            "mfr evaluate: the ADM reference batch for FID, sFID, precision and recall",
            "no official checksum is published: the pinned sha256 comes from a third-party Git LFS pointer and is a cross-check",
        ),
        asset(
            "pt_inception",
            "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
            None,
            Pin::Sha256Prefix("6726825d".to_owned()),
            "Apache-2.0 (pytorch-fid); weights from TensorFlow's inception-2015-12-05",
            "mfr evaluate: the FID Inception with its 1008-way softmax weights (Inception Score)",
            "pinned by the sha256 prefix in its file name (torch.hub's convention); no full hash is published",
        ),
        asset(
            "sd-vae-ft-ema",
            "https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/diffusion_pytorch_model.safetensors",
            None,
            Pin::Unpinned,
            "MIT (stabilityai/sd-vae-ft-ema)",
            "sampling: the SD-VAE decoder the PyTorch port decodes with",
            "pass --sha256 HEX, the LFS sha256 shown on the file's Hugging Face page",
        ),
        asset(
            "sd-vae-ft-mse",
            "https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/diffusion_pytorch_model.safetensors",
            None,
            Pin::Unpinned,
            "MIT (stabilityai/sd-vae-ft-mse)",
            "preprocessing and sampling: the SD-VAE the paper encodes with",
            "pass --sha256 HEX, the LFS sha256 shown on the file's Hugging Face page",
        ),
    ]
}

impl Pin {
    /// The pin as a report shows it.
    pub fn describe(&self) -> String {
        match self {
            Pin::Sha256(h) => format!("sha256 {}", &h[..16.min(h.len())]),
            Pin::Sha256Prefix(p) => format!("sha256 {p}..."),
            Pin::Unpinned => "unpinned".to_owned(),
        }
    }
}

/// Every asset with a pinned hash (what `mfr fetch --all` fetches).
pub fn pinned() -> Vec<Asset> {
    manifest()
        .into_iter()
        .filter(|a| a.pin != Pin::Unpinned)
        .collect()
}

/// The manifest as `mfr fetch` lists it: each asset, whether it is in `cache`, where it comes
/// from, what uses it and its licence.
pub fn listing(cache: &Path) -> String {
    manifest()
        .iter()
        .map(|a| {
            let state = match cached_path(a, cache).exists() {
                true => "cached",
                false => "missing",
            };
            format!(
                "{:<28} {state:<8} {}\n{:<28} {} [{}]\n",
                a.name, a.url, "", a.used_by, a.licence
            )
        })
        .collect()
}

pub fn find(name: &str) -> Result<Asset> {
    let all = manifest();
    all.iter().find(|a| a.name == name).cloned().ok_or_else(|| {
        anyhow!(
            "unknown asset `{name}`, expected one of {}",
            all.iter()
                .map(|a| a.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

pub struct Options {
    /// The cache directory ($MFR_CACHE): assets land in `<cache>/assets/`.
    pub cache: PathBuf,
    /// A base URL serving the same file names (air-gapped clusters); $MFR_MIRROR.
    pub mirror: Option<String>,
    /// Never touch the network: only report what is cached.
    pub offline: bool,
    /// Per connect / read timeout.
    pub timeout: Duration,
    pub retries: u32,
    /// First backoff; doubled per retry.
    pub backoff: Duration,
    /// The user's pin for an unpinned asset (or to override one).
    pub sha256: Option<String>,
    pub progress: bool,
}

impl Options {
    pub fn new(cache: PathBuf) -> Self {
        Self {
            cache,
            mirror: std::env::var("MFR_MIRROR").ok().filter(|m| !m.is_empty()),
            offline: false,
            timeout: Duration::from_secs(60),
            retries: 5,
            backoff: Duration::from_secs(2),
            sha256: None,
            progress: true,
        }
    }
}

/// `name` as a local file: a path as given, or the cached copy of the asset of that name;
/// `what` names it in the error, which says how to fetch it.
pub fn local(name: &str, what: &str) -> Result<PathBuf> {
    if Path::new(name).is_file() {
        return Ok(PathBuf::from(name));
    }
    let asset =
        find(name).with_context(|| format!("{what} `{name}` is neither a file nor an asset"))?;
    let cached = cached_path(&asset, &crate::paths::default_cache());
    if cached.is_file() {
        return Ok(cached);
    }
    Err(anyhow!(
        "{what} `{name}` is not in the cache ({}): run `mfr fetch {name}`, or give a file's path",
        cached.display()
    ))
}

/// Where an asset lives once fetched.
pub fn cached_path(asset: &Asset, cache: &Path) -> PathBuf {
    cache.join("assets").join(&asset.file)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().expect("a file name").to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn check(pin: &Pin, digest: &str) -> Result<(), String> {
    match pin {
        Pin::Sha256(h) if h.eq_ignore_ascii_case(digest) => Ok(()),
        Pin::Sha256Prefix(p) if digest.starts_with(&p.to_ascii_lowercase()) => Ok(()),
        Pin::Sha256(h) => Err(format!("expected sha256 {h}")),
        Pin::Sha256Prefix(p) => Err(format!("expected a sha256 starting {p}")),
        Pin::Unpinned => Err("no hash to check against".to_owned()),
    }
}

/// The largest download of an asset whose size the manifest does not give (the largest public
/// file the harness fetches, a SiT-XL/2 training checkpoint, is ~10 GB).
pub const MAX_UNSIZED: u64 = 16 << 30;

/// `--sha256 HEX` as a pin: 64 hex digits, checked before any traffic.
pub fn parse_sha256(hex: &str) -> Result<Pin> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("--sha256 {hex}: expected 64 hex digits (a sha256 as `sha256sum` prints it)");
    }
    Ok(Pin::Sha256(hex.to_ascii_lowercase()))
}

/// A mirror base URL, checked before any traffic: http or https, with a host.
fn parse_mirror(base: &str) -> Result<reqwest::Url> {
    let url = reqwest::Url::parse(base)
        .map_err(|e| anyhow!("mirror `{base}` is not a URL ({e}): give e.g. https://host/path"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        bail!("mirror `{base}`: expected an http:// or https:// URL with a host");
    }
    Ok(url)
}

/// What `<file>.sha256` records when a file was verified: its hash, and its size and
/// modification time then. A file whose size or time changed since is hashed again.
fn marker_text(digest: &str, meta: &std::fs::Metadata, file: &str) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{digest}  {file}  size={} mtime_ns={mtime}\n", meta.len())
}

/// Whether the cached `dest` is the verified file: its marker matches it and the pin, or else
/// hashing it now does (then the marker is rewritten). A file that fails is moved aside.
fn cached_and_verified(dest: &Path, marker: &Path, pin: &Pin, file: &str) -> Result<bool> {
    let Ok(meta) = std::fs::metadata(dest) else {
        return Ok(false);
    };
    let recorded = std::fs::read_to_string(marker).unwrap_or_default();
    let digest = recorded.split_whitespace().next().unwrap_or_default();
    if check(pin, digest).is_ok() && recorded == marker_text(digest, &meta, file) {
        return Ok(true);
    }
    let digest = crate::files::sha256_file(dest)?;
    if let Err(expected) = check(pin, &digest) {
        let rejected = with_suffix(dest, ".rejected");
        std::fs::rename(dest, &rejected)
            .with_context(|| format!("{}: cannot move aside", dest.display()))?;
        eprintln!(
            "warning: {}: sha256 {digest}, {expected}: moved aside as {}, fetching it again",
            dest.display(),
            rejected.display()
        );
        return Ok(false);
    }
    crate::files::write_atomic(marker, marker_text(&digest, &meta, file).as_bytes())?;
    Ok(true)
}

/// The asset's path in the cache, downloading it first if needed. Arguments are checked before
/// any traffic; one process fetches an asset at a time (the others wait); the download lands
/// under its final name only once its sha256 matches.
pub fn fetch(asset: &Asset, opts: &Options) -> Result<PathBuf> {
    let pin = match (&opts.sha256, &asset.pin) {
        (Some(h), _) => parse_sha256(h)?,
        (None, Pin::Unpinned) => bail!(
            "{}: no sha256 is pinned for it ({}); pass --sha256 HEX",
            asset.name,
            asset.note
        ),
        (None, pin) => pin.clone(),
    };
    let url = match &opts.mirror {
        Some(base) => format!(
            "{}/{}",
            parse_mirror(base)?.as_str().trim_end_matches('/'),
            asset.file
        ),
        None => asset.url.clone(),
    };
    let dest = cached_path(asset, &opts.cache);
    let marker = with_suffix(&dest, ".sha256");
    let dir = dest.parent().expect("assets live in a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let _lock = crate::files::Lock::acquire(
        &with_suffix(&dest, ".lock"),
        &dest,
        "mfr fetch",
        crate::files::Contention::Wait,
    )?;
    if cached_and_verified(&dest, &marker, &pin, &asset.file)? {
        return Ok(dest);
    }
    if opts.offline {
        bail!("{} is not in the cache ({}) and --offline is set: copy {} there, or fetch it where there is network", asset.name, dest.display(), asset.file);
    }
    let part = with_suffix(&dest, ".part");
    let limit = asset.size.unwrap_or(MAX_UNSIZED);
    let mut attempt = 0;
    let digest = loop {
        match download(&url, &part, asset.size, limit, opts) {
            Ok(digest) => break digest,
            Err(Failure::Final(e)) => {
                if e.downcast_ref::<crate::signals::Stopped>().is_none() {
                    std::fs::remove_file(&part).ok();
                }
                return Err(e.context(format!("fetching {} from {url}", asset.name)));
            }
            Err(Failure::Retry(e)) if attempt >= opts.retries => {
                return Err(e.context(format!("fetching {} from {url}: gave up after {} attempts; {} is kept to resume from next time", asset.name, attempt + 1, part.display())))
            }
            Err(Failure::Retry(e)) => {
                let wait = opts.backoff * 2u32.saturating_pow(attempt);
                eprintln!("warning: {}: {e:#}; retrying in {wait:?}", asset.name);
                std::thread::sleep(wait);
                attempt += 1;
            }
        }
    };
    if let Err(expected) = check(&pin, &digest) {
        let rejected = with_suffix(&dest, ".rejected");
        std::fs::rename(&part, &rejected).ok();
        bail!("{}: the download's sha256 is {digest}, {expected}; it was kept aside as {} and not used", asset.name, rejected.display());
    }
    std::fs::rename(&part, &dest)
        .with_context(|| format!("{}: cannot rename into place", dest.display()))?;
    crate::files::sync_parent(&dest);
    let meta =
        std::fs::metadata(&dest).with_context(|| format!("{}: cannot read", dest.display()))?;
    crate::files::write_atomic(&marker, marker_text(&digest, &meta, &asset.file).as_bytes())?;
    Ok(dest)
}

enum Failure {
    /// Worth another attempt (a cut, a stall, a 5xx, a 408 or 429).
    Retry(anyhow::Error),
    /// Not worth one (a refused URL, a 4xx, a full disk, a stop signal).
    Final(anyhow::Error),
}

fn retry(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Retry(e.into())
}

/// A local I/O error, naming the file: final (a full disk does not empty itself).
fn on_disk<'a>(path: &'a Path, what: &'a str) -> impl FnOnce(std::io::Error) -> Failure + 'a {
    move |e| Failure::Final(anyhow!("{}: cannot {what} ({e})", path.display()))
}

/// One attempt: continue `part` from where it stops (HTTP Range), hashing everything it holds,
/// never beyond `limit` bytes; returns the hex sha256 of the complete file.
fn download(
    url: &str,
    part: &Path,
    size: Option<u64>,
    limit: u64,
    opts: &Options,
) -> Result<String, Failure> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    if have > limit {
        std::fs::remove_file(part).map_err(on_disk(part, "remove"))?;
        return Err(retry(anyhow!(
            "{} was longer than the asset: starting over",
            part.display()
        )));
    }
    // The blocking client applies `timeout` to sending the request and to every read of the
    // body: a stalled server fails a read (and the attempt is retried), a slow one does not.
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(opts.timeout)
        .timeout(opts.timeout)
        .build()
        .map_err(|e| Failure::Final(e.into()))?;
    let mut request = client.get(url);
    if have > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let response = request.send().map_err(|e| match e.is_builder() {
        true => Failure::Final(e.into()),
        false => retry(e),
    })?;
    let status = response.status();
    let resumed = status == reqwest::StatusCode::PARTIAL_CONTENT && have > 0;
    if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
        std::fs::remove_file(part).ok();
        return Err(retry(anyhow!(
            "the server refused to resume at byte {have}; starting over"
        )));
    }
    let transient = status.is_server_error()
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
    if transient {
        return Err(retry(anyhow!("the server answered {status}")));
    }
    if !status.is_success() {
        return Err(Failure::Final(anyhow!("the server answered {status}")));
    }
    let start = if resumed { have } else { 0 };
    let total = response.content_length().map(|n| n + start).or(size);
    if let Some(total) = total.filter(|&t| t > limit) {
        return Err(Failure::Final(anyhow!(
            "the server offers {total} bytes, more than the asset's {limit}"
        )));
    }
    let mut hasher = Sha256::new();
    let mut file = if resumed {
        // Hash what is already there, then append.
        let existing = std::fs::File::open(part).map_err(on_disk(part, "read"))?;
        let mut existing = existing.take(have);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = existing.read(&mut buf).map_err(on_disk(part, "read"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(part)
            .map_err(on_disk(part, "append to"))?
    } else {
        // A fresh start, or a server that ignored the Range request and sends everything.
        std::fs::File::create(part).map_err(on_disk(part, "create"))?
    };
    let bar = match opts.progress {
        true => Progress::new(
            &format!("fetch {}", part.display()),
            total.unwrap_or(0),
            "bytes",
        ),
        false => Progress::hidden(),
    };
    bar.start_at(start);
    let mut reader = response;
    let mut buf = vec![0u8; 1 << 16];
    let mut got = start;
    loop {
        crate::signals::check(|| format!("after {got} bytes of {}", part.display()))
            .map_err(|e| Failure::Final(e.into()))?;
        let n = reader.read(&mut buf).map_err(retry)?;
        if n == 0 {
            break;
        }
        if got + n as u64 > limit {
            return Err(Failure::Final(anyhow!(
                "the server sent more than the asset's {limit} bytes"
            )));
        }
        file.write_all(&buf[..n]).map_err(on_disk(part, "write"))?;
        hasher.update(&buf[..n]);
        got += n as u64;
        bar.set_position(got);
    }
    file.sync_all().map_err(on_disk(part, "sync"))?;
    bar.finish();
    if let Some(total) = total {
        if got != total {
            return Err(retry(anyhow!(
                "the connection closed after {got} of {total} bytes"
            )));
        }
    }
    Ok(crate::files::hex(&hasher.finalize()))
}
