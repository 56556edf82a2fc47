//! Experiment specs: the TOML file schema (serde, unknown keys rejected), its validation, and the
//! checked runtime configs the other modules take. A resolved spec has every default filled in;
//! it serialises back to TOML, and the sha256 of that text identifies the experiment.
mod error;
mod schema;

pub use error::SpecError;
pub use schema::{
    EvalSection, ExperimentSection, MeanFlowSection, ModelSection, PaperSection, Precision,
    SampleSection, Spec, TrainSection,
};

use sha2::{Digest, Sha256};
use std::path::Path;

impl Spec {
    /// Reads, parses, resolves and validates a spec file.
    pub fn load(path: &Path) -> Result<Spec, SpecError> {
        let file = path.display().to_string();
        let src = std::fs::read_to_string(path)
            .map_err(|e| SpecError::whole(&file, format!("cannot read the spec: {e}")))?;
        Spec::parse(&src, &file)
    }

    /// Parses TOML text; `file` names it in errors.
    pub fn parse(src: &str, file: &str) -> Result<Spec, SpecError> {
        let de = toml::Deserializer::new(src);
        let mut spec: Spec = serde_path_to_error::deserialize(de)
            .map_err(|e| SpecError::from_serde(file, src, e))?;
        spec.resolve()
            .map_err(|(key, msg)| SpecError::at_key(file, src, &key, msg))?;
        spec.validate()
            .map_err(|(key, msg)| SpecError::at_key(file, src, &key, msg))?;
        Ok(spec)
    }

    /// The resolved spec as TOML: every field explicit, defaults included.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a resolved spec serialises")
    }

    /// sha256 of [`Spec::to_toml`], lowercase hex.
    pub fn sha256(&self) -> String {
        let digest = Sha256::digest(self.to_toml().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}
