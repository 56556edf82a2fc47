//! Files written whole or not at all, content hashes, and locks that die with their holder. Every writer of the project goes
//! through [`AtomicFile`]: the bytes go to a temporary name unique to this host, process and
//! call, are synced, renamed over the final name, and the directory is synced, so a reader
//! (or a process killed at any instruction) sees the old file or the new one, never a mix, and
//! two processes writing the same file never share a temporary.
//!
//! Replacing by rename is right for the regular files of the project's own folders only: a
//! temporary is created fresh (never through a symlink planted at its name), and a target that
//! is a symlink, a device or a FIFO is refused rather than replaced. A file the user names
//! (`--json FILE`) is written through [`write_output`], which follows a symlink to the user's
//! file and writes into a device or a FIFO instead of replacing it. Files the project appends
//! to or locks are opened without following symlinks ([`open_append`], [`Lock`]).
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
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

/// Clears O_NONBLOCK, which an open set only so that opening a FIFO could not wait forever.
fn set_blocking(file: &File) {
    // SAFETY: fcntl on a descriptor this process owns; no memory is passed.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
}

/// The sha256 of a file's content, in hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let file = crate::readfile::open(path)?;
    sha256_of(file).with_context(|| format!("{}: cannot read", path.display()))
}

/// This machine's name (lock holders and temporary names carry it).
pub fn host_name() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
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
        replaceable(path)?;
        let temporary = temporary_for(path);
        // create_new: O_CREAT | O_EXCL, which never follows a symlink planted at the name.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)
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
        replaceable(&self.path)?;
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

/// Whether `path` may be replaced by a rename: absent, or a regular file (not a symlink to one).
fn replaceable(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => bail!(
            "{} is {}, not a regular file: mfr only replaces regular files in its own folders; remove it or write elsewhere",
            path.display(),
            crate::readfile::kind_of(m.file_type())
        ),
        _ => Ok(()),
    }
}

/// Writes `bytes` as `path`, whole or not at all.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    file.commit()
}

/// Where a file the user named is written: the user's regular file behind a symlink, or the
/// path itself when nothing is there yet. Anything else (a directory, a device, a FIFO) is
/// refused: used for outputs that must be replaced whole (`mfr import --out`).
pub fn regular_output(path: &Path) -> Result<PathBuf> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => std::fs::canonicalize(path)
            .with_context(|| format!("{}: cannot resolve", path.display())),
        Ok(m) => bail!(
            "{} is {}: give the path of a regular file to write",
            path.display(),
            crate::readfile::kind_of(m.file_type())
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::fs::symlink_metadata(path).is_ok() {
                bail!(
                    "{} is a symbolic link to a missing file: remove it or give another path",
                    path.display()
                );
            }
            Ok(path.to_owned())
        }
        Err(e) => bail!("{}: cannot write ({e})", path.display()),
    }
}

/// Writes `bytes` to a file the user named (`--json FILE`): a regular file (or one behind a
/// symlink) is replaced whole, as [`write_atomic`] does; a character device (`/dev/null`,
/// `/dev/stdout`) or a FIFO is written into, never replaced. A FIFO must have a reader already
/// (no process waits forever on one).
pub fn write_output(path: &Path, bytes: &[u8]) -> Result<()> {
    let streamed = std::fs::metadata(path)
        .is_ok_and(|m| m.file_type().is_char_device() || m.file_type().is_fifo());
    if !streamed {
        return write_atomic(&regular_output(path)?, bytes);
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => anyhow::anyhow!(
                "{} is a FIFO with no reader: start the reader first",
                path.display()
            ),
            _ => anyhow::anyhow!("{}: cannot open for writing ({e})", path.display()),
        })?;
    // Blocking writes from here: a full pipe waits for its reader.
    set_blocking(&file);
    (&file)
        .write_all(bytes)
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// Opens a file of the project's own folders for appending (created if absent), never through a
/// symlink: a link planted at `path` is an error, not a way to write into the file it names.
pub fn open_append(path: &Path) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| not_followed(path, e))?;
    own_regular(&file, path)?;
    Ok(file)
}

/// The error of an open with O_NOFOLLOW: ELOOP means a symlink stood at the name.
fn not_followed(path: &Path, e: std::io::Error) -> anyhow::Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) => anyhow::anyhow!(
            "{} is a symbolic link: mfr does not write through links in its own folders; remove it",
            path.display()
        ),
        _ => anyhow::anyhow!("{}: cannot open ({e})", path.display()),
    }
}

/// Checks that an opened file is a regular file (not a FIFO or device planted at its name).
fn own_regular(file: &File, path: &Path) -> Result<()> {
    let kind = file
        .metadata()
        .with_context(|| format!("{}: cannot stat", path.display()))?
        .file_type();
    if !kind.is_file() {
        bail!(
            "{} is {}, not a regular file: remove it",
            path.display(),
            crate::readfile::kind_of(kind)
        );
    }
    Ok(())
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

/// The holder's line, as it wrote it into the lock file.
fn holder(file: &File) -> String {
    use std::os::unix::fs::FileExt;
    let mut bytes = [0u8; 4096];
    let n = file.read_at(&mut bytes, 0).unwrap_or(0);
    let text = String::from_utf8_lossy(&bytes[..n]);
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
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| not_followed(path, e))?;
        own_regular(&file, path)?;
        // flock(2): the kernel drops it when the holder dies, however it dies.
        if let Err(e) = file.try_lock() {
            if let std::fs::TryLockError::Error(e) = e {
                bail!("{}: cannot lock ({e})", path.display());
            }
            let who = holder(&file);
            if contention == Contention::Refuse {
                bail!(
                    "{} is being written by {who}: wait for it to finish, or pass --wait to queue behind it",
                    what.display()
                );
            }
            eprintln!("waiting for {who} to finish with {}", what.display());
            // A signal interrupts the wait; the wait goes on (a second Ctrl-C kills).
            while let Err(e) = file.lock() {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    bail!("{}: cannot lock ({e})", path.display());
                }
            }
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
