//! The checked runtime configs a validated spec gives the other modules, each defined by the
//! module that takes it (`SiTConfig` in model, `MeanFlowConfig` in meanflow, ...).
use super::schema::{ImfSection, JvpTangent, MeanFlowSection, Method, Spec, TimeSamplerName};
use crate::imf::{ImfConfig, LatentNorm};
use crate::meanflow::{Guidance, MeanFlowConfig, Tangent, TimeSampler};
use crate::model::{ImfDiTConfig, SiTConfig};

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

    /// The iMF network's checked shape (call on a resolved spec): the model section's, with the
    /// heads' depth of the iMF preset named, or half the blocks without one (as the small
    /// presets have it).
    pub fn imf_model_config(&self) -> ImfDiTConfig {
        let m = &self.model;
        let get = |v: Option<i64>| v.expect("resolved spec has the model's shape");
        let depth = get(m.depth);
        let preset = m.preset.as_deref().and_then(ImfDiTConfig::preset);
        let aux_head_depth = preset.map_or((depth / 2).max(1), |p| p.aux_head_depth);
        ImfDiTConfig {
            input_size: m.input_size,
            patch_size: get(m.patch_size),
            in_channels: m.in_channels,
            hidden_size: get(m.hidden_size),
            depth,
            num_heads: get(m.num_heads),
            aux_head_depth,
            num_classes: m.num_classes,
            // What every iMF preset shares: the 8/4/4/2 conditioning tokens, float32
            // sinusoids, and the v-head that training needs.
            ..ImfDiTConfig::preset("iMF-B/2").expect("a preset of the table")
        }
    }

    /// The section of the iMF objective (its defaults until resolved).
    pub fn imf_section(&self) -> ImfSection {
        self.imf.clone().unwrap_or_default()
    }

    /// The method with its network, objective and sampling settings (of a validated spec).
    pub fn method(&self) -> crate::method::Method {
        match self.method {
            Method::MeanFlow => crate::method::Method::MeanFlow {
                model: self.model_config(),
                objective: self.meanflow_config(),
            },
            Method::Imf => {
                let imf = self.imf_section();
                let schedules = &self.sample.schedules;
                let guidance = schedules
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (s.len() - 1, imf.guidance[i.min(imf.guidance.len() - 1)]))
                    .collect();
                let latents = match crate::data::is_pixels(&self.train.data) {
                    true => LatentNorm::None,
                    false => imf.latents,
                };
                crate::method::Method::Imf {
                    model: self.imf_model_config(),
                    objective: imf.config(),
                    guidance,
                    latents,
                }
            }
        }
    }
}

impl ImfSection {
    /// The iMF loss's checked runtime config.
    pub fn config(&self) -> ImfConfig {
        ImfConfig {
            p_mean: self.p_mean,
            p_std: self.p_std,
            data_proportion: self.data_proportion,
            cfg_beta: self.cfg_beta,
            s_max: self.s_max,
            class_dropout: self.class_dropout,
            norm_p: self.norm_p,
            norm_eps: self.norm_eps,
            jvp: self.jvp,
            uncond_omega: self.uncond_omega,
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
