//! Exponential moving average of the weights: ema <- decay * ema + (1 - decay) * weights, as the
//! reference's update_ema. The EMA lives in its own network, which sampling uses.
use crate::device::handles;
use crate::device::shim_call;
use crate::ffi::mfr_foreach_ema;
use anyhow::Result;
use tch::nn::VarStore;

/// One EMA update of every variable of `ema` from the same-named one of `model`, in two
/// multi-tensor kernels.
pub fn update(ema: &VarStore, model: &VarStore, decay: f64) -> Result<()> {
    let source = model.variables();
    let pairs: Vec<(tch::Tensor, tch::Tensor)> = ema
        .variables()
        .into_iter()
        .map(|(name, e)| (e, source[&name].shallow_clone()))
        .collect();
    let (e, p) = (
        handles(pairs.iter().map(|x| &x.0)),
        handles(pairs.iter().map(|x| &x.1)),
    );
    tch::no_grad(|| {
        // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
        shim_call("EMA update", |er, l| unsafe {
            mfr_foreach_ema(e.as_ptr(), p.as_ptr(), e.len(), decay, er, l)
        })
    })
}

/// Sets the EMA to the weights (at the start of training).
pub fn copy(ema: &VarStore, model: &VarStore) {
    let source = model.variables();
    tch::no_grad(|| {
        for (name, mut e) in ema.variables() {
            e.copy_(&source[&name]);
        }
    });
}
