//! The spec file's sections. Defaults are the paper's SiT-B/4 setting (facts: Sec. 4, Table 4,
//! Appendix A); every section rejects keys it does not know.
use crate::meanflow::{sampler, Guidance, JvpMethod, MeanFlowConfig, Tangent, TimeSampler};
use crate::model::{Conditioning, SiTConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

type Checked = Result<(), (String, String)>;

fn fail(key: &str, msg: impl Into<String>) -> Checked {
    Err((key.to_owned(), msg.into()))
}

fn require(ok: bool, key: &str, msg: &str) -> Checked {
    if ok {
        Ok(())
    } else {
        fail(key, msg)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub experiment: ExperimentSection,
    pub model: ModelSection,
    #[serde(default)]
    pub meanflow: MeanFlowSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub sample: SampleSection,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub paper: PaperSection,
    /// A grid over dotted keys (`"meanflow.data_proportion" = [1.0, 0.75]`): each point of the
    /// grid is its own run. Empty in a point's own resolved spec.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sweep: BTreeMap<String, Vec<toml::Value>>,
    /// One-factor-at-a-time studies, as paper Table 1 is: each named group is a grid like
    /// `sweep` around the base spec; the runs are the base spec (`default`) and every group's
    /// points, each distinct spec once.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ablations: BTreeMap<String, BTreeMap<String, Vec<toml::Value>>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSection {
    /// Names results/<name>/ and reports/<name>/.
    pub name: String,
    #[serde(default)]
    pub description: String,
}

/// A preset names the network; explicit fields override it (and are filled from it on resolve).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub preset: Option<String>,
    /// Weights to sample and evaluate instead of training: a checkpoint written by `mfr import`
    /// (e.g. the public meanflow-B4.pth) or by an earlier run. The train stage is then skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    pub depth: Option<i64>,
    pub hidden_size: Option<i64>,
    pub num_heads: Option<i64>,
    pub patch_size: Option<i64>,
    #[serde(default = "d::input_size")]
    pub input_size: i64,
    #[serde(default = "d::in_channels")]
    pub in_channels: i64,
    #[serde(default = "d::num_classes")]
    pub num_classes: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeSamplerName {
    LogitNormal,
    Uniform,
}

/// The JVP tangent (dz, dr, dt) as paper Table 1b writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JvpTangent {
    #[serde(rename = "v,0,1")]
    V01,
    #[serde(rename = "v,0,0")]
    V00,
    #[serde(rename = "v,1,0")]
    V10,
    #[serde(rename = "v,1,1")]
    V11,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeanFlowSection {
    pub time_sampler: TimeSamplerName,
    #[serde(rename = "P_mean")]
    pub p_mean: f64,
    #[serde(rename = "P_std")]
    pub p_std: f64,
    /// Fraction of samples with r = t (0.75: 25% have r != t, Table 1a).
    pub data_proportion: f64,
    pub omega: f64,
    pub kappa: f64,
    pub t_start: f64,
    pub t_end: f64,
    pub norm_p: f64,
    pub norm_eps: f64,
    pub class_dropout: f64,
    pub jvp_tangent: JvpTangent,
    pub conditioning: Conditioning,
    /// How du/dt is computed: "manual" (tangent rules beside the primal; no graph for the
    /// tangent) or "forward_ad" (libtorch's forward-mode AD, as the reference). Same numbers.
    pub jvp: JvpMethod,
}

impl Default for MeanFlowSection {
    fn default() -> Self {
        Self {
            time_sampler: TimeSamplerName::LogitNormal,
            p_mean: -0.4,
            p_std: 1.0,
            data_proportion: 0.75,
            omega: 1.0,
            kappa: 0.0,
            t_start: 0.0,
            t_end: 1.0,
            norm_p: 1.0,
            norm_eps: 0.01,
            class_dropout: 0.1,
            jvp_tangent: JvpTangent::V01,
            conditioning: Conditioning::THalf,
            jvp: JvpMethod::Manual,
        }
    }
}

/// Training precision: f32 params with bf16 autocast (the PyTorch port), plain f32 (the
/// official code), f32 with TF32 matrix products, or f64 (CPU checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Bf16,
    F32,
    Tf32,
    F64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Latent dataset directory (or `digits` for the bundled demo data).
    pub data: String,
    /// Global batch.
    pub batch: i64,
    pub epochs: i64,
    pub lr: f64,
    pub betas: [f64; 2],
    pub weight_decay: f64,
    pub warmup_steps: i64,
    /// Gradient-norm clip; 0 disables it (the official code does not clip, the port clips at 1).
    pub grad_clip: f64,
    pub ema_decay: f64,
    pub precision: Precision,
    pub seed: u64,
    /// Micro-batches per step (the batch stays global; gradients are summed).
    pub grad_accumulation: i64,
    pub log_every: i64,
    pub checkpoint_every: i64,
    /// How many of the newest checkpoints to keep...
    pub keep_checkpoints: i64,
    /// ...besides these steps, kept whatever happens.
    pub pin_checkpoints: Vec<u64>,
    pub device: String,
    /// Replay the training step as one captured CUDA graph (the same kernels, one launch).
    /// Off until measured on a GPU; one process only. Left out of the TOML (and so of the
    /// spec's hash) when off, so the specs written before it keep their run directories.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cuda_graph: bool,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            data: "data/imagenet256-latents".to_owned(),
            batch: 256,
            epochs: 80,
            lr: 1e-4,
            betas: [0.9, 0.95],
            weight_decay: 0.0,
            warmup_steps: 0,
            grad_clip: 0.0,
            ema_decay: 0.9999,
            precision: Precision::Bf16,
            seed: 0,
            grad_accumulation: 1,
            log_every: 100,
            checkpoint_every: 10_000,
            keep_checkpoints: 3,
            pin_checkpoints: Vec::new(),
            device: "cuda".to_owned(),
            cuda_graph: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleSection {
    /// Decreasing time lists from 1 to 0; [1.0, 0.0] is 1-NFE.
    pub schedules: Vec<Vec<f64>>,
    pub num_samples: i64,
    pub batch: i64,
    pub seed: u64,
    pub vae: String,
}

impl Default for SampleSection {
    fn default() -> Self {
        Self {
            schedules: vec![vec![1.0, 0.0], vec![1.0, 0.5, 0.0]],
            num_samples: 50_000,
            batch: 250,
            seed: 0,
            vae: "sd-vae-ft-ema".to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// The reference batch asset (ADM's VIRTUAL_imagenet256_labeled.npz).
    pub reference: String,
    pub batch: i64,
    /// Training steps whose checkpoints are saved, kept, sampled and evaluated besides the
    /// final one: the report's FID against training step.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<u64>,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            reference: "VIRTUAL_imagenet256_labeled".to_owned(),
            batch: 250,
            steps: Vec::new(),
        }
    }
}

/// Rows of paper/meanflow.toml this experiment reproduces, and how close counts as reproduced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaperSection {
    pub rows: Vec<String>,
    /// Relative FID tolerance for a "reproduced" verdict.
    pub tolerance: f64,
}

impl Default for PaperSection {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            tolerance: 0.1,
        }
    }
}

mod d {
    pub fn input_size() -> i64 {
        32
    }
    pub fn in_channels() -> i64 {
        4
    }
    pub fn num_classes() -> i64 {
        1000
    }
}

impl Spec {
    /// Fills the model's shape from its preset; a field set in the file wins over the preset.
    pub(super) fn resolve(&mut self) -> Checked {
        let m = &mut self.model;
        if let Some(name) = &m.preset {
            let Some(p) = SiTConfig::preset(name) else {
                return fail(
                    "model.preset",
                    format!(
                        "unknown preset `{name}`, expected one of {}",
                        SiTConfig::preset_names().join(", ")
                    ),
                );
            };
            m.depth.get_or_insert(p.depth);
            m.hidden_size.get_or_insert(p.hidden_size);
            m.num_heads.get_or_insert(p.num_heads);
            m.patch_size.get_or_insert(p.patch_size);
        }
        for (key, v) in [
            ("depth", m.depth),
            ("hidden_size", m.hidden_size),
            ("num_heads", m.num_heads),
            ("patch_size", m.patch_size),
        ] {
            if v.is_none() {
                return fail(
                    &format!("model.{key}"),
                    "missing: set it or name a `preset`",
                );
            }
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Checked {
        let c = self.model_config();
        for (key, v) in [
            ("model.depth", c.depth),
            ("model.hidden_size", c.hidden_size),
            ("model.num_heads", c.num_heads),
            ("model.patch_size", c.patch_size),
            ("model.input_size", c.input_size),
            ("model.in_channels", c.in_channels),
            ("model.num_classes", c.num_classes),
        ] {
            require(v > 0, key, &format!("expected a positive integer, got {v}"))?;
        }
        require(
            c.hidden_size % c.num_heads == 0,
            "model.num_heads",
            "must divide model.hidden_size",
        )?;
        require(
            c.hidden_size % 4 == 0,
            "model.hidden_size",
            "must be a multiple of 4 (2-D sin-cos positions)",
        )?;
        require(
            c.input_size % c.patch_size == 0,
            "model.patch_size",
            "must divide model.input_size",
        )?;

        let m = &self.meanflow;
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        require(
            m.p_std > 0.0,
            "meanflow.P_std",
            "expected a positive number",
        )?;
        require(
            m.p_mean.is_finite(),
            "meanflow.P_mean",
            "expected a finite number",
        )?;
        require(
            unit(m.data_proportion),
            "meanflow.data_proportion",
            "expected a fraction in [0, 1]",
        )?;
        require(
            m.omega > 0.0 && m.omega.is_finite(),
            "meanflow.omega",
            "expected a positive number (1.0 = no guidance)",
        )?;
        require(
            (0.0..1.0).contains(&m.kappa),
            "meanflow.kappa",
            "expected a number in [0, 1)",
        )?;
        require(
            unit(m.t_start),
            "meanflow.t_start",
            "expected a time in [0, 1]",
        )?;
        require(unit(m.t_end), "meanflow.t_end", "expected a time in [0, 1]")?;
        require(
            m.t_start <= m.t_end,
            "meanflow.t_end",
            "must not be below meanflow.t_start",
        )?;
        require(m.norm_p >= 0.0, "meanflow.norm_p", "expected a number >= 0")?;
        require(
            m.norm_eps > 0.0,
            "meanflow.norm_eps",
            "expected a positive number",
        )?;
        require(
            (0.0..1.0).contains(&m.class_dropout),
            "meanflow.class_dropout",
            "expected a probability in [0, 1)",
        )?;

        let t = &self.train;
        require(t.batch > 0, "train.batch", "expected a positive integer")?;
        require(t.epochs > 0, "train.epochs", "expected a positive integer")?;
        require(t.lr > 0.0, "train.lr", "expected a positive number")?;
        require(
            t.betas.iter().all(|b| (0.0..1.0).contains(b)),
            "train.betas",
            "expected two numbers in [0, 1)",
        )?;
        require(
            t.weight_decay >= 0.0,
            "train.weight_decay",
            "expected a number >= 0",
        )?;
        require(
            t.warmup_steps >= 0,
            "train.warmup_steps",
            "expected an integer >= 0",
        )?;
        require(
            t.grad_clip >= 0.0,
            "train.grad_clip",
            "expected a number >= 0 (0 disables clipping)",
        )?;
        require(
            (0.0..1.0).contains(&t.ema_decay),
            "train.ema_decay",
            "expected a number in [0, 1)",
        )?;
        require(
            t.log_every > 0,
            "train.log_every",
            "expected a positive integer",
        )?;
        require(
            t.checkpoint_every > 0,
            "train.checkpoint_every",
            "expected a positive integer",
        )?;
        require(
            t.keep_checkpoints > 0,
            "train.keep_checkpoints",
            "expected a positive integer",
        )?;
        if let Err(e) = crate::device::parse_name(&t.device) {
            return fail("train.device", e.to_string());
        }

        let s = &self.sample;
        require(
            !s.schedules.is_empty(),
            "sample.schedules",
            "expected at least one schedule, e.g. [[1.0, 0.0]]",
        )?;
        for schedule in &s.schedules {
            if let Err(e) = sampler::check_schedule(schedule) {
                return fail("sample.schedules", e.to_string());
            }
        }
        require(
            s.num_samples > 0,
            "sample.num_samples",
            "expected a positive integer",
        )?;
        require(s.batch > 0, "sample.batch", "expected a positive integer")?;
        require(
            self.eval.batch > 0,
            "eval.batch",
            "expected a positive integer",
        )?;
        require(
            self.paper.tolerance > 0.0,
            "paper.tolerance",
            "expected a positive number",
        )?;
        Ok(())
    }

    /// The network's checked shape (call on a resolved spec).
    pub fn model_config(&self) -> SiTConfig {
        let m = &self.model;
        let get = |v: Option<i64>| v.expect("resolved spec has the model's shape");
        SiTConfig {
            input_size: m.input_size,
            patch_size: get(m.patch_size),
            in_channels: m.in_channels,
            hidden_size: get(m.hidden_size),
            depth: get(m.depth),
            num_heads: get(m.num_heads),
            num_classes: m.num_classes,
            conditioning: self.meanflow.conditioning,
        }
    }

    pub fn meanflow_config(&self) -> MeanFlowConfig {
        self.meanflow.config()
    }
}

impl MeanFlowSection {
    /// The loss's checked runtime config.
    pub fn config(&self) -> MeanFlowConfig {
        let m = self;
        let (dr, dt) = match m.jvp_tangent {
            JvpTangent::V01 => (0.0, 1.0),
            JvpTangent::V00 => (0.0, 0.0),
            JvpTangent::V10 => (1.0, 0.0),
            JvpTangent::V11 => (1.0, 1.0),
        };
        MeanFlowConfig {
            time_sampler: match m.time_sampler {
                TimeSamplerName::LogitNormal => TimeSampler::LogitNormal {
                    p_mean: m.p_mean,
                    p_std: m.p_std,
                },
                TimeSamplerName::Uniform => TimeSampler::Uniform,
            },
            data_proportion: m.data_proportion,
            guidance: Guidance {
                omega: m.omega,
                kappa: m.kappa,
                t_start: m.t_start,
                t_end: m.t_end,
            },
            class_dropout: m.class_dropout,
            tangent: Tangent { dr, dt },
            jvp: m.jvp,
            norm_p: m.norm_p,
            norm_eps: m.norm_eps,
        }
    }
}
