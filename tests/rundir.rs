//! The run directory under faults: a kill -9 mid-log, a flipped bit in a checkpoint, a
//! second writer, damaged sample parts, and files that are not what their names say. Each
//! ends in a run that resumes to what an uninterrupted one computes, or one clear sentence.
mod common;
use common::{micro_spec, temp_dir};
use meanflow_repro::rundir::{checkpoint, read_stats, Contention, RunDir, StatLine};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A latent-data spec in f64 on the CPU (so reruns are bit for bit), `epochs` x 3 steps.
fn latent_spec(root: &Path, epochs: u32, extra: &str) -> PathBuf {
    let train = format!(
        "epochs = {epochs}\nlog_every = 1\ncheckpoint_every = 3\nkeep_checkpoints = 4\n{extra}"
    );
    micro_spec(root, "faults", &train)
}

fn mfr(args: &[&str], results: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mfr"));
    cmd.args(args)
        .arg("--results")
        .arg(results)
        .env("MFR_CACHE", results.join("cache"))
        .env("MFR_DIST", "0");
    cmd
}

fn ok(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// The stats lines without their wall-clock fields, which differ between any two runs.
fn logged(run: &Path) -> Vec<StatLine> {
    read_stats(&run.join("stats.jsonl"))
        .unwrap()
        .into_iter()
        .map(|l| StatLine {
            img_per_s: 0.0,
            wall_s: 0.0,
            ..l
        })
        .collect()
}

fn final_tensors(run: &Path, step: u64) -> Vec<(String, tch::Tensor)> {
    checkpoint::read_tensors(&run.join("checkpoints").join(checkpoint::file_name(step)))
        .unwrap()
        .into_iter()
        .collect()
}

fn assert_same_weights(a: &Path, b: &Path, step: u64) {
    let (a, b) = (final_tensors(a, step), final_tensors(b, step));
    assert_eq!(a.len(), b.len());
    for ((ka, ta), (kb, tb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert!(ta.equal(tb), "{ka} differs from the uninterrupted run");
    }
}

/// Waits for `child` to log at least `lines` stats lines, then kills it with SIGKILL.
fn kill_after_lines(mut child: Child, stats: &Path, lines: usize) {
    let start = Instant::now();
    loop {
        let n = std::fs::read_to_string(stats)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if n >= lines {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "training ended before it could be killed"
        );
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no handler runs
    child.wait().unwrap();
}

#[test]
fn a_kill_mid_log_then_resume_logs_what_an_uninterrupted_run_logs() {
    let root = temp_dir("kill-log");
    let spec = latent_spec(&root, 40, "");
    let spec = spec.to_str().unwrap();
    let (whole, killed) = (root.join("whole"), root.join("killed"));
    ok(mfr(&["train", spec], &whole).output().unwrap());

    let child = mfr(&["train", spec], &killed)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let run = killed.join("faults/default");
    kill_after_lines(child, &run.join("stats.jsonl"), 8);
    // What a kill in the middle of a line's write leaves: the line's first bytes.
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(run.join("stats.jsonl"))
        .unwrap();
    std::io::Write::write_all(&mut log, b"{\"step\":9999,\"epoch\":3,\"lo").unwrap();
    drop(log);
    assert!(
        read_stats(&run.join("stats.jsonl")).is_ok(),
        "a reader skips a partial last line"
    );

    let stderr = ok(mfr(&["train", spec, "--resume"], &killed).output().unwrap());
    assert!(stderr.contains("resuming from"), "{stderr}");
    let (want, got) = (logged(&whole.join("faults/default")), logged(&run));
    assert_eq!(want.len(), 120);
    assert_eq!(
        got, want,
        "the resumed log differs from the uninterrupted one"
    );
    assert_same_weights(&whole.join("faults/default"), &run, 120);
}

/// Ways a checkpoint can be damaged after it was written, each to be caught before a resume
/// builds on it.
enum Damage {
    /// One bit of a weight.
    WeightBit,
    /// One bit of the training state's step in the header ("step":9 -> "step":8).
    StepBit,
    /// The checksum entry renamed away (same length, so the file stays well formed), and a bit
    /// of a weight flipped: without the entry the flip would go through.
    ChecksumRemoved,
}

fn damage(path: &Path, how: &Damage) {
    let mut bytes = std::fs::read(path).unwrap();
    let find = |bytes: &[u8], what: &[u8]| {
        bytes
            .windows(what.len())
            .position(|w| w == what)
            .unwrap_or_else(|| panic!("{} not in the header", String::from_utf8_lossy(what)))
    };
    match how {
        Damage::WeightBit => {
            let at = bytes.len() - 100;
            bytes[at] ^= 0x10;
        }
        Damage::StepBit => {
            let at = find(&bytes, b"\\\"step\\\":9") + 9;
            bytes[at] ^= 0x01; // '9' -> '8'
        }
        Damage::ChecksumRemoved => {
            let at = find(&bytes, b"\"file_sha256\"");
            bytes[at + 1] = b'x';
            let last = bytes.len() - 100;
            bytes[last] ^= 0x10;
        }
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_damaged_newest_checkpoint_resumes_from_the_one_before() {
    let root = temp_dir("bitflip");
    let spec = latent_spec(&root, 4, "");
    let spec = spec.to_str().unwrap();
    let whole = root.join("whole");
    ok(mfr(&["train", spec], &whole).output().unwrap());
    let src = whole.join("faults/default");

    for (i, how) in [Damage::WeightBit, Damage::StepBit, Damage::ChecksumRemoved]
        .iter()
        .enumerate()
    {
        // An interrupted run holding steps 6 and 9, the newest damaged.
        let damaged = root.join(format!("damaged{i}"));
        let run = damaged.join("faults/default");
        std::fs::create_dir_all(run.join("checkpoints")).unwrap();
        for f in ["spec.toml", "spec.sha256", "env.json"] {
            std::fs::copy(src.join(f), run.join(f)).unwrap();
        }
        for step in [6, 9] {
            let name = checkpoint::file_name(step);
            std::fs::copy(
                src.join("checkpoints").join(&name),
                run.join("checkpoints").join(&name),
            )
            .unwrap();
        }
        damage(&run.join("checkpoints").join(checkpoint::file_name(9)), how);
        // Neither a folder nor a FIFO named like a checkpoint is one (nor hangs or aborts anything).
        std::fs::create_dir(run.join("checkpoints").join(checkpoint::file_name(7))).unwrap();
        let fifo = run.join("checkpoints").join(checkpoint::file_name(8));
        let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());

        let stderr = ok(mfr(&["train", spec, "--resume"], &damaged)
            .output()
            .unwrap());
        let named = match how {
            Damage::ChecksumRemoved => "step-00000009.safetensors: no checksum",
            _ => "step-00000009.safetensors: damaged",
        };
        assert!(
            stderr.contains(named) && stderr.contains("falling back"),
            "{stderr}"
        );
        assert!(
            stderr.contains("resuming from") && stderr.contains("step-00000006.safetensors"),
            "{stderr}"
        );
        assert_same_weights(&src, &run, 12);
        // The resumed run wrote step 9 anew, whole.
        assert_same_weights(&src, &run, 9);
    }
}

#[test]
fn a_second_writer_is_refused_by_name_or_waits_and_the_samples_are_whole() {
    let root = temp_dir("writers");
    let spec = latent_spec(&root, 1, "");
    // Digits: samples need no VAE.
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace(
            &format!("data = \"{}\"", root.join("data").display()),
            "data = \"digits\"",
        )
        .replace("input_size = 4", "input_size = 8")
        .replace("num_classes = 3", "num_classes = 10")
        .replace("precision = \"f64\"", "precision = \"f32\"")
        .replace("batch = 8", "batch = 64")
        + "[sample]\nnum_samples = 300\nbatch = 50\nschedules = [[1.0, 0.0]]\n";
    std::fs::write(&spec, text).unwrap();
    let spec = spec.to_str().unwrap();
    let results = root.join("results");
    ok(mfr(&["train", spec], &results).output().unwrap());
    let run = RunDir::new(results.join("faults/default"));

    // Held by this process: a sampler refuses at once, naming the holder.
    let held = run.lock("the test", Contention::Refuse).unwrap();
    let out = mfr(&["sample", spec], &results).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("is being written by")
            && stderr.contains(&format!("pid {}", std::process::id()))
            && stderr.contains("--wait"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Two samplers that wait: both queue behind the holder, then behind each other.
    let waiting: Vec<Child> = (0..2)
        .map(|_| {
            mfr(&["sample", spec, "--wait"], &results)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !run.samples_npz(None, 1).exists(),
        "nothing is written while the lock is held"
    );
    drop(held);
    for child in waiting {
        ok(child.wait_with_output().unwrap());
    }
    let mut npz = meanflow_repro::eval::npz::Npz::open(&run.samples_npz(None, 1)).unwrap();
    let mut images = npz.images("arr_0").unwrap();
    assert_eq!(images.len(), 300);
    let mut n = 0;
    while let Some(batch) = images.next_batch(64).unwrap() {
        n += batch.size()[0];
    }
    assert_eq!(n, 300, "the .npz holds every image");
}
