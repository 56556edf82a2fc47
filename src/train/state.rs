//! A run's state across processes and restarts: resuming from the newest whole checkpoint
//! (falling back past damaged ones), handing rank 0's state to the other ranks, checking that
//! the replicas agree, and writing checkpoints.
use super::{optim::AdamW, Networks, TrainConfig};
use crate::dist::{Group, World};
use crate::rundir::checkpoint::{self, TrainState};
use crate::rundir::RunDir;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::{nn, Kind, Tensor};

/// Loads the newest checkpoint that is whole (checksum, names, shapes, finite values, this
/// spec), warning about each newer one that is not and falling back to the one before; the
/// step and wall time to continue from, (0, 0) when there is none.
pub(super) fn resume(
    cfg: &TrainConfig,
    dir: &RunDir,
    nets: &Networks,
    opt: &mut AdamW,
    total: u64,
) -> Result<(u64, f64)> {
    let mut damaged = Vec::new();
    for (_, path) in checkpoint::list(&dir.checkpoints()).into_iter().rev() {
        let loaded = checkpoint::verify(&path).and_then(|state| {
            if state.spec_sha256 != cfg.spec_sha256 {
                bail!(
                    "{}: written for spec {}, not this one ({})",
                    path.display(),
                    state.spec_sha256,
                    cfg.spec_sha256
                );
            }
            let ema = nets.ema.as_ref().map(|e| &e.0);
            restore(&path, &state, &nets.vs, ema, opt)?;
            Ok(state)
        });
        match loaded {
            Ok(state) => {
                eprintln!(
                    "resuming from {} (step {} of {total})",
                    path.display(),
                    state.step
                );
                return Ok((state.step, state.wall_s));
            }
            Err(e) => {
                eprintln!("warning: {e:#}; falling back to the checkpoint before it");
                damaged.push(format!("{e:#}"));
            }
        }
    }
    if !damaged.is_empty() {
        bail!(
            "{}: no checkpoint can be resumed from ({}); move them aside to train from the start",
            dir.checkpoints().display(),
            damaged.join("; ")
        );
    }
    Ok((0, 0.0))
}

/// Every rank starts from rank 0's step, weights and optimizer state.
pub(super) fn broadcast_start(
    world: &World,
    group: &Group,
    vs: &nn::VarStore,
    opt: &mut AdamW,
    start: u64,
) -> Result<u64> {
    let shared = world.share(&[start as i64, opt.step()], "the starting step")?;
    opt.set_step(shared[1]);
    let mut state: Vec<Tensor> = crate::model::sorted_variables(vs)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    for p in &opt.params {
        state.push(p.exp_avg.shallow_clone());
        state.push(p.exp_avg_sq.shallow_clone());
    }
    group.broadcast(&state, 0, "rank 0's weights and optimizer state")?;
    Ok(shared[0] as u64)
}

/// Writes step `state.step`'s checkpoint on rank 0 (after checking that every rank holds the
/// same weights), prunes the old ones, and holds the other ranks until it is in place.
pub(super) fn save_checkpoint(
    cfg: &TrainConfig,
    dir: &RunDir,
    world: &World,
    nets: &Networks,
    opt: &AdamW,
    state: &TrainState,
) -> Result<PathBuf> {
    if let Some(group) = world.group() {
        check_replicas(group, &nets.vs, state.step)?;
    }
    let path = dir.checkpoint(state.step);
    if let Some((ema_vs, _)) = &nets.ema {
        let moments = opt
            .params
            .iter()
            .map(|p| (p.name.as_str(), &p.exp_avg, &p.exp_avg_sq));
        checkpoint::write(&path, &checkpoint::layout(&nets.vs, ema_vs, moments), state)?;
        // The steps to evaluate stay, like the pinned ones.
        let kept: Vec<u64> = cfg
            .pin_checkpoints
            .iter()
            .chain(&cfg.eval_steps)
            .copied()
            .collect();
        checkpoint::prune(&dir.checkpoints(), cfg.keep_checkpoints, &kept)?;
    }
    world.barrier(&format!("rank 0 writing {}", path.display()))?;
    Ok(path)
}

/// Every rank must hold the same weights (all applied the same averaged gradients): compared at
/// each checkpoint through a fingerprint, the sums of the weights and of their squares in f64,
/// which only identical weights give bit for bit.
fn check_replicas(group: &Group, vs: &nn::VarStore, step: u64) -> Result<()> {
    let fingerprint = tch::no_grad(|| {
        let parts: Vec<Tensor> = crate::model::sorted_variables(vs)
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

/// Loads a checkpoint's model, (on the rank that keeps it) EMA, and AdamW moments, every name
/// and shape checked, and its Adam step: what resuming does (also how an imported checkpoint is
/// checked to load). The file's checksum and values are checked first.
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
    crate::model::load_state_dict(vs, &tensors, checkpoint::MODEL, &source)?;
    if let Some(ema_vs) = ema_vs {
        crate::model::load_state_dict(ema_vs, &tensors, checkpoint::EMA, &source)?;
    }
    let by_name: std::collections::HashMap<&str, &Tensor> =
        tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    tch::no_grad(|| -> Result<()> {
        for p in &mut opt.params {
            let name = &p.name;
            for (prefix, dst) in [
                (checkpoint::EXP_AVG, &mut p.exp_avg),
                (checkpoint::EXP_AVG_SQ, &mut p.exp_avg_sq),
            ] {
                let src = by_name
                    .get(format!("{prefix}{name}").as_str())
                    .with_context(|| format!("{source}: no {prefix}{name}"))?;
                if src.size() != dst.size() {
                    bail!(
                        "{source}: {prefix}{name} is {:?}, the parameter {:?}",
                        src.size(),
                        dst.size()
                    );
                }
                dst.copy_(&src.to_kind(dst.kind()).to_device(dst.device()));
            }
        }
        Ok(())
    })?;
    opt.set_step(state.adam_step);
    Ok(())
}
