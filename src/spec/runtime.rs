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
