//! .npz files as the ADM evaluator takes them: a zip of .npy members (stored or deflated).
//! Members are read as streams: a 2 GB reference batch is never held whole, and a truncated or
//! malformed file is an error naming the file and the member.
use crate::data::npy;
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub struct Npz {
    path: PathBuf,
    archive: zip::ZipArchive<BufReader<File>>,
}

impl Npz {
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::readfile::open(path)?;
        let mut archive = zip::ZipArchive::new(BufReader::new(file)).with_context(|| {
            format!(
                "{}: not a readable .npz (zip) file; truncated?",
                path.display()
            )
        })?;
        if let Some(name) = crate::readfile::zip_duplicate(&mut archive) {
            bail!(
                "{}: holds two members named {name}, which readers resolve differently; write the arrays once each",
                path.display()
            );
        }
        Ok(Self {
            path: path.to_owned(),
            archive,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn has(&self, name: &str) -> bool {
        self.archive
            .file_names()
            .any(|n| n == format!("{name}.npy"))
    }

    fn member(&mut self, name: &str) -> Result<(zip::read::ZipFile<'_>, npy::Header)> {
        let path = self.path.display().to_string();
        let mut member = self
            .archive
            .by_name(&format!("{name}.npy"))
            .with_context(|| format!("{path}: has no array `{name}`"))?;
        let header = npy::read_header(&mut member)
            .with_context(|| format!("{path}: `{name}` is not a readable .npy array"))?;
        Ok((member, header))
    }

    /// A whole float array (statistics such as mu, sigma) as float64, of at most `max` values.
    pub fn floats(&mut self, name: &str, max: usize) -> Result<Tensor> {
        let path = self.path.display().to_string();
        let (member, header) = self.member(name)?;
        let count = header
            .count()
            .with_context(|| format!("{path}: `{name}`"))?;
        if count > max {
            bail!(
                "{path}: `{name}` is {:?}, more than the {max} values it can hold",
                header.shape
            );
        }
        let width = npy::float_width(&header.descr).with_context(|| format!("{path}: `{name}`"))?;
        let mut body = Vec::with_capacity(count * width);
        member
            .take((count * width) as u64)
            .read_to_end(&mut body)
            .with_context(|| format!("{path}: `{name}` is truncated or corrupt"))?;
        let values = npy::floats(&header.descr, &body, count)
            .with_context(|| format!("{path}: `{name}`"))?;
        let shape: Vec<i64> = header.shape.iter().map(|&d| d as i64).collect();
        Ok(Tensor::from_slice(&values).view(shape.as_slice()))
    }

    /// uint8 NHWC images (`arr_0`; 1 or 3 channels, read as RGB), read a batch at a time.
    pub fn images(&mut self, name: &str) -> Result<Images<'_>> {
        let path = self.path.display().to_string();
        let (member, header) = self.member(name)?;
        if !matches!(header.descr.as_str(), "|u1" | "<u1") {
            bail!(
                "{path}: `{name}` holds {}, expected uint8 images (|u1)",
                header.descr
            );
        }
        let shape = image_shape(&header.shape).with_context(|| format!("{path}: `{name}`"))?;
        let count = header
            .count()
            .with_context(|| format!("{path}: `{name}`"))?;
        let held = member.size().saturating_sub(header.data_offset as u64);
        if held < count as u64 {
            bail!(
                "{path}: `{name}` declares {:?} images ({count} bytes) but holds {held} bytes: truncated or crafted",
                header.shape
            );
        }
        Ok(Images {
            path,
            name: name.to_owned(),
            member,
            shape,
            read: 0,
        })
    }
}

/// The largest image side read (ADM's batches are 256 or 512; Inception sees 299).
pub const MAX_SIDE: usize = 4096;

/// (N, H, W, C) images, each side within [`MAX_SIDE`], 1 or 3 channels, checked not to be
/// channel-first data (N, C, H, W) that happens to end in 3.
pub fn image_shape(shape: &[usize]) -> Result<[usize; 4]> {
    let [n, h, w, c] = shape[..] else {
        bail!("is {shape:?}, expected (N, H, W, 3) images");
    };
    if n == 0 || h == 0 || w == 0 {
        bail!("is {shape:?}: no images to read");
    }
    if h > MAX_SIDE || w > MAX_SIDE {
        bail!("is {shape:?}: images larger than {MAX_SIDE} pixels a side are not read");
    }
    if c != 1 && c != 3 {
        bail!("has {c} channels, expected 3 (RGB) or 1 (grey), channels last (NHWC)");
    }
    if h <= 3 && w > 4 * h {
        bail!("is {shape:?}: {h}-pixel-high images look like channel-first (N, C, H, W) data; write NHWC");
    }
    Ok([n, h, w, c])
}

/// Bytes of images read at once, whatever batch is asked for.
pub const MAX_BATCH_BYTES: usize = 1 << 30;

pub struct Images<'a> {
    path: String,
    name: String,
    member: zip::read::ZipFile<'a>,
    pub shape: [usize; 4],
    read: usize,
}

impl Images<'_> {
    pub fn len(&self) -> usize {
        self.shape[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next (up to) `batch` images as a (B, H, W, 3) uint8 tensor (grey images repeated to
    /// RGB); None at the end. At most [`MAX_BATCH_BYTES`] are read at once.
    pub fn next_batch(&mut self, batch: usize) -> Result<Option<Tensor>> {
        let per_image = self.shape[1] * self.shape[2] * self.shape[3];
        let take = batch
            .min(MAX_BATCH_BYTES / per_image)
            .max(1)
            .min(self.shape[0] - self.read);
        if take == 0 {
            return Ok(None);
        }
        let [_, h, w, c] = self.shape;
        let mut bytes = vec![0u8; take * h * w * c];
        self.member.read_exact(&mut bytes).with_context(|| {
            format!(
                "{}: `{}` ends after {} of {} images (truncated file?)",
                self.path, self.name, self.read, self.shape[0]
            )
        })?;
        self.read += take;
        let images = Tensor::from_slice(&bytes).view([take as i64, h as i64, w as i64, c as i64]);
        Ok(Some(match c {
            1 => images.repeat([1, 1, 1, 3]),
            _ => images,
        }))
    }
}

/// Writes uint8 NHWC images as an ADM-style .npz (`arr_0`, stored): samples and tests use it.
pub fn write_images(path: &Path, images: &Tensor) -> Result<()> {
    let shape: Vec<usize> = images.size().iter().map(|&d| d as usize).collect();
    let data = images.to_kind(Kind::Uint8).contiguous();
    let mut bytes = vec![0u8; data.numel()];
    data.copy_data_u8(&mut bytes, data.numel());
    let npy = npy::encode("|u1", &shape, &bytes);
    let mut zip = zip::ZipWriter::new(crate::files::AtomicFile::create(path)?);
    let options = zip::write::FileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(npy.len() > u32::MAX as usize);
    zip.start_file("arr_0.npy", options)?;
    std::io::Write::write_all(&mut zip, &npy)?;
    zip.finish()?.commit()
}
