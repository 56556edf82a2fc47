//! `mfr launch --nproc N ...`: N local training processes without torchrun. Each gets the
//! variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
//! MASTER_PORT); when one fails, the others get a grace period to stop on their own (they do:
//! their next collective fails), then SIGTERM, then SIGKILL.
use anyhow::{bail, Context, Result};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

pub struct Options {
    pub nproc: usize,
    /// MASTER_PORT; a free port of 127.0.0.1 when None.
    pub port: Option<u16>,
    /// The process group's timeout, passed on as MFR_DIST_TIMEOUT (seconds).
    pub timeout: Option<f64>,
    /// How long the others may take to stop after one failed, before SIGTERM.
    pub grace: Duration,
}

/// A TCP port of 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("no free TCP port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}

/// Runs `mfr ARGS...` as ranks 0..nproc of one group and waits for all of them.
/// More processes than any machine has GPUs or cores for is a typo, not a launch.
const MAX_NPROC: usize = 1024;

pub fn launch(opts: &Options, args: &[String]) -> Result<()> {
    if !(1..=MAX_NPROC).contains(&opts.nproc) {
        bail!(
            "--nproc {}: expected an integer in [1, {MAX_NPROC}]",
            opts.nproc
        );
    }
    if let Some(t) = opts.timeout {
        crate::settings::DIST_TIMEOUT
            .parse(&t.to_string())
            .context("--timeout")?;
    }
    let port = match opts.port {
        Some(p) => p,
        None => free_port()?,
    };
    // Ctrl-C reaches the children too (one terminal process group): they finish the step,
    // checkpoint and exit; the launcher waits for that instead of dying first.
    // SAFETY: signal() with a constant disposition touches no memory.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    let children = spawn(opts, args, port)?;
    match supervise(children, opts)? {
        Some((rank, status)) => bail!(
            "rank {rank} of {} failed first ({status}): its error above is the cause",
            opts.nproc
        ),
        None => Ok(()),
    }
}

/// Starts every rank with torchrun's variables; if one cannot start, the started ones are
/// killed.
fn spawn(opts: &Options, args: &[String], port: u16) -> Result<Vec<(usize, Child)>> {
    let exe = std::env::current_exe().context("cannot find the mfr executable")?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for rank in 0..opts.nproc {
        let mut cmd = Command::new(&exe);
        cmd.args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", opts.nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", opts.nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env_remove("TORCHELASTIC_USE_AGENT_STORE")
            .env_remove("TORCHELASTIC_RESTART_COUNT");
        if let Some(t) = opts.timeout {
            cmd.env(crate::settings::DIST_TIMEOUT.key, t.to_string());
        }
        // The children take SIGINT's default disposition back (the trainer installs its own).
        // SAFETY: the pre-exec hook only calls signal(), async-signal-safe after fork.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(child) => children.push((rank, child)),
            Err(e) => {
                for (_, c) in &mut children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e)
                    .with_context(|| format!("cannot start rank {rank} ({})", exe.display()));
            }
        }
    }
    Ok(children)
}

/// Waits for every rank. After the first failure the others get `opts.grace` to stop on their
/// own, then SIGTERM, then 10 s later SIGKILL. Returns the first failed rank and its status.
fn supervise(mut children: Vec<(usize, Child)>, opts: &Options) -> Result<Option<(usize, String)>> {
    let mut first_failure: Option<(usize, String, Instant)> = None;
    let (mut terminated, mut killed) = (false, false);
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            let (rank, child) = &mut children[i];
            match child.try_wait()? {
                Some(status) => {
                    if !status.success() && first_failure.is_none() {
                        eprintln!(
                            "mfr launch: rank {rank} stopped ({}); the other ranks stop at their next collective (or are terminated in {} s)",
                            describe(status),
                            opts.grace.as_secs()
                        );
                        first_failure = Some((*rank, describe(status), Instant::now()));
                    }
                    children.remove(i);
                }
                None => i += 1,
            }
        }
        if let Some((_, _, at)) = &first_failure {
            let waited = at.elapsed();
            if !terminated && waited > opts.grace {
                for (rank, c) in &children {
                    eprintln!("mfr launch: terminating rank {rank}");
                    // SAFETY: kill() on a child this process spawned and has not reaped.
                    unsafe {
                        libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
                    }
                }
                terminated = true;
            }
            if !killed && waited > opts.grace + Duration::from_secs(10) {
                for (_, c) in &mut children {
                    let _ = c.kill();
                }
                killed = true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(first_failure.map(|(rank, status, _)| (rank, status)))
}
