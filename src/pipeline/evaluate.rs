//! The evaluate stage: ADM's five metrics of each schedule's samples against the reference
//! batch (latent runs), or a small-sample FID against the training images (pixel-space data,
//! the demo), for the final weights and each checkpoint of `eval.steps`; into metrics.json.
use super::{plan, Run};
use crate::data::Dataset;
use crate::eval::bootstrap::Interval;
use crate::eval::evaluator::{
    self, cached_features, featurise, score, weights_tag, Against, Options, Scorer, Source,
};
use crate::eval::npz::Npz;
use crate::eval::{Reference, Stats};
use crate::files::hex;
use crate::paths::default_cache;
use crate::rundir::{AdmScores, HistoryPoint, Metrics};
use anyhow::{Context, Result};
use sha2::Digest;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use tch::Tensor;

/// ADM's five metrics of `samples` against `reference` with the Inception weights of
/// `inception` (default: see [`crate::import::inception::default_weights`]): `mfr evaluate`.
pub fn evaluate_files(
    reference: &Path,
    samples: &Path,
    inception: Option<&Path>,
    opts: &Options,
) -> Result<AdmScores> {
    opts.check()?;
    let weights = crate::import::inception::default_weights(inception, &opts.cache)?;
    let (_vs, net) = crate::import::inception::load(&weights, opts.device)?;
    let scorer = Scorer {
        net: &net,
        weights: &weights,
    };
    evaluator::evaluate(&scorer, reference, samples, opts)
}

pub fn stage(run: &Run, ds: Option<&Arc<dyn Dataset>>) -> Result<()> {
    let w = plan::weights(run).context("no finished training to evaluate")?;
    let metrics = if crate::data::is_pixels(&run.spec.train.data) {
        let ds = ds.context("the small-sample FID needs the training images")?;
        pixels(run, ds.as_ref(), &w)?
    } else {
        adm(run, &w)?
    };
    run.dir.write_metrics(&metrics)
}

/// The sample batches the stage scores: the final weights' (None) first, then each checkpoint's
/// of `eval.steps`; beside each, the training step its FIDs are logged under in the history
/// (none for given weights, which no step of this run produced).
fn evaluated(run: &Run) -> Vec<(Option<u64>, Option<u64>)> {
    let final_step = run.total.filter(|_| run.spec.model.weights.is_none());
    std::iter::once((None, final_step))
        .chain(
            plan::intermediate(run)
                .into_iter()
                .map(|(s, _)| (Some(s), Some(s))),
        )
        .collect()
}

/// The FIDs of every evaluated batch: the final weights' per NFE, and the history.
#[derive(Default)]
struct Fids {
    last: BTreeMap<String, f64>,
    intervals: BTreeMap<String, Interval>,
    history: Vec<HistoryPoint>,
}

impl Fids {
    fn add(
        &mut self,
        step: Option<u64>,
        logged: Option<u64>,
        nfe: &str,
        fid: f64,
        interval: Option<Interval>,
    ) {
        if let (None, Some(i)) = (step, interval) {
            self.intervals.insert(nfe.to_owned(), i);
        }
        if let Some(step) = logged {
            self.history.push(HistoryPoint {
                step,
                nfe: nfe.to_owned(),
                fid,
            });
        }
        if step.is_none() {
            self.last.insert(nfe.to_owned(), fid);
        }
    }
}

/// FID of each schedule's samples against every training image, for data in pixel space (the
/// demo). A small-sample FID: comparable between the runs of one spec, not with FID-50K
/// numbers. The training images' features are cached by content.
fn pixels(run: &Run, ds: &dyn Dataset, weights: &Path) -> Result<Metrics> {
    let spec = run.spec;
    let device = crate::device::parse(&spec.train.device)?;
    let inception_weights = crate::import::inception::bundled_torchscript()?;
    let (_ivs, net) = crate::import::inception::load(&inception_weights, device)?;
    let batch = spec.sample.batch as usize;

    // Every training image, and a content hash of them for the cache key.
    let [c, h, w] = ds.stored_shape();
    let size = (c * h * w) as usize;
    let mut values = vec![0f32; ds.len() * size];
    let labels = values
        .chunks_exact_mut(size)
        .enumerate()
        .map(|(i, out)| ds.read(i, out))
        .collect::<Result<Vec<i64>>>()?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let hash = hex(&sha2::Sha256::digest(&bytes)[..8]);
    let key = format!(
        "{}-{hash}-{}",
        spec.train.data,
        weights_tag(&inception_weights)
    );
    let reference =
        crate::sample::pixels_to_u8(&Tensor::from_slice(&values).view([ds.len() as i64, c, h, w]));
    real_grid(run, &reference, &labels)?;
    let (ref_pool, ref_spatial) = cached_features(&default_cache(), &key, || {
        let mut source = Source::Memory {
            images: reference.shallow_clone(),
            next: 0,
        };
        let (pool, spatial, _) = featurise(&net, &mut source, batch, device, "training images")?;
        Ok((pool, spatial))
    })?;
    let against = Against {
        pool: Reference::new(&Stats::of(&ref_pool)?)?,
        spatial: Some(Reference::new(&Stats::of(&ref_spatial)?)?),
        pool_features: Some(&ref_pool),
    };

    let n = spec.sample.num_samples;
    let (mut fids, mut all) = (Fids::default(), BTreeMap::new());
    for (step, logged) in evaluated(run) {
        for schedule in &spec.sample.schedules {
            let nfe = format!("{}-NFE", schedule.len() - 1);
            let npz_path = run.dir.samples_npz(step, schedule.len() - 1);
            let mut npz = Npz::open(&npz_path)?;
            let mut source = Source::Npz(Box::new(npz.images("arr_0")?));
            let (pool, spatial, img_per_s) = featurise(&net, &mut source, batch, device, &nfe)?;
            // Intervals only for the final weights: the history plots FIDs alone.
            let resamples = if step.is_none() {
                spec.eval.bootstrap
            } else {
                0
            };
            let s = score(&net, &against, &pool, &spatial, resamples as usize, device)?;
            let at = step.map_or_else(String::new, |s| format!(", step {s}"));
            let interval = s.fid_interval.map_or_else(String::new, |i| format!(" {i}"));
            println!(
                "  FID ({nfe}{at}, {n} samples vs {} training images): {:.2}{interval}",
                ds.len(),
                s.fid
            );
            fids.add(step, logged, &nfe, s.fid, s.fid_interval);
            if step.is_none() {
                all.insert(
                    nfe,
                    AdmScores {
                        inception_score: s.inception_score,
                        fid: s.fid,
                        sfid: s.sfid,
                        precision: s.precision,
                        recall: s.recall,
                        reference: format!("{} training images", spec.train.data),
                        samples: npz_path.display().to_string(),
                        num_samples: pool.size()[0] as usize,
                        num_reference: ds.len(),
                        inception_weights: inception_weights.display().to_string(),
                        device: crate::device::describe(device),
                        img_per_s,
                        fid_interval: s.fid_interval,
                    },
                );
            }
        }
    }
    Ok(Metrics {
        fid: fids.last,
        fid_interval: fids.intervals,
        history: fids.history,
        adm: all,
        num_samples: n,
        num_reference: ds.len(),
        note: "small-sample FID of pixel-space samples (Inception features of upscaled images): compare runs of one spec, not FID-50K numbers".to_owned(),
        reference: None,
        inputs: plan::sample_inputs(spec, weights),
        inception_weights: inception_weights.display().to_string(),
    })
}

/// samples/grid-real.png for latent runs: the reference batch's first images (4 rows of 10),
/// where it holds images.
fn reference_grid(run: &Run, reference: &Path) -> Result<()> {
    let mut npz = Npz::open(reference)?;
    if !npz.has("arr_0") {
        return Ok(());
    }
    let mut images = npz.images("arr_0")?;
    let Some(first) = images.next_batch(40)? else {
        return Ok(());
    };
    let cols = first.size()[0].min(10);
    crate::report::sample_grid(
        &first.narrow(0, 0, cols * (first.size()[0] / cols)),
        cols,
        1,
        &run.dir.real_grid(),
    )
}

/// samples/grid-real.png: real images in the sample grids' layout (a column per class, as many
/// rows as the grids have), to look at beside them. `labels` holds each image's class.
fn real_grid(run: &Run, images: &Tensor, labels: &[i64]) -> Result<()> {
    let classes = run.spec.model.num_classes.min(10);
    let rows = crate::pipeline::sample::GRID_ROWS_PIXELS;
    let mut picked = Vec::new();
    for row in 0..rows {
        for class in 0..classes {
            let Some(i) = labels
                .iter()
                .enumerate()
                .filter(|(_, &l)| l == class)
                .nth(row as usize)
                .map(|(i, _)| i as i64)
            else {
                continue;
            };
            picked.push(i);
        }
    }
    if picked.len() as i64 != rows * classes {
        // A class with fewer images than the grid has rows: no grid rather than a ragged one.
        return Ok(());
    }
    let grid = images.index_select(0, &Tensor::from_slice(&picked));
    crate::report::sample_grid(
        &grid,
        classes,
        crate::pipeline::sample::ZOOM_PIXELS,
        &run.dir.real_grid(),
    )
}

/// ADM's five metrics of each schedule's samples against the reference batch.
fn adm(run: &Run, weights: &Path) -> Result<Metrics> {
    let spec = run.spec;
    let reference = plan::reference_batch(spec)?;
    reference_grid(run, &reference)?;
    let opts = Options {
        batch: spec.eval.batch as usize,
        device: crate::device::parse(&spec.train.device)?,
        bootstrap: spec.eval.bootstrap as usize,
        cache: default_cache(),
    };
    let inception_weights = crate::import::inception::default_weights(None, &opts.cache)?;
    let (_vs, net) = crate::import::inception::load(&inception_weights, opts.device)?;
    let scorer = Scorer {
        net: &net,
        weights: &inception_weights,
    };
    let (mut fids, mut all) = (Fids::default(), BTreeMap::new());
    for (step, logged) in evaluated(run) {
        for schedule in &spec.sample.schedules {
            let nfe = format!("{}-NFE", schedule.len() - 1);
            let npz = run.dir.samples_npz(step, schedule.len() - 1);
            let scores = evaluator::evaluate(&scorer, &reference, &npz, &opts)?;
            let at = step.map_or_else(String::new, |s| format!(" (step {s})"));
            println!(
                "  {nfe}{at}:\n    {}",
                scores.adm_lines().replace('\n', "\n    ")
            );
            fids.add(step, logged, &nfe, scores.fid, scores.fid_interval);
            if step.is_none() {
                all.insert(nfe, scores);
            }
        }
    }
    let num_reference = all.values().next().map_or(0, |s| s.num_reference);
    Ok(Metrics {
        fid: fids.last,
        fid_interval: fids.intervals,
        history: fids.history,
        adm: all,
        num_samples: spec.sample.num_samples,
        num_reference,
        note: "ADM evaluator semantics against the reference batch".to_owned(),
        reference: Some(reference.display().to_string()),
        inputs: plan::sample_inputs(spec, weights),
        inception_weights: inception_weights.display().to_string(),
    })
}
