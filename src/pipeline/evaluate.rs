//! The evaluate stage: ADM's five metrics of each schedule's samples, for the final weights and
//! each checkpoint of `eval.steps`, into metrics.json. One loop for every run: latent runs are
//! scored against the reference batch, pixel-space runs (the demo) against their training
//! images (a small-sample FID: it ranks the runs of one spec, it is not FID-50K); the Inception
//! weights, the batch and the intervals follow one rule for both.
use super::{plan, Run};
use crate::data::Dataset;
use crate::eval::evaluator::{self, weights_tag, Against, Options, Scorer};
use crate::eval::npz::Npz;
use crate::eval::AdmScores;
use crate::files::hex;
use crate::paths::default_cache;
use crate::rundir::{HistoryPoint, Metrics};
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
    let spec = run.spec;
    let weights = plan::weights(run).context("no finished training to evaluate")?;
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
    let pixels = crate::data::is_pixels(&spec.train.data);
    let (against, reference) = if pixels {
        let ds = ds.context("the small-sample FID needs the training images")?;
        (training_images(run, &scorer, ds.as_ref(), &opts)?, None)
    } else {
        let path = plan::reference_batch(spec)?;
        reference_grid(run, &path)?;
        (evaluator::against_file(&scorer, &path, &opts)?, Some(path))
    };
    let mut fids = Fids::default();
    for (step, logged) in evaluated(run) {
        for schedule in &spec.sample.schedules {
            let nfe = format!("{}-NFE", schedule.len() - 1);
            let npz = run.dir.samples_npz(step, schedule.len() - 1);
            let scores = evaluator::score_samples(&scorer, &against, &npz, &opts)?;
            let at = step.map_or_else(String::new, |s| format!(" (step {s})"));
            let interval = scores
                .fid_interval
                .map_or_else(String::new, |i| format!(" {i}"));
            println!(
                "  {nfe}{at}, {} samples vs {}: FID {:.2}{interval}\n    {}",
                scores.num_samples,
                against.description,
                scores.fid,
                scores.adm_lines().replace('\n', "\n    ")
            );
            fids.add(step, logged, &nfe, scores);
        }
    }
    let note = match pixels {
        true => "small-sample FID of pixel-space samples against the training images (Inception features of upscaled images): compare runs of one spec, not FID-50K numbers",
        false => "ADM evaluator semantics against the reference batch",
    };
    run.dir.write_metrics(&Metrics {
        fid: fids.last.iter().map(|(k, s)| (k.clone(), s.fid)).collect(),
        fid_interval: fids
            .last
            .iter()
            .filter_map(|(k, s)| Some((k.clone(), s.fid_interval?)))
            .collect(),
        history: fids.history,
        num_samples: spec.sample.num_samples,
        num_reference: against.images,
        note: note.to_owned(),
        reference: reference.map(|p| p.display().to_string()),
        inputs: plan::sample_inputs(spec, &weights),
        inception_weights: inception_weights.display().to_string(),
        adm: fids.last,
    })
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

/// The scores of every evaluated batch: the final weights' per NFE, and each evaluated step's
/// FID with its interval in the history.
#[derive(Default)]
struct Fids {
    last: BTreeMap<String, AdmScores>,
    history: Vec<HistoryPoint>,
}

impl Fids {
    fn add(&mut self, step: Option<u64>, logged: Option<u64>, nfe: &str, scores: AdmScores) {
        if let Some(step) = logged {
            self.history.push(HistoryPoint {
                step,
                nfe: nfe.to_owned(),
                fid: scores.fid,
                fid_interval: scores.fid_interval,
            });
        }
        if step.is_none() {
            self.last.insert(nfe.to_owned(), scores);
        }
    }
}

/// The reference of pixel-space data: every training image, its features cached by the
/// images' content and the Inception weights.
fn training_images(
    run: &Run,
    scorer: &Scorer,
    ds: &dyn Dataset,
    opts: &Options,
) -> Result<Against> {
    let spec = run.spec;
    let [c, h, w] = ds.stored_shape();
    let size = (c * h * w) as usize;
    let mut values = vec![0f32; ds.len() * size];
    let labels = values
        .chunks_exact_mut(size)
        .enumerate()
        .map(|(i, out)| ds.read(i, out))
        .collect::<Result<Vec<i64>>>()?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let key = format!(
        "{}-{}-{}",
        spec.train.data,
        hex(&sha2::Sha256::digest(&bytes)[..8]),
        weights_tag(scorer.weights)
    );
    let images =
        crate::data::pixels_to_u8(&Tensor::from_slice(&values).view([ds.len() as i64, c, h, w]));
    real_grid(run, &images, &labels)?;
    let description = format!("{} training images of {}", ds.len(), spec.train.data);
    evaluator::against_images(scorer, &images, &key, description, opts)
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
