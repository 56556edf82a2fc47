//! Jacobian-vector products by libtorch's forward-mode AD.
//!
//! tch binds `_make_dual` / `_unpack_dual` but not the level they live at; the shim enters and
//! leaves it. [`DualLevel`] is a guard: the level is released when it drops, on every path,
//! errors and panics included, so one failed JVP never poisons the next ("Nested forward mode AD
//! is not supported" is what libtorch says to a leaked level).
//!
//! libtorch has one level for the whole process, so the guard also holds a process-wide lock:
//! JVPs from several threads take turns, and a nested JVP on one thread is an error.
use crate::device::shim_call;
use crate::ffi::{mfr_fwad_enter, mfr_fwad_exit};
use anyhow::{bail, Result};
use std::cell::Cell;
use std::sync::{Mutex, MutexGuard};
use tch::Tensor;

static LEVEL_LOCK: Mutex<()> = Mutex::new(());

thread_local! {
    static IN_LEVEL: Cell<bool> = const { Cell::new(false) };
}

/// One forward-AD level, entered on creation and left on drop.
pub struct DualLevel {
    idx: u64,
    _lock: MutexGuard<'static, ()>,
}

impl DualLevel {
    pub fn enter() -> Result<Self> {
        if IN_LEVEL.get() {
            bail!("nested forward-AD levels are not supported: this thread already holds one");
        }
        // A panic while another level was held poisons the lock, but the level was released.
        let lock = LEVEL_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut idx = 0u64;
        // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
        shim_call("enter forward-AD level", |e, l| unsafe {
            mfr_fwad_enter(&mut idx, e, l)
        })?;
        IN_LEVEL.set(true);
        Ok(Self { idx, _lock: lock })
    }

    /// `primal` carrying `tangent` at this level.
    pub fn make_dual(&self, primal: &Tensor, tangent: &Tensor) -> Tensor {
        Tensor::internal_make_dual(primal, tangent, self.idx as i64)
    }

    /// (primal, tangent) of `dual`; a tensor no tangent reached has a zero tangent.
    pub fn unpack(&self, dual: &Tensor) -> (Tensor, Tensor) {
        let (primal, tangent) = Tensor::internal_unpack_dual(dual, self.idx as i64);
        let tangent = if tangent.defined() {
            tangent
        } else {
            primal.zeros_like()
        };
        (primal, tangent)
    }
}

impl Drop for DualLevel {
    fn drop(&mut self) {
        IN_LEVEL.set(false);
        // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
        let released = shim_call("leave forward-AD level", |e, l| unsafe {
            mfr_fwad_exit(self.idx, e, l)
        });
        if let Err(err) = released {
            // Drop cannot return an error, and a leaked level would break every later JVP.
            panic!("{err}");
        }
    }
}

/// `(f(x), J_f(x) v)` for `x = primals`, `v = tangents`. The primal output keeps its autograd
/// graph (so a loss on it can be differentiated); the tangent output is detached.
pub fn jvp<F>(f: F, primals: &[&Tensor], tangents: &[&Tensor]) -> Result<(Tensor, Tensor)>
where
    F: FnOnce(&[Tensor]) -> Result<Tensor>,
{
    assert_eq!(primals.len(), tangents.len(), "one tangent per primal");
    let level = DualLevel::enter()?;
    let duals: Vec<Tensor> = primals
        .iter()
        .zip(tangents)
        .map(|(p, t)| level.make_dual(p, t))
        .collect();
    let out = f(&duals)?;
    let (primal, tangent) = level.unpack(&out);
    Ok((primal, tangent.detach()))
}
