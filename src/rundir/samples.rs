//! A sample batch in ADM's format (an .npz whose arr_0 is (N, H, W, 3) uint8 and arr_1 the class
//! labels), made batch by batch: each finished batch is a part file (.npy) in `<npz>.parts/`,
//! written atomically. An interrupted stage keeps its parts; a part that is not exactly what
//! its batch must be (size, header, shape) is reported, to be drawn again from its seed; the
//! .npz is assembled (streamed, never held in memory) only from whole parts.
use crate::data::npy;
use crate::files::AtomicFile;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// The part files of one sample batch.
pub struct SampleParts {
    npz: PathBuf,
    dir: PathBuf,
    num_samples: i64,
    batch: i64,
    /// (H, W, 3) of every image.
    image: [usize; 3],
}

/// A header longer than this is not one a part file has (numpy pads them to 64 or 128 bytes).
const MAX_HEADER: usize = 4096;

impl SampleParts {
    /// The parts of `npz`: `num_samples` images of shape `image`, `batch` per part.
    pub fn new(npz: &Path, num_samples: i64, batch: i64, image: [usize; 3]) -> SampleParts {
        SampleParts {
            npz: npz.to_owned(),
            dir: npz.with_extension("parts"),
            num_samples,
            batch,
            image,
        }
    }

    pub fn npz(&self) -> &Path {
        &self.npz
    }

    pub fn batches(&self) -> i64 {
        (self.num_samples + self.batch - 1) / self.batch
    }

    /// Images in batch `b` (the last one may be short).
    pub fn size(&self, b: i64) -> i64 {
        self.batch.min(self.num_samples - b * self.batch)
    }

    fn part(&self, b: i64) -> PathBuf {
        self.dir.join(format!("batch-{b:06}.npy"))
    }

    /// Where batch `b`'s data starts in its part file, once the file is checked to be exactly
    /// what batch `b` must be: a uint8 array of `size(b)` images of the stage's shape, whole.
    fn check(&self, b: i64) -> Result<usize> {
        let path = self.part(b);
        let meta =
            std::fs::metadata(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        if !meta.is_file() {
            bail!("{}: not a regular file", path.display());
        }
        let mut head = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_HEADER as u64).read_to_end(&mut head))
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let header = npy::parse_header(&head)
            .with_context(|| format!("{}: not a readable .npy part", path.display()))?;
        let want: Vec<usize> = std::iter::once(self.size(b) as usize)
            .chain(self.image)
            .collect();
        // uint8 has no byte order: numpy writes |u1, some writers <u1.
        if !matches!(header.descr.as_str(), "|u1" | "<u1") || header.shape != want {
            bail!(
                "{}: holds {} {:?}, not this batch's uint8 {want:?}",
                path.display(),
                header.descr,
                header.shape
            );
        }
        let expected = header.data_offset + want.iter().product::<usize>();
        if meta.len() != expected as u64 {
            bail!(
                "{}: {} bytes, {expected} expected (a damaged or partial part)",
                path.display(),
                meta.len()
            );
        }
        Ok(header.data_offset)
    }

    /// The batches still to draw: those without a part file, and those whose part is damaged
    /// (removed here, with a warning naming it).
    pub fn missing(&self, batches: impl IntoIterator<Item = i64>) -> Vec<i64> {
        batches
            .into_iter()
            .filter(|&b| {
                if !self.part(b).exists() {
                    return true;
                }
                match self.check(b) {
                    Ok(_) => false,
                    Err(e) => {
                        eprintln!("warning: {e:#}; drawing batch {b} again from its seed");
                        let _ = std::fs::remove_file(self.part(b));
                        true
                    }
                }
            })
            .collect()
    }

    /// Writes batch `b`'s uint8 (N, H, W, 3) images as its part file.
    pub fn write(&self, b: i64, images: &Tensor) -> Result<()> {
        let shape: Vec<usize> = images.size().iter().map(|&d| d as usize).collect();
        let expected: Vec<usize> = std::iter::once(self.size(b) as usize)
            .chain(self.image)
            .collect();
        if shape != expected {
            bail!("batch {b} came out {shape:?}, not {expected:?}");
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("{}: cannot create", self.dir.display()))?;
        let data = images.to_device(Device::Cpu).contiguous();
        let mut bytes = vec![0u8; data.numel()];
        data.copy_data_u8(&mut bytes, data.numel());
        crate::files::write_atomic(&self.part(b), &npy::encode("|u1", &shape, &bytes))
    }

    /// Streams every part into one stored (uncompressed, zip64 when large) .npz with `labels`
    /// as arr_1, then removes the parts. Every part is checked first: a missing or damaged one
    /// fails the assembly, naming it. Returns the number of images.
    pub fn assemble(&self, labels: &[i64]) -> Result<usize> {
        if labels.len() != self.num_samples as usize {
            bail!("{} labels for {} samples", labels.len(), self.num_samples);
        }
        let offsets = (0..self.batches())
            .map(|b| self.check(b))
            .collect::<Result<Vec<usize>>>()
            .with_context(|| {
                format!(
                    "{}: cannot assemble; sample again to draw the batch anew",
                    self.npz.display()
                )
            })?;
        let n = self.num_samples as usize;
        let mut zip = zip::ZipWriter::new(AtomicFile::create(&self.npz)?);
        // A fixed timestamp: the same samples make the same bytes (and the same sha256).
        let options = zip::write::FileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .last_modified_time(zip::DateTime::default())
            .large_file(true);
        zip.start_file("arr_0.npy", options)?;
        let full: Vec<usize> = std::iter::once(n).chain(self.image).collect();
        zip.write_all(&npy::encode("|u1", &full, &[]))?;
        for (b, skip) in offsets.iter().enumerate() {
            let path = self.part(b as i64);
            let mut f = std::fs::File::open(&path)
                .with_context(|| format!("{}: cannot open", path.display()))?;
            std::io::copy(&mut (&mut f).take(*skip as u64), &mut std::io::sink())?;
            std::io::copy(&mut f, &mut zip)
                .with_context(|| format!("{}: cannot write", self.npz.display()))?;
        }
        zip.start_file("arr_1.npy", options)?;
        let label_bytes: Vec<u8> = labels.iter().flat_map(|l| l.to_le_bytes()).collect();
        zip.write_all(&npy::encode("<i8", &[n], &label_bytes))?;
        let out = zip.finish()?;
        out.commit()?;
        std::fs::remove_dir_all(&self.dir).ok();
        Ok(n)
    }
}
