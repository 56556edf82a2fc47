//! Assets too large or too licensed to ship: a manifest (assets/manifest.toml, compiled in, and
//! $MFR_MANIFEST over it) and a fetcher that never lets a partial, unverified or wrong file into
//! the cache. Downloads stream into `<file>.part`, hashing as they go, resume with an HTTP Range
//! request after a cut, retry with backoff, follow Google Drive's interstitial, and are renamed
//! into the cache only once the hash matches the manifest's (or, where none is published, the
//! sha256 the first download recorded in `<file>.recorded-sha256`); a mismatch is kept aside as
//! `<file>.rejected` and reported, never used. The fetcher writes nothing through a symbolic
//! link and opens no FIFO or device in the cache; a stop signal ends a stalled download within
//! a fraction of a second, the `.part` kept to resume from.
mod drive;
mod manifest;
mod net;

pub use manifest::{Asset, Format, Manifest, Pin, Served, Size, MAX_SIZE};

use crate::progress::Progress;
use anyhow::{anyhow, bail, Context, Result};
use net::{Event, Failure};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

/// How often a waiting download looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);

/// The manifest in force: the built-in one with $MFR_MANIFEST over it.
pub fn manifest() -> Result<Manifest> {
    Manifest::load()
}

/// The asset of that name in the manifest in force.
pub fn find(name: &str) -> Result<Asset> {
    Ok(Manifest::load()?.find(name)?.clone())
}

/// Every asset pinned by a hash the manifest gives (what `mfr fetch --all` fetches).
pub fn pinned() -> Result<Vec<Asset>> {
    Ok(Manifest::load()?
        .assets
        .into_iter()
        .filter(|a| a.pin != Pin::Record)
        .collect())
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
    /// The user's pin, over the manifest's (or the recorded one).
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

/// The sha256 the first download of an asset recorded in `cache`, if any.
pub fn recorded(asset: &Asset, cache: &Path) -> Option<String> {
    let slot = Slot::new(asset, cache);
    read_record(&slot).ok().flatten()
}

/// `--sha256 HEX` as a pin: 64 hex digits, checked before any traffic.
pub fn parse_sha256(hex: &str) -> Result<Pin> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("--sha256 {hex}: expected 64 hex digits (a sha256 as `sha256sum` prints it)");
    }
    Ok(Pin::Sha256(hex.to_ascii_lowercase()))
}

/// The manifest as `mfr fetch` lists it: per asset its name, size, whether it is in `cache`
/// and the hash it is checked against; then what it is, what uses it, its licence and source.
pub fn listing(manifest: &Manifest, cache: &Path) -> String {
    let mut out = format!(
        "{:<28} {:<12} {:<10} {}\n",
        "NAME", "SIZE", "CACHE", "SHA256"
    );
    for a in &manifest.assets {
        let slot = Slot::new(a, cache);
        let state = match std::fs::metadata(&slot.dest) {
            Ok(m) if m.is_file() => match marker_matches(&slot, &m) {
                true => "verified",
                false => "cached",
            },
            _ => "missing",
        };
        let size = match a.size {
            Size::Exact(n) => human(n),
            Size::AtMost(n) => format!("<= {}", human(n)),
        };
        let hash = match (&a.pin, read_record(&slot).ok().flatten()) {
            (Pin::Sha256(h), _) => h.clone(),
            (Pin::Sha256Prefix(p), _) => format!("{p}... (prefix)"),
            (Pin::Record, Some(h)) => format!("{h} (recorded)"),
            (Pin::Record, None) => "recorded on first download (none yet)".to_owned(),
        };
        let from = match &a.served {
            Served::GoogleDrive { id } => format!("Google Drive {id}"),
            Served::HuggingFace => "Hugging Face".to_owned(),
            Served::Http => "HTTP".to_owned(),
        };
        out += &format!(
            "{:<28} {size:<12} {state:<10} {hash}\n    {}\n    {} [{}]\n    {from}: {}\n",
            a.name, a.purpose, a.used_by, a.licence, a.url
        );
    }
    out
}

/// Bytes as a person reads them: 2.04 GB, 335 MB.
fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} GB", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.0} MB", n as f64 / 1e6),
        n => format!("{n} B"),
    }
}

/// The files the fetcher keeps for one asset in the cache.
struct Slot {
    dest: PathBuf,
    part: PathBuf,
    /// `<file>.sha256`: the hash, size and time of the file when it was last verified.
    marker: PathBuf,
    /// `<file>.recorded-sha256`: the first download's hash, for assets with no published one.
    record: PathBuf,
    lock: PathBuf,
    rejected: PathBuf,
}

impl Slot {
    fn new(asset: &Asset, cache: &Path) -> Slot {
        let dest = cached_path(asset, cache);
        let beside = |suffix: &str| dest.with_file_name(format!("{}{suffix}", asset.file));
        Slot {
            part: beside(".part"),
            marker: beside(".sha256"),
            record: beside(".recorded-sha256"),
            lock: beside(".lock"),
            rejected: beside(".rejected"),
            dest,
        }
    }

    /// Refuses a link or a non-regular file where the fetcher writes, and a cached file that
    /// is not (a link to) a regular file: it never writes through a link, nor opens a FIFO.
    fn check(&self) -> Result<()> {
        for path in [
            &self.part,
            &self.marker,
            &self.record,
            &self.lock,
            &self.rejected,
        ] {
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_symlink() => bail!(
                    "{} is a symbolic link, not a file mfr fetch wrote (it never writes through links in its cache): remove it and fetch again",
                    path.display()
                ),
                Ok(m) if !m.is_file() => bail!(
                    "{} is a {}, not a regular file: remove it and fetch again",
                    path.display(),
                    kind(&m)
                ),
                _ => {}
            }
        }
        // The cached file itself may be a link to a shared copy: it is only read, and hashed.
        match std::fs::metadata(&self.dest) {
            Ok(m) if !m.is_file() => bail!(
                "{} is a {}, not a regular file: remove it and fetch again",
                self.dest.display(),
                kind(&m)
            ),
            _ => Ok(()),
        }
    }
}

fn kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    match () {
        _ if t.is_dir() => "directory",
        _ if t.is_fifo() => "FIFO",
        _ if t.is_socket() => "socket",
        _ if t.is_block_device() || t.is_char_device() => "device",
        _ if t.is_symlink() => "symbolic link",
        _ => "special file",
    }
}

/// Opens a file of the slot without following a link at its name and without blocking on a
/// FIFO, and checks that what was opened is a regular file.
fn open_in_cache(path: &Path, options: &mut OpenOptions) -> std::io::Result<File> {
    let file = options
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => std::io::Error::other("it is a symbolic link"),
            _ => e,
        })?;
    let meta = file.metadata()?;
    match meta.is_file() {
        true => Ok(file),
        false => Err(std::io::Error::other(format!(
            "it is a {}, not a regular file",
            kind(&meta)
        ))),
    }
}

/// A small file of the slot (a marker or a record), at most 4 KB of it; None when absent.
fn read_small(path: &Path) -> Result<Option<String>> {
    let file = match open_in_cache(path, OpenOptions::new().read(true)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => bail!(
            "{}: cannot read ({e}): remove it and fetch again",
            path.display()
        ),
    };
    let mut text = String::new();
    file.take(4096)
        .read_to_string(&mut text)
        .with_context(|| format!("{}: cannot read: remove it and fetch again", path.display()))?;
    Ok(Some(text))
}

/// The recorded sha256: the record's first line, `sha256 <64 hex>`.
fn read_record(slot: &Slot) -> Result<Option<String>> {
    let Some(text) = read_small(&slot.record)? else {
        return Ok(None);
    };
    match text.lines().next().and_then(|l| l.strip_prefix("sha256 ")) {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(Some(h.to_ascii_lowercase()))
        }
        _ => bail!(
            "{}: not a record mfr fetch wrote (its first line must be `sha256 <64 hex digits>`): remove it, and the first download from now on is recorded",
            slot.record.display()
        ),
    }
}

fn write_record(slot: &Slot, digest: &str, size: u64, url: &str) -> Result<()> {
    let text = format!(
        "sha256 {digest}\nsize {size}\nurl {url}\nrecorded {}\n",
        crate::progress::timestamp(std::time::SystemTime::now())
    );
    crate::files::write_atomic(&slot.record, text.as_bytes())
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

/// Whether the marker describes the cached file as it is now (no hashing).
fn marker_matches(slot: &Slot, meta: &std::fs::Metadata) -> bool {
    let text = read_small(&slot.marker).ok().flatten().unwrap_or_default();
    let digest = text.split_whitespace().next().unwrap_or_default();
    let file = slot
        .dest
        .file_name()
        .map(|f| f.to_string_lossy().into_owned());
    !digest.is_empty() && text == marker_text(digest, meta, &file.unwrap_or_default())
}

/// The hash a file must have, and who says so.
struct Expected {
    /// None: nothing yet (a "record" asset's first download).
    pin: Option<Pin>,
    from: &'static str,
}

impl Expected {
    fn of(asset: &Asset, opts: &Options, slot: &Slot) -> Result<Expected> {
        if let Some(hex) = &opts.sha256 {
            return Ok(Expected {
                pin: Some(parse_sha256(hex)?),
                from: "--sha256",
            });
        }
        Ok(match &asset.pin {
            Pin::Record => Expected {
                pin: read_record(slot)?.map(Pin::Sha256),
                from: "the record",
            },
            pin => Expected {
                pin: Some(pin.clone()),
                from: "the manifest",
            },
        })
    }

    /// Ok when `digest` is the one expected; else what was expected, as a message says it.
    fn check(&self, digest: &str) -> Result<(), String> {
        match &self.pin {
            None => Ok(()),
            Some(Pin::Sha256(h)) if h.eq_ignore_ascii_case(digest) => Ok(()),
            Some(Pin::Sha256Prefix(p)) if digest.starts_with(&p.to_ascii_lowercase()) => Ok(()),
            Some(Pin::Sha256(h)) => Err(h.clone()),
            Some(Pin::Sha256Prefix(p)) => Err(format!("{p}...")),
            Some(Pin::Record) => Err("a recorded sha256".to_owned()),
        }
    }
}

/// The asset's path in the cache, downloading it first if needed. Arguments are checked before
/// any traffic; one process fetches an asset at a time (the others wait); the download lands
/// under its final name only once its sha256 matches.
pub fn fetch(asset: &Asset, opts: &Options) -> Result<PathBuf> {
    let (slot, expected, _lock) = prepare(asset, opts)?;
    // A mirror serves the same file names over plain HTTP (no Drive interstitial).
    let (url, drive) = match &opts.mirror {
        Some(base) => {
            let base = manifest::check_url(base).map_err(|why| {
                anyhow!("mirror {why}: give e.g. https://host/path (--mirror or $MFR_MIRROR)")
            })?;
            let base = base.as_str().trim_end_matches('/');
            (format!("{base}/{}", asset.file), false)
        }
        None => (
            asset.url.clone(),
            matches!(asset.served, Served::GoogleDrive { .. }),
        ),
    };
    if cached_and_verified(asset, &slot, &expected)? {
        return Ok(slot.dest);
    }
    if opts.offline {
        bail!("{} is not in the cache ({}) and --offline is set: copy {} there, or fetch it where there is network", asset.name, slot.dest.display(), asset.file);
    }
    let request = net::Request {
        name: asset.name.clone(),
        page: asset.page(),
        url: manifest::check_url(&url).map_err(|why| anyhow!("{}: {why}", asset.name))?,
        drive,
        have: 0,
        limit: asset.size.limit(),
        format: asset.format,
        timeout: opts.timeout,
    };
    let digest = download(request, &slot, opts)
        .with_context(|| format!("fetching {} from {url}", asset.name))?;
    accept(asset, &slot, &expected, &digest, &url)
}

/// A file the user downloaded by hand (Google Drive refused, a browser was needed), checked
/// like a download and copied into the cache; the file itself is left as it is.
pub fn adopt(asset: &Asset, file: &Path, opts: &Options) -> Result<PathBuf> {
    let (slot, expected, _lock) = prepare(asset, opts)?;
    let mut source = open_in_cache(file, OpenOptions::new().read(true))
        .or_else(|_| {
            // A user's file may be a link (to a download folder); it must still be regular.
            let f = File::open(file)?;
            match f.metadata()?.is_file() {
                true => Ok(f),
                false => Err(std::io::Error::other("it is not a regular file")),
            }
        })
        .with_context(|| format!("{}: cannot read it as {}", file.display(), asset.name))?;
    let len = source.metadata().map(|m| m.len()).unwrap_or(0);
    if len > asset.size.limit() {
        bail!(
            "{}: {len} bytes, more than {}'s {}: is it the right file?",
            file.display(),
            asset.name,
            asset.size.limit()
        );
    }
    let mut part = open_in_cache(
        &slot.part,
        OpenOptions::new().write(true).create(true).truncate(true),
    )
    .with_context(|| format!("{}: cannot create", slot.part.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        crate::signals::check(|| format!("while copying {}", file.display()))?;
        let n = source
            .read(&mut buf)
            .with_context(|| format!("{}: cannot read", file.display()))?;
        if n == 0 {
            break;
        }
        part.write_all(&buf[..n])
            .with_context(|| format!("{}: cannot write", slot.part.display()))?;
        hasher.update(&buf[..n]);
    }
    part.sync_all()
        .with_context(|| format!("{}: cannot write", slot.part.display()))?;
    let digest = crate::files::hex(&hasher.finalize());
    let from = format!(
        "file://{}",
        file.canonicalize().unwrap_or(file.to_owned()).display()
    );
    accept(asset, &slot, &expected, &digest, &from)
}

/// The checks before anything is fetched: the cache's files are what the fetcher wrote, the
/// asset is locked against other fetchers, and the hash to match is known.
fn prepare(asset: &Asset, opts: &Options) -> Result<(Slot, Expected, crate::files::Lock)> {
    if let Some(hex) = &opts.sha256 {
        parse_sha256(hex)?;
    }
    let slot = Slot::new(asset, &opts.cache);
    let dir = slot.dest.parent().expect("assets live in a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    slot.check()?;
    let lock = crate::files::Lock::acquire(
        &slot.lock,
        &slot.dest,
        "mfr fetch",
        crate::files::Contention::Wait,
    )?;
    let expected = Expected::of(asset, opts, &slot)?;
    Ok((slot, expected, lock))
}

/// Whether the cached file is the verified one: its marker matches it and the expected hash,
/// or else hashing it now does (then the marker, and a missing record, are written). A file
/// that fails is moved aside.
fn cached_and_verified(asset: &Asset, slot: &Slot, expected: &Expected) -> Result<bool> {
    let Ok(meta) = std::fs::metadata(&slot.dest) else {
        return Ok(false);
    };
    let text = read_small(&slot.marker)?.unwrap_or_default();
    let marked = text.split_whitespace().next().unwrap_or_default();
    if expected.pin.is_some() && expected.check(marked).is_ok() && marker_matches(slot, &meta) {
        return Ok(true);
    }
    let digest = crate::files::sha256_file(&slot.dest)?;
    let wrong_size = matches!(asset.size, Size::Exact(n) if n != meta.len());
    if let (Err(_), _) | (_, true) = (expected.check(&digest), wrong_size) {
        std::fs::rename(&slot.dest, &slot.rejected)
            .with_context(|| format!("{}: cannot move aside", slot.dest.display()))?;
        eprintln!(
            "warning: {}: sha256 {digest} ({} bytes) is not the expected file: moved aside as {}, fetching it again",
            slot.dest.display(),
            meta.len(),
            slot.rejected.display()
        );
        return Ok(false);
    }
    if asset.pin == Pin::Record && read_record(slot)?.as_deref() != Some(&digest) {
        write_record(
            slot,
            &digest,
            meta.len(),
            &format!("file://{}", slot.dest.display()),
        )?;
    }
    crate::files::write_atomic(
        &slot.marker,
        marker_text(&digest, &meta, &asset.file).as_bytes(),
    )?;
    Ok(true)
}

/// The complete `.part` with sha256 `digest`, put in place if it is the file: its first bytes,
/// its size and its hash are checked; a file that fails the hash is kept aside.
fn accept(
    asset: &Asset,
    slot: &Slot,
    expected: &Expected,
    digest: &str,
    url: &str,
) -> Result<PathBuf> {
    let mut head = Vec::new();
    let mut part = open_in_cache(&slot.part, OpenOptions::new().read(true))
        .with_context(|| format!("{}: cannot read", slot.part.display()))?;
    (&mut part)
        .take(16)
        .read_to_end(&mut head)
        .with_context(|| format!("{}: cannot read", slot.part.display()))?;
    let len = part.metadata().map(|m| m.len()).unwrap_or(0);
    if !net::magic_ok(asset.format, &head) {
        std::fs::remove_file(&slot.part).ok();
        bail!(
            "{}: what arrived is not a {} file (it starts {}); nothing was kept: check {} (is it the right file?)",
            asset.name,
            asset.format.name(),
            net::preview(&head),
            asset.page()
        );
    }
    let wrong_size = matches!(asset.size, Size::Exact(n) if n != len);
    if let Err(want) = expected.check(digest) {
        std::fs::rename(&slot.part, &slot.rejected).ok();
        let rejected = slot.rejected.display();
        match expected.from {
            "the record" => bail!(
                "{}: this download's sha256 is {digest}, but the first download's was {want} (recorded in {}): the file changed upstream or was damaged in transit; it was kept aside as {rejected} and not used: if the new file is right, remove {} (or pass --sha256 {digest}) and fetch again",
                asset.name,
                slot.record.display(),
                slot.record.display()
            ),
            from => bail!(
                "{}: the download's sha256 is {digest}, expected {want} ({from}); it was kept aside as {rejected} and not used",
                asset.name
            ),
        }
    }
    if wrong_size {
        std::fs::rename(&slot.part, &slot.rejected).ok();
        bail!(
            "{}: the download holds {len} bytes, the manifest says {}; it was kept aside as {} and not used",
            asset.name,
            asset.size.limit(),
            slot.rejected.display()
        );
    }
    std::fs::rename(&slot.part, &slot.dest)
        .with_context(|| format!("{}: cannot rename into place", slot.dest.display()))?;
    crate::files::sync_parent(&slot.dest);
    let meta = std::fs::metadata(&slot.dest)
        .with_context(|| format!("{}: cannot read", slot.dest.display()))?;
    if asset.pin == Pin::Record && read_record(slot)?.as_deref() != Some(digest) {
        write_record(slot, digest, meta.len(), url)?;
    }
    crate::files::write_atomic(
        &slot.marker,
        marker_text(digest, &meta, &asset.file).as_bytes(),
    )?;
    Ok(slot.dest.clone())
}

/// Attempts until one completes, retrying what is worth it with a doubling backoff; returns
/// the hex sha256 of the complete `.part`.
fn download(mut request: net::Request, slot: &Slot, opts: &Options) -> Result<String> {
    let mut attempt = 0;
    loop {
        let failure = match attempt_once(&mut request, slot, opts) {
            Ok(digest) => return Ok(digest),
            Err(failure) => failure,
        };
        let (e, start_over) = match failure {
            // What the `.part` holds stays to resume from (a refusal now may pass tomorrow).
            Failure::Final(e) => return Err(e),
            Failure::Retry(e) => (e, false),
            Failure::StartOver(e) => (e, true),
        };
        if start_over {
            std::fs::remove_file(&slot.part).ok();
        }
        if attempt >= opts.retries {
            return Err(e.context(format!(
                "gave up after {} attempts; {} is kept to resume from next time",
                attempt + 1,
                slot.part.display()
            )));
        }
        let wait = opts.backoff * 2u32.saturating_pow(attempt);
        eprintln!("warning: {}: {e:#}; retrying in {wait:?}", request.name);
        pause(wait, &slot.part)?;
        attempt += 1;
    }
}

/// Sleeps `wait`, ending early (with the stop) when a stop signal arrives.
fn pause(wait: Duration, part: &Path) -> Result<()> {
    let until = Instant::now() + wait;
    while Instant::now() < until {
        crate::signals::check(|| format!("before retrying {}", part.display()))?;
        std::thread::sleep(STOP_POLL.min(until.saturating_duration_since(Instant::now())));
    }
    Ok(())
}

/// The next event of an attempt, looking at the stop flag between short waits. A network side
/// that goes silent past twice its own timeout is given up on (it is left to end by itself).
fn next_event(
    events: &net::Events,
    got: u64,
    part: &Path,
    timeout: Duration,
) -> Result<Event, Failure> {
    let started = Instant::now();
    loop {
        crate::signals::check(|| format!("after {got} bytes of {}", part.display()))
            .map_err(|e| Failure::Final(e.into()))?;
        match events.recv_timeout(STOP_POLL) {
            Ok(event) => return event,
            Err(RecvTimeoutError::Timeout) if started.elapsed() > timeout * 2 + STOP_POLL => {
                return Err(Failure::Retry(anyhow!(
                    "no answer for {:?}",
                    started.elapsed()
                )))
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Failure::Retry(anyhow!("the connection ended unexpectedly")))
            }
        }
    }
}

/// One attempt: continue `.part` from where it stops (HTTP Range), hashing everything it
/// holds, never beyond the asset's size; returns the hex sha256 of the complete file.
fn attempt_once(
    request: &mut net::Request,
    slot: &Slot,
    opts: &Options,
) -> Result<String, Failure> {
    let part = &slot.part;
    let have = match std::fs::symlink_metadata(part) {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => {
            return Err(on_disk(part, "resume from")(std::io::Error::other(
                "not a regular file",
            )))
        }
        Err(_) => 0,
    };
    if have > request.limit {
        std::fs::remove_file(part).map_err(on_disk(part, "remove"))?;
        return Err(Failure::Retry(anyhow!(
            "{} was longer than the asset: starting over",
            part.display()
        )));
    }
    request.have = have;
    let events = net::start(request.clone());
    let Event::Head { total, resumed } = next_event(&events, 0, part, opts.timeout)? else {
        return Err(Failure::Retry(anyhow!("the server's answer had no head")));
    };
    let start = if resumed { have } else { 0 };
    let (mut file, mut hasher) = open_part(part, resumed)?;
    let bar = match opts.progress {
        true => Progress::new(
            &format!("fetch {}", part.display()),
            total.unwrap_or(0),
            "bytes",
        ),
        false => Progress::hidden(),
    };
    bar.start_at(start);
    let mut got = start;
    loop {
        match next_event(&events, got, part, opts.timeout)? {
            Event::Bytes(bytes) => {
                if got + bytes.len() as u64 > request.limit {
                    drop(file);
                    std::fs::remove_file(part).map_err(on_disk(part, "remove"))?;
                    return Err(Failure::Final(anyhow!(
                        "the server sent more than the asset's {} bytes",
                        request.limit
                    )));
                }
                file.write_all(&bytes).map_err(on_disk(part, "write"))?;
                hasher.update(&bytes);
                got += bytes.len() as u64;
                bar.set_position(got);
            }
            Event::End => break,
            Event::Head { .. } => return Err(Failure::Retry(anyhow!("the server answered twice"))),
        }
    }
    file.sync_all().map_err(on_disk(part, "sync"))?;
    bar.finish();
    match total {
        Some(total) if got != total => Err(Failure::Retry(anyhow!(
            "the connection closed after {got} of {total} bytes"
        ))),
        _ => Ok(crate::files::hex(&hasher.finalize())),
    }
}

/// A local I/O error, naming the file: final (a full disk does not empty itself).
fn on_disk<'a>(path: &'a Path, what: &'a str) -> impl FnOnce(std::io::Error) -> Failure + 'a {
    move |e| Failure::Final(anyhow!("{}: cannot {what} ({e})", path.display()))
}

/// The `.part` to write into: appended to, with what it holds already hashed, when the server
/// resumes; else emptied (a fresh start, or a server that ignored the Range request).
fn open_part(part: &Path, resumed: bool) -> Result<(File, Sha256), Failure> {
    let mut hasher = Sha256::new();
    if !resumed {
        let file = open_in_cache(
            part,
            OpenOptions::new().write(true).create(true).truncate(true),
        )
        .map_err(on_disk(part, "create"))?;
        return Ok((file, hasher));
    }
    let mut existing =
        open_in_cache(part, OpenOptions::new().read(true)).map_err(on_disk(part, "read"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut hashed = 0u64;
    loop {
        crate::signals::check(|| format!("while hashing {hashed} bytes of {}", part.display()))
            .map_err(|e| Failure::Final(e.into()))?;
        let n = existing.read(&mut buf).map_err(on_disk(part, "read"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        hashed += n as u64;
    }
    let file =
        open_in_cache(part, OpenOptions::new().append(true)).map_err(on_disk(part, "append to"))?;
    Ok((file, hasher))
}
