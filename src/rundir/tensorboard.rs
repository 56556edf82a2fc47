//! TensorBoard event files: `<run>/tensorboard/events.out.tfevents.0.mfr`, scalars only (loss,
//! v loss, grad norm, lr, img/s per logged step; FID per evaluated step and NFE), so
//! `tensorboard --logdir results/` plots every run. The format is TFRecord framing (length,
//! masked CRC-32C of the length, the bytes, their masked CRC-32C) around `Event` protocol
//! buffers; both are written here by hand (a few dozen lines against a protobuf toolchain).
use super::records::StatLine;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli), bitwise: records are small and written once per logged step.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// TFRecord's masked CRC.
fn masked(bytes: &[u8]) -> u32 {
    let crc = crc32c(bytes);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited protobuf field.
fn bytes_field(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(field << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// An `Event` holding `file_version` (the first record of every file) or scalar summaries.
fn event(wall_time: f64, step: u64, what: Result<&[(&str, f64)], &str>) -> Vec<u8> {
    let mut out = Vec::new();
    varint(1 << 3 | 1, &mut out); // wall_time, double
    out.extend_from_slice(&wall_time.to_le_bytes());
    varint(2 << 3, &mut out); // step, int64
    varint(step, &mut out);
    match what {
        Err(version) => bytes_field(3, version.as_bytes(), &mut out),
        Ok(scalars) => {
            let mut summary = Vec::new();
            for (tag, value) in scalars {
                let mut v = Vec::new();
                bytes_field(1, tag.as_bytes(), &mut v); // Summary.Value.tag
                varint(2 << 3 | 5, &mut v); // simple_value, float
                v.extend_from_slice(&(*value as f32).to_le_bytes());
                bytes_field(1, &v, &mut summary); // Summary.value
            }
            bytes_field(5, &summary, &mut out); // Event.summary
        }
    }
    out
}

/// One TFRecord.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked(data).to_le_bytes());
    out
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The event records of a stats line (wall time: when it was logged, as the run counts it).
fn stat_records(line: &StatLine, started: f64) -> Vec<u8> {
    let mut scalars = vec![
        ("train/loss", line.loss),
        ("train/v_loss", line.v_loss),
        ("train/grad_norm", line.grad_norm),
        ("train/lr", line.lr),
        ("train/img_per_s", line.img_per_s),
    ];
    scalars.extend(line.adaptive_weight.map(|w| ("train/adaptive_weight", w)));
    record(&event(started + line.wall_s, line.step, Ok(&scalars)))
}

/// The event file of a run directory.
pub struct Events {
    path: PathBuf,
}

impl Events {
    pub fn of(run: &Path) -> Events {
        Events {
            path: run.join("tensorboard").join("events.out.tfevents.0.mfr"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the file anew from `lines` (a run's stats.jsonl as it stands), atomically.
    pub fn rewrite(&self, lines: &[StatLine]) -> Result<()> {
        let dir = self.path.parent().expect("a folder");
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let started = now() - lines.last().map_or(0.0, |l| l.wall_s);
        let mut bytes = record(&event(now(), 0, Err("brain.Event:2")));
        for line in lines {
            bytes.extend(stat_records(line, started));
        }
        crate::files::write_atomic(&self.path, &bytes)
    }

    fn append(&self, bytes: &[u8]) -> Result<()> {
        if std::fs::symlink_metadata(&self.path).is_err() {
            self.rewrite(&[])?;
        }
        crate::files::open_append(&self.path)?
            .write_all(bytes)
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }

    /// Appends a stats line's scalars.
    pub fn stat(&self, line: &StatLine) -> Result<()> {
        self.append(&stat_records(line, now() - line.wall_s))
    }

    /// Appends `eval/fid_<nfe>` at `step`.
    pub fn fid(&self, step: u64, nfe: &str, fid: f64) -> Result<()> {
        let tag = format!("eval/fid_{}", nfe.to_lowercase().replace('-', ""));
        self.append(&record(&event(now(), step, Ok(&[(tag.as_str(), fid)]))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value of "123456789" (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
