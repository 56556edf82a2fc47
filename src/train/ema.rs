//! Exponential moving average of the weights: ema <- decay * ema + (1 - decay) * weights, as the
//! reference's update_ema. The EMA lives in its own network, which sampling uses.
use tch::nn::VarStore;

/// One EMA update of every variable of `ema` from the same-named one of `model`.
pub fn update(ema: &VarStore, model: &VarStore, decay: f64) {
    let source = model.variables();
    tch::no_grad(|| {
        for (name, mut e) in ema.variables() {
            let p = &source[&name];
            let _ = e.g_mul_scalar_(decay).g_add_(&p.g_mul_scalar(1.0 - decay));
        }
    });
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
