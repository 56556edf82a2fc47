//! The training loop of one run: resumes from the newest checkpoint that verifies, logs to an
//! append-only stats.jsonl and a progress bar, checkpoints atomically, stops cleanly on a stop
//! signal (SIGINT, SIGTERM, SIGUSR1: see [`crate::signals`]) after checkpointing, and at the
//! first non-finite loss or gradient.
use super::log::StepLog;
use super::state::{broadcast_start, resume, save_checkpoint};
use super::{ema, input_kind, optim::AdamW, trainable, Networks, Part, TrainConfig, Trainer};
use crate::data::{self, Loader};
use crate::device;
use crate::dist::World;
use crate::rundir::checkpoint::{self, TrainState};
use crate::rundir::RunDir;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use tch::Tensor;

pub use super::state::restore;

pub struct Trained {
    pub steps: u64,
    pub checkpoint: PathBuf,
}

/// How far a run goes: whole batches per epoch, and the last step.
#[derive(Debug, Clone, Copy)]
struct Length {
    per_epoch: u64,
    total: u64,
}

impl Length {
    fn of(cfg: &TrainConfig, ds: &dyn data::Dataset) -> Result<Length> {
        let per_epoch = Loader::steps_per_epoch(ds, cfg.batch);
        if per_epoch == 0 {
            bail!(
                "{}: {} samples make no batch of {} (lower train.batch)",
                cfg.data,
                ds.len(),
                cfg.batch
            );
        }
        let total = per_epoch
            .checked_mul(cfg.epochs)
            .with_context(|| format!("train.epochs = {} is too many steps to count", cfg.epochs))?;
        Ok(Length { per_epoch, total })
    }
}

fn check_data(cfg: &TrainConfig, ds: &dyn data::Dataset) -> Result<()> {
    let m = cfg.method.input();
    let [c, h, w] = ds.stored_shape();
    let channels = if ds.is_posterior() { c / 2 } else { c };
    if channels != m.in_channels || h != m.input_size || w != m.input_size {
        bail!(
            "{}: samples are {channels} x {h} x {w}, but the spec's model takes {} x {} x {} (set model.in_channels and model.input_size)",
            cfg.data, m.in_channels, m.input_size, m.input_size
        );
    }
    if ds.num_classes() > m.num_classes {
        bail!(
            "{}: labels go up to {}, but model.num_classes is {}",
            cfg.data,
            ds.num_classes() - 1,
            m.num_classes
        );
    }
    Ok(())
}

/// Trains the run in `dir` on `ds` (the spec's `train.data`) to its last step, continuing from
/// its newest checkpoint.
pub fn train(cfg: &TrainConfig, ds: Arc<dyn data::Dataset>, dir: &RunDir) -> Result<Trained> {
    train_in(cfg, ds, dir, &World::single())
}

/// [`train`] as one rank of `world`: the batch is the global batch and this process trains on
/// its rows of it ([`Part`]), gradients averaged over the group every step. Rank 0 alone reads
/// and writes the run directory (checkpoints, stats.jsonl) and keeps the EMA; it hands its
/// starting weights and optimizer state to the others, which wait at a barrier while it
/// checkpoints. The data order and every random draw depend on (seed, step) only, so a run
/// resumes with any number of processes that splits the same global batch.
pub fn train_in(
    cfg: &TrainConfig,
    ds: Arc<dyn data::Dataset>,
    dir: &RunDir,
    world: &World,
) -> Result<Trained> {
    check_data(cfg, ds.as_ref())?;
    let device = world.device(device::parse(&cfg.device)?);
    let main = world.is_main();
    let part = Part::new(cfg.batch, cfg.accumulation, world.rank, world.size)?;
    let length = Length::of(cfg, ds.as_ref())?;
    if main {
        note_late_eval_steps(cfg, length.total);
        std::fs::create_dir_all(dir.checkpoints())
            .with_context(|| format!("{}: cannot create", dir.checkpoints().display()))?;
    }

    // The EMA lives on rank 0 only (it alone samples and checkpoints).
    let nets = Networks::on(cfg, device, main)?;
    let mut opt = AdamW::new(trainable(&nets.vs), cfg.lr, cfg.betas, cfg.weight_decay);
    let (mut start, wall_before) = match main {
        true => resume(cfg, dir, &nets, &mut opt, length.total)?,
        false => (0, 0.0),
    };
    if let Some(group) = world.group() {
        start = broadcast_start(world, group, &nets.vs, &mut opt, start)?;
    }
    if start >= length.total {
        return Ok(Trained {
            steps: length.total,
            checkpoint: dir.checkpoint(length.total),
        });
    }

    let mut trainer = Trainer::for_run(cfg, &nets, opt, world.group(), device)?;
    let rows = part.rows();
    let row_index = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>());
    let mut loader = Loader::with_rows(ds.clone(), cfg.batch, rows, cfg.seed, start, 4)?;
    let stats = match main {
        true => Some(dir.stats_log(start)?),
        false => None,
    };
    let mut log = StepLog::new(cfg, stats, length.total, start, wall_before, device, main);
    crate::signals::install();
    let mut stop = AgreedStop::default();
    let mut last_saved = None;
    let kind = input_kind(cfg.precision);
    for step in start..length.total {
        tch::manual_seed(data::mix(cfg.seed, step) as i64);
        let b = loader.next_batch()?;
        let x = data::model_input_rows(
            ds.as_ref(),
            &b.x.to_device(device),
            &row_index,
            cfg.batch as i64,
        )
        .to_kind(kind);
        let lr = cfg.lr_at(step);
        let s = trainer.step(&x, &b.labels.to_device(device), lr)?;
        if let Some((ema_vs, _)) = &nets.ema {
            ema::update(ema_vs, &nets.vs, cfg.ema_decay)?;
        }
        log.add(step, &s);
        let done = step + 1;
        let interrupted = stop.now(world, done)?;
        let last = done == length.total || interrupted.is_some();
        let write_log = done % cfg.log_every == 0 || last;
        let save = done % cfg.checkpoint_every == 0 || last || cfg.eval_steps.contains(&done);
        if write_log || save {
            // The loss and gradients were averaged over the group: every rank stops here alike.
            stop_if_non_finite(&mut log, last_saved.as_ref(), dir)?;
        }
        if write_log {
            log.write(done, step / length.per_epoch, lr)?;
        }
        log.at(done);
        if save {
            let state = TrainState {
                step: done,
                epoch: done / length.per_epoch,
                adam_step: trainer.opt.step(),
                seed: cfg.seed,
                spec_sha256: cfg.spec_sha256.clone(),
                wall_s: log.wall_s(),
            };
            last_saved = Some(save_checkpoint(
                cfg,
                dir,
                world,
                &nets,
                &trainer.opt,
                &state,
            )?);
        }
        if let Some(signal) = interrupted {
            log.abandon();
            let path = last_saved.as_ref().expect("a stop saves");
            return Err(crate::signals::Stopped {
                signal,
                at: format!(
                    "at step {done} of {} (checkpoint {} written)",
                    length.total,
                    path.display()
                ),
            }
            .into());
        }
    }
    log.finish();
    if main && world.size > 1 {
        println!(
            "  all {} ranks held the same weights at every checkpoint",
            world.size
        );
    }
    Ok(Trained {
        steps: length.total,
        checkpoint: last_saved.expect("the last step saves"),
    })
}

/// Stops the run at the first non-finite loss or gradient since the last check, naming the last
/// good checkpoint; nothing non-finite is saved.
fn stop_if_non_finite(log: &mut StepLog, last_saved: Option<&PathBuf>, dir: &RunDir) -> Result<()> {
    let Some(bad) = log.first_bad_step() else {
        return Ok(());
    };
    log.abandon();
    let kept = last_saved
        .cloned()
        .or_else(|| checkpoint::newest_verified(&dir.checkpoints()).map(|c| c.0));
    bail!(
        "non-finite loss or gradient at step {bad}; stopped without saving it. Last good checkpoint: {}. Lower train.lr, set train.grad_clip, or train in bf16/f32 rather than fp16",
        kept.map_or("none".to_owned(), |p| p.display().to_string())
    )
}

/// Says which `eval.steps` no checkpoint of this run can serve.
fn note_late_eval_steps(cfg: &TrainConfig, total: u64) {
    let beyond: Vec<u64> = cfg
        .eval_steps
        .iter()
        .copied()
        .filter(|&s| s >= total)
        .collect();
    if !beyond.is_empty() {
        eprintln!(
            "note: eval.steps {beyond:?} are not before this run's last step ({total}): no extra checkpoint is scored for them (the final weights always are)"
        );
    }
}

/// Whether the run stops after step `done`, and on which signal: one seen here, or, in a group,
/// by any rank (the others stop on SIGTERM's number).
#[derive(Default)]
struct AgreedStop {
    asked: bool,
}

impl AgreedStop {
    fn now(&mut self, world: &World, done: u64) -> Result<Option<i32>> {
        let seen = crate::signals::received();
        let Some(group) = world.group() else {
            return Ok(seen);
        };
        // Ranks may see a signal at different steps: the first to see it asks the group to stop
        // after the next step, which no rank can have finished yet.
        let ask = seen.is_some() && !self.asked;
        self.asked |= ask;
        let stop = group
            .stop_step(ask.then_some(done + 1))?
            .is_some_and(|at| done >= at);
        Ok(stop.then(|| seen.unwrap_or(libc::SIGTERM)))
    }
}
