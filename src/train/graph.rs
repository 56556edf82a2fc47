//! The training step replayed as one CUDA graph (csrc/cuda_graph.cpp, `train.cuda_graph`).
//!
//! A few eager steps first create what the step creates lazily (the optimizer's step counts,
//! cuBLAS workspaces, allocator blocks); then one step is recorded with its batch in static
//! input tensors, and every later step copies its batch there and replays the recording: the
//! same kernels on the same addresses, launched at once. The step is already free of host syncs
//! (its numbers stay on the device), and randomness comes from the registered default generator,
//! reseeded per step as the eager loop does. A step the recording does not fit (another learning
//! rate, as during warm-up, or another batch shape) runs eagerly.
use super::{StepStats, Trainer};
use crate::device::handles;
use crate::device::shim_call;
use crate::ffi::{
    mfr_graph_capture_begin, mfr_graph_capture_end, mfr_graph_free, mfr_graph_new, mfr_graph_replay,
};
use anyhow::{bail, Context, Result};
use std::ffi::c_void;
use std::os::raw::c_int;
use tch::{Device, Tensor};

/// Eager steps before the recording.
pub const WARMUP_STEPS: usize = 3;

/// A recorded step: its static inputs, the learning rate baked into it, and its outputs.
struct Recorded {
    x: Tensor,
    labels: Tensor,
    lr: f64,
    stats: StepStats,
}

pub struct StepGraph {
    handle: *mut c_void,
    eager_left: usize,
    recorded: Option<Recorded>,
}

impl StepGraph {
    /// From here on this thread queues its device work on the graph's side stream (until drop).
    pub fn new(device: Device) -> Result<Self> {
        let Device::Cuda(index) = device else {
            bail!("train.cuda_graph needs a CUDA device, not {device:?}: set it to false");
        };
        let mut handle = std::ptr::null_mut();
        // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
        shim_call("create the step's CUDA graph", |e, l| unsafe {
            mfr_graph_new(index as c_int, &mut handle, e, l)
        })?;
        Ok(Self {
            handle,
            eager_left: WARMUP_STEPS,
            recorded: None,
        })
    }

    /// One training step: eager, recorded, or replayed.
    pub fn step(
        &mut self,
        trainer: &mut Trainer,
        x: &Tensor,
        labels: &Tensor,
        lr: f64,
    ) -> Result<StepStats> {
        if let Some(r) = &self.recorded {
            if r.lr != lr || r.x.size() != x.size() || r.labels.size() != labels.size() {
                return trainer.step_eager(x, labels, lr);
            }
            let stats = self.replay(x, labels)?;
            trainer.opt.count_replayed_update();
            return Ok(stats);
        }
        if self.eager_left > 0 {
            self.eager_left -= 1;
            return trainer.step_eager(x, labels, lr);
        }
        let (sx, sl) = (x.copy(), labels.copy());
        // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
        shim_call("begin recording the step", |e, l| unsafe {
            mfr_graph_capture_begin(self.handle, e, l)
        })?;
        let stats = trainer.step_eager(&sx, &sl, lr);
        // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
        let ended = shim_call("end recording the step", |e, l| unsafe {
            mfr_graph_capture_end(self.handle, e, l)
        });
        let stats = stats.and_then(|s| ended.map(|()| s)).context(
            "the training step cannot be recorded as a CUDA graph: set train.cuda_graph = false",
        )?;
        self.recorded = Some(Recorded {
            x: sx,
            labels: sl,
            lr,
            stats,
        });
        // Recording ran nothing (though the optimizer counted its update): this step is the
        // first replay.
        self.replay(x, labels)
    }

    fn replay(&self, x: &Tensor, labels: &Tensor) -> Result<StepStats> {
        let r = self.recorded.as_ref().expect("replay follows a recording");
        let (statics, sources) = (handles([&r.x, &r.labels]), handles([x, labels]));
        // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
        shim_call("replay the step", |e, l| unsafe {
            mfr_graph_replay(self.handle, statics.as_ptr(), sources.as_ptr(), 2, e, l)
        })?;
        // The recording's outputs are overwritten by the next replay: hand out copies.
        Ok(StepStats {
            loss: r.stats.loss.copy(),
            v_loss: r.stats.v_loss.copy(),
            adaptive_weight: r.stats.adaptive_weight.copy(),
            grad_norm: r.stats.grad_norm.copy(),
        })
    }
}

impl Drop for StepGraph {
    fn drop(&mut self) {
        // The recording's tensors go first, while the graph's memory pool still exists.
        self.recorded = None;
        // SAFETY: the handle came from mfr_graph_new and is freed once, here.
        unsafe { mfr_graph_free(self.handle) };
    }
}
