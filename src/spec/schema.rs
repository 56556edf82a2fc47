//! The spec file's sections. Defaults are the paper's SiT-B/4 setting (its Sec. 4, Table 4,
//! Appendix A); every section rejects keys it does not know.
use crate::imf::{LatentNorm, SamplingGuidance, UncondOmega};
use crate::meanflow::JvpMethod;
use crate::model::{Conditioning, EmbedderInit};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The spec as written (and read back): serialised through [`Written`], which leaves out the
/// sections of the method the spec does not use.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Which objective, network and sampler (MeanFlow unless the spec says otherwise).
    #[serde(default)]
    pub method: Method,
    pub experiment: ExperimentSection,
    pub model: ModelSection,
    /// MeanFlow's objective (its defaults under `method = "imf"`, and then never written).
    #[serde(default)]
    pub meanflow: MeanFlowSection,
    /// Improved MeanFlow's objective and sampling guidance: None until resolved, and always
    /// None under MeanFlow (a MeanFlow spec that names it is refused).
    #[serde(default)]
    pub imf: Option<ImfSection>,
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

/// What `Spec` serialises as: the fields in the order MeanFlow specs have always been written
/// (so their text, and their hashes, stay the same), `method` only when it is not MeanFlow, and
/// only the section of the method in use.
#[derive(Serialize)]
struct Written<'a> {
    #[serde(skip_serializing_if = "is_default")]
    method: Method,
    experiment: &'a ExperimentSection,
    model: &'a ModelSection,
    #[serde(skip_serializing_if = "Option::is_none")]
    meanflow: Option<&'a MeanFlowSection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    imf: Option<&'a ImfSection>,
    train: &'a TrainSection,
    sample: &'a SampleSection,
    eval: &'a EvalSection,
    paper: &'a PaperSection,
    #[serde(skip_serializing_if = "no_entries")]
    sweep: &'a BTreeMap<String, Vec<toml::Value>>,
    #[serde(skip_serializing_if = "no_entries")]
    ablations: &'a BTreeMap<String, BTreeMap<String, Vec<toml::Value>>>,
}

fn no_entries<V>(map: &&BTreeMap<String, V>) -> bool {
    map.is_empty()
}

impl Serialize for Spec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Written {
            method: self.method,
            experiment: &self.experiment,
            model: &self.model,
            meanflow: (self.method == Method::MeanFlow).then_some(&self.meanflow),
            imf: self.imf.as_ref(),
            train: &self.train,
            sample: &self.sample,
            eval: &self.eval,
            paper: &self.paper,
            sweep: &self.sweep,
            ablations: &self.ablations,
        }
        .serialize(s)
    }
}

/// The method of the run: the objective, the network it trains and the sampler
/// ([`crate::method::Method`] is what the other modules take).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Method {
    /// MeanFlow (Geng et al. 2025) with a SiT: the presets SiT-* and the `[meanflow]` section.
    #[default]
    #[serde(rename = "meanflow")]
    MeanFlow,
    /// Improved MeanFlow (Geng et al., arXiv 2512.02012) with imfDiT: the presets iMF-* and the
    /// `[imf]` section.
    #[serde(rename = "imf")]
    Imf,
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
    /// The time embedders' init: "port" (the PyTorch port: t N(0, 0.02), h Xavier-uniform) or
    /// "official" (the official JAX code: both N(0, 0.02)). Left out of the TOML at its default,
    /// so the specs written before it keep their hashes.
    #[serde(default, skip_serializing_if = "is_default")]
    pub embedder_init: EmbedderInit,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// The keys a resolved spec leaves out of its TOML (and hash) while they hold their defaults,
/// with those defaults: added after the specs that predate them, which keep their hashes.
pub fn implicit_defaults() -> Vec<(&'static str, toml::Value)> {
    let text = |v: &dyn erased::AsText| toml::Value::String(v.text());
    vec![
        ("model.embedder_init", text(&EmbedderInit::default())),
        ("sample.precision", text(&SamplePrecision::default())),
        ("sample.labels", text(&SampleLabels::default())),
        ("train.cuda_graph", toml::Value::Boolean(false)),
        ("eval.bootstrap", toml::Value::Integer(DEFAULT_BOOTSTRAP)),
        ("method", text(&Method::default())),
    ]
}

mod erased {
    /// A unit enum's name as serde writes it.
    pub trait AsText {
        fn text(&self) -> String;
    }
    impl<T: serde::Serialize> AsText for T {
        fn text(&self) -> String {
            toml::Value::try_from(self)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        }
    }
}

/// How the sample stage's network runs: float32 (both references sample in float32) or under
/// bf16 autocast (faster, not what the paper's numbers were made with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplePrecision {
    #[default]
    Float32,
    Bf16,
}

/// The class labels of the sample batch: "balanced" (index mod num_classes, the PyTorch
/// port's) or "random" (uniform draws, as the official code samples for FID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleLabels {
    #[default]
    Balanced,
    Random,
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

/// Improved MeanFlow's objective (defaults: the official configs/default.py and imf.py, as
/// [`crate::imf::ImfConfig::official`]) and the guidance its samples are drawn at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImfSection {
    #[serde(rename = "P_mean")]
    pub p_mean: f64,
    #[serde(rename = "P_std")]
    pub p_std: f64,
    /// Fraction of each batch (its first rows) with r = t and the interval [0, 1].
    pub data_proportion: f64,
    /// omega ~ omega^-cfg_beta on [1, 1 + s_max] while training.
    pub cfg_beta: f64,
    pub s_max: f64,
    pub class_dropout: f64,
    pub norm_p: f64,
    pub norm_eps: f64,
    /// How du/dt is computed: "manual" (tangent rules through every imfDiT block) or
    /// "forward_ad" (libtorch's forward-mode AD). Same numbers (tests/parity_imf.rs).
    pub jvp: JvpMethod,
    /// The scale v_u of the target is conditioned on: "one" (the official code) or "omega" (the
    /// paper's Algorithm 2).
    pub uncond_omega: UncondOmega,
    /// The network's latent space: "per_channel" (the official normalisation by fixed ImageNet
    /// statistics, which the released checkpoints take) or "none" (the data's latents times
    /// 0.18215, as MeanFlow's). Pixel data (digits) is used as it is either way.
    pub latents: LatentNorm,
    /// The guidance scale and interval each schedule of `sample.schedules` samples at, in its
    /// order; one entry serves every schedule. The official configs/eval_config.yml per preset.
    pub guidance: Vec<SamplingGuidance>,
}

impl Default for ImfSection {
    fn default() -> Self {
        let c = crate::imf::ImfConfig::official();
        Self {
            p_mean: c.p_mean,
            p_std: c.p_std,
            data_proportion: c.data_proportion,
            cfg_beta: c.cfg_beta,
            s_max: c.s_max,
            class_dropout: c.class_dropout,
            norm_p: c.norm_p,
            norm_eps: c.norm_eps,
            jvp: c.jvp,
            uncond_omega: c.uncond_omega,
            latents: LatentNorm::PerChannel,
            // No guidance: omega 1 (the network's conditioning then says so) on the whole path.
            guidance: vec![SamplingGuidance {
                omega: 1.0,
                t_min: 0.0,
                t_max: 1.0,
            }],
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
    /// (beta1, beta2); a list so that a wrong length is named, not cut.
    pub betas: Vec<f64>,
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
            betas: vec![0.9, 0.95],
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
    /// The network's precision while sampling (the decoder runs as it always does).
    #[serde(skip_serializing_if = "is_default")]
    pub precision: SamplePrecision,
    #[serde(skip_serializing_if = "is_default")]
    pub labels: SampleLabels,
}

impl Default for SampleSection {
    fn default() -> Self {
        Self {
            schedules: vec![vec![1.0, 0.0], vec![1.0, 0.5, 0.0]],
            num_samples: 50_000,
            batch: 250,
            seed: 0,
            vae: "sd-vae-ft-ema".to_owned(),
            precision: SamplePrecision::Float32,
            labels: SampleLabels::Balanced,
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
    /// Resamples (half-samples) of each FID's 95% interval (0: none; see eval::bootstrap).
    #[serde(skip_serializing_if = "is_default_bootstrap")]
    pub bootstrap: i64,
}

/// Resamples of an FID's interval unless a spec says otherwise.
pub const DEFAULT_BOOTSTRAP: i64 = 200;

fn is_default_bootstrap(v: &i64) -> bool {
    *v == DEFAULT_BOOTSTRAP
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            reference: "VIRTUAL_imagenet256_labeled".to_owned(),
            batch: 250,
            steps: Vec::new(),
            bootstrap: DEFAULT_BOOTSTRAP,
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
