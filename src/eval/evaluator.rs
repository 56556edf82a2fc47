//! `mfr evaluate REF SAMPLE`: the ADM evaluator's inputs and printed metrics, computed with our
//! Inception port. The reference's stored statistics (mu, sigma, mu_s, sigma_s) are used when
//! present; its images' features (needed for precision and recall, or for missing statistics)
//! are cached by the file's sha256.
use super::bootstrap::{check_resamples, fid_interval, Interval};
use super::metrics::{inception_score, precision_recall, Reference, Stats};
use super::npz::Npz;
use crate::files::{hex, sha256_file};
use crate::model::inception::{Features, Inception, POOL_FEATURES, SPATIAL_FEATURES};
use crate::progress::Progress;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub struct Options {
    pub batch: usize,
    pub device: Device,
    /// Half-samples of FID's 95% interval (0: none; see [`super::bootstrap`]).
    pub bootstrap: usize,
    /// Where reference features and file hashes are cached ($MFR_CACHE).
    pub cache: PathBuf,
}

impl Options {
    /// Refuses settings that could not finish, before any work starts.
    pub fn check(&self) -> Result<()> {
        check_resamples(self.bootstrap).map_err(|e| anyhow!("--bootstrap: {e}"))?;
        if !(1..=MAX_BATCH).contains(&self.batch) {
            bail!(
                "an Inception batch of {} images: expected an integer in [1, {MAX_BATCH}]",
                self.batch
            );
        }
        Ok(())
    }
}

/// The Inception network that scores, and the file its weights came from (reports name it; the
/// cache keys on it).
pub struct Scorer<'a> {
    pub net: &'a Inception,
    pub weights: &'a Path,
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
                if let Some((f, other)) = chunk
                    .iter()
                    .zip(&images)
                    .find(|(_, t)| t.size() != images[0].size())
                {
                    bail!(
                        "{}: {:?} pixels, where {} has {:?}: the PNGs of a folder must share one size",
                        f.display(),
                        &other.size()[..2],
                        chunk[0].display(),
                        &images[0].size()[..2]
                    );
                }
                Ok(Some(Tensor::stack(&images, 0)))
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

/// Largest Inception batch on a CPU: a batch's activations must stay near the cache to keep the
/// convolutions fed (`mfr bench evaluate --device cpu`, 2-core Xeon: 8.1 img/s at 16, 6.5 at 100).
const CPU_BATCH: usize = 16;

/// Features of every image of a source, in batches, with a progress bar; (pool, spatial) on
/// the CPU in float32, and the throughput.
pub fn featurise(
    net: &Inception,
    source: &mut Source,
    batch: usize,
    device: Device,
    label: &str,
) -> Result<(Tensor, Tensor, f64)> {
    let batch = match device {
        Device::Cpu => batch.min(CPU_BATCH),
        _ => batch,
    };
    let bar = Progress::new(&format!("Inception {label}"), source.len() as u64, "images");
    let (mut pools, mut spatials) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while let Some(images) = source.next_batch(batch)? {
        crate::signals::check(|| {
            format!("while featurising {label} ({} images done)", bar.position())
        })?;
        let n = images.size()[0] as u64;
        let Features { pool, spatial } =
            tch::no_grad(|| net.features_of_images(&images.to_device(device)));
        pools.push(pool.to_device(Device::Cpu));
        spatials.push(spatial.to_device(Device::Cpu));
        bar.inc(n);
    }
    bar.finish();
    if pools.is_empty() {
        bail!("{label}: no images");
    }
    let seconds = start.elapsed().as_secs_f64();
    let (pool, spatial) = (Tensor::cat(&pools, 0), Tensor::cat(&spatials, 0));
    let rate = pool.size()[0] as f64 / seconds.max(1e-9);
    Ok((pool, spatial, rate))
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
    if let Ok(list) = crate::tensorfile::read(&cached) {
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
    let named = [("pool".to_owned(), pool), ("spatial".to_owned(), spatial)];
    crate::tensorfile::write(&cached, &named, &[])?;
    let [(_, pool), (_, spatial)] = named;
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
    let id = hex(&Sha256::digest(absolute.to_string_lossy().as_bytes())[..12]);
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
        let _ = crate::files::write_atomic(&memo, record.to_string().as_bytes());
    }
    Ok(sha)
}

/// The reference's image features, keyed by the file's sha256 and the weights.
fn reference_features(
    scorer: &Scorer,
    reference: &Path,
    opts: &Options,
) -> Result<(Tensor, Tensor)> {
    let key = format!(
        "{}-{}",
        &content_sha256(reference, &opts.cache)?[..16],
        weights_tag(scorer.weights)
    );
    cached_features(&opts.cache, &key, || {
        let mut npz = Npz::open(reference)?;
        let mut source = Source::Npz(Box::new(npz.images("arr_0")?));
        let (pool, spatial, _) = featurise(
            scorer.net,
            &mut source,
            opts.batch,
            opts.device,
            "reference",
        )?;
        Ok((pool, spatial))
    })
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

/// Images a metric needs at least: two for a covariance, k + 1 = 4 for precision and recall
/// (each point's third-nearest neighbour among the others).
const MIN_IMAGES: usize = super::MIN_SAMPLES as usize;

/// What a reference batch holds, read and checked before any sample is featurised.
struct ReferenceBatch {
    /// Stored pool_3 statistics (`mu`, `sigma`), when present.
    pool: Option<Stats>,
    /// Stored spatial statistics (`mu_s`, `sigma_s`), when present.
    spatial: Option<Stats>,
    /// Its images (`arr_0`), when present: needed for precision and recall.
    images: Option<usize>,
}

/// Stored statistics `mu` (d,) and `sigma` (d, d), checked: finite, sigma symmetric and positive
/// semi-definite. Tolerances: numpy's covariance is symmetric to rounding (~1e-16 relative) and
/// its eigenvalues are >= 0 to rounding; 1e-6 of the largest leaves room for float32 storage
/// and still refuses a matrix that is not a covariance.
fn stored_stats(npz: &mut Npz, mu: &str, sigma: &str, d: i64) -> Result<Option<Stats>> {
    let path = npz.path().display().to_string();
    match (npz.has(mu), npz.has(sigma)) {
        (false, false) => return Ok(None),
        (true, true) => {}
        _ => bail!("{path}: has one of `{mu}` and `{sigma}` without the other"),
    }
    let (m, s) = (
        npz.floats(mu, d as usize)?,
        npz.floats(sigma, (d * d) as usize)?,
    );
    if m.size() != [d] || s.size() != [d, d] {
        bail!(
            "{path}: `{mu}` is {:?} and `{sigma}` {:?}; Inception statistics are ({d},) and ({d}, {d})",
            m.size(),
            s.size()
        );
    }
    if m.isfinite().all().int64_value(&[]) == 0 || s.isfinite().all().int64_value(&[]) == 0 {
        bail!("{path}: `{mu}` or `{sigma}` holds NaN or infinity");
    }
    let scale = s.abs().max().double_value(&[]).max(f64::MIN_POSITIVE);
    let asymmetry = (&s - s.transpose(0, 1)).abs().max().double_value(&[]);
    if asymmetry > 1e-6 * scale {
        bail!("{path}: `{sigma}` is not symmetric (off by {asymmetry:.3e}), so not a covariance");
    }
    let lowest = s.linalg_eigvalsh("L").min().double_value(&[]);
    if lowest < -1e-6 * scale {
        bail!("{path}: `{sigma}` has a negative eigenvalue ({lowest:.3e}), so not a covariance");
    }
    Ok(Some(Stats { mu: m, sigma: s }))
}

fn read_reference(path: &Path) -> Result<ReferenceBatch> {
    let mut npz = Npz::open(path)?;
    // ADM's names (and pytorch-fid's --save-stats), or the official JAX code's FID statistics.
    let pool = match stored_stats(&mut npz, "mu", "sigma", POOL_FEATURES)? {
        Some(stats) => Some(stats),
        None => stored_stats(&mut npz, "ref_mu", "ref_sigma", POOL_FEATURES)?,
    };
    let spatial = stored_stats(&mut npz, "mu_s", "sigma_s", SPATIAL_FEATURES)?;
    let images = match npz.has("arr_0") {
        true => Some(npz.images("arr_0")?.len()),
        false => None,
    };
    match (images, &pool) {
        (None, None) => bail!(
            "{}: holds neither images (arr_0) nor Inception statistics (mu, sigma): not a reference batch",
            path.display()
        ),
        (Some(n), _) if n < MIN_IMAGES => bail!(
            "{}: {n} reference images; precision and recall need at least {MIN_IMAGES}",
            path.display()
        ),
        _ => {}
    }
    Ok(ReferenceBatch {
        pool,
        spatial,
        images,
    })
}

/// The images of `samples`: an .npz's arr_0 or a folder of PNGs.
fn sample_source<'a>(samples: &Path, npz: &'a mut Option<Npz>) -> Result<Source<'a>> {
    if samples.is_dir() {
        return Ok(Source::Pngs {
            files: png_folder(samples)?,
            next: 0,
        });
    }
    let npz = npz.insert(Npz::open(samples)?);
    Ok(Source::Npz(Box::new(npz.images("arr_0")?)))
}

/// ADM's five metrics of `samples` (an .npz or a folder of PNGs) against `reference` (ADM's
/// reference batch, or statistics alone: then FID, and sFID where its statistics are there).
/// The reference is read and checked first.
pub fn evaluate(
    scorer: &Scorer,
    reference: &Path,
    samples: &Path,
    opts: &Options,
) -> Result<AdmScores> {
    opts.check()?;
    // Read and checked before any sample is featurised; its features come after the samples'.
    let refs = read_reference(reference)?;
    let mut sample_npz = None;
    let mut source = sample_source(samples, &mut sample_npz)?;
    let features = featurise_samples(scorer, &mut source, samples, opts)?;
    let against = against_batch(scorer, reference, refs, opts)?;
    score_features(scorer, &against, features, samples, opts)
}

/// The reference side of an evaluation, from a reference batch file (read once, scored
/// against many samples).
pub fn against_file(scorer: &Scorer, reference: &Path, opts: &Options) -> Result<Against> {
    opts.check()?;
    against_batch(scorer, reference, read_reference(reference)?, opts)
}

fn against_batch(
    scorer: &Scorer,
    reference: &Path,
    refs: ReferenceBatch,
    opts: &Options,
) -> Result<Against> {
    let features = match refs.images {
        Some(_) => Some(reference_features(scorer, reference, opts)?),
        None => None,
    };
    let ref_stats = |stored: Option<Stats>, computed: Option<&Tensor>| {
        let stats = match (stored, computed) {
            (Some(s), _) => s,
            (None, Some(c)) => Stats::of(c)?,
            (None, None) => return Ok(None),
        };
        Reference::new(&stats).map(Some)
    };
    let named = |e: anyhow::Error| e.context(format!("the reference {}", reference.display()));
    Ok(Against {
        pool: ref_stats(refs.pool, features.as_ref().map(|f| &f.0))
            .map_err(named)?
            .expect("a reference has images or statistics"),
        spatial: ref_stats(refs.spatial, features.as_ref().map(|f| &f.1)).map_err(named)?,
        pool_features: features.map(|f| f.0),
        description: reference.display().to_string(),
        images: refs.images.unwrap_or(0),
    })
}

/// The reference side of an evaluation from images in memory (uint8 NHWC; pixel-space data,
/// whose reference is the training images), their features cached under `key`.
pub fn against_images(
    scorer: &Scorer,
    images: &Tensor,
    key: &str,
    description: String,
    opts: &Options,
) -> Result<Against> {
    opts.check()?;
    let n = images.size()[0] as usize;
    if n < MIN_IMAGES {
        bail!("{description}: {n} images; precision and recall need at least {MIN_IMAGES}");
    }
    let (pool, spatial) = cached_features(&opts.cache, key, || {
        let mut source = Source::Memory {
            images: images.shallow_clone(),
            next: 0,
        };
        let (pool, spatial, _) = featurise(
            scorer.net,
            &mut source,
            opts.batch,
            opts.device,
            &description,
        )?;
        Ok((pool, spatial))
    })?;
    Ok(Against {
        pool: Reference::new(&Stats::of(&pool)?)?,
        spatial: Some(Reference::new(&Stats::of(&spatial)?)?),
        pool_features: Some(pool),
        description,
        images: n,
    })
}

/// ADM's five metrics of `samples` (an .npz or a folder of PNGs) against a reference side.
pub fn score_samples(
    scorer: &Scorer,
    against: &Against,
    samples: &Path,
    opts: &Options,
) -> Result<AdmScores> {
    opts.check()?;
    let mut sample_npz = None;
    let mut source = sample_source(samples, &mut sample_npz)?;
    let features = featurise_samples(scorer, &mut source, samples, opts)?;
    score_features(scorer, against, features, samples, opts)
}

/// The largest Inception batch asked for (a 299 x 299 batch of this size is ~5 GB of input).
const MAX_BATCH: usize = 4096;

/// A sample's features: (pool, spatial, Inception images per second).
type SampleFeatures = (Tensor, Tensor, f64);

fn featurise_samples(
    scorer: &Scorer,
    source: &mut Source,
    samples: &Path,
    opts: &Options,
) -> Result<SampleFeatures> {
    if source.len() < MIN_IMAGES {
        bail!(
            "{}: {} images; the metrics need at least {MIN_IMAGES}",
            samples.display(),
            source.len()
        );
    }
    if opts.device.is_cuda() {
        // Full float32: libtorch lets cuDNN convolutions use TF32 (~1e-3 relative) by default.
        crate::device::set_tf32(false)?;
    }
    featurise(scorer.net, source, opts.batch, opts.device, "samples")
}

fn score_features(
    scorer: &Scorer,
    against: &Against,
    (pool, spatial, img_per_s): SampleFeatures,
    samples: &Path,
    opts: &Options,
) -> Result<AdmScores> {
    let s = score(
        scorer.net,
        against,
        &pool,
        &spatial,
        opts.bootstrap,
        opts.device,
    )
    .with_context(|| {
        format!(
            "scoring {} against the reference {}",
            samples.display(),
            against.description
        )
    })?;
    Ok(AdmScores {
        inception_score: s.inception_score,
        fid: s.fid,
        sfid: s.sfid,
        precision: s.precision,
        recall: s.recall,
        reference: against.description.clone(),
        samples: samples.display().to_string(),
        num_samples: pool.size()[0] as usize,
        num_reference: against.images,
        inception_weights: scorer.weights.display().to_string(),
        device: crate::device::describe(opts.device),
        img_per_s,
        fid_interval: s.fid_interval,
    })
}

/// The ADM evaluator's five numbers for one sample batch, and what they were computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdmScores {
    /// None: the Inception weights have no softmax layer (the bundled TorchScript network).
    pub inception_score: Option<f64>,
    pub fid: f64,
    /// None: a reference of statistics without the spatial ones.
    pub sfid: Option<f64>,
    /// None (with recall): a reference of statistics alone, without images.
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub reference: String,
    pub samples: String,
    pub num_samples: usize,
    pub num_reference: usize,
    pub inception_weights: String,
    pub device: String,
    /// Inception throughput on the samples.
    pub img_per_s: f64,
    /// FID's bootstrap interval, when one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fid_interval: Option<super::bootstrap::Interval>,
}

impl AdmScores {
    /// The lines the ADM evaluator prints.
    pub fn adm_lines(&self) -> String {
        let is = self.inception_score.map_or_else(|| "unavailable (these Inception weights have no softmax layer: `mfr fetch pt_inception`, or pass --inception pt_inception-2015-12-05-6726825d.pth)".to_owned(), |v| v.to_string());
        let or = |v: Option<f64>, why: &str| {
            v.map_or_else(|| format!("unavailable ({why})"), |v| v.to_string())
        };
        let stats_only = "the reference holds statistics, not images";
        format!(
            "Inception Score: {is}\nFID: {}\nsFID: {}\nPrecision: {}\nRecall: {}",
            self.fid,
            or(
                self.sfid,
                "the reference has no spatial statistics (mu_s, sigma_s)"
            ),
            or(self.precision, stats_only),
            or(self.recall, stats_only)
        )
    }
}

/// The reference side of the metrics: its statistics, and its pool features where it has
/// images (precision and recall need them).
pub struct Against {
    pub pool: Reference,
    pub spatial: Option<Reference>,
    pub pool_features: Option<Tensor>,
    /// The reference as the scores name it (a file, or what the images are).
    pub description: String,
    /// Its number of images (0: statistics alone).
    pub images: usize,
}

/// What can be computed of ADM's metrics for one sample's features.
pub struct Scores {
    pub inception_score: Option<f64>,
    pub fid: f64,
    pub fid_interval: Option<Interval>,
    pub sfid: Option<f64>,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
}

/// ADM's metrics of a sample's `pool` and `spatial` features against a reference, with FID's
/// 95% interval from `bootstrap` half-samples (0: none).
pub fn score(
    net: &Inception,
    against: &Against,
    pool: &Tensor,
    spatial: &Tensor,
    bootstrap: usize,
    device: Device,
) -> Result<Scores> {
    let fid = against.pool.fid(pool)?;
    let fid_interval = match bootstrap {
        0 => None,
        n => Some(fid_interval(&against.pool, pool, fid, n, 0, device)?),
    };
    let sfid = match &against.spatial {
        Some(s) => Some(s.fid(spatial)?),
        None => None,
    };
    let (precision, recall) = match &against.pool_features {
        Some(reference) => {
            let (p, r) = precision_recall(
                &reference.to_kind(Kind::Float),
                &pool.to_kind(Kind::Float),
                super::NEIGHBOURS,
            )?;
            (Some(p), Some(r))
        }
        None => (None, None),
    };
    Ok(Scores {
        inception_score: inception_score_of(net, pool, device),
        fid,
        fid_interval,
        sfid,
        precision,
        recall,
    })
}
