//! One writer per run directory: an advisory lock (flock) on its `lock` file, which the kernel
//! releases when the holding process dies however it dies, so a killed run never leaves a stale
//! lock. The file names its holder (pid, host, command) for the message a second writer gets.
//! Data-parallel ranks count as one writer: rank 0 holds the lock for the group.
use crate::files::host_name;
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Held while it lives; dropping it releases the lock.
#[derive(Debug)]
pub struct RunLock {
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

impl RunLock {
    /// Takes the lock of `dir` (created if needed) for `command`, e.g. "mfr train".
    pub fn acquire(dir: &Path, command: &str, contention: Contention) -> Result<RunLock> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let path = dir.join("lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        if let Err(e) = flock(&file, false) {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                bail!("{}: cannot lock ({e})", path.display());
            }
            let who = holder(&path);
            if contention == Contention::Refuse {
                bail!(
                    "{} is being written by {who}: wait for it to finish, or pass --wait to queue behind it",
                    dir.display()
                );
            }
            eprintln!("waiting for {who} to finish with {}", dir.display());
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
        crate::files::remove_stale_temporaries(dir);
        Ok(RunLock { _file: file, path })
    }
}
