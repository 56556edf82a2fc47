//! Opening a file named from outside (a weight file, an image, a latent, a reference batch) for
//! reading: regular files only. Opening a FIFO for reading blocks until a writer comes, and a
//! device or a socket yields endless or no bytes, so each is refused with a sentence before any
//! read. The check is made on the path, then again on the opened descriptor (opened without
//! blocking), so a file swapped for a FIFO in between is refused too. Symlinks to regular files
//! are followed: datasets are often links into shared storage.
use anyhow::{bail, Context, Result};
use std::fs::FileType;
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// What a non-regular file is, for an error sentence.
pub fn kind_of(t: FileType) -> &'static str {
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "a special file"
    }
}

fn refuse(path: &Path, meta: &Metadata) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: {}, not a regular file; give the path of the file itself",
        path.display(),
        kind_of(meta.file_type())
    )
}

/// `path`'s metadata if it is a regular file (or a symlink to one); otherwise one sentence
/// saying what it is. Nothing is opened.
pub fn regular(path: &Path) -> Result<Metadata> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if !meta.is_file() {
        return Err(refuse(path, &meta));
    }
    Ok(meta)
}

/// Opens `path` for reading if it is a regular file (or a symlink to one); otherwise one
/// sentence saying what it is.
pub fn open(path: &Path) -> Result<File> {
    regular(path)?;
    open_flags(path, 0)
}

/// Opens `path` for reading if it is a regular file itself: a symlink is refused, not followed
/// (what a report copies must be the run's own file, not what a link points at).
pub fn open_no_follow(path: &Path) -> Result<File> {
    open_flags(path, libc::O_NOFOLLOW)
}

fn open_flags(path: &Path, flags: i32) -> Result<File> {
    // O_NONBLOCK: should the path have become a FIFO since it was checked, the open returns at
    // once and the check below refuses it. Reads of regular files ignore the flag.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | flags)
        .open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("{}: cannot read", path.display()))?;
    if !meta.is_file() {
        return Err(refuse(path, &meta));
    }
    Ok(file)
}

/// The whole content of a regular file, of at most `max` bytes (a larger file is refused
/// before anything is read).
pub fn read(path: &Path, max: u64) -> Result<Vec<u8>> {
    let file = open(path)?;
    let len = file
        .metadata()
        .with_context(|| format!("{}: cannot read", path.display()))?
        .len();
    if len > max {
        bail!(
            "{}: {len} bytes, more than the {max} this reader takes",
            path.display()
        );
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max)
        .read_to_end(&mut bytes)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(bytes)
}

/// [`read`] as UTF-8 text.
pub fn read_to_string(path: &Path, max: u64) -> Result<String> {
    String::from_utf8(read(path, max)?)
        .with_context(|| format!("{}: not UTF-8 text", path.display()))
}

/// The identity of a folder (device, inode): what a walk remembers to notice a symlink that
/// leads back into a folder it has already entered.
pub fn folder_id(path: &Path) -> Result<(u64, u64)> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("{}: cannot list", path.display()))?;
    Ok((meta.dev(), meta.ino()))
}

/// The first member name a zip archive holds twice, if any. An archive's name table keeps one
/// of them, and which one a reader takes differs between readers, so such a file is ambiguous.
pub fn zip_duplicate<R: std::io::Read + std::io::Seek>(
    archive: &mut zip::ZipArchive<R>,
) -> Option<String> {
    if archive.file_names().count() == archive.len() {
        return None;
    }
    let mut seen = std::collections::HashSet::new();
    (0..archive.len())
        .filter_map(|i| Some(archive.by_index_raw(i).ok()?.name().to_owned()))
        .find(|name| !seen.insert(name.clone()))
}
