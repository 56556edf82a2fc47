//! The sample stage: a grid per schedule (a column per class), then every schedule's sample
//! batch as an .npz, from the final weights and from each checkpoint of `eval.steps`. Rank 0
//! loads the weights and hands them to the other ranks; batch b is sampled by rank b mod N
//! (from its own seed, as one process would), and rank 0 assembles the .npz.
use super::{plan, Run};
use crate::data;
use crate::dist::World;
use crate::sample::{Decoder, Sampler};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The weights to sample: the final ones (step None) and each intermediate checkpoint's. Rank
/// 0 alone reads the checkpoints; the others learn the steps (and hold no paths).
fn targets(run: &Run, world: &World) -> Result<Vec<(Option<u64>, Option<PathBuf>)>> {
    let main = world.is_main();
    let steps = match main {
        true => plan::intermediate(run),
        false => Vec::new(),
    };
    let shared = world.share(
        &std::iter::once(steps.len() as i64)
            .chain(steps.iter().map(|(s, _)| *s as i64))
            .chain(std::iter::repeat_n(
                0,
                run.spec.eval.steps.len() - steps.len(),
            ))
            .collect::<Vec<_>>(),
        "the steps to sample",
    )?;
    let count = shared[0] as usize;
    let mut targets = vec![(None, plan::weights(run).filter(|_| main))];
    for (i, step) in shared[1..=count].iter().enumerate() {
        targets.push((Some(*step as u64), steps.get(i).map(|(_, p)| p.clone())));
    }
    Ok(targets)
}

/// Rows of a pixel-space grid (images per class), and how much each pixel is enlarged.
pub const GRID_ROWS_PIXELS: i64 = 10;
pub const ZOOM_PIXELS: u32 = 6;

pub fn stage(run: &Run, world: &World) -> Result<()> {
    let spec = run.spec;
    let main = world.is_main();
    let device = world.device(crate::device::parse(&spec.train.device)?);
    tch::manual_seed(data::mix(spec.train.seed, u64::MAX) as i64);
    let (vs, net) = crate::train::network(&spec.model_config(), spec.train.precision, device, 1.0)?;
    let load = |path: Option<&Path>| -> Result<()> {
        if main {
            let path = path.context("no finished training to sample from")?;
            crate::train::run::load_ema(&vs, path)?;
        }
        if let Some(group) = world.group() {
            let weights: Vec<tch::Tensor> = crate::model::sorted_variables(&vs)
                .into_iter()
                .map(|(_, v)| v)
                .collect();
            group.broadcast(&weights, 0, "rank 0's EMA weights")?;
        }
        Ok(())
    };
    let pixels = data::is_pixels(&spec.train.data);
    let decoder = match pixels {
        true => Decoder::Pixels,
        false => Decoder::vae(&spec.sample.vae, device)?,
    };
    let cfg = spec.sample_config();
    let sampler = Sampler {
        cfg: &cfg,
        net: &net,
        decoder: &decoder,
        device,
    };
    let targets = targets(run, world)?;
    for (step, path) in &targets {
        load(path.as_deref())?;
        if main && step.is_none() {
            std::fs::create_dir_all(run.dir.samples())
                .with_context(|| format!("{}: cannot create", run.dir.samples().display()))?;
            let classes = spec.model.num_classes.min(10);
            let (per_class, zoom) = match pixels {
                true => (GRID_ROWS_PIXELS, ZOOM_PIXELS),
                false => (4, 1),
            };
            for schedule in &spec.sample.schedules {
                let images = sampler.grid(schedule, classes, per_class)?;
                let path = run.dir.grid(schedule.len() - 1);
                crate::report::sample_grid(&images, classes, zoom, &path)?;
                println!("  grid: {}", path.display());
            }
        }
        for schedule in &spec.sample.schedules {
            let npz = run.dir.samples_npz(*step, schedule.len() - 1);
            sampler.write_parts(schedule, &npz, world.rank, world.size)?;
        }
        world.barrier("every rank's sample batches")?;
        if main {
            for schedule in &spec.sample.schedules {
                let parts = sampler.parts(&run.dir.samples_npz(*step, schedule.len() - 1));
                let n = parts.assemble(&sampler.all_labels())?;
                println!("  samples: {} ({n} images)", parts.npz().display());
            }
        }
    }
    if main {
        let weights = targets[0].1.as_ref().expect("checked when loading");
        run.dir
            .write_sample_inputs(&plan::sample_inputs(spec, weights))?;
    }
    Ok(())
}
