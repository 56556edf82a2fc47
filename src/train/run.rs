//! The training loop of one run: resumes from the newest whole checkpoint, logs to an
//! append-only stats.jsonl and a progress bar, checkpoints atomically, stops cleanly on Ctrl-C
//! and at the first non-finite loss or gradient.
use super::checkpoint::{self, TrainState};
use super::{ema, input_kind, optim::AdamW, prepare_precision, trainable, Part, Trainer};
use crate::data::{self, Loader};
use crate::device;
use crate::dist::{Group, World};
use crate::model::SiT;
use crate::spec::Spec;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{nn, Kind, Tensor};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    // The next Ctrl-C kills at once (both calls are async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
    }
}

/// Ctrl-C finishes the current step, writes a checkpoint and stops; a second Ctrl-C kills.
fn install_interrupt_handler() {
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
}

pub struct Trained {
    pub steps: u64,
    pub checkpoint: PathBuf,
}

/// The model and EMA networks of a run, built for its spec on its device.
pub struct Networks {
    pub vs: nn::VarStore,
    pub net: SiT,
    pub ema_vs: nn::VarStore,
    pub ema: SiT,
}

/// The spec's network on `device`, initialised from the spec's seed.
fn network(spec: &Spec, device: tch::Device) -> Result<(nn::VarStore, SiT)> {
    let mut vs = nn::VarStore::new(device);
    let net = SiT::new(&vs.root(), &spec.model_config());
    prepare_precision(&mut vs, spec.train.precision, device)?;
    Ok((vs, net))
}

/// An EMA network holding `vs`'s weights, frozen.
fn ema_of(spec: &Spec, vs: &nn::VarStore) -> Result<(nn::VarStore, SiT)> {
    let (mut ema_vs, ema) = network(spec, vs.device())?;
    ema_vs.freeze();
    ema::copy(&ema_vs, vs);
    Ok((ema_vs, ema))
}

impl Networks {
    pub fn new(spec: &Spec) -> Result<Self> {
        Self::on(spec, device::parse(&spec.train.device)?)
    }

    /// On `device` rather than the spec's (a data-parallel rank's own GPU).
    pub fn on(spec: &Spec, device: tch::Device) -> Result<Self> {
        tch::manual_seed(data::mix(spec.train.seed, u64::MAX) as i64);
        let (vs, net) = network(spec, device)?;
        let (ema_vs, ema) = ema_of(spec, &vs)?;
        Ok(Self {
            vs,
            net,
            ema_vs,
            ema,
        })
    }

    /// Loads the EMA weights of a checkpoint (for sampling).
    pub fn load_ema(&self, path: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = checkpoint::read_tensors(path)?.into_iter().collect();
        crate::model::load_state_dict(&self.ema_vs, &tensors, "ema.", &path.display().to_string())
    }
}

fn check_data(spec: &Spec, ds: &dyn data::Dataset) -> Result<()> {
    let m = &spec.model;
    let [c, h, w] = ds.stored_shape();
    let channels = if ds.is_posterior() { c / 2 } else { c };
    if channels != m.in_channels || h != m.input_size || w != m.input_size {
        bail!(
            "{}: samples are {channels} x {h} x {w}, but the spec's model takes {} x {} x {} (set model.in_channels and model.input_size)",
            spec.train.data, m.in_channels, m.input_size, m.input_size
        );
    }
    if ds.num_classes() > m.num_classes {
        bail!(
            "{}: labels go up to {}, but model.num_classes is {}",
            spec.train.data,
            ds.num_classes() - 1,
            m.num_classes
        );
    }
    Ok(())
}

fn lr_at(spec: &Spec, step: u64) -> f64 {
    let t = &spec.train;
    if t.warmup_steps > 0 && (step as i64) < t.warmup_steps {
        t.lr * (step + 1) as f64 / t.warmup_steps as f64
    } else {
        t.lr
    }
}

/// Trains the run in `dir` on `ds` (the spec's `train.data`) to the spec's last step,
/// continuing from its newest checkpoint.
pub fn train(spec: &Spec, ds: Arc<dyn data::Dataset>, dir: &Path) -> Result<Trained> {
    train_in(spec, ds, dir, &World::single())
}

/// [`train`] as one rank of `world`: the spec's batch is the global batch and this process
/// trains on its rows of it ([`Part`]), gradients averaged over the group every step. Rank 0
/// alone reads and writes the run directory (checkpoints, stats.jsonl) and keeps the EMA; it
/// hands its starting weights and optimizer state to the others, which wait at a barrier while
/// it checkpoints. The data order and every random draw depend on (seed, step) only, so a run
/// resumes with any number of processes that splits the same global batch.
pub fn train_in(
    spec: &Spec,
    ds: Arc<dyn data::Dataset>,
    dir: &Path,
    world: &World,
) -> Result<Trained> {
    let t = &spec.train;
    check_data(spec, ds.as_ref())?;
    let device = world.device(device::parse(&t.device)?);
    let main = world.is_main();
    let batch = t.batch as usize;
    let part = Part::new(batch, t.grad_accumulation as usize, world.rank, world.size)?;
    let per_epoch = Loader::steps_per_epoch(ds.as_ref(), batch);
    if per_epoch == 0 {
        bail!(
            "{}: {} samples make no batch of {batch} (lower train.batch)",
            t.data,
            ds.len()
        );
    }
    let total = per_epoch * t.epochs as u64;
    let beyond: Vec<u64> = spec
        .eval
        .steps
        .iter()
        .copied()
        .filter(|&s| s >= total)
        .collect();
    if main && !beyond.is_empty() {
        eprintln!(
            "note: eval.steps {beyond:?} are not before this run's last step ({total}): no extra checkpoint is scored for them (the final weights always are)"
        );
    }
    let ckpt_dir = dir.join("checkpoints");
    if main {
        std::fs::create_dir_all(&ckpt_dir)
            .with_context(|| format!("{}: cannot create", ckpt_dir.display()))?;
    }

    tch::manual_seed(data::mix(t.seed, u64::MAX) as i64);
    let (vs, net) = network(spec, device)?;
    // The EMA lives on rank 0 only (it alone samples and checkpoints).
    let ema = if main { Some(ema_of(spec, &vs)?) } else { None };
    let ema_vs = ema.as_ref().map(|e| &e.0);
    let spec_sha256 = spec.sha256();
    let named = trainable(&vs);
    let mut opt = AdamW::new(named, t.lr, t.betas, t.weight_decay);
    let (mut start, mut wall_before) = (0, 0.0);
    if main {
        if let Some((path, state)) = checkpoint::latest(&ckpt_dir) {
            if state.spec_sha256 != spec_sha256 {
                bail!(
                    "{}: written for spec {}, not this one ({spec_sha256})",
                    path.display(),
                    state.spec_sha256,
                );
            }
            restore(&path, &state, &vs, ema_vs, &mut opt)?;
            eprintln!(
                "resuming from {} (step {} of {total})",
                path.display(),
                state.step
            );
            (start, wall_before) = (state.step, state.wall_s);
        }
    }
    if let Some(group) = world.group() {
        // Every rank starts from rank 0's step, weights and optimizer state.
        let shared = world.share(&[start as i64, opt.step()], "the starting step")?;
        start = shared[0] as u64;
        opt.set_step(shared[1]);
        let mut state: Vec<Tensor> = sorted(&vs).into_iter().map(|(_, v)| v).collect();
        for (_, _, m, v) in &opt.params {
            state.push(m.shallow_clone());
            state.push(v.shallow_clone());
        }
        group.broadcast(&state, 0, "rank 0's weights and optimizer state")?;
    }
    if start >= total {
        return Ok(Trained {
            steps: total,
            checkpoint: ckpt_dir.join(checkpoint::file_name(total)),
        });
    }

    let mut trainer = Trainer {
        net: &net,
        opt,
        cfg: spec.meanflow_config(),
        precision: t.precision,
        grad_clip: t.grad_clip,
        accumulation: t.grad_accumulation,
        sync: world.group(),
        graph: match t.cuda_graph {
            true => Some(super::graph::StepGraph::new(device)?),
            false => None,
        },
    };
    let rows = part.rows();
    let row_index = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>());
    let mut loader = Loader::with_rows(ds.clone(), batch, rows, t.seed, start, 4)?;
    let mut stats = if main {
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("stats.jsonl"))
                .with_context(|| format!("{}: cannot open stats.jsonl", dir.display()))?,
        )
    } else {
        None
    };
    let bar = if main {
        ProgressBar::new(total).with_position(start)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}<{eta_precise}] {wide_bar} {pos}/{len} {msg}",
        )
        .expect("a valid template"),
    );
    bar.set_prefix(spec.experiment.name.clone());
    install_interrupt_handler();

    let zero = || Tensor::zeros([], (Kind::Float, device));
    let (mut loss_sum, mut v_loss_sum, mut norm_sum) = (zero(), zero(), zero());
    let mut first_bad = Tensor::full([], -1i64, (Kind::Int64, device));
    let started = Instant::now();
    let mut window = (Instant::now(), 0u64);
    let kind = input_kind(t.precision);
    let mut last_saved = None;
    let mut asked_to_stop = false;
    for step in start..total {
        tch::manual_seed(data::mix(t.seed, step) as i64);
        let b = loader.next_batch()?;
        let x = data::model_input_rows(
            ds.as_ref(),
            &b.x.to_device(device),
            &row_index,
            batch as i64,
        )
        .to_kind(kind);
        let lr = lr_at(spec, step);
        let s = trainer.step(&x, &b.labels.to_device(device), lr)?;
        if let Some(ema_vs) = ema_vs {
            ema::update(ema_vs, &vs, t.ema_decay)?;
        }
        let bad = s
            .loss
            .isfinite()
            .logical_and(&s.grad_norm.isfinite())
            .logical_not();
        first_bad = first_bad.where_self(
            &(first_bad.ge(0).logical_or(&bad.logical_not())),
            &Tensor::full([], step as i64, (Kind::Int64, device)),
        );
        loss_sum += &s.loss;
        v_loss_sum += &s.v_loss;
        norm_sum += s.grad_norm.to_kind(Kind::Float);
        window.1 += 1;
        let done = step + 1;
        let interrupted = match world.group() {
            None => INTERRUPTED.load(Ordering::SeqCst),
            // Ranks may see Ctrl-C at different steps: the first to see it asks the group to
            // stop after the next step, which no rank can have finished yet.
            Some(group) => {
                let ask = INTERRUPTED.load(Ordering::SeqCst) && !asked_to_stop;
                asked_to_stop |= ask;
                group
                    .stop_step(ask.then_some(done + 1))?
                    .is_some_and(|at| done >= at)
            }
        };
        let log = done % t.log_every as u64 == 0 || done == total || interrupted;
        let save = done % t.checkpoint_every as u64 == 0
            || done == total
            || interrupted
            || spec.eval.steps.contains(&done);
        if log || save {
            // The loss and gradients were averaged over the group: every rank stops here alike.
            let bad_step = first_bad.int64_value(&[]);
            if bad_step >= 0 {
                bar.abandon();
                let kept = last_saved.or_else(|| checkpoint::latest(&ckpt_dir).map(|c| c.0));
                bail!(
                    "non-finite loss or gradient at step {bad_step}; stopped without saving it. Last good checkpoint: {}. Lower train.lr, set train.grad_clip, or train in bf16/f32 rather than fp16",
                    kept.map_or("none".to_owned(), |p| p.display().to_string())
                );
            }
        }
        if log {
            let n = window.1 as f64;
            let elapsed = window.0.elapsed().as_secs_f64();
            let line = serde_json::json!({
                "step": done,
                "epoch": step / per_epoch,
                "loss": loss_sum.double_value(&[]) / n,
                "v_loss": v_loss_sum.double_value(&[]) / n,
                "grad_norm": norm_sum.double_value(&[]) / n,
                "lr": lr,
                "img_per_s": n * batch as f64 / elapsed.max(1e-9),
                "wall_s": wall_before + started.elapsed().as_secs_f64(),
            });
            if let Some(stats) = &mut stats {
                writeln!(stats, "{line}").context("writing stats.jsonl")?;
            }
            bar.set_message(format!(
                "loss {:.4} v_loss {:.4}",
                line["loss"], line["v_loss"]
            ));
            (loss_sum, v_loss_sum, norm_sum) = (zero(), zero(), zero());
            window = (Instant::now(), 0);
        }
        bar.set_position(done);
        if save {
            if let Some(group) = world.group() {
                check_replicas(group, &vs, done)?;
            }
            let path = ckpt_dir.join(checkpoint::file_name(done));
            if let Some(ema_vs) = ema_vs {
                let state = TrainState {
                    step: done,
                    epoch: done / per_epoch,
                    adam_step: trainer.opt.step(),
                    seed: t.seed,
                    spec_sha256: spec_sha256.clone(),
                    wall_s: wall_before + started.elapsed().as_secs_f64(),
                };
                checkpoint::write(
                    &path,
                    &checkpoint_tensors(&vs, ema_vs, &trainer.opt),
                    &state,
                )?;
                // The steps to evaluate stay, like the pinned ones.
                let kept: Vec<u64> = t
                    .pin_checkpoints
                    .iter()
                    .chain(&spec.eval.steps)
                    .copied()
                    .collect();
                checkpoint::prune(&ckpt_dir, t.keep_checkpoints as usize, &kept)?;
            }
            // The others wait for the checkpoint (the next stage reads the last one).
            world.barrier(&format!("rank 0 writing {}", path.display()))?;
            last_saved = Some(path);
        }
        if interrupted {
            bar.abandon();
            bail!("interrupted at step {done}; the checkpoint is saved: continue with `mfr run SPEC --resume`");
        }
    }
    bar.finish();
    if main && world.size > 1 {
        println!(
            "  all {} ranks held the same weights at every checkpoint",
            world.size
        );
    }
    Ok(Trained {
        steps: total,
        checkpoint: last_saved.expect("the last step saves"),
    })
}

/// Every rank must hold the same weights (all applied the same averaged gradients): compared at
/// each checkpoint through a fingerprint, the sums of the weights and of their squares in f64,
/// which only identical weights give bit for bit.
fn check_replicas(group: &Group, vs: &nn::VarStore, step: u64) -> Result<()> {
    let fingerprint = tch::no_grad(|| {
        let parts: Vec<Tensor> = sorted(vs)
            .iter()
            .map(|(_, v)| {
                let v = v.to_kind(Kind::Double);
                Tensor::stack(&[v.sum(Kind::Double), v.square().sum(Kind::Double)], 0)
            })
            .collect();
        Tensor::stack(&parts, 0).sum_dim_intlist([0].as_slice(), true, Kind::Double)
    });
    let all = group.all_gather(&fingerprint, "weight fingerprints")?;
    let all: Vec<Vec<f64>> = Vec::try_from(&all.to_device(tch::Device::Cpu))?;
    if let Some(rank) = all.iter().position(|f| f != &all[0]) {
        bail!(
            "after step {step}, rank {rank} holds other weights than rank 0 (fingerprints {:?} and {:?}): the replicas diverged",
            all[rank],
            all[0]
        );
    }
    Ok(())
}

/// A store's variables sorted by name (the checkpoint's and the broadcast's order).
fn sorted(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

fn checkpoint_tensors(
    vs: &nn::VarStore,
    ema_vs: &nn::VarStore,
    opt: &AdamW,
) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for (prefix, vs) in [("model.", vs), ("ema.", ema_vs)] {
        out.extend(
            sorted(vs)
                .into_iter()
                .map(|(k, v)| (format!("{prefix}{k}"), v)),
        );
    }
    for (name, _, m, v) in &opt.params {
        out.push((format!("opt.exp_avg.{name}"), m.shallow_clone()));
        out.push((format!("opt.exp_avg_sq.{name}"), v.shallow_clone()));
    }
    out
}

/// Loads a checkpoint's model, (on the rank that keeps it) EMA, and AdamW moments, every name
/// and shape checked, and its Adam step: what resuming does (also how an imported checkpoint is
/// checked to load).
pub fn restore(
    path: &Path,
    state: &TrainState,
    vs: &nn::VarStore,
    ema_vs: Option<&nn::VarStore>,
    opt: &mut AdamW,
) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = checkpoint::read_tensors(path)?.into_iter().collect();
    let source = path.display().to_string();
    // load_state_dict considers only the names under its prefix.
    crate::model::load_state_dict(vs, &tensors, "model.", &source)?;
    if let Some(ema_vs) = ema_vs {
        crate::model::load_state_dict(ema_vs, &tensors, "ema.", &source)?;
    }
    let by_name: std::collections::HashMap<&str, &Tensor> =
        tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    tch::no_grad(|| -> Result<()> {
        for (name, _, m, v) in &mut opt.params {
            for (prefix, dst) in [("opt.exp_avg.", m), ("opt.exp_avg_sq.", v)] {
                let src = by_name
                    .get(format!("{prefix}{name}").as_str())
                    .with_context(|| format!("{source}: no {prefix}{name}"))?;
                dst.copy_(&src.to_kind(dst.kind()).to_device(dst.device()));
            }
        }
        Ok(())
    })?;
    opt.set_step(state.adam_step);
    Ok(())
}
