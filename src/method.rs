//! The method of a run (the spec's `method`): which network it trains, with which objective, and
//! how it samples. The one place where MeanFlow and improved MeanFlow part ways: training and
//! the sample stage hold a [`Network`] and ask this module for its [`Objective`] and
//! [`Generator`]; the run directory, evaluation and reports never see the difference.
use crate::imf::{self, ImfConfig, LatentNorm, SamplingGuidance};
use crate::meanflow::{self, MeanFlowConfig};
use crate::model::{ImfDiT, ImfDiTConfig, SiT, SiTConfig};
use anyhow::{bail, Result};
use tch::{nn, Kind, Tensor};

/// A method with its checked configs (built from a validated spec by `Spec::method`).
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    MeanFlow {
        model: SiTConfig,
        objective: MeanFlowConfig,
    },
    Imf {
        model: ImfDiTConfig,
        objective: ImfConfig,
        /// The guidance each schedule samples at, by its number of steps.
        guidance: Vec<(usize, SamplingGuidance)>,
        /// The network's latent space (`None` for pixel data).
        latents: LatentNorm,
    },
}

/// A built network of either method (boxed: the two structs differ much in size).
pub enum Network {
    MeanFlow(Box<SiT>),
    Imf(Box<ImfDiT>),
}

/// What a data set must match: (channels, side, classes) of the network's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputShape {
    pub in_channels: i64,
    pub input_size: i64,
    pub num_classes: i64,
}

impl Method {
    /// Short name for messages ("MeanFlow", "iMF").
    pub fn name(&self) -> &'static str {
        match self {
            Method::MeanFlow { .. } => "MeanFlow",
            Method::Imf { .. } => "iMF",
        }
    }

    pub fn input(&self) -> InputShape {
        let (in_channels, input_size, num_classes) = match self {
            Method::MeanFlow { model: m, .. } => (m.in_channels, m.input_size, m.num_classes),
            Method::Imf { model: m, .. } => (m.in_channels, m.input_size, m.num_classes),
        };
        InputShape {
            in_channels,
            input_size,
            num_classes,
        }
    }

    /// The parameter count, in f64 (memory estimates before building).
    pub fn parameters(&self) -> f64 {
        match self {
            Method::MeanFlow { model, .. } => model.parameters(),
            Method::Imf { model, .. } => model.parameters(),
        }
    }

    /// The network, its variables under `p` named as the method's public checkpoints name them,
    /// initialised from torch's generator as it stands.
    pub fn build(&self, p: &nn::Path) -> Result<Network> {
        Ok(match self {
            Method::MeanFlow { model, .. } => Network::MeanFlow(Box::new(SiT::new(p, model))),
            Method::Imf { model, .. } => Network::Imf(Box::new(ImfDiT::new(p, model)?)),
        })
    }

    /// The method as the sample stage needs it: iMF's v-head blocks only serve training, and
    /// inference checkpoints do not have them.
    pub fn for_sampling(&self) -> Method {
        let mut m = self.clone();
        if let Method::Imf { model, .. } = &mut m {
            model.v_head = false;
        }
        m
    }

    /// Whether a variable of a trained checkpoint is one [`Method::for_sampling`]'s network
    /// leaves out (iMF's v-head blocks, `net.v_heads.*`).
    pub fn unused_for_sampling(&self, name: &str) -> bool {
        matches!(self, Method::Imf { .. }) && name.starts_with("net.v_heads.")
    }

    /// `net` with this method's objective. Err: a network of the other method.
    pub fn objective<'a>(&self, net: &'a Network) -> Result<Objective<'a>> {
        Ok(match (self, net) {
            (Method::MeanFlow { objective, .. }, Network::MeanFlow(n)) => {
                Objective::MeanFlow(n, objective.clone())
            }
            (
                Method::Imf {
                    objective, latents, ..
                },
                Network::Imf(n),
            ) => Objective::Imf(n, objective.clone(), *latents),
            _ => bail!("{}", mismatch(self)),
        })
    }

    /// `net` with this method's sampler. Err: a network of the other method.
    pub fn generator<'a>(&self, net: &'a Network) -> Result<Generator<'a>> {
        Ok(match (self, net) {
            (Method::MeanFlow { .. }, Network::MeanFlow(n)) => Generator::MeanFlow(n),
            (
                Method::Imf {
                    guidance, latents, ..
                },
                Network::Imf(n),
            ) => Generator::Imf(n, guidance.clone(), *latents),
            _ => bail!("{}", mismatch(self)),
        })
    }
}

fn mismatch(method: &Method) -> String {
    format!(
        "a network of another method was handed to the {} objective or sampler",
        method.name()
    )
}

/// A step's loss and the numbers the log keeps, left on the device.
pub struct StepTerms {
    /// The loss to differentiate.
    pub loss: Tensor,
    /// MeanFlow: mean ||u - v||^2 (how far the average velocity is from the instantaneous).
    /// iMF: the official logged `loss_u`, mean (V - v_g)^2 per element.
    pub v_loss: Tensor,
    /// The adaptive weight (||error||^2 + eps)^p of each sample (iMF: of the u term).
    pub adaptive_weight: Tensor,
}

/// A network with its method's training objective.
pub enum Objective<'a> {
    MeanFlow(&'a SiT, MeanFlowConfig),
    /// With the network's latent space (the data is mapped into it).
    Imf(&'a ImfDiT, ImfConfig, LatentNorm),
}

impl Objective<'_> {
    /// The loss on (x, labels) with this step's random draws, taken from torch's generator as
    /// the rows [offset, offset + B) of a global batch of `global` (see the draws' `sample_part`).
    pub fn loss(&self, x: &Tensor, labels: &Tensor, global: i64, offset: i64) -> Result<StepTerms> {
        match self {
            Objective::MeanFlow(net, cfg) => {
                let draw = meanflow::Draw::sample_part(cfg, x, global, offset);
                let t = meanflow::meanflow_loss(net, cfg, x, labels, &draw)?;
                Ok(StepTerms {
                    loss: t.loss,
                    v_loss: t.v_loss,
                    adaptive_weight: t.adaptive_weight,
                })
            }
            Objective::Imf(net, cfg, latents) => {
                let x = &latents.to_network(x);
                let draw = imf::Draw::sample_part(cfg, x, global, offset);
                let t = imf::imf_loss(net, cfg, x, labels, &draw)?;
                Ok(StepTerms {
                    loss: t.loss,
                    v_loss: t.loss_u_mse.to_kind(Kind::Float),
                    adaptive_weight: t.loss_u_weight,
                })
            }
        }
    }
}

/// A network with its method's few-step sampler.
pub enum Generator<'a> {
    MeanFlow(&'a SiT),
    /// With the guidance of each number of steps and the network's latent space (samples are
    /// mapped back to the data's).
    Imf(&'a ImfDiT, Vec<(usize, SamplingGuidance)>, LatentNorm),
}

impl Generator<'_> {
    /// Latents (as the data holds them) from noise `e` with labels `y` along `schedule` (one
    /// network call per step).
    pub fn sample(&self, e: &Tensor, y: &Tensor, schedule: &[f64]) -> Result<Tensor> {
        match self {
            Generator::MeanFlow(net) => meanflow::sampler::sample(net, e, y, schedule),
            Generator::Imf(net, guidance, latents) => {
                let steps = schedule.len().saturating_sub(1);
                let Some((_, g)) = guidance.iter().find(|(s, _)| *s == steps) else {
                    bail!("no iMF guidance is set for {steps}-step sampling: give imf.guidance one entry per schedule of sample.schedules");
                };
                Ok(latents.from_network(&imf::sample(net, e, y, schedule, g)?))
            }
        }
    }
}
