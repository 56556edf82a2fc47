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
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let archive = zip::ZipArchive::new(BufReader::new(file)).with_context(|| {
            format!(
                "{}: not a readable .npz (zip) file; truncated?",
                path.display()
            )
        })?;
        Ok(Self {
            path: path.to_owned(),
            archive,
        })
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
        let mut preamble = vec![0u8; 12];
        member
            .read_exact(&mut preamble)
            .with_context(|| format!("{path}: `{name}` is truncated"))?;
        let (start, len) = npy::header_len(&preamble)
            .with_context(|| format!("{path}: `{name}` is not an .npy array"))?;
        let mut bytes = preamble;
        bytes.resize(start + len, 0);
        member
            .read_exact(&mut bytes[12..])
            .with_context(|| format!("{path}: `{name}` is truncated"))?;
        let header = npy::parse_header(&bytes)
            .with_context(|| format!("{path}: `{name}` has a malformed header"))?;
        Ok((member, header))
    }

    /// A whole float array (statistics such as mu, sigma) as float64.
    pub fn floats(&mut self, name: &str) -> Result<Tensor> {
        let path = self.path.display().to_string();
        let (mut member, header) = self.member(name)?;
        let mut body = Vec::new();
        member
            .read_to_end(&mut body)
            .with_context(|| format!("{path}: `{name}` is truncated or corrupt"))?;
        let count: usize = header.shape.iter().product();
        let values = npy::floats(&header.descr, &body, count)
            .with_context(|| format!("{path}: `{name}`"))?;
        let shape: Vec<i64> = header.shape.iter().map(|&d| d as i64).collect();
        Ok(Tensor::from_slice(&values).view(shape.as_slice()))
    }

    /// uint8 NHWC images (`arr_0`), read `batch` at a time.
    pub fn images(&mut self, name: &str) -> Result<Images<'_>> {
        let path = self.path.display().to_string();
        let (member, header) = self.member(name)?;
        if header.descr != "|u1" {
            bail!(
                "{path}: `{name}` holds {}, expected uint8 images (|u1)",
                header.descr
            );
        }
        let [n, h, w, c] = header.shape[..] else {
            bail!(
                "{path}: `{name}` is {:?}, expected (N, H, W, 3) images",
                header.shape
            );
        };
        if c != 3 {
            bail!("{path}: `{name}` has {c} channels, expected 3 (RGB, NHWC)");
        }
        Ok(Images {
            path,
            name: name.to_owned(),
            member,
            shape: [n, h, w, c],
            read: 0,
        })
    }
}

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

    /// The next (up to) `batch` images as a (B, H, W, 3) uint8 tensor; None at the end.
    pub fn next_batch(&mut self, batch: usize) -> Result<Option<Tensor>> {
        let take = batch.min(self.shape[0] - self.read);
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
        Ok(Some(Tensor::from_slice(&bytes).view([
            take as i64,
            h as i64,
            w as i64,
            c as i64,
        ])))
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
