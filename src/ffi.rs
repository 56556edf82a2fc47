//! Every C function of the C++ shims in csrc/, declared once. Each returns 0 on success or 1
//! with the C++ exception's message in `err` (csrc/c_abi.hpp), so no exception crosses into Rust;
//! tensors travel as tch's handles (`device::handle`). Callers go through `device::shim_call`.
use std::ffi::c_void;
use std::os::raw::{c_char, c_int};

extern "C" {
    // csrc/shim.cpp: devices (device.rs)
    pub(crate) fn mfr_cuda_peak_allocated(
        device: c_int,
        bytes: *mut i64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_cuda_reset_peak(device: c_int, err: *mut c_char, len: usize) -> c_int;
    pub(crate) fn mfr_set_tf32(enabled: c_int, err: *mut c_char, len: usize) -> c_int;
    pub(crate) fn mfr_swap_tf32(
        matmul: c_int,
        conv: c_int,
        prev_matmul: *mut c_int,
        prev_conv: *mut c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_cuda_device_name(
        device: c_int,
        name: *mut c_char,
        name_len: usize,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_cuda_device_facts(
        device: c_int,
        total_bytes: *mut i64,
        driver_version: *mut c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_cuda_runtime_version(
        version: *mut i64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_autocast_push(
        cuda: c_int,
        enabled: c_int,
        prev_enabled: *mut c_int,
        prev_dtype: *mut c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_autocast_pop(
        cuda: c_int,
        prev_enabled: c_int,
        prev_dtype: c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    // csrc/shim.cpp: the fast path's kernels (model/dual.rs)
    pub(crate) fn mfr_layer_norm_backward(
        grad: *mut c_void,
        input: *mut c_void,
        mean: *mut c_void,
        rstd: *mut c_void,
        d: i64,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_add_mul_broadcast(
        acc: *mut c_void,
        big: *mut c_void,
        small: *mut c_void,
        to_autocast: c_int,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    // csrc/shim.cpp: forward-mode AD levels (meanflow/jvp.rs)
    pub(crate) fn mfr_fwad_enter(level: *mut u64, err: *mut c_char, len: usize) -> c_int;
    pub(crate) fn mfr_fwad_exit(level: u64, err: *mut c_char, len: usize) -> c_int;
    // csrc/shim.cpp: the optimizer, clipping and EMA (train/optim.rs, train/ema.rs)
    pub(crate) fn mfr_fused_adamw(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        exp_avgs: *const *mut c_void,
        exp_avg_sqs: *const *mut c_void,
        steps: *const *mut c_void,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_clear_grads(
        params: *const *mut c_void,
        n: usize,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_clip_grad_norm(
        grads: *const *mut c_void,
        n: usize,
        max_norm: f64,
        total: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_foreach_ema(
        ema: *const *mut c_void,
        model: *const *mut c_void,
        n: usize,
        decay: f64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    // csrc/cuda_graph.cpp (train/graph.rs)
    pub(crate) fn mfr_graph_new(
        device: c_int,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_graph_capture_begin(
        graph: *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_graph_capture_end(graph: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    pub(crate) fn mfr_graph_replay(
        graph: *mut c_void,
        statics: *const *mut c_void,
        sources: *const *mut c_void,
        n: usize,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_graph_free(graph: *mut c_void);
    // csrc/dist.cpp (dist/mod.rs)
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mfr_dist_new(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        size: c_int,
        store_server: c_int,
        prefix: *const c_char,
        device: c_int,
        timeout_ms: i64,
        gloo_ifname: *const c_char,
        gloo_host: *const c_char,
        group: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_dist_all_reduce(
        group: *mut c_void,
        tensors: *const *mut c_void,
        n: usize,
        average: c_int,
        bucket_bytes: i64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_dist_broadcast(
        group: *mut c_void,
        tensors: *const *mut c_void,
        n: usize,
        root: c_int,
        bucket_bytes: i64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_dist_all_gather(
        group: *mut c_void,
        input: *mut c_void,
        out: *mut *mut c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_dist_barrier(group: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    pub(crate) fn mfr_dist_stop_step(
        group: *mut c_void,
        propose: i64,
        agreed: *mut i64,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_dist_free(
        group: *mut c_void,
        abort: c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    // csrc/op_profile.cpp (src/bench/profile.rs)
    pub(crate) fn mfr_op_profile_start(err: *mut c_char, len: usize) -> c_int;
    pub(crate) fn mfr_op_profile_stop(
        table: *mut *mut c_char,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    pub(crate) fn mfr_op_profile_free(table: *mut c_char);
}
