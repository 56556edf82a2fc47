//! The improved-MeanFlow method (iMF): its training objective and its few-step sampler, over
//! the imfDiT network ([`crate::model::imf`]). The JVP machinery is MeanFlow's
//! ([`crate::meanflow::jvp`], [`crate::meanflow::JvpMethod`]).
pub mod latents;
pub mod loss;
pub mod sampler;

pub use latents::LatentNorm;
pub use loss::{imf_loss, Draw, ImfConfig, RawDraw, Terms, UncondOmega};
pub use sampler::{sample, SamplingGuidance};
