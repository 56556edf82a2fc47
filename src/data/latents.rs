//! SD-VAE latents in the layout of the public PyTorch re-implementation (forked from REPA):
//! `<dir>/vae-sd/<idx[:5]>/img-mean-std-<idx:08d>.npy`, each the (2C, H, W) mean and std of the
//! VAE posterior, with labels in `<dir>/vae-sd/dataset.json` as `{"labels": [[file, class], ...]}`.
use super::{npy, Dataset};
use anyhow::{bail, Context, Result};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The largest dataset.json read (ImageNet's 1.28M labels take about 80 MB).
const MAX_INDEX: u64 = 1 << 30;

/// Class labels run below this (the spec's bound on model.num_classes).
const MAX_CLASSES: i64 = 1 << 24;

pub struct Latents {
    files: Vec<PathBuf>,
    labels: Vec<i64>,
    shape: [i64; 3],
    num_classes: i64,
}

impl Latents {
    pub fn open(dir: &Path) -> Result<Self> {
        let root = dir.join("vae-sd");
        let index = root.join("dataset.json");
        let text = crate::readfile::read_to_string(&index, MAX_INDEX).with_context(|| {
            format!(
                "cannot read the label file (expected the REPA latent layout under {})",
                dir.display()
            )
        })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", index.display()))?;
        let entries = json["labels"].as_array().with_context(|| {
            format!(
                "{}: expected {{\"labels\": [[file, class], ...]}}",
                index.display()
            )
        })?;
        let mut labels_by_file = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            let (Some(name), Some(label)) = (e[0].as_str(), e[1].as_i64()) else {
                bail!("{}: entry {i} is not [file, class]", index.display());
            };
            if !(0..MAX_CLASSES).contains(&label) {
                bail!(
                    "{}: entry {i} has class {label}, outside 0 to {}",
                    index.display(),
                    MAX_CLASSES - 1
                );
            }
            if labels_by_file
                .insert(name.replace('\\', "/"), label)
                .is_some()
            {
                bail!(
                    "{}: {name} is listed twice; each latent has one label",
                    index.display()
                );
            }
        }
        let mut names = Vec::new();
        collect_npy(&root, &root, &mut HashSet::new(), &mut names)?;
        names.sort();
        if names.is_empty() {
            bail!(
                "{}: no .npy latents found (expected vae-sd/00000/img-mean-std-00000000.npy ...)",
                root.display()
            );
        }
        let mut labels = Vec::with_capacity(names.len());
        for name in &names {
            let label = labels_by_file
                .get(name)
                .with_context(|| format!("{}: no label for {name}", index.display()))?;
            labels.push(*label);
        }
        let first = npy::read(&root.join(&names[0]))?;
        let shape: [i64; 3] = match first.shape.as_slice() {
            [c, h, w] | [1, c, h, w] => [*c as i64, *h as i64, *w as i64],
            other => bail!(
                "{}: latents are {other:?}, expected (2C, H, W)",
                root.join(&names[0]).display()
            ),
        };
        if shape[0] % 2 != 0 {
            bail!(
                "{}: {} channels cannot be a mean and a std",
                root.join(&names[0]).display(),
                shape[0]
            );
        }
        let num_classes = labels.iter().max().map_or(0, |m| m + 1);
        Ok(Self {
            files: names.iter().map(|n| root.join(n)).collect(),
            labels,
            shape,
            num_classes,
        })
    }
}

/// Every .npy under `dir`, by its path relative to `root`. Symlinks are followed (datasets are
/// often links into shared storage), so a folder is remembered by its identity: one reached
/// twice is a loop (a link to an ancestor) or a second link to the same latents, and either is
/// refused rather than walked forever or read twice. A .npy that is not a regular file (a FIFO
/// would block the reader) is refused here, before training starts.
fn collect_npy(
    root: &Path,
    dir: &Path,
    seen: &mut HashSet<(u64, u64)>,
    out: &mut Vec<String>,
) -> Result<()> {
    if !seen.insert(crate::readfile::folder_id(dir)?) {
        bail!(
            "{}: a folder reached twice while listing {} (a symlink loop, or two links to one folder); remove the link",
            dir.display(),
            root.display()
        );
    }
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?
    {
        let path = entry
            .with_context(|| format!("{}: cannot list", dir.display()))?
            .path();
        if path.is_dir() {
            collect_npy(root, &path, seen, out)?;
        } else if path.extension().is_some_and(|e| e == "npy") {
            crate::readfile::regular(&path)?;
            out.push(
                path.strip_prefix(root)?
                    .to_string_lossy()
                    .replace('\\', "/"),
            );
        }
    }
    Ok(())
}

impl Dataset for Latents {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn stored_shape(&self) -> [i64; 3] {
        self.shape
    }
    fn num_classes(&self) -> i64 {
        self.num_classes
    }
    fn read(&self, index: usize, out: &mut [f32]) -> Result<i64> {
        let array = npy::read(&self.files[index])?;
        if array.data.len() != out.len() {
            bail!(
                "{}: holds {:?}, expected {:?} like the first file",
                self.files[index].display(),
                array.shape,
                self.shape
            );
        }
        out.copy_from_slice(&array.data);
        Ok(self.labels[index])
    }
    fn is_posterior(&self) -> bool {
        true
    }
}
