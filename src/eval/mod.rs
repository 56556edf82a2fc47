//! Evaluation with the ADM evaluator's semantics (openai/guided-diffusion evaluations/
//! evaluator.py): statistics in float64, FID and sFID from them, Inception Score on ordered
//! splits, precision and recall with k = 3 nearest neighbours.
pub mod bootstrap;
pub mod evaluator;
pub mod metrics;
pub mod npz;

pub use evaluator::AdmScores;

pub use metrics::{
    frechet_distance, inception_score, precision_recall, Reference, Stats, MIN_SAMPLES, NEIGHBOURS,
};
