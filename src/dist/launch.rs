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
pub fn launch(opts: &Options, args: &[String]) -> Result<()> {
    if opts.nproc == 0 {
        bail!("--nproc must be at least 1");
    }
    let exe = std::env::current_exe().context("cannot find the mfr executable")?;
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
            cmd.env("MFR_DIST_TIMEOUT", t.to_string());
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
    let mut first_failure: Option<(usize, String, Instant)> = None;
    let mut terminated = false;
    let mut killed = false;
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
    match first_failure {
        Some((rank, status, _)) => bail!(
            "rank {rank} of {} failed first ({status}): its error above is the cause",
            opts.nproc
        ),
        None => Ok(()),
    }
}
