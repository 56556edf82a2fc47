//! `mfr bench train`: MeanFlow training steps (loss, JVP, backward, AdamW) on random latents,
//! with the step's op profile and its agreement with forward-mode AD.
use super::{peak_memory_gib, peak_memory_of, preset, profile, randomise, rel_diff};
use crate::device;
use crate::meanflow::{meanflow_loss, Draw, JvpMethod, MeanFlowConfig};
use crate::model::{AttentionKernel, SiT, SiTConfig};
use crate::spec::{MeanFlowSection, Precision, TrainSection};
use crate::train;
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

pub struct TrainBench {
    pub model: String,
    pub batch: i64,
    pub precision: Precision,
    pub device: Device,
    pub warmup: usize,
    pub steps: usize,
    pub omega: f64,
    pub kappa: f64,
    pub grad_clip: f64,
    pub jvp: JvpMethod,
    /// Replay the step as a CUDA graph (`train.cuda_graph`).
    pub cuda_graph: bool,
}

/// The stated tolerances of the manual JVP against forward-mode AD under bf16 autocast (relative,
/// as [`Agreement`]): bf16's unit roundoff (3.9e-3) compounded over the network's depth.
pub const BF16_DU_DT_TOLERANCE: f64 = 2e-2;
pub const BF16_GRADS_TOLERANCE: f64 = 5e-3;

/// Relative differences (||a - b|| / ||b||) of the JVP method under test from forward-mode AD,
/// on one batch with the same randomness, in the bench's precision.
#[derive(Debug, Serialize)]
pub struct Agreement {
    pub u: f64,
    pub du_dt: f64,
    pub loss: f64,
    pub grads: f64,
    /// Under bf16: du/dt and the gradients within the stated tolerances. None in other
    /// precisions, which have none stated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub within_bf16_tolerance: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct TrainBenchResult {
    pub what: &'static str,
    pub model: String,
    pub parameters: i64,
    pub batch: i64,
    pub precision: Precision,
    pub omega: f64,
    pub kappa: f64,
    pub grad_clip: f64,
    pub jvp: JvpMethod,
    pub cuda_graph: bool,
    pub agreement_with_forward_ad: Agreement,
    /// With `--cuda-graph`: replayed steps against eager ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph_vs_eager: Option<GraphAgreement>,
    pub device: String,
    pub warmup_steps: usize,
    pub timed_steps: usize,
    pub ms_per_step: f64,
    pub img_per_s: f64,
    pub peak_memory_gib: f64,
    /// What `peak_memory_gib` measures: the CUDA caching allocator's peak since warm-up, or the
    /// whole process's peak resident set on the CPU.
    pub peak_memory_of: &'static str,
    pub final_loss: f64,
    /// dtype of the network's output inside the step's autocast region (proves what ran).
    pub compute_dtype: String,
    /// One more step, op by op: what it launches, moves and computes.
    pub ops: profile::OpProfile,
    pub libtorch: String,
    pub mfr_version: &'static str,
}

/// The bench's network: the same random weights on every call.
fn network(b: &TrainBench, config: &SiTConfig) -> Result<(nn::VarStore, SiT)> {
    tch::manual_seed(0);
    let (vs, net) = train::network(config, b.precision, b.device, 5.0)?;
    // Random weights everywhere: a freshly initialised SiT outputs exactly zero (adaLN-Zero),
    // which would make the agreement checks below trivially exact.
    randomise(&vs, 0.02);
    Ok((vs, net))
}

fn trainer<'a>(
    b: &TrainBench,
    net: &'a SiT,
    vs: &nn::VarStore,
    cfg: &MeanFlowConfig,
    graph: bool,
) -> Result<train::Trainer<'a>> {
    let defaults = TrainSection::default();
    Ok(train::Trainer {
        objective: crate::method::Objective::MeanFlow(net, cfg.clone()),
        opt: train::optim::AdamW::new(
            train::trainable(vs),
            defaults.lr,
            [defaults.betas[0], defaults.betas[1]],
            0.0,
        ),
        precision: b.precision,
        grad_clip: b.grad_clip,
        accumulation: 1,
        sync: None,
        graph: match graph {
            true => Some(train::graph::StepGraph::new(b.device)?),
            false => None,
        },
    })
}

pub fn train(b: &TrainBench) -> Result<TrainBenchResult> {
    super::check_sizes(b.batch, b.steps)?;
    let config = preset(&b.model)?;
    let (vs, net) = network(b, &config)?;
    let train_defaults = TrainSection::default();
    let cfg = MeanFlowSection {
        omega: b.omega,
        kappa: b.kappa,
        jvp: b.jvp,
        ..MeanFlowSection::default()
    }
    .config();
    let kind = train::input_kind(b.precision);
    let shape = [
        b.batch,
        config.in_channels,
        config.input_size,
        config.input_size,
    ];
    let x = Tensor::randn(shape, (kind, b.device));
    let labels = Tensor::randint(config.num_classes, [b.batch], (Kind::Int64, b.device));

    let compute_dtype = device::autocast_bf16(b.device, b.precision == Precision::Bf16, || {
        let t = Tensor::ones([b.batch], (kind, b.device));
        Ok(tch::no_grad(|| net.forward_aten(&x, &t, &t, &labels, AttentionKernel::Fused)).kind())
    })?;
    let agreement = agreement(&net, &vs, &cfg, &x, &labels, b.precision)?;
    let graph_vs_eager = match b.cuda_graph {
        true => Some(graph_agreement(b, &config, &cfg, &x, &labels)?),
        false => None,
    };
    let mut trainer = trainer(b, &net, &vs, &cfg, b.cuda_graph)?;
    let mut last = Tensor::zeros([], (Kind::Float, b.device));
    let mut run = |n: usize| -> Result<()> {
        for _ in 0..n {
            last = trainer.step(&x, &labels, train_defaults.lr)?.loss;
        }
        device::synchronize(b.device);
        Ok(())
    };
    run(b.warmup)?;
    device::reset_peak_memory(b.device)?;
    let start = Instant::now();
    run(b.steps)?;
    let seconds = start.elapsed().as_secs_f64() / b.steps.max(1) as f64;
    let peak_memory_gib = peak_memory_gib(b.device)?;
    let ((), ops) = profile::profile(|| run(1))?;
    let parameters = vs
        .trainable_variables()
        .iter()
        .map(|v| v.numel() as i64)
        .sum();
    Ok(TrainBenchResult {
        what: "meanflow train step",
        model: b.model.clone(),
        parameters,
        batch: b.batch,
        precision: b.precision,
        omega: b.omega,
        kappa: b.kappa,
        grad_clip: b.grad_clip,
        jvp: b.jvp,
        cuda_graph: b.cuda_graph,
        agreement_with_forward_ad: agreement,
        graph_vs_eager,
        device: device::describe(b.device),
        warmup_steps: b.warmup,
        timed_steps: b.steps,
        ms_per_step: seconds * 1e3,
        img_per_s: b.batch as f64 / seconds,
        peak_memory_gib,
        peak_memory_of: peak_memory_of(b.device),
        final_loss: last.double_value(&[]),
        compute_dtype: format!("{compute_dtype:?}"),
        ops,
        libtorch: "2.11.0".to_owned(),
        mfr_version: env!("CARGO_PKG_VERSION"),
    })
}

fn agreement(
    net: &SiT,
    vs: &nn::VarStore,
    cfg: &MeanFlowConfig,
    x: &Tensor,
    labels: &Tensor,
    precision: Precision,
) -> Result<Agreement> {
    tch::manual_seed(1);
    let draw = Draw::sample(cfg, x);
    let run = |jvp: JvpMethod| -> Result<[Tensor; 4]> {
        let cfg = MeanFlowConfig { jvp, ..cfg.clone() };
        for mut g in vs
            .trainable_variables()
            .iter()
            .map(|v| v.grad())
            .filter(|g| g.defined())
        {
            let _ = g.zero_();
        }
        let terms = device::autocast_bf16(x.device(), precision == Precision::Bf16, || {
            meanflow_loss(net, &cfg, x, labels, &draw)
        })?;
        terms.loss.backward();
        let grads: Vec<Tensor> = vs
            .trainable_variables()
            .iter()
            .map(|v| v.grad().to_kind(Kind::Float).reshape([-1]))
            .collect();
        // du/dt where the target uses it (the manual JVP skips the r = t rows).
        let b = x.size()[0];
        Ok([
            terms.u,
            terms.du_dt.narrow(0, draw.r_equals_t, b - draw.r_equals_t),
            terms.loss.detach(),
            Tensor::cat(&grads, 0),
        ])
    };
    let (ours, plain) = (run(cfg.jvp)?, run(JvpMethod::ForwardAd)?);
    let (du_dt, grads) = (rel_diff(&ours[1], &plain[1]), rel_diff(&ours[3], &plain[3]));
    Ok(Agreement {
        u: rel_diff(&ours[0], &plain[0]),
        du_dt,
        loss: rel_diff(&ours[2], &plain[2]),
        grads,
        within_bf16_tolerance: (precision == Precision::Bf16)
            .then_some(du_dt < BF16_DU_DT_TOLERANCE && grads < BF16_GRADS_TOLERANCE),
    })
}

/// Steps of two copies of the bench's network on the same batch and seeds, one replaying a
/// CUDA graph and one eager: the largest relative difference of the step's loss, and of the
/// weights after the last step. Its first steps are eager on both sides, the rest replays.
#[derive(Debug, Serialize)]
pub struct GraphAgreement {
    pub steps: usize,
    pub replayed_steps: usize,
    pub loss: f64,
    pub weights: f64,
}

fn graph_agreement(
    b: &TrainBench,
    config: &SiTConfig,
    cfg: &MeanFlowConfig,
    x: &Tensor,
    labels: &Tensor,
) -> Result<GraphAgreement> {
    const STEPS: usize = 7;
    let lr = TrainSection::default().lr;
    // Each side's losses and final weights, moved to the CPU so that one network at a time
    // occupies the device (XL/2's three copies would not fit an H100 beside each other).
    let run = |graph: bool| -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let (vs, net) = network(b, config)?;
        let mut trainer = trainer(b, &net, &vs, cfg, graph)?;
        let losses = (0..STEPS)
            .map(|i| {
                tch::manual_seed(100 + i as i64);
                Ok(trainer.step(x, labels, lr)?.loss.to_device(Device::Cpu))
            })
            .collect::<Result<Vec<_>>>()?;
        let weights = train::trainable(&vs)
            .into_iter()
            .map(|(_, v)| v.to_device(Device::Cpu))
            .collect();
        Ok((losses, weights))
    };
    let (graphed, graphed_weights) = run(true)?;
    let (eager, eager_weights) = run(false)?;
    let largest = |a: &[Tensor], b: &[Tensor]| {
        a.iter()
            .zip(b)
            .map(|(a, b)| rel_diff(a, b))
            .fold(0.0, f64::max)
    };
    let (loss, weights) = (
        largest(&graphed, &eager),
        largest(&graphed_weights, &eager_weights),
    );
    Ok(GraphAgreement {
        steps: STEPS,
        replayed_steps: STEPS - train::graph::WARMUP_STEPS,
        loss,
        weights,
    })
}
