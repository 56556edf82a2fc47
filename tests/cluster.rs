//! What a run on a cluster relies on: progress as timestamped lines when stderr is a file,
//! TensorBoard event files that TensorBoard's own reader reads, one point of a sweep per array
//! task, `mfr check` and `mfr run` from any directory, and a requeue after SIGTERM.
mod common;
use common::{micro_spec, temp_dir};
use meanflow_repro::rundir::{read_stats, RunDir};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn mfr(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mfr"));
    cmd.args(args)
        .current_dir(dir)
        .env("MFR_CACHE", dir.join("cache"))
        .env("MFR_RESULTS", dir.join("results"))
        .env("MFR_REPORTS", dir.join("reports"))
        .env("MFR_DIST", "0");
    cmd
}

fn latent_spec(root: &Path, extra: &str) -> PathBuf {
    let train = "epochs = 4\nlog_every = 2\ncheckpoint_every = 6\n";
    micro_spec(root, "c", &format!("{train}{extra}"))
}

#[test]
fn a_log_file_gets_timestamped_progress_lines() {
    let root = temp_dir("log-lines");
    let spec = latent_spec(&root, "");
    let log = std::fs::File::create(root.join("train.log")).unwrap();
    let status = mfr(&root, &["train", spec.to_str().unwrap()])
        .env("MFR_LOG_INTERVAL", "0")
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(root.join("train.log")).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(" c train ")).collect();
    assert!(lines.len() >= 6, "{text}");
    let last = lines.last().unwrap();
    // 2026-11-30T01:02:03Z c train 12/12 steps (100%) ...
    let stamp = last.split(' ').next().unwrap();
    assert!(
        stamp.len() == 20 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
        "{last}"
    );
    assert!(
        last.contains("12/12 steps (100%)") && last.contains("v_loss"),
        "{last}"
    );
    assert!(!text.contains('\u{1b}'), "terminal escapes in a log file");
    // --quiet: none.
    let log = std::fs::File::create(root.join("quiet.log")).unwrap();
    let status = mfr(&root, &["train", spec.to_str().unwrap(), "--quiet"])
        .env("MFR_RESULTS", root.join("quiet-results"))
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .unwrap();
    assert!(status.success());
    let quiet = std::fs::read_to_string(root.join("quiet.log")).unwrap();
    assert!(!quiet.contains(" c train "), "{quiet}");
}

#[test]
fn tensorboards_reader_reads_the_runs_scalars() {
    let root = temp_dir("tensorboard");
    let spec = latent_spec(&root, "");
    let out = mfr(&root, &["train", spec.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = RunDir::new(root.join("results/c/default"));
    let events = run.events();
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let read = Command::new(python)
        .args([
            "-c",
            "import sys, json
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util
out = []
for e in EventFileLoader(sys.argv[1]).Load():
    for v in e.summary.value:
        value = v.simple_value if v.HasField('simple_value') else float(tensor_util.make_ndarray(v.tensor))
        out.append([v.tag, e.step, value])
print(json.dumps(out))",
            events.path().to_str().unwrap(),
        ])
        .output()
        .expect("the project's .venv python with tensorboard (make setup)");
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let scalars: Vec<(String, u64, f64)> = serde_json::from_slice(&read.stdout).unwrap();
    let stats = read_stats(&run.stats_file()).unwrap();
    assert_eq!(stats.len(), 6);
    for line in &stats {
        for (tag, want) in [
            ("train/loss", line.loss),
            ("train/v_loss", line.v_loss),
            ("train/lr", line.lr),
        ] {
            let got = scalars
                .iter()
                .find(|(t, s, _)| t == tag && *s == line.step)
                .unwrap_or_else(|| panic!("{tag} at step {} missing: {scalars:?}", line.step));
            // Event files hold float32 scalars.
            assert!(
                (got.2 - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{tag}: {} vs {want}",
                got.2
            );
        }
    }
}

#[test]
fn an_array_task_runs_its_point_and_the_index_lists_every_run() {
    let root = temp_dir("array");
    let spec = latent_spec(&root, "[sweep]\n\"meanflow.omega\" = [1.0, 2.0, 3.0]\n");
    let spec = spec.to_str().unwrap();
    let plan = mfr(&root, &["run", spec, "--dry-run"]).output().unwrap();
    let plan = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.contains("[1] omega=2.0") && plan.contains("[2] omega=3.0"),
        "{plan}"
    );
    for point in ["1", "omega=3.0"] {
        let out = mfr(&root, &["train", spec, "--point", point])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let results = root.join("results/c");
    assert!(
        !results.join("omega=1.0").exists(),
        "point 0 was not asked for"
    );
    for name in ["omega=2.0", "omega=3.0"] {
        assert!(results.join(name).join("checkpoints").exists(), "{name}");
    }
    let out = mfr(&root, &["train", spec, "--point", "7"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--point 7") && stderr.contains("0 to 2"),
        "{stderr}"
    );
}

#[test]
fn check_and_run_work_from_any_directory() {
    let root = temp_dir("anywhere");
    let elsewhere = root.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("experiments/demo-digits.toml");
    let out = mfr(&elsewhere, &["check", demo.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let spec = latent_spec(&root, "[sample]\nnum_samples = 8\nbatch = 4\n");
    let out = mfr(&elsewhere, &["train", spec.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(elsewhere.join("results/c/default/stats.jsonl").exists());
}

#[test]
fn a_stop_by_sigterm_in_a_slurm_job_asks_for_a_requeue() {
    let root = temp_dir("requeue");
    let spec = latent_spec(&root, "").to_str().unwrap().to_owned();
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("epochs = 4", "epochs = 400");
    std::fs::write(&spec, text).unwrap();
    // A stand-in for SLURM's scontrol that records how it was called.
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let scontrol = bin.join("scontrol");
    std::fs::write(
        &scontrol,
        format!(
            "#!/bin/sh\necho \"$@\" > {}\n",
            root.join("scontrol.args").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&scontrol, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let child = mfr(&root, &["train", &spec, "--requeue"])
        .env("PATH", path)
        .env("SLURM_JOB_ID", "4242")
        .env("SLURM_PROCID", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stats = root.join("results/c/default/stats.jsonl");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&stats).map_or(0, |t| t.lines().count()) < 3 {
        assert!(start.elapsed().as_secs() < 120, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: kill() on a child this test spawned and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(138), "{stderr}");
    assert!(
        stderr.contains("asked SLURM to requeue job 4242"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("scontrol.args"))
            .unwrap()
            .trim(),
        "requeue 4242"
    );
}
