//! Files written whole or not at all, content hashes, and locks that die with their holder. Every writer of the project goes
//! through [`AtomicFile`]: the bytes go to a temporary name unique to this host, process and
//! call, are synced, renamed over the final name, and the directory is synced, so a reader
//! (or a process killed at any instruction) sees the old file or the new one, never a mix, and
//! two processes writing the same file never share a temporary.
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of everything `reader` yields, in hex.
pub fn sha256_of(mut reader: impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

/// The sha256 of a file's content, in hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    sha256_of(file).with_context(|| format!("{}: cannot read", path.display()))
}

/// This machine's name, as `uname` gives it (lock holders and temporary names carry it).
pub fn host_name() -> String {
    // SAFETY: utsname is plain bytes; uname fills it and NUL-terminates every field.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut name) } != 0 {
        return "unknown-host".to_owned();
    }
    // SAFETY: uname succeeded, so `nodename` is a NUL-terminated string within the array.
    unsafe { std::ffi::CStr::from_ptr(name.nodename.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

const TEMP_SUFFIX: &str = ".tmp";

/// `.<name>.<host>.<pid>.<n>.tmp` beside `path`: hidden, and never the same for two writers.
fn temporary_for(path: &Path) -> PathBuf {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(
        ".{name}.{}.{}.{}{TEMP_SUFFIX}",
        host_name(),
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A file being written: bytes go to a temporary; [`AtomicFile::commit`] puts them in place.
/// Dropped without a commit (an error, a panic), the temporary is removed.
pub struct AtomicFile {
    path: PathBuf,
    temporary: PathBuf,
    file: Option<BufWriter<File>>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<AtomicFile> {
        let temporary = temporary_for(path);
        let file = File::create(&temporary)
            .with_context(|| format!("{}: cannot create", temporary.display()))?;
        Ok(AtomicFile {
            path: path.to_owned(),
            temporary,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// Overwrites bytes already written at `offset` (a checksum that a header holds before the
    /// data it covers is known).
    pub fn patch(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let file = self.file.as_mut().expect("not yet committed");
        file.flush()
            .and_then(|()| file.get_ref().write_all_at(bytes, offset))
            .with_context(|| format!("{}: cannot write", self.temporary.display()))
    }

    /// Syncs the bytes, renames them over the final name and syncs the directory.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("not yet committed");
        let done = file
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .with_context(|| format!("{}: cannot write", self.path.display()));
        done?;
        std::fs::rename(&self.temporary, &self.path)
            .with_context(|| format!("{}: cannot rename into place", self.path.display()))?;
        sync_parent(&self.path);
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.as_mut().expect("not yet committed").write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().expect("not yet committed").flush()
    }
}

impl std::io::Seek for AtomicFile {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.file.as_mut().expect("not yet committed").seek(pos)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

/// Writes `bytes` as `path`, whole or not at all.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    file.commit()
}

/// Syncs the directory holding `path`, so a rename into it survives a power cut. A filesystem
/// that cannot sync directories loses nothing a process kill could.
pub fn sync_parent(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Removes the temporaries in `dir` that a writer on this host left when it was killed (its
/// process is gone). Others' temporaries, and other hosts' on a shared filesystem, are left.
pub fn remove_stale_temporaries(dir: &Path) {
    let host = host_name();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(inner) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(TEMP_SUFFIX))
        else {
            continue;
        };
        // <name>.<host>.<pid>.<n>: the host may hold dots, the pid and n do not.
        let mut parts = inner.rsplitn(3, '.');
        let (_, pid, rest) = (parts.next(), parts.next(), parts.next());
        let (Some(pid), Some(rest)) = (pid.and_then(|p| p.parse::<i32>().ok()), rest) else {
            continue;
        };
        if rest.ends_with(&format!(".{host}")) && !process_alive(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether process `pid` exists on this machine.
pub fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only asks whether the process exists; nothing is delivered.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// Held while it lives; dropping it releases the lock.
#[derive(Debug)]
pub struct Lock {
    _file: File,
    pub path: PathBuf,
}

/// How a second writer behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contention {
    /// Fail at once, naming the holder.
    Refuse,
    /// Wait until the holder is done.
    Wait,
}

fn flock(file: &File, blocking: bool) -> std::io::Result<()> {
    let op = libc::LOCK_EX | if blocking { 0 } else { libc::LOCK_NB };
    loop {
        // SAFETY: flock on a descriptor this process owns; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The holder's line, as it wrote it into the lock file.
fn holder(path: &Path) -> String {
    let mut text = String::new();
    let _ = File::open(path).and_then(|f| f.take(4096).read_to_string(&mut text));
    let text = text.trim();
    if text.is_empty() {
        "another process".to_owned()
    } else {
        text.to_owned()
    }
}

impl Lock {
    /// Takes the lock file `path` (created if needed) for `command`, e.g. "mfr train", on
    /// behalf of `what` (the thing it guards, named in messages).
    pub fn acquire(
        path: &Path,
        what: &Path,
        command: &str,
        contention: Contention,
    ) -> Result<Lock> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("{}: cannot create", dir.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        if let Err(e) = flock(&file, false) {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                bail!("{}: cannot lock ({e})", path.display());
            }
            let who = holder(path);
            if contention == Contention::Refuse {
                bail!(
                    "{} is being written by {who}: wait for it to finish, or pass --wait to queue behind it",
                    what.display()
                );
            }
            eprintln!("waiting for {who} to finish with {}", what.display());
            flock(&file, true).with_context(|| format!("{}: cannot lock", path.display()))?;
        }
        file.set_len(0)?;
        file.rewind()?;
        let line = format!(
            "pid {} on host {} ({command})\n",
            std::process::id(),
            host_name()
        );
        file.write_all(line.as_bytes())
            .with_context(|| format!("{}: cannot write", path.display()))?;
        Ok(Lock {
            _file: file,
            path: path.to_owned(),
        })
    }
}
