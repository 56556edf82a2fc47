//! TensorBoard event files: `<run>/tensorboard/events.out.tfevents.0.mfr`, scalars only (loss,
//! v loss, grad norm, lr, img/s per logged step; FID per evaluated step and NFE), so
//! `tensorboard --logdir results/` plots every run. The format is TFRecord framing (length,
//! masked CRC-32C of the length, the bytes, their masked CRC-32C) around `Event` protocol
//! buffers: the CRC from the crc32c crate, the messages declared below with prost's derive (the
//! fields of tensorflow's event.proto and summary.proto that scalars use, with their tags).
use super::records::StatLine;
use anyhow::{Context, Result};
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};

/// tensorflow.Event.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    what: Option<What>,
}

/// Event.what: the first record's version, or a summary.
#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// tensorflow.Summary.
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// tensorflow.Summary.Value, a scalar: `simple_value` sits in a oneof, so it is written even
/// when 0.0 (TensorBoard skips a value whose oneof is unset).
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(oneof = "Scalar", tags = "2")]
    value: Option<Scalar>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Scalar {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
}

/// An `Event` holding `file_version` (the first record of every file) or scalar summaries.
fn event(wall_time: f64, step: u64, what: Result<&[(&str, f64)], &str>) -> Vec<u8> {
    let what = match what {
        Err(version) => What::FileVersion(version.to_owned()),
        Ok(scalars) => What::Summary(Summary {
            value: scalars
                .iter()
                .map(|(tag, value)| SummaryValue {
                    tag: (*tag).to_owned(),
                    value: Some(Scalar::SimpleValue(*value as f32)),
                })
                .collect(),
        }),
    };
    Event {
        wall_time,
        step: i64::try_from(step).unwrap_or(i64::MAX),
        what: Some(what),
    }
    .encode_to_vec()
}

/// TFRecord's masked CRC.
fn masked(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
        .rotate_right(15)
        .wrapping_add(0xa282_ead8)
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

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Records as TensorBoard's own writer frames them, from the venv's tensorboard 2.x:
    /// `event_pb2.Event(wall_time=1.5, step=7, summary=Summary(value=[Value(tag='train/loss',
    /// simple_value=0.0)]))` and `Event(wall_time=2.0, file_version='brain.Event:2')`, each
    /// serialised and framed with `struct.pack('<Q', len)`, `masked_crc32c` of the length, the
    /// bytes and `masked_crc32c` of the bytes (tensorflow_stub.pywrap_tensorflow).
    #[test]
    fn records_equal_tensorboards_bytes() {
        assert_eq!(
            hex(&record(&event(1.5, 7, Ok(&[("train/loss", 0.0)])))),
            "200000000000000029eda95009000000000000f83f10072a130a110a0a747261696e2f6c6f73731500000000844b8711"
        );
        assert_eq!(
            hex(&record(&event(2.0, 0, Err("brain.Event:2")))),
            "1800000000000000a37f4b220900000000000000401a0d627261696e2e4576656e743a32ff2ee0e7"
        );
    }
}
