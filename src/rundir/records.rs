//! The JSON records of a run directory, one type per file (or per line, for stats.jsonl).
//! Writers and readers share them; a file that lacks a field fails to read with its name.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// env.json: what produced the run (the session that started it: its training, for a trained
/// run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Env {
    pub code_commit: String,
    pub mfr_version: String,
    pub tch: String,
    pub libtorch: String,
    /// The training device as a person names it ("NVIDIA H200", "cpu (2 threads)").
    pub device: String,
    /// The NVIDIA driver's CUDA version ("13.0"), on a GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_driver: Option<String>,
    /// The CUDA version libtorch was built with ("13.0"), on a GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_runtime: Option<String>,
    /// Data-parallel processes.
    #[serde(default = "one")]
    pub world_size: usize,
    /// The command that ran, as typed.
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub host: String,
}

/// This process's command line, the program by its file name (not one machine's folder).
fn command_line() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(program) = args.first_mut() {
        if let Some(name) = std::path::Path::new(program.as_str()).file_name() {
            *program = name.to_string_lossy().into_owned();
        }
    }
    args.join(" ")
}

fn one() -> usize {
    1
}

impl Env {
    /// This build, this process's command line and host, on `device` with `world_size`
    /// processes.
    pub fn current(device: anyhow::Result<tch::Device>, world_size: usize) -> Env {
        let cuda = device.as_ref().ok().and_then(|d| match d {
            tch::Device::Cuda(i) => crate::device::cuda_facts(*i).ok(),
            _ => None,
        });
        Env {
            code_commit: env!("MFR_GIT_COMMIT").to_owned(),
            mfr_version: env!("CARGO_PKG_VERSION").to_owned(),
            tch: "0.24.0".to_owned(),
            libtorch: "2.11.0".to_owned(),
            device: match device {
                Ok(d) => crate::device::describe(d),
                Err(e) => e.to_string(),
            },
            cuda_driver: cuda.map(|(_, driver)| driver),
            cuda_runtime: crate::device::cuda_runtime(),
            world_size,
            command: command_line(),
            host: crate::files::host_name(),
        }
    }
}

/// One line of stats.jsonl: the means over the steps since the previous line.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StatLine {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub v_loss: f64,
    /// The batch mean of the adaptive weight (None in logs from before it was logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_weight: Option<f64>,
    pub grad_norm: f64,
    pub lr: f64,
    /// Wall-clock fields: they differ between a resumed run and an uninterrupted one.
    pub img_per_s: f64,
    pub wall_s: f64,
}

/// What the sample stage was made from (samples/inputs.json, and metrics.json's `inputs`): the
/// evaluate stage is current when it names the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleInputs {
    pub weights: String,
    pub schedules: Vec<Vec<f64>>,
    pub num_samples: i64,
    pub seed: u64,
    /// None for pixel-space data (nothing to decode).
    pub vae: Option<String>,
    /// The checkpoints of `eval.steps` sampled besides the final weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<u64>,
    /// The network's precision and the labels ("float32", "balanced"): empty in files written
    /// before they were recorded, which then no longer match (their samples are drawn again).
    #[serde(default)]
    pub precision: String,
    #[serde(default)]
    pub labels: String,
}

/// One point of FID against training step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    pub step: u64,
    /// "1-NFE", "2-NFE", ...
    pub nfe: String,
    pub fid: f64,
    /// Its interval, as for the final weights' (none in files from before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fid_interval: Option<crate::eval::bootstrap::Interval>,
}

/// samples/metrics.json: the evaluate stage's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// FID of the final weights' samples per schedule ("1-NFE" -> FID).
    pub fid: BTreeMap<String, f64>,
    /// Each of those FIDs' bootstrap interval (none in files from before intervals).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fid_interval: BTreeMap<String, crate::eval::bootstrap::Interval>,
    /// FID per evaluated training step (the final one and those of `eval.steps`).
    pub history: Vec<HistoryPoint>,
    /// ADM's five metrics per schedule (latent runs scored against a reference batch).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub adm: BTreeMap<String, crate::eval::AdmScores>,
    pub num_samples: i64,
    pub num_reference: usize,
    pub note: String,
    /// The reference batch; None: the training images (pixel-space data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    pub inputs: SampleInputs,
    pub inception_weights: String,
}

impl Metrics {
    /// FID per NFE, e.g. [(1, 61.2), (2, 55.0)].
    pub fn fids(&self) -> Vec<(i64, f64)> {
        let mut out: Vec<(i64, f64)> = self
            .fid
            .iter()
            .filter_map(|(k, v)| Some((k.strip_suffix("-NFE")?.parse().ok()?, *v)))
            .collect();
        out.sort_by_key(|p| p.0);
        out
    }
}

/// results/<experiment>/runs.json: the runs of one `mfr run` and their FIDs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentIndex {
    pub experiment: String,
    pub spec: String,
    pub runs: BTreeMap<String, String>,
    pub fid: BTreeMap<String, BTreeMap<String, f64>>,
}
