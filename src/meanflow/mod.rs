//! The MeanFlow method: the training objective, the JVP it needs, and the few-step sampler.
pub mod jvp;
pub mod loss;
pub mod sampler;

pub use loss::{
    meanflow_loss, Draw, Guidance, JvpMethod, MeanFlowConfig, Tangent, Terms, TimeSampler,
};
