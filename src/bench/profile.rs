//! What one step asks of the device, op by op (csrc/op_profile.cpp): kernel launches, bytes
//! moved and FLOPs. Counted from the ATen ops dispatched, so the same on a CPU as on a GPU in
//! the same dtypes; the numbers a change to the step is predicted from before a GPU times it.
use crate::device::shim_call;
use crate::ffi::{mfr_op_profile_free, mfr_op_profile_start, mfr_op_profile_stop};
use anyhow::Result;
use serde::Serialize;
use std::ffi::CStr;
use std::os::raw::c_char;

/// One op name's share of a profile. Views (no kernel) count as calls only.
#[derive(Debug, Clone, Serialize)]
pub struct OpRow {
    pub op: String,
    pub calls: i64,
    pub kernels: i64,
    /// Bytes of the tensor arguments and results of its kernel calls.
    pub mb: f64,
    pub gflop: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpProfile {
    /// Outermost ATen ops that ran a kernel (each launches at least one on a GPU).
    pub kernels: i64,
    /// Every outermost ATen op, views included (what the host dispatches).
    pub dispatches: i64,
    /// Bytes read and written by those kernels, counting each argument once.
    pub gb_moved: f64,
    pub tflop: f64,
    /// The ops that move the most bytes, largest first.
    pub top_by_bytes: Vec<OpRow>,
}

/// How many ops [`OpProfile::top_by_bytes`] lists.
const TOP: usize = 25;

/// Runs `f` with every outermost ATen op counted (one profile at a time per process).
pub fn profile<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, OpProfile)> {
    // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
    shim_call("start the op profile", |e, l| unsafe {
        mfr_op_profile_start(e, l)
    })?;
    let out = f();
    let mut table: *mut c_char = std::ptr::null_mut();
    // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
    shim_call("stop the op profile", |e, l| unsafe {
        mfr_op_profile_stop(&mut table, e, l)
    })?;
    // SAFETY: the shim returned a NUL-terminated string it allocated.
    let text = unsafe { CStr::from_ptr(table) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: freed once, by the shim that allocated it.
    unsafe { mfr_op_profile_free(table) };
    Ok((out?, summarise(&text)))
}

fn summarise(table: &str) -> OpProfile {
    let mut rows: Vec<OpRow> = table
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            let [op, calls, kernels, bytes, flops] = f.as_slice() else {
                return None;
            };
            Some(OpRow {
                op: (*op).to_owned(),
                calls: calls.parse().ok()?,
                kernels: kernels.parse().ok()?,
                mb: bytes.parse::<f64>().ok()? / 1e6,
                gflop: flops.parse::<f64>().ok()? / 1e9,
            })
        })
        .collect();
    let (kernels, dispatches) = (
        rows.iter().map(|r| r.kernels).sum(),
        rows.iter().map(|r| r.calls).sum(),
    );
    let gb_moved = rows.iter().map(|r| r.mb).sum::<f64>() / 1e3;
    let tflop = rows.iter().map(|r| r.gflop).sum::<f64>() / 1e3;
    rows.retain(|r| r.kernels > 0);
    rows.sort_by(|a, b| b.mb.total_cmp(&a.mb));
    rows.truncate(TOP);
    OpProfile {
        kernels,
        dispatches,
        gb_moved,
        tflop,
        top_by_bytes: rows,
    }
}
