//! Data parallelism: where this process stands among the training processes ([`World`]), read
//! from the launcher's environment (torchrun's, SLURM's or `mfr launch`'s, see [`Launch`]), and
//! a c10d process group ([`Group`]: Gloo for CPU tensors, NCCL for CUDA tensors) through the C++
//! shim csrc/dist.cpp.
pub mod launch;

use crate::device::handles;
use crate::device::shim_call;
use crate::ffi::{
    mfr_dist_all_gather, mfr_dist_all_reduce, mfr_dist_barrier, mfr_dist_broadcast, mfr_dist_free,
    mfr_dist_new, mfr_dist_stop_step,
};
use anyhow::{bail, Context, Result};
use std::cell::Cell;
use std::ffi::{c_void, CString};
use std::os::raw::{c_char, c_int};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// Gradients are all-reduced this many bytes at a time (DDP's default bucket).
pub const BUCKET_BYTES: i64 = 25 << 20;

/// What a launcher told this process: torchrun's RANK, WORLD_SIZE, LOCAL_RANK,
/// LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, or SLURM's SLURM_PROCID, SLURM_NTASKS,
/// SLURM_LOCALID (MASTER_ADDR then defaults to the job's first node, MASTER_PORT to one derived
/// from the job id).
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Whether this process hosts the TCPStore (rank 0, unless torchrun's agent hosts it).
    pub store_server: bool,
    /// Keys of this launch in the store (a restarted torchrun attempt does not see the last one's).
    pub prefix: String,
    /// Which variables it came from, for messages.
    pub source: &'static str,
}

impl Launch {
    /// From this process's environment; None when no launcher set it (or MFR_DIST=0).
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From variables looked up by `var` (the environment, or a test's table).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        if var("MFR_DIST").as_deref() == Some("0") {
            return Ok(None);
        }
        let int = |key: &str| -> Result<Option<usize>> {
            var(key)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .with_context(|| format!("{key}={v} is not a non-negative integer"))
                })
                .transpose()
        };
        let port = |key: &str, v: &str| -> Result<u16> {
            v.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .with_context(|| format!("{key}={v} is not a TCP port"))
        };
        let restart = var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".to_owned());
        let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True");
        let launch = if let (Some(rank), Some(world)) = (int("RANK")?, int("WORLD_SIZE")?) {
            let need = |key: &str| {
                var(key).with_context(|| {
                    format!("RANK and WORLD_SIZE are set but {key} is not (launch with torchrun or `mfr launch`, or set it)")
                })
            };
            let local_rank = int("LOCAL_RANK")?.unwrap_or(rank);
            Launch {
                rank,
                world_size: world,
                local_rank,
                local_world_size: int("LOCAL_WORLD_SIZE")?.unwrap_or(world),
                master_addr: need("MASTER_ADDR")?,
                master_port: port("MASTER_PORT", &need("MASTER_PORT")?)?,
                store_server: rank == 0 && !agent_store,
                prefix: format!("mfr/{restart}/"),
                source: "RANK/WORLD_SIZE",
            }
        } else if let (Some(rank), Some(world)) = (int("SLURM_PROCID")?, int("SLURM_NTASKS")?) {
            // A batch script's own shell has these too (one task): only several tasks are a launch.
            if world < 2 {
                return Ok(None);
            }
            let master_addr = match var("MASTER_ADDR") {
                Some(a) => a,
                None => var("SLURM_JOB_NODELIST")
                    .or_else(|| var("SLURM_NODELIST"))
                    .map(|l| first_host(&l))
                    .context(
                        "SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_JOB_NODELIST is",
                    )?,
            };
            let master_port = match var("MASTER_PORT") {
                Some(p) => port("MASTER_PORT", &p)?,
                // Two jobs sharing a node must not pick the same port.
                None => 20000 + (int("SLURM_JOB_ID")?.unwrap_or(0) % 20000) as u16,
            };
            let per_node = var("SLURM_NTASKS_PER_NODE")
                .or_else(|| var("SLURM_TASKS_PER_NODE"))
                .and_then(|v| {
                    v.split(|c: char| !c.is_ascii_digit())
                        .next()
                        .and_then(|n| n.parse().ok())
                });
            Launch {
                rank,
                world_size: world,
                local_rank: int("SLURM_LOCALID")?.unwrap_or(0),
                local_world_size: per_node.unwrap_or(world),
                master_addr,
                master_port,
                store_server: rank == 0,
                prefix: format!("mfr/slurm-{}/", var("SLURM_STEP_ID").unwrap_or_default()),
                source: "SLURM_PROCID/SLURM_NTASKS",
            }
        } else {
            return Ok(None);
        };
        if launch.world_size == 0 || launch.rank >= launch.world_size {
            bail!(
                "rank {} of a world of {} ({}): the rank must be below the world size",
                launch.rank,
                launch.world_size,
                launch.source
            );
        }
        Ok(Some(launch))
    }
}

/// The first host of a SLURM node list: `gpu[003-004,010],cpu1` -> `gpu003`.
pub fn first_host(list: &str) -> String {
    let first = match list.find('[') {
        Some(open) if list[..open].find(',').is_none() => {
            let close = list[open..].find(']').map_or(list.len(), |c| open + c);
            let inside = &list[open + 1..close];
            let number = inside.split([',', '-']).next().unwrap_or("");
            format!("{}{number}", &list[..open])
        }
        _ => list.split(',').next().unwrap_or("").to_owned(),
    };
    first.trim().to_owned()
}

/// The process group's timeout: $MFR_DIST_TIMEOUT seconds (range-checked), 1800 by default.
pub fn timeout_from_env() -> Result<Duration> {
    crate::settings::DIST_TIMEOUT.get()
}

/// A c10d process group: Gloo when its device is the CPU, NCCL when it is a CUDA device.
/// Collectives must be called by every rank in the same order.
pub struct Group {
    ptr: *mut c_void,
    rank: usize,
    size: usize,
    device: Device,
    /// Set by a failed call: the peers may be gone, so leaving aborts instead of waiting.
    failed: Cell<bool>,
}

impl Group {
    /// Rendezvous at the launcher's MASTER_ADDR:MASTER_PORT and join the group.
    pub fn join(launch: &Launch, device: Device, timeout: Duration) -> Result<Self> {
        let cstr = |s: &str| CString::new(s).context("a NUL byte in a launcher variable");
        let host = cstr(&launch.master_addr)?;
        let prefix = cstr(&launch.prefix)?;
        let ifname = cstr(&std::env::var("GLOO_SOCKET_IFNAME").unwrap_or_default())?;
        // All ranks on this machine: Gloo's sockets on the loopback too (a host name may resolve
        // to an address that is not this machine's, in containers).
        let loopback = matches!(
            launch.master_addr.as_str(),
            "127.0.0.1" | "localhost" | "::1"
        );
        let gloo_host = cstr(if loopback { &launch.master_addr } else { "" })?;
        let cuda = match device {
            Device::Cuda(i) => i as c_int,
            _ => -1,
        };
        let mut ptr = std::ptr::null_mut();
        shim_call(
            &format!(
                "joining the process group at {}:{} (as rank {} of {}, from {})",
                launch.master_addr,
                launch.master_port,
                launch.rank,
                launch.world_size,
                launch.source
            ),
            // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
            |e, l| unsafe {
                mfr_dist_new(
                    host.as_ptr(),
                    launch.master_port as c_int,
                    launch.rank as c_int,
                    launch.world_size as c_int,
                    launch.store_server as c_int,
                    prefix.as_ptr(),
                    cuda,
                    timeout.as_millis().min(i64::MAX as u128) as i64,
                    ifname.as_ptr(),
                    gloo_host.as_ptr(),
                    &mut ptr,
                    e,
                    l,
                )
            },
        )?;
        Ok(Self {
            ptr,
            rank: launch.rank,
            size: launch.world_size,
            device,
            failed: Cell::new(false),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Where this group's tensors live (CUDA for NCCL, the CPU for Gloo).
    pub fn device(&self) -> Device {
        self.device
    }

    fn call(&self, what: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
        let out = shim_call(
            &format!("{what} failed (if another rank stopped first, its own error is the cause)"),
            f,
        );
        if out.is_err() {
            self.failed.set(true);
        }
        out
    }

    /// Sums (or averages) each tensor over the group in place, in buckets of [`BUCKET_BYTES`].
    pub fn all_reduce(&self, tensors: &[Tensor], average: bool, what: &str) -> Result<()> {
        let list = handles(tensors);
        tch::no_grad(|| {
            // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
            self.call(&format!("all-reduce of {what}"), |e, l| unsafe {
                mfr_dist_all_reduce(
                    self.ptr,
                    list.as_ptr(),
                    list.len(),
                    average as c_int,
                    BUCKET_BYTES,
                    e,
                    l,
                )
            })
        })
    }

    /// Overwrites each tensor with rank `root`'s.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize, what: &str) -> Result<()> {
        let list = handles(tensors);
        tch::no_grad(|| {
            // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
            self.call(&format!("broadcast of {what}"), |e, l| unsafe {
                mfr_dist_broadcast(
                    self.ptr,
                    list.as_ptr(),
                    list.len(),
                    root as c_int,
                    BUCKET_BYTES,
                    e,
                    l,
                )
            })
        })
    }

    /// Every rank's `t` (one shape on all ranks), concatenated along dim 0 in rank order.
    pub fn all_gather(&self, t: &Tensor, what: &str) -> Result<Tensor> {
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
        self.call(&format!("all-gather of {what}"), |e, l| unsafe {
            mfr_dist_all_gather(self.ptr, t.as_ptr() as *mut c_void, &mut out, e, l)
        })?;
        // The shim allocated a new tensor handle; tch takes ownership and frees it.
        // SAFETY: the shim returned a new tensor handle that nothing else owns; tch frees it.
        Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
    }

    /// Returns when every rank has reached it.
    pub fn barrier(&self, what: &str) -> Result<()> {
        // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
        self.call(&format!("barrier ({what})"), |e, l| unsafe {
            mfr_dist_barrier(self.ptr, e, l)
        })
    }

    /// After an interrupt, the step to stop after, agreed through the store: `propose` asks for
    /// one (the group's first request wins); None while nobody has asked.
    pub fn stop_step(&self, propose: Option<u64>) -> Result<Option<u64>> {
        let mut agreed = -1i64;
        let propose = propose.map_or(-1, |s| s as i64);
        // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
        self.call("agreeing on the step to stop at", |e, l| unsafe {
            mfr_dist_stop_step(self.ptr, propose, &mut agreed, e, l)
        })?;
        Ok((agreed >= 0).then_some(agreed as u64))
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let abort = self.failed.get() || std::thread::panicking();
        // SAFETY: the shim gets handles of tensors alive for the call and an error buffer of `l` bytes.
        if let Err(e) = shim_call("leaving the process group", |e, l| unsafe {
            mfr_dist_free(self.ptr, abort as c_int, e, l)
        }) {
            eprintln!("warning: {e:#}");
        }
    }
}

/// This process among the training processes: alone (rank 0 of 1, no group), or one rank of a
/// launched group.
pub struct World {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    group: Option<Group>,
}

impl World {
    pub fn single() -> Self {
        Self {
            rank: 0,
            size: 1,
            local_rank: 0,
            group: None,
        }
    }

    /// Joins the group a launcher set up for this process (on cuda:LOCAL_RANK with NCCL when
    /// `device` is CUDA, or cuda:0 when the process sees one GPU only; with Gloo on the CPU);
    /// alone when no launcher did.
    pub fn from_env(device: Device) -> Result<Self> {
        let Some(launch) = Launch::from_env()? else {
            return Ok(Self::single());
        };
        let device = Self::device_of(device, launch.local_rank)?;
        let group = Group::join(&launch, device, timeout_from_env()?)?;
        Ok(Self {
            rank: launch.rank,
            size: launch.world_size,
            local_rank: launch.local_rank,
            group: Some(group),
        })
    }

    fn device_of(device: Device, local_rank: usize) -> Result<Device> {
        Ok(match device {
            Device::Cuda(_) => {
                let n = tch::Cuda::device_count() as usize;
                match n {
                    // The launcher gave each process its own GPU (srun --gpus-per-task=1).
                    1 => Device::Cuda(0),
                    n if local_rank < n => Device::Cuda(local_rank),
                    n => bail!("LOCAL_RANK {local_rank} needs cuda:{local_rank}, but libtorch sees {n} CUDA device(s): start at most {n} processes per node"),
                }
            }
            other => other,
        })
    }

    /// The device this process trains on when the spec names `device`: each rank its own GPU
    /// (cuda:LOCAL_RANK), or the CPU.
    pub fn device(&self, device: Device) -> Device {
        match (&self.group, device) {
            (Some(g), Device::Cuda(_)) => g.device(),
            _ => device,
        }
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    pub fn group(&self) -> Option<&Group> {
        self.group.as_ref()
    }

    /// Waits for every rank (nothing to wait for alone).
    pub fn barrier(&self, what: &str) -> Result<()> {
        match &self.group {
            Some(g) => g.barrier(what),
            None => Ok(()),
        }
    }

    /// Every rank's `t` in rank order, as float64 on the CPU: row counts may differ between
    /// ranks, the other dimensions may not.
    pub fn gather_rows(&self, t: &Tensor, what: &str) -> Result<Vec<Tensor>> {
        let t = t.to_kind(Kind::Double);
        let Some(g) = &self.group else {
            return Ok(vec![t.to_device(Device::Cpu)]);
        };
        let rows = Tensor::from_slice(&[t.size()[0]]).to_device(g.device());
        let rows: Vec<i64> = Vec::try_from(&g.all_gather(&rows, what)?.to_device(Device::Cpu))?;
        let most = rows.iter().copied().max().unwrap_or(0);
        let mut pad = t.size();
        pad[0] = most - pad[0];
        let padded = Tensor::cat(
            &[&t, &t.new_zeros(pad.as_slice(), (Kind::Double, t.device()))],
            0,
        );
        let all = g
            .all_gather(&padded.to_device(g.device()), what)?
            .to_device(Device::Cpu);
        Ok(rows
            .iter()
            .enumerate()
            .map(|(r, &n)| all.narrow(0, r as i64 * most, n))
            .collect())
    }

    /// Rank 0's `values` on every rank.
    pub fn share(&self, values: &[i64], what: &str) -> Result<Vec<i64>> {
        let Some(g) = &self.group else {
            return Ok(values.to_vec());
        };
        let t = Tensor::from_slice(values).to_device(g.device());
        g.broadcast(std::slice::from_ref(&t), 0, what)?;
        Ok(Vec::<i64>::try_from(
            &t.to_device(Device::Cpu).to_kind(Kind::Int64),
        )?)
    }
}
