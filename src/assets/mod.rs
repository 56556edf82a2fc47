//! Assets too large or too licensed to ship: a manifest pinned by sha256, and a fetcher that
//! never lets a partial or unverified file into the cache. Downloads stream into `<file>.part`,
//! hashing as they go, resume with an HTTP Range request after a cut, retry with backoff, and
//! are renamed into the cache only once the hash matches; a mismatch is kept aside as
//! `<file>.rejected` and reported, never used.
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
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

/// The asset's path in the cache, downloading it first if needed.
pub fn fetch(asset: &Asset, opts: &Options) -> Result<PathBuf> {
    let dest = cached_path(asset, &opts.cache);
    let verified = with_suffix(&dest, ".sha256");
    if dest.exists() && verified.exists() {
        return Ok(dest);
    }
    let pin = match (&opts.sha256, &asset.pin) {
        (Some(h), _) => Pin::Sha256(h.clone()),
        (None, Pin::Unpinned) => bail!(
            "{}: no sha256 is pinned for it ({}); pass --sha256 HEX",
            asset.name,
            asset.note
        ),
        (None, pin) => pin.clone(),
    };
    if opts.offline {
        bail!("{} is not in the cache ({}) and --offline is set: copy {} there, or fetch it where there is network", asset.name, dest.display(), asset.file);
    }
    let dir = dest.parent().expect("assets live in a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let url = match &opts.mirror {
        Some(base) => format!("{}/{}", base.trim_end_matches('/'), asset.file),
        None => asset.url.clone(),
    };
    let part = with_suffix(&dest, ".part");
    let mut attempt = 0;
    let digest = loop {
        match download(&url, &part, asset.size, opts) {
            Ok(digest) => break digest,
            Err(Failure::Final(e)) => return Err(e.context(format!("fetching {} from {url}", asset.name))),
            Err(Failure::Retry(e)) if attempt >= opts.retries => {
                return Err(e.context(format!("fetching {} from {url}: gave up after {} attempts; the partial download is kept for the next try", asset.name, attempt + 1)))
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
    crate::files::write_atomic(&verified, format!("{digest}  {}\n", asset.file).as_bytes())?;
    Ok(dest)
}

enum Failure {
    /// Worth another attempt (a cut, a stall, a 5xx).
    Retry(anyhow::Error),
    Final(anyhow::Error),
}

fn retry(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Retry(e.into())
}

/// One attempt: continue `part` from where it stops (HTTP Range), hashing everything it holds;
/// returns the hex sha256 of the complete file.
fn download(url: &str, part: &Path, size: Option<u64>, opts: &Options) -> Result<String, Failure> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
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
    let response = request.send().map_err(retry)?;
    let status = response.status();
    let resumed = status == reqwest::StatusCode::PARTIAL_CONTENT && have > 0;
    if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
        std::fs::remove_file(part).ok();
        return Err(retry(anyhow!(
            "the server refused to resume at byte {have}; starting over"
        )));
    }
    if status.is_server_error() {
        return Err(retry(anyhow!("server error {status}")));
    }
    if !status.is_success() {
        return Err(Failure::Final(anyhow!("the server answered {status}")));
    }
    let mut hasher = Sha256::new();
    let mut file = if resumed {
        // Hash what is already there, then append.
        let mut existing = std::fs::File::open(part).map_err(retry)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = existing.read(&mut buf).map_err(retry)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(part)
            .map_err(retry)?
    } else {
        // A fresh start, or a server that ignored the Range request and sends everything.
        std::fs::File::create(part).map_err(retry)?
    };
    let start = if resumed { have } else { 0 };
    let total = response.content_length().map(|n| n + start).or(size);
    let bar = if opts.progress {
        ProgressBar::new(total.unwrap_or(0))
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bytes}/{total_bytes} [{elapsed_precise}<{eta_precise}] {bytes_per_sec} {wide_bar}",
        )
        .expect("template"),
    );
    bar.set_position(start);
    let mut reader = response;
    let mut buf = vec![0u8; 1 << 16];
    let mut got = start;
    loop {
        let n = reader.read(&mut buf).map_err(retry)?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).map_err(retry)?;
        hasher.update(&buf[..n]);
        got += n as u64;
        bar.set_position(got);
    }
    file.sync_all().map_err(retry)?;
    bar.finish_and_clear();
    if let Some(total) = total {
        if got != total {
            return Err(retry(anyhow!(
                "the connection closed after {got} of {total} bytes"
            )));
        }
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
