//! The evaluate stage: ADM's five metrics of each schedule's samples against the reference
//! batch (latent runs), or a small-sample FID against the training images (pixel-space data,
//! the demo), for the final weights and each checkpoint of `eval.steps`; into metrics.json.
use super::{plan, Run};
use crate::data::Dataset;
use crate::eval::bootstrap::{fid_interval, Interval};
use crate::eval::evaluator::{
    self, cached_features, featurise, weights_tag, Options, Scorer, Source,
};
use crate::eval::npz::Npz;
use crate::eval::{frechet_distance, Stats};
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
    for (i, out) in values.chunks_exact_mut(size).enumerate() {
        ds.read(i, out)?;
    }
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let hash = hex(&sha2::Sha256::digest(&bytes)[..8]);
    let key = format!(
        "{}-{hash}-{}",
        spec.train.data,
        weights_tag(&inception_weights)
    );
    let reference = Tensor::from_slice(&values).view([ds.len() as i64, c, h, w]);
    let (ref_pool, _) = cached_features(&default_cache(), &key, || {
        let mut source = Source::Memory {
            images: crate::sample::pixels_to_u8(&reference),
            next: 0,
        };
        let (pool, spatial, _) = featurise(&net, &mut source, batch, device, "training images")?;
        Ok((pool, spatial))
    })?;
    let ref_stats = Stats::of(&ref_pool)?;

    let n = spec.sample.num_samples;
    let mut fids = Fids::default();
    for (step, logged) in evaluated(run) {
        for schedule in &spec.sample.schedules {
            let nfe = format!("{}-NFE", schedule.len() - 1);
            let mut npz = Npz::open(&run.dir.samples_npz(step, schedule.len() - 1))?;
            let mut source = Source::Npz(Box::new(npz.images("arr_0")?));
            let (pool, _, _) = featurise(&net, &mut source, batch, device, &nfe)?;
            let fid = frechet_distance(&ref_stats, &Stats::of(&pool)?)?;
            let interval = match (step, spec.eval.bootstrap) {
                (None, r) if r > 0 => Some(fid_interval(
                    &ref_stats, &pool, r as usize, 0, 0.95, device,
                )?),
                _ => None,
            };
            let at = step.map_or_else(String::new, |s| format!(", step {s}"));
            let pm = interval.map_or_else(String::new, |i| format!(" +- {:.2}", i.half_width()));
            println!(
                "  FID ({nfe}{at}, {n} samples vs {} training images): {fid:.2}{pm}",
                ds.len()
            );
            fids.add(step, logged, &nfe, fid, interval);
        }
    }
    Ok(Metrics {
        fid: fids.last,
        fid_interval: fids.intervals,
        history: fids.history,
        adm: BTreeMap::new(),
        num_samples: n,
        num_reference: ds.len(),
        note: "small-sample FID of pixel-space samples (Inception features of upscaled images): compare runs of one spec, not FID-50K numbers".to_owned(),
        reference: None,
        inputs: plan::sample_inputs(spec, weights),
        inception_weights: inception_weights.display().to_string(),
    })
}

/// ADM's five metrics of each schedule's samples against the reference batch.
fn adm(run: &Run, weights: &Path) -> Result<Metrics> {
    let spec = run.spec;
    let reference = plan::reference_batch(spec)?;
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
