//! Devices: parsing `cpu|cuda[:N]`, the CUDA facts tch does not expose (device name, peak memory,
//! TF32), read through the C++ shim.
use crate::ffi::{
    mfr_autocast_pop, mfr_autocast_push, mfr_cuda_device_facts, mfr_cuda_device_name,
    mfr_cuda_peak_allocated, mfr_cuda_reset_peak, mfr_cuda_runtime_version, mfr_set_tf32,
    mfr_swap_tf32,
};
use anyhow::{bail, Result};
use std::ffi::{c_void, CStr};
use std::os::raw::{c_char, c_int};
use tch::Device;

/// Runs one shim call, turning its error buffer into an `anyhow` error.
pub(crate) fn shim_call(what: &str, call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut err = [0 as c_char; 1024];
    if call(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim NUL-terminates its message within the buffer (csrc/c_abi.hpp).
    let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
    bail!("{what}: {msg}")
}

/// Runs one shim call that returns a new tensor handle through `out`, which tch then owns.
pub(crate) fn shim_tensor(
    what: &str,
    call: impl FnOnce(*mut *mut c_void, *mut c_char, usize) -> c_int,
) -> Result<tch::Tensor> {
    let mut out: *mut c_void = std::ptr::null_mut();
    shim_call(what, |e, l| call(&mut out, e, l))?;
    // SAFETY: the shim returned a new tensor handle that nothing else owns; tch frees it.
    Ok(unsafe { tch::Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
}

/// A tch tensor as the shim takes it (valid while the tensor lives).
pub(crate) fn handle(t: &tch::Tensor) -> *mut c_void {
    t.as_ptr() as *mut c_void
}

/// The handles the shim takes for a list of tensors (valid while the tensors live).
pub(crate) fn handles<'a>(tensors: impl IntoIterator<Item = &'a tch::Tensor>) -> Vec<*mut c_void> {
    tensors.into_iter().map(handle).collect()
}

/// `cpu`, `cuda` or `cuda:N`, without asking whether that device exists.
pub fn parse_name(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => Device::Cuda(i),
            None => bail!("unknown device `{name}`: use cpu, cuda or cuda:N"),
        },
    })
}

/// A device that exists: `cuda` on a machine without one is an error, not a silent fallback.
pub fn parse(name: &str) -> Result<Device> {
    let device = parse_name(name)?;
    if let Device::Cuda(i) = device {
        let n = tch::Cuda::device_count() as usize;
        if i >= n {
            bail!("device `{name}` asked for, but libtorch sees {n} CUDA device(s)");
        }
    }
    Ok(device)
}

/// A human name for the device: the GPU's marketing name, or the CPU with its thread count.
pub fn describe(device: Device) -> String {
    match device {
        Device::Cuda(i) => {
            let mut name = [0 as c_char; 256];
            // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
            let ok = shim_call("cuDeviceGetName", |e, l| unsafe {
                mfr_cuda_device_name(i as c_int, name.as_mut_ptr(), name.len(), e, l)
            });
            match ok {
                // SAFETY: the shim NUL-terminates the name within the buffer.
                Ok(()) => unsafe { CStr::from_ptr(name.as_ptr()) }
                    .to_string_lossy()
                    .into_owned(),
                Err(_) => format!("cuda:{i}"),
            }
        }
        _ => format!("cpu ({} threads)", tch::get_num_threads()),
    }
}

/// Bytes `device` can hold at most: the GPU's memory, or the memory the system reports available
/// (MemAvailable) for the CPU. None when it cannot be read.
pub fn capacity_bytes(device: Device) -> Option<u64> {
    match device {
        Device::Cuda(i) => cuda_facts(i).ok().map(|(total, _)| total),
        _ => std::fs::read_to_string("/proc/meminfo")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse::<u64>()
            .ok()
            .map(|kb| kb * 1024),
    }
}

/// A GPU's total memory in bytes and its driver's CUDA version ("13.0").
pub fn cuda_facts(device: usize) -> Result<(u64, String)> {
    let (mut total, mut version) = (0i64, 0 as c_int);
    shim_call("read the GPU's facts", |e, l| {
        // SAFETY: the shim writes two integers and at most `l` bytes of error message.
        unsafe { mfr_cuda_device_facts(device as c_int, &mut total, &mut version, e, l) }
    })?;
    Ok((
        total as u64,
        format!("{}.{}", version / 1000, (version % 1000) / 10),
    ))
}

/// The CUDA runtime version libtorch was built with ("13.0"), where CUDA is available.
pub fn cuda_runtime() -> Option<String> {
    if !tch::Cuda::is_available() {
        return None;
    }
    let mut version = 0i64;
    shim_call("read the CUDA runtime version", |e, l| {
        // SAFETY: the shim writes one integer and at most `l` bytes of error message.
        unsafe { mfr_cuda_runtime_version(&mut version, e, l) }
    })
    .ok()?;
    Some(format!("{}.{}", version / 1000, (version % 1000) / 10))
}

/// Refuses, with the numbers, work that needs more than `device` can hold: `bytes` estimated
/// for `what`.
pub fn ensure_fits(bytes: f64, device: Device, what: &str) -> Result<()> {
    let Some(capacity) = capacity_bytes(device) else {
        return Ok(());
    };
    if bytes > capacity as f64 {
        bail!(
            "{what} needs about {:.1} GiB, more than the {:.1} GiB {} can hold: use a smaller model or batch",
            bytes / f64::from(1u32 << 30),
            capacity as f64 / f64::from(1u32 << 30),
            describe(device)
        );
    }
    Ok(())
}

/// Allow or forbid TF32 for float32 matrix products (PyTorch's two allow_tf32 switches).
pub fn set_tf32(enabled: bool) -> Result<()> {
    // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
    shim_call("set TF32", |e, l| unsafe {
        mfr_set_tf32(enabled as c_int, e, l)
    })
}

/// Runs `f` with TF32 allowed (or not) for both matrix products and convolutions, restoring
/// the previous settings afterwards, also when `f` fails.
pub fn with_tf32<T>(enabled: bool, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let swap = |matmul: c_int, conv: c_int| -> Result<(c_int, c_int)> {
        let (mut pm, mut pc) = (0, 0);
        // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
        shim_call("set TF32", |e, l| unsafe {
            mfr_swap_tf32(matmul, conv, &mut pm, &mut pc, e, l)
        })?;
        Ok((pm, pc))
    };
    let on = enabled as c_int;
    let (matmul, conv) = swap(on, on)?;
    let out = f();
    swap(matmul, conv)?;
    out
}

/// Resets the peak-memory counter: of the CUDA caching allocator, or nothing on the CPU
/// (whose peak is the process's resident-set high-water mark and cannot be reset).
pub fn reset_peak_memory(device: Device) -> Result<()> {
    match device {
        // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
        Device::Cuda(i) => shim_call("reset CUDA peak memory", |e, l| unsafe {
            mfr_cuda_reset_peak(i as c_int, e, l)
        }),
        _ => Ok(()),
    }
}

/// Peak bytes: allocated on the GPU since the last reset, or the process's peak RSS on the CPU.
pub fn peak_memory_bytes(device: Device) -> Result<u64> {
    match device {
        Device::Cuda(i) => {
            let mut bytes = 0i64;
            // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
            shim_call("read CUDA peak memory", |e, l| unsafe {
                mfr_cuda_peak_allocated(i as c_int, &mut bytes, e, l)
            })?;
            Ok(bytes as u64)
        }
        _ => {
            // SAFETY: rusage is plain integers; getrusage fills it.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
            Ok(usage.ru_maxrss as u64 * 1024)
        }
    }
}

pub fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Runs `f` with autocast to bfloat16 on `device`'s kind (CUDA or the CPU) on, or explicitly
/// off, restoring the previous state afterwards, also when `f` fails.
pub fn autocast_bf16<T>(device: Device, enabled: bool, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let cuda = device.is_cuda() as c_int;
    let (mut prev_enabled, mut prev_dtype) = (0, 0);
    // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
    shim_call("enter autocast", |e, l| unsafe {
        mfr_autocast_push(
            cuda,
            enabled as c_int,
            &mut prev_enabled,
            &mut prev_dtype,
            e,
            l,
        )
    })?;
    let out = f();
    // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
    shim_call("leave autocast", |e, l| unsafe {
        mfr_autocast_pop(cuda, prev_enabled, prev_dtype, e, l)
    })?;
    out
}
