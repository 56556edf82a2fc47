//! Stopping on request. SIGINT (Ctrl-C), SIGTERM (`kill`, SLURM's time limit and preemption)
//! and SIGUSR1 (SLURM's `--signal=B:USR1@<seconds>`) ask whatever is running to stop at its next
//! safe point: a training step (which then checkpoints), a sample batch, an evaluation batch, a
//! prepared batch, a download chunk. What is done stays resumable, and the process exits with
//! status 128 + the signal's number, after one line saying where it stopped. A second signal
//! ends the process at once (the handler resets itself to the default action).
use std::fmt;
use std::sync::atomic::{AtomicI32, Ordering};

static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The signals that ask for a stop.
const HANDLED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1];

extern "C" fn on_signal(signal: libc::c_int) {
    // Only an atomic store: async-signal-safe. SA_RESETHAND already restored the default
    // action, so the same signal again ends the process.
    let _ = RECEIVED.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
}

/// Installs the handlers (once per process; later calls do nothing).
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for signal in HANDLED {
            // SAFETY: sigaction with a zeroed struct, an empty mask and a handler that only
            // stores to an atomic.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                action.sa_flags = libc::SA_RESETHAND;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signal, &action, std::ptr::null_mut());
            }
        }
    });
}

/// The first stop signal received, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// A stop asked for by a signal, and where the work stopped: an error that carries its exit
/// status (see [`exit_status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    pub signal: i32,
    /// "at step 120 of 5000; checkpoint step-00000120.safetensors written", "after 3 of 20
    /// sample batches of 1-NFE", ...
    pub at: String,
}

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stopped by {} {}; what is done is kept: run the same command with --resume to continue",
            name(self.signal),
            self.at
        )
    }
}

impl std::error::Error for Stopped {}

/// The signal's name: SIGINT, SIGTERM, SIGUSR1.
pub fn name(signal: i32) -> String {
    match signal {
        libc::SIGINT => "SIGINT".to_owned(),
        libc::SIGTERM => "SIGTERM".to_owned(),
        libc::SIGUSR1 => "SIGUSR1".to_owned(),
        other => format!("signal {other}"),
    }
}

/// `Err(Stopped)` once a stop signal has arrived; `at` says where the work stands.
pub fn check(at: impl FnOnce() -> String) -> Result<(), Stopped> {
    match received() {
        None => Ok(()),
        Some(signal) => Err(Stopped { signal, at: at() }),
    }
}

/// The exit status of a process stopped by `signal`: 128 + its number, as a shell reports a
/// process the signal killed (130 for SIGINT, 143 for SIGTERM, 138 for SIGUSR1).
pub fn exit_status(signal: i32) -> u8 {
    (128 + signal).clamp(0, 255) as u8
}

/// Whether the run should ask SLURM to requeue its job after a stop: `--requeue`, or
/// $MFR_REQUEUE=1 (for scripts that cannot add a flag).
pub fn requeue_wanted(flag: bool) -> bool {
    flag || std::env::var("MFR_REQUEUE").is_ok_and(|v| v == "1")
}

/// After a stop by SIGTERM or SIGUSR1 inside a SLURM job, asks SLURM to put the job back in the
/// queue (`scontrol requeue $SLURM_JOB_ID`); the requeued job continues with `--resume`. Only
/// the job's first task asks (SLURM_PROCID 0, or no task id), once. Returns what was done, for
/// the log; None when there is nothing to do (not in a job, another signal, another task).
pub fn requeue(stop: &Stopped) -> Option<String> {
    if stop.signal != libc::SIGTERM && stop.signal != libc::SIGUSR1 {
        return None;
    }
    let job = std::env::var("SLURM_JOB_ID")
        .ok()
        .filter(|j| !j.is_empty())?;
    let task = std::env::var("SLURM_PROCID").unwrap_or_else(|_| "0".to_owned());
    if task != "0" {
        return None;
    }
    let done = std::process::Command::new("scontrol")
        .args(["requeue", &job])
        .status();
    Some(match done {
        Ok(s) if s.success() => format!("asked SLURM to requeue job {job} (scontrol requeue)"),
        Ok(s) => format!("scontrol requeue {job} failed ({s}): resubmit the job to continue"),
        Err(e) => {
            format!("cannot run scontrol to requeue job {job} ({e}): resubmit the job to continue")
        }
    })
}
