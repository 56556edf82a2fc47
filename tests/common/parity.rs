//! What the golden-step parity tests share: the fixture files of a folder, their metadata and
//! tensors, and a checker that collects every mismatch beyond a tolerance.
use super::rel_err;
use meanflow_repro::import::flax::Layout;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// The folder named by the environment variable `var`, else the repository's `default`.
pub fn fixture_dir(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join(default),
        PathBuf::from,
    )
}

/// Every *.safetensors in `dir`, sorted; at least one.
pub fn fixtures_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("fixture directory {} unreadable: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.safetensors in {}", dir.display());
    files
}

pub fn num(v: &Value, key: &str) -> Result<f64, String> {
    v[key]
        .as_f64()
        .ok_or_else(|| format!("meta has no number `{key}`"))
}

/// NHWC -> NCHW for image-shaped tensors.
pub fn nchw(t: &Tensor) -> Tensor {
    t.permute([0, 3, 1, 2])
}

/// The tensors of a fixture by name, possibly with one of them changed.
pub type Tensors = BTreeMap<String, Tensor>;

/// A fixture's JSON metadata (`meta`) and its tensors.
pub fn read(path: &Path) -> (Value, Tensors) {
    let header = meanflow_repro::tensorfile::header(path).unwrap();
    let meta = serde_json::from_str(&header.metadata["meta"]).unwrap();
    let tensors = Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect();
    (meta, tensors)
}

/// The file with one tensor multiplied by 1 + 1e-6.
pub fn perturbed(file: &Tensors, key: &str) -> Tensors {
    let mut out: Tensors = file
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    out.insert(key.to_owned(), &file[key] * (1.0 + 1e-6));
    out
}

/// The mismatches found so far and the largest relative error (L2).
pub struct Checker {
    pub bad: Vec<String>,
    pub worst: f64,
    tolerance: f64,
}

impl Checker {
    pub fn new(tolerance: f64) -> Self {
        Self {
            bad: Vec::new(),
            worst: 0.0,
            tolerance,
        }
    }

    pub fn compare(&mut self, name: &str, ours: &Tensor, theirs: &Tensor) {
        if ours.size() != theirs.size() {
            self.bad.push(format!(
                "{name}: shape {:?} vs {:?}",
                ours.size(),
                theirs.size()
            ));
            return;
        }
        let err = rel_err(ours, theirs);
        self.worst = self.worst.max(err);
        if std::env::var_os("PARITY_VERBOSE").is_some() {
            println!("  {name}: {err:.2e}");
        }
        if err.is_nan() || err > self.tolerance {
            self.bad.push(format!(
                "{name}: relative error {err:.3e} > {:e}",
                self.tolerance
            ));
        }
    }
}

/// The file's `weights.<flax path>` tensors (flax layout), after checking that `rule` gives each
/// path the key and layout of the file's own table `meta.flax_to_torch` (mismatches go into
/// `check`) and that the table names no other parameter.
pub fn flax_weights(
    meta: &Value,
    file: &Tensors,
    rule: impl Fn(&str, usize) -> anyhow::Result<(String, Layout)>,
    check: &mut Checker,
) -> Result<Vec<(String, Tensor)>, String> {
    let table = meta["flax_to_torch"]
        .as_object()
        .ok_or("meta has no flax_to_torch")?;
    let mut params = Vec::new();
    for (key, t) in file {
        let Some(path) = key.strip_prefix("weights.") else {
            continue;
        };
        let (torch, layout) = rule(path, t.dim()).map_err(|e| e.to_string())?;
        let want = table
            .get(path)
            .ok_or(format!("{path}: not in flax_to_torch"))?;
        let want_layout = want[1].as_str().unwrap_or_default();
        let same_layout = match layout {
            Layout::Same => want_layout.starts_with("none"),
            Layout::Transpose => want_layout.starts_with("transpose"),
            Layout::HwioToOihw => want_layout.starts_with("permute(3,2,0,1)"),
        };
        if want[0].as_str() != Some(torch.as_str()) || !same_layout {
            check.bad.push(format!(
                "{path}: we map it to {torch} ({layout:?}), the file to {want}"
            ));
        }
        params.push((path.to_owned(), t.shallow_clone()));
    }
    if params.len() != table.len() {
        check.bad.push(format!(
            "{} weights in the file, {} entries in its flax_to_torch",
            params.len(),
            table.len()
        ));
    }
    Ok(params)
}
