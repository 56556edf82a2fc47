//! The checked runtime configs a validated spec gives the other modules, each defined by the
//! module that takes it (`SiTConfig` in model, `MeanFlowConfig` in meanflow, ...).
use super::schema::{JvpTangent, MeanFlowSection, Spec, TimeSamplerName};
use crate::meanflow::{Guidance, MeanFlowConfig, Tangent, TimeSampler};
use crate::model::SiTConfig;

impl Spec {
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
            time_embedding: crate::model::TimeEmbedding::Float32,
            embedder_init: m.embedder_init,
        }
    }

    pub fn meanflow_config(&self) -> MeanFlowConfig {
        self.meanflow.config()
    }

    /// The training loop's checked runtime config (call on a validated spec).
    pub fn train_config(&self) -> crate::train::TrainConfig {
        let t = &self.train;
        let count = |v: i64| u64::try_from(v).expect("validated as positive");
        crate::train::TrainConfig {
            spec_sha256: self.sha256(),
            label: self.experiment.name.clone(),
            data: t.data.clone(),
            model: self.model_config(),
            meanflow: self.meanflow_config(),
            batch: count(t.batch) as usize,
            epochs: count(t.epochs),
            lr: t.lr,
            warmup_steps: count(t.warmup_steps),
            betas: [t.betas[0], t.betas[1]],
            weight_decay: t.weight_decay,
            grad_clip: t.grad_clip,
            ema_decay: t.ema_decay,
            precision: t.precision,
            seed: t.seed,
            accumulation: count(t.grad_accumulation) as usize,
            log_every: count(t.log_every),
            checkpoint_every: count(t.checkpoint_every),
            keep_checkpoints: count(t.keep_checkpoints) as usize,
            pin_checkpoints: t.pin_checkpoints.clone(),
            eval_steps: self.eval.steps.clone(),
            device: t.device.clone(),
            cuda_graph: t.cuda_graph,
        }
    }

    /// Sampling's checked runtime config.
    pub fn sample_config(&self) -> crate::sample::SampleConfig {
        let m = &self.model;
        crate::sample::SampleConfig {
            in_channels: m.in_channels,
            input_size: m.input_size,
            num_classes: m.num_classes,
            bf16: self.sample.precision == super::SamplePrecision::Bf16,
            input_kind: crate::train::input_kind(self.train.precision),
            random_labels: self.sample.labels == super::SampleLabels::Random,
            seed: self.sample.seed,
            batch: self.sample.batch,
            num_samples: self.sample.num_samples,
        }
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
