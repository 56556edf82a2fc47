//! Signals sent to a running `mfr`: SIGTERM (and SIGINT, SIGUSR1) stop training after the step
//! with a checkpoint, and sampling after the batch, with one line and status 128 + signal; the
//! same command with --resume then finishes to what an uninterrupted run makes. A second signal
//! ends the process at once.
mod common;
use common::{micro_spec, temp_dir};
use meanflow_repro::rundir::checkpoint;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn mfr(args: &[&str], results: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mfr"));
    cmd.args(args)
        .arg("--results")
        .arg(results)
        .env("MFR_CACHE", results.join("cache"))
        .env("MFR_DIST", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Waits until `ready` holds (polling), then sends `signal` to the child.
fn signal_when(child: &mut Child, signal: i32, ready: impl Fn() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before the signal"
        );
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: kill() on a child this test spawned and has not reaped.
    unsafe { libc::kill(child.id() as i32, signal) };
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

fn latent_spec(root: &Path) -> PathBuf {
    micro_spec(
        root,
        "sig",
        "epochs = 40\nlog_every = 1\ncheckpoint_every = 50\n",
    )
}

#[test]
fn sigterm_mid_training_checkpoints_and_resume_finishes_the_same_run() {
    let root = temp_dir("sigterm-train");
    let spec = latent_spec(&root);
    let spec = spec.to_str().unwrap();
    let whole = root.join("whole");
    let out = mfr(&["train", spec], &whole).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for (signal, status) in [
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGUSR1, 138),
    ] {
        let stopped = root.join(format!("stopped-{signal}"));
        let run = stopped.join("sig/default");
        let mut child = mfr(&["train", spec], &stopped).spawn().unwrap();
        signal_when(&mut child, signal, || lines(&run.join("stats.jsonl")) >= 5);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(status), "{stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("stopped by ")
                && last.contains("at step")
                && last.contains("--resume"),
            "{stderr}"
        );
        let saved = checkpoint::list(&run.join("checkpoints"));
        let (step, _) = saved.last().expect("a checkpoint at the stop");
        assert!(*step >= 5 && *step < 120, "stopped at step {step}");
        let out = mfr(&["train", spec, "--resume"], &stopped)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (a, b) = (
            checkpoint::read_tensors(
                &whole
                    .join("sig/default/checkpoints")
                    .join(checkpoint::file_name(120)),
            )
            .unwrap(),
            checkpoint::read_tensors(&run.join("checkpoints").join(checkpoint::file_name(120)))
                .unwrap(),
        );
        for (k, t) in &a {
            assert!(
                t.equal(&b[k]),
                "{k} differs after a stop by signal {signal} and a resume"
            );
        }
    }
}

#[test]
fn a_second_signal_ends_the_process_at_once() {
    let root = temp_dir("sigterm-twice");
    // Steps of a tenth of a second or more: the second signal lands inside the step the first
    // one lets finish. (Two signals sent back to back would merge into one pending signal.)
    let spec = root.join("spec.toml");
    std::fs::write(
        &spec,
        "[experiment]\nname = \"sig\"\n[model]\npreset = \"tiny/2\"\ninput_size = 8\n\
         in_channels = 1\nnum_classes = 10\n[train]\ndata = \"digits\"\nbatch = 512\nepochs = 20\n\
         precision = \"f32\"\ndevice = \"cpu\"\nlog_every = 1\n",
    )
    .unwrap();
    let results = root.join("results");
    let run = results.join("sig/default");
    let mut child = mfr(&["train", spec.to_str().unwrap()], &results)
        .spawn()
        .unwrap();
    signal_when(&mut child, libc::SIGTERM, || {
        lines(&run.join("stats.jsonl")) >= 2
    });
    std::thread::sleep(Duration::from_millis(20));
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
}

#[test]
fn sigterm_while_sampling_stops_after_the_batch_and_resume_completes_the_samples() {
    let root = temp_dir("sigterm-sample");
    let spec = root.join("spec.toml");
    std::fs::write(
        &spec,
        "[experiment]\nname = \"sig\"\n[model]\npreset = \"micro/2\"\ninput_size = 8\n\
         in_channels = 1\nnum_classes = 10\n[train]\ndata = \"digits\"\nbatch = 128\nepochs = 1\n\
         precision = \"f32\"\ndevice = \"cpu\"\n[sample]\nnum_samples = 4000\nbatch = 20\n\
         schedules = [[1.0, 0.0]]\n",
    )
    .unwrap();
    let spec = spec.to_str().unwrap();
    let results = root.join("results");
    let out = mfr(&["train", spec], &results).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parts = results.join("sig/default/samples/samples-1nfe.parts");
    let mut child = mfr(&["sample", spec], &results).spawn().unwrap();
    signal_when(&mut child, libc::SIGTERM, || {
        std::fs::read_dir(&parts).map_or(0, |d| d.count()) >= 2
    });
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(
        stderr
            .lines()
            .last()
            .unwrap_or_default()
            .contains("sample batches"),
        "{stderr}"
    );
    let npz = results.join("sig/default/samples/samples-1nfe.npz");
    assert!(!npz.exists(), "a stopped stage leaves no .npz");
    let out = mfr(&["sample", spec, "--resume"], &results)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut file = meanflow_repro::eval::npz::Npz::open(&npz).unwrap();
    assert_eq!(file.images("arr_0").unwrap().len(), 4000);
}
