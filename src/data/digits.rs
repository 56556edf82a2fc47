//! The demo data: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), read from the
//! installed package's `datasets/data/digits.csv.gz` (64 pixel values 0..16, then the class).
//! Pixels are mapped to [-1, 1] and used as single-channel "latents".
use super::Dataset;
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

pub struct Digits {
    pixels: Vec<f32>,
    labels: Vec<i64>,
}

const SIDE: usize = 8;

impl Digits {
    pub fn open() -> Result<Self> {
        Self::from_csv_gz(&locate()?)
    }

    pub fn from_csv_gz(path: &Path) -> Result<Self> {
        let mut text = String::new();
        std::fs::File::open(path)
            .map(flate2::read::GzDecoder::new)
            .and_then(|mut gz| gz.read_to_string(&mut text))
            .with_context(|| format!("{}: cannot read the digits", path.display()))?;
        let (mut pixels, mut labels) = (Vec::new(), Vec::new());
        for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            let values: Vec<f32> = line
                .split(',')
                .map(|v| v.trim().parse::<f32>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("{}: line {} is not numbers", path.display(), i + 1))?;
            if values.len() != SIDE * SIDE + 1 {
                bail!(
                    "{}: line {} has {} values, expected 65",
                    path.display(),
                    i + 1,
                    values.len()
                );
            }
            pixels.extend(values[..SIDE * SIDE].iter().map(|v| v / 8.0 - 1.0));
            labels.push(values[SIDE * SIDE] as i64);
        }
        Ok(Self { pixels, labels })
    }
}

/// $MFR_DIGITS, else scikit-learn's copy in the project venv or python3's site-packages.
pub(super) fn locate() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MFR_DIGITS") {
        return Ok(PathBuf::from(p));
    }
    crate::paths::package_file("sklearn/datasets/data/digits.csv.gz").context(
        "the digits demo data was not found: run `make setup` (it installs scikit-learn into .venv) or set MFR_DIGITS to a digits.csv.gz",
    )
}

impl Dataset for Digits {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn stored_shape(&self) -> [i64; 3] {
        [1, SIDE as i64, SIDE as i64]
    }
    fn num_classes(&self) -> i64 {
        10
    }
    fn read(&self, index: usize, out: &mut [f32]) -> Result<i64> {
        out.copy_from_slice(&self.pixels[index * SIDE * SIDE..(index + 1) * SIDE * SIDE]);
        Ok(self.labels[index])
    }
    fn is_posterior(&self) -> bool {
        false
    }
}
