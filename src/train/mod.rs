//! Training: one optimisation step ([`Trainer`]), AdamW, EMA, the networks of a run
//! ([`Networks`]) and the loop ([`run::train`]), configured by a checked [`TrainConfig`].
pub mod ema;
pub mod graph;
mod log;
pub mod optim;
pub mod run;
mod state;

use crate::dist::Group;
use crate::method::{Method, Network, Objective};
use crate::model::{SiT, SiTConfig};
use crate::spec::{Precision, Spec};
use anyhow::{bail, Result};
use optim::AdamW;
use tch::{nn, Device, Kind, Tensor};

/// What a training run needs to know, checked (built from a validated spec by [`TrainConfig::of`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// The spec's identity: checkpoints record it and resume only into the same spec.
    pub spec_sha256: String,
    /// Names the run in progress lines.
    pub label: String,
    /// `train.data` as the spec names it (for messages).
    pub data: String,
    /// The network, objective and sampler.
    pub method: Method,
    /// Global batch.
    pub batch: usize,
    pub epochs: u64,
    pub lr: f64,
    pub warmup_steps: u64,
    pub betas: [f64; 2],
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub ema_decay: f64,
    pub precision: Precision,
    pub seed: u64,
    pub accumulation: usize,
    pub log_every: u64,
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    /// Steps whose checkpoints are kept whatever `keep_checkpoints` says.
    pub pin_checkpoints: Vec<u64>,
    /// Steps whose checkpoints are saved (and kept) to be sampled and scored.
    pub eval_steps: Vec<u64>,
    pub device: String,
    pub cuda_graph: bool,
}

impl TrainConfig {
    /// The training loop's checked runtime config (of a validated spec).
    pub fn of(spec: &Spec) -> TrainConfig {
        let t = &spec.train;
        let count = |v: i64| u64::try_from(v).expect("validated as positive");
        TrainConfig {
            spec_sha256: spec.sha256(),
            label: spec.experiment.name.clone(),
            data: t.data.clone(),
            method: spec.method(),
            batch: count(t.batch) as usize,
            epochs: count(t.epochs),
            lr: t.lr,
            warmup_steps: count(t.warmup_steps),
            betas: [t.betas[0], t.betas[1]],
            weight_decay: t.weight_decay,
            grad_clip: t.grad_clip,
            ema_decay: t.ema_decay,
            precision: t.precision,
            seed: t.seed,
            accumulation: count(t.grad_accumulation) as usize,
            log_every: count(t.log_every),
            checkpoint_every: count(t.checkpoint_every),
            keep_checkpoints: count(t.keep_checkpoints) as usize,
            pin_checkpoints: t.pin_checkpoints.clone(),
            eval_steps: spec.eval.steps.clone(),
            device: t.device.clone(),
            cuda_graph: t.cuda_graph,
        }
    }

    /// The learning rate of `step`: linear warmup, then constant.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            self.lr * (step + 1) as f64 / self.warmup_steps as f64
        } else {
            self.lr
        }
    }
}

/// A SiT of `config` on `device` in `precision`, initialised from torch's generator as it
/// stands (seed it first). Refused, with the numbers, when `copies` of its weights (the model,
/// an EMA, gradients, optimizer moments) cannot fit the device.
pub fn network(
    config: &SiTConfig,
    precision: Precision,
    device: Device,
    copies: f64,
) -> Result<(nn::VarStore, SiT)> {
    built(config.parameters(), precision, device, copies, |p| {
        Ok(SiT::new(p, config))
    })
}

/// [`network`] for the network of a method.
pub fn method_network(
    method: &Method,
    precision: Precision,
    device: Device,
    copies: f64,
) -> Result<(nn::VarStore, Network)> {
    built(method.parameters(), precision, device, copies, |p| {
        method.build(p)
    })
}

/// A store holding what `build` makes, checked to fit first.
fn built<T>(
    parameters: f64,
    precision: Precision,
    device: Device,
    copies: f64,
    build: impl FnOnce(&nn::Path) -> Result<T>,
) -> Result<(nn::VarStore, T)> {
    let bytes = parameters * input_kind(precision).elt_size_in_bytes() as f64;
    crate::device::ensure_fits(
        bytes * copies,
        device,
        &format!("a network of {parameters:.3e} parameters"),
    )?;
    let mut vs = nn::VarStore::new(device);
    let net = build(&vs.root())?;
    prepare_precision(&mut vs, precision, device)?;
    Ok((vs, net))
}

/// The networks of a training run: the model and (in the process that keeps it) its EMA, frozen.
pub struct Networks {
    pub vs: nn::VarStore,
    pub net: Network,
    pub ema: Option<(nn::VarStore, Network)>,
}

impl Networks {
    /// The model initialised from `seed`, and an EMA copy of it when `with_ema`.
    pub fn on(cfg: &TrainConfig, device: Device, with_ema: bool) -> Result<Networks> {
        tch::manual_seed(crate::data::mix(cfg.seed, u64::MAX) as i64);
        // The weights, their gradients, AdamW's two moments and the EMA.
        let (vs, net) = method_network(&cfg.method, cfg.precision, device, 5.0)?;
        let ema = match with_ema {
            true => {
                let (mut ema_vs, ema) = method_network(&cfg.method, cfg.precision, device, 1.0)?;
                ema_vs.freeze();
                ema::copy(&ema_vs, &vs);
                Some((ema_vs, ema))
            }
            false => None,
        };
        Ok(Networks { vs, net, ema })
    }
}

/// Puts the variables in the precision's dtype (float32 under bf16 autocast) and sets TF32 on
/// CUDA.
pub fn prepare_precision(
    vs: &mut nn::VarStore,
    precision: Precision,
    device: Device,
) -> Result<()> {
    match precision {
        Precision::F64 => vs.double(),
        _ => vs.float(),
    }
    if device.is_cuda() {
        crate::device::set_tf32(precision == Precision::Tf32)?;
    }
    Ok(())
}

/// The dtype of the model's inputs and master weights under a precision.
pub fn input_kind(precision: Precision) -> Kind {
    if precision == Precision::F64 {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Trainable variables sorted by name (the optimizer's and the checkpoint's order).
pub fn trainable(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    crate::model::sorted_variables(vs)
        .into_iter()
        .filter(|(_, v)| v.requires_grad())
        .collect()
}

/// A step's numbers, left on the device (reading them would stall it).
pub struct StepStats {
    pub loss: Tensor,
    pub v_loss: Tensor,
    /// The batch mean of the adaptive weight (||u - u_tgt||^2 + eps)^p: the weighted loss sits
    /// near 1 with p = 1, so this is what shows the scale of the error.
    pub adaptive_weight: Tensor,
    pub grad_norm: Tensor,
}

/// What a training step needs besides the batch.
pub struct Trainer<'a> {
    /// The network with its method's loss.
    pub objective: Objective<'a>,
    pub opt: AdamW,
    pub precision: Precision,
    /// Gradient-norm clip; 0 disables it.
    pub grad_clip: f64,
    /// Micro-batches per step: the batch is split and the gradients summed.
    pub accumulation: i64,
    /// The group whose processes each hold a part of the step's batch and average their
    /// gradients; None: this process holds the whole batch.
    pub sync: Option<&'a Group>,
    /// Steps replayed as one CUDA graph (`train.cuda_graph`); None: every step eager.
    pub graph: Option<graph::StepGraph>,
}

impl<'a> Trainer<'a> {
    /// The trainer of a run's network, stepping `opt`, averaging over `sync` when given.
    pub fn for_run(
        cfg: &TrainConfig,
        nets: &'a Networks,
        opt: AdamW,
        sync: Option<&'a Group>,
        device: Device,
    ) -> Result<Trainer<'a>> {
        Ok(Trainer {
            objective: cfg.method.objective(&nets.net)?,
            opt,
            precision: cfg.precision,
            grad_clip: cfg.grad_clip,
            accumulation: cfg.accumulation as i64,
            sync,
            graph: match cfg.cuda_graph {
                true => Some(graph::StepGraph::new(device)?),
                false => None,
            },
        })
    }
}

/// Which rows of a step's global batch a data-parallel process trains on. Each of the
/// `accumulation` micro-batches (batch / accumulation samples, in batch order) is split into
/// `world` equal parts and process `rank` takes part `rank` of each, so N processes compute the
/// loss terms of one process with the same global batch and accumulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub batch: usize,
    pub accumulation: usize,
    pub rank: usize,
    pub world: usize,
}

impl Part {
    /// The checked split: the batch must divide into accumulation x world equal parts.
    pub fn new(batch: usize, accumulation: usize, rank: usize, world: usize) -> Result<Self> {
        let accumulation = accumulation.max(1);
        if world > 1 && !batch.is_multiple_of(accumulation * world) {
            bail!(
                "train.batch = {batch} does not split into {accumulation} micro-batch(es) x {world} processes: make it a multiple of {}",
                accumulation * world
            );
        }
        Ok(Self {
            batch,
            accumulation,
            rank,
            world,
        })
    }

    /// Samples of one process in one micro-batch.
    pub fn local_micro(&self) -> usize {
        self.batch / self.accumulation / self.world
    }

    /// This process's rows of the global batch, micro-batch after micro-batch.
    pub fn rows(&self) -> Vec<usize> {
        if self.world == 1 {
            return (0..self.batch).collect();
        }
        let (micro, local) = (self.batch / self.accumulation, self.local_micro());
        (0..self.accumulation)
            .flat_map(|m| (0..local).map(move |j| m * micro + self.rank * local + j))
            .collect()
    }
}

impl Trainer<'_> {
    /// One step on a batch (x, labels) at learning rate `lr`; randomness comes from torch's
    /// generator (seed it first for a reproducible step). With `sync`, (x, labels) are this
    /// process's rows of the global batch ([`Part::rows`]), the random draws are the rows' share
    /// of the global batch's, and gradients and the loss are averaged over the group before
    /// the update.
    pub fn step(&mut self, x: &Tensor, labels: &Tensor, lr: f64) -> Result<StepStats> {
        let Some(mut graph) = self.graph.take() else {
            return self.step_eager(x, labels, lr);
        };
        if self.sync.is_some() {
            bail!("train.cuda_graph works in one process for now: set it to false to train in several");
        }
        let stats = graph.step(self, x, labels, lr);
        self.graph = Some(graph);
        stats
    }

    /// [`Trainer::step`] op by op, as [`graph::StepGraph`] records it.
    pub fn step_eager(&mut self, x: &Tensor, labels: &Tensor, lr: f64) -> Result<StepStats> {
        self.opt.zero_grad()?;
        let chunks = self.accumulation.max(1);
        let (rank, world) = self
            .sync
            .map_or((0, 1), |g| (g.rank() as i64, g.size() as i64));
        let zero = || Tensor::zeros([], (Kind::Float, x.device()));
        let (mut loss, mut v_loss, mut weight) = (zero(), zero(), zero());
        for (x, labels) in x
            .chunk(chunks, 0)
            .iter()
            .zip(labels.chunk(chunks, 0).iter())
        {
            let n = x.size()[0];
            let autocast = self.precision == Precision::Bf16;
            let terms = crate::device::autocast_bf16(x.device(), autocast, || {
                self.objective.loss(x, labels, n * world, n * rank)
            })?;
            (terms.loss.shallow_clone() / chunks as f64).backward();
            loss += terms.loss.detach().to_kind(Kind::Float) / chunks as f64;
            v_loss += terms.v_loss.to_kind(Kind::Float) / chunks as f64;
            weight += terms
                .adaptive_weight
                .detach()
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                / chunks as f64;
        }
        if let Some(group) = self.sync {
            // One all-reduce for the gradients and the step's numbers (the loss terms of the
            // whole global batch, as one process would log them).
            let numbers = Tensor::stack(&[&loss, &v_loss, &weight], 0);
            let mut list: Vec<Tensor> = self
                .opt
                .params
                .iter()
                .map(|p| p.value.grad())
                .filter(|g| g.defined())
                .collect();
            list.push(numbers.shallow_clone());
            group.all_reduce(&list, true, "the gradients")?;
            (loss, v_loss, weight) = (numbers.get(0), numbers.get(1), numbers.get(2));
        }
        let grad_norm = optim::clip_grad_norm(&self.opt.params, self.grad_clip)?;
        self.opt.update(lr)?;
        Ok(StepStats {
            loss,
            v_loss,
            adaptive_weight: weight,
            grad_norm,
        })
    }
}
