//! Data-parallel training over Gloo on 127.0.0.1: two and three `mfr` processes train as one
//! process with the same global batch, a killed rank stops the others with an error, and a run
//! of two processes resumes with one. Also the pieces that need no processes: the sharded draws,
//! the rows each process takes, and the launcher variables.
mod common;
use common::temp_dir;

use common::{latent_tree, rel_err};
use meanflow_repro::dist::{first_host, Launch};
use meanflow_repro::meanflow::Draw;
use meanflow_repro::rundir::checkpoint;
use meanflow_repro::spec::Spec;
use meanflow_repro::train::Part;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// 36 latents; batch 12 in 2 micro-batches (splits into 2 x 2 and 2 x 3 parts): 3 steps an
/// epoch. Guidance and the default label drop and r = t share are on, so every draw matters.
fn write_spec(root: &Path, epochs: usize, checkpoint_every: usize) -> PathBuf {
    let data = root.join("data");
    if !data.exists() {
        latent_tree(&data, 36, None);
    }
    let text = format!(
        r#"
[experiment]
name = "dist"
[model]
preset = "micro/2"
input_size = 4
in_channels = 1
num_classes = 3
[meanflow]
omega = 1.5
[train]
data = "{}"
batch = 12
grad_accumulation = 2
epochs = {epochs}
lr = 1e-3
precision = "f64"
device = "cpu"
log_every = 1
checkpoint_every = {checkpoint_every}
keep_checkpoints = 10
"#,
        data.display()
    );
    let path = root.join(format!("spec-{epochs}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// `mfr ARGS` with one intra-op thread (several processes share this machine's cores).
fn mfr(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mfr"));
    cmd.args(args)
        .env("OMP_NUM_THREADS", "1")
        .env("MFR_DIST_TIMEOUT", "60")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("SLURM_PROCID")
        .env_remove("SLURM_NTASKS");
    cmd
}

fn check(out: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Ranks started as torchrun starts them: each with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*.
fn spawn_ranks(n: usize, args: &[&str], port: u16) -> Vec<Child> {
    (0..n)
        .map(|rank| {
            mfr(args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("LOCAL_WORLD_SIZE", n.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

fn run_dir(results: &Path) -> PathBuf {
    results.join("dist").join("default")
}

fn tensors(results: &Path, step: u64) -> BTreeMap<String, Tensor> {
    checkpoint::read_tensors(
        &run_dir(results)
            .join("checkpoints")
            .join(checkpoint::file_name(step)),
    )
    .unwrap()
}

/// Every tensor of the two checkpoints (model, EMA, AdamW moments) within `tol` relative error.
fn assert_close(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>, tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: different tensors");
    for (k, ta) in a {
        let err = rel_err(&b[k], ta);
        assert!(err < tol, "{what}: {k} differs by {err:e}");
    }
}

fn losses(results: &Path) -> Vec<f64> {
    meanflow_repro::rundir::read_stats(&run_dir(results).join("stats.jsonl"))
        .unwrap()
        .iter()
        .map(|s| s.loss)
        .collect()
}

#[test]
fn two_and_three_processes_train_as_one_with_the_same_global_batch() {
    let root = temp_dir("same");
    let spec = write_spec(&root, 2, 3);
    let spec = spec.to_str().unwrap();
    let (one, two, three) = (root.join("one"), root.join("two"), root.join("three"));
    check(
        mfr(&["train", spec, "--results", one.to_str().unwrap()])
            .output()
            .unwrap(),
        "one process",
    );
    // Two through `mfr launch`, three as torchrun would start them.
    let launched = check(
        mfr(&[
            "launch",
            "--nproc",
            "2",
            "train",
            spec,
            "--results",
            two.to_str().unwrap(),
        ])
        .output()
        .unwrap(),
        "mfr launch --nproc 2",
    );
    let port = meanflow_repro::dist::launch::free_port().unwrap();
    let args = ["train", spec, "--results", three.to_str().unwrap()];
    let outs: Vec<String> = spawn_ranks(3, &args, port)
        .into_iter()
        .enumerate()
        .map(|(r, c)| check(c.wait_with_output().unwrap(), &format!("rank {r} of 3")))
        .collect();
    // Every rank held rank 0's weights at each checkpoint (compared bit for bit by the trainer)...
    for out in [&launched, &outs[0]] {
        assert!(
            out.contains("ranks held the same weights at every checkpoint"),
            "{out}"
        );
    }
    // ...and rank 0's are one process's, to the rounding of summing the gradients in another
    // order: gradients were averaged over the group, and each rank took its share of the data
    // and of the draws (t, r, noise, label drop, posterior noise).
    let reference = losses(&one);
    assert_eq!(reference.len(), 6);
    for (n, results) in [(2, &two), (3, &three)] {
        for step in [3, 6] {
            assert_close(
                &tensors(results, step),
                &tensors(&one, step),
                1e-9,
                &format!("{n} processes, step {step}"),
            );
        }
        // The logged loss is float32, whatever the training precision.
        for (a, b) in losses(results).iter().zip(&reference) {
            assert!(
                (a - b).abs() < 1e-6 * b.abs(),
                "{n} processes: loss {a} vs {b}"
            );
        }
    }
    // And training moved the weights: a run that ignored the data would not match by accident.
    let (start, end) = (tensors(&one, 3), tensors(&one, 6));
    assert!(
        rel_err(
            &start["model.final_layer.linear.weight"],
            &end["model.final_layer.linear.weight"]
        ) > 1e-6
    );
}

#[test]
fn a_killed_rank_makes_the_others_stop_with_an_error() {
    let root = temp_dir("kill");
    let spec = write_spec(&root, 400, 1000);
    let results = root.join("results");
    let args = [
        "train",
        spec.to_str().unwrap(),
        "--results",
        results.to_str().unwrap(),
    ];
    let port = meanflow_repro::dist::launch::free_port().unwrap();
    let mut ranks = spawn_ranks(3, &args, port);
    let stats = run_dir(&results).join("stats.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&stats).map_or(0, |s| s.lines().count()) < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the three ranks made no progress"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ranks[1].kill().unwrap();
    let killed = Instant::now();
    let _ = ranks[1].wait();
    for rank in [0, 2] {
        loop {
            if ranks[rank].try_wait().unwrap().is_some() {
                break;
            }
            // Gloo sees the closed connection at once; the timeout (60 s) is the upper bound.
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "rank {rank} still runs {} s after rank 1 died",
                killed.elapsed().as_secs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for rank in [0, 2] {
        let out = ranks
            .remove(if rank == 0 { 0 } else { 1 })
            .wait_with_output();
        let out = out.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "rank {rank} exited 0 after rank 1 died"
        );
        assert!(
            stderr.contains(&format!("rank {rank} of 3"))
                && stderr.contains("all-reduce of the gradients failed")
                && ["peer", "Connection", "pipe"]
                    .iter()
                    .any(|w| stderr.contains(w)),
            "rank {rank}: {stderr}"
        );
    }
}

#[test]
fn a_run_of_two_processes_resumes_with_one() {
    let root = temp_dir("resume");
    let spec = write_spec(&root, 2, 3);
    let spec = spec.to_str().unwrap();
    let two = root.join("two");
    check(
        mfr(&[
            "launch",
            "--nproc",
            "2",
            "train",
            spec,
            "--results",
            two.to_str().unwrap(),
        ])
        .output()
        .unwrap(),
        "two processes",
    );
    // The same run stopped after step 3 (as after a crash at step 4 or 5)...
    let resumed = root.join("resumed");
    let (from, to) = (run_dir(&two), run_dir(&resumed));
    std::fs::create_dir_all(to.join("checkpoints")).unwrap();
    for f in ["spec.toml", "spec.sha256", "env.json"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    std::fs::copy(
        from.join("checkpoints").join(checkpoint::file_name(3)),
        to.join("checkpoints").join(checkpoint::file_name(3)),
    )
    .unwrap();
    let stats = std::fs::read_to_string(from.join("stats.jsonl")).unwrap();
    let first: Vec<&str> = stats.lines().take(3).collect();
    std::fs::write(to.join("stats.jsonl"), first.join("\n") + "\n").unwrap();
    // ...continued by one process with the same global batch, continues the curve.
    let out = check(
        mfr(&[
            "train",
            spec,
            "--resume",
            "--results",
            resumed.to_str().unwrap(),
        ])
        .output()
        .unwrap(),
        "the resume with one process",
    );
    assert!(out.contains("resume at step 3 of 6"), "{out}");
    let (a, b) = (losses(&resumed), losses(&two));
    assert_eq!(a.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-6 * y.abs(), "loss {x} vs {y}");
    }
    assert_close(
        &tensors(&resumed, 6),
        &tensors(&two, 6),
        1e-9,
        "after resuming",
    );
}

/// What N processes draw for their rows is what one process draws for the whole batch.
#[test]
fn the_parts_of_a_draw_are_the_rows_of_the_whole_draw() {
    let spec = Spec::parse(
        "[experiment]\nname = \"d\"\n[model]\npreset = \"micro/2\"\n[meanflow]\nclass_dropout = 0.4\n",
        "d.toml",
    )
    .unwrap();
    let cfg = spec.meanflow_config();
    let x = Tensor::zeros([12, 4, 8, 8], (Kind::Double, tch::Device::Cpu));
    tch::manual_seed(7);
    let whole = Draw::sample(&cfg, &x);
    let num_drop = whole.num_drop.int64_value(&[]);
    assert!(num_drop > 0 && num_drop < 12, "{num_drop} dropped labels");
    for world in [2i64, 3, 4] {
        let b = 12 / world;
        for rank in 0..world {
            tch::manual_seed(7);
            let part = Draw::sample_part(&cfg, &x.narrow(0, 0, b), 12, rank * b);
            for (p, w, name) in [
                (&part.t, &whole.t, "t"),
                (&part.r, &whole.r, "r"),
                (&part.e, &whole.e, "e"),
            ] {
                assert!(
                    p.equal(&w.narrow(0, rank * b, b)),
                    "{name} of rank {rank} of {world}"
                );
            }
            let expect = (num_drop - rank * b).clamp(0, b);
            assert_eq!(
                part.num_drop.int64_value(&[]),
                expect,
                "rank {rank} of {world}"
            );
        }
    }
}

#[test]
fn each_process_takes_its_share_of_every_micro_batch() {
    let part = |rank| Part::new(12, 2, rank, 3).unwrap();
    assert_eq!(part(0).rows(), [0, 1, 6, 7]);
    assert_eq!(part(2).rows(), [4, 5, 10, 11]);
    let mut all: Vec<usize> = (0..3).flat_map(|r| part(r).rows()).collect();
    all.sort();
    assert_eq!(all, (0..12).collect::<Vec<_>>());
    assert_eq!(
        Part::new(12, 1, 0, 1).unwrap().rows(),
        (0..12).collect::<Vec<_>>()
    );
    let err = Part::new(12, 2, 0, 4).unwrap_err().to_string();
    assert!(
        err.contains("train.batch = 12") && err.contains("multiple of 8"),
        "{err}"
    );
}

#[test]
fn torchrun_and_slurm_variables_name_the_rank_and_the_rendezvous() {
    let from = |pairs: &[(&str, &str)]| {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_vars(|k| map.get(k).cloned())
    };
    assert_eq!(from(&[]).unwrap(), None);
    let torchrun = from(&[
        ("RANK", "9"),
        ("WORLD_SIZE", "16"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "8"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("TORCHELASTIC_RESTART_COUNT", "2"),
        // torchrun inside an allocation: its variables win.
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "2"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(
        (
            torchrun.rank,
            torchrun.world_size,
            torchrun.local_rank,
            torchrun.local_world_size
        ),
        (9, 16, 1, 8)
    );
    assert_eq!(
        (torchrun.master_addr.as_str(), torchrun.master_port),
        ("node0", 29500)
    );
    // torchrun's agent hosts the store; a restart uses fresh keys.
    assert!(!torchrun.store_server);
    assert_eq!(torchrun.prefix, "mfr/2/");

    let slurm = from(&[
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_NTASKS_PER_NODE", "8(x2)"),
        ("SLURM_JOB_NODELIST", "gpu[007-008]"),
        ("SLURM_JOB_ID", "123456"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(
        (slurm.rank, slurm.world_size, slurm.local_world_size),
        (0, 16, 8)
    );
    assert_eq!(
        (slurm.master_addr.as_str(), slurm.master_port),
        ("gpu007", 23456)
    );
    assert!(slurm.store_server);
    // One task (a batch script's own shell) is no launch.
    assert_eq!(
        from(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap(),
        None
    );

    let err = from(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("MASTER_PORT"), "{err}");
    let err = from(&[
        ("RANK", "2"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "1"),
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("rank 2 of a world of 2"), "{err}");
    assert_eq!(first_host("gpu[003-004,010],cpu1"), "gpu003");
    assert_eq!(first_host("a1,a2"), "a1");
    assert_eq!(first_host("solo"), "solo");
}

/// Sampling shared between ranks (batch b on rank b mod N, each from its own seed) assembles
/// the very .npz one process writes.
#[test]
fn two_processes_sample_the_same_npz_as_one() {
    let root = temp_dir("sample");
    let spec = root.join("digits.toml");
    std::fs::write(
        &spec,
        "[experiment]\nname = \"dist\"\n[model]\npreset = \"micro/2\"\ninput_size = 8\nin_channels = 1\nnum_classes = 10\n\
         [train]\ndata = \"digits\"\nbatch = 128\nepochs = 1\nprecision = \"f32\"\ndevice = \"cpu\"\n\
         [sample]\nschedules = [[1.0, 0.0]]\nnum_samples = 30\nbatch = 8\n",
    )
    .unwrap();
    let spec = spec.to_str().unwrap();
    let (one, two) = (root.join("one"), root.join("two"));
    check(
        mfr(&["train", spec, "--results", one.to_str().unwrap()])
            .output()
            .unwrap(),
        "training",
    );
    let status = Command::new("cp")
        .args(["-r", one.to_str().unwrap(), two.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    check(
        mfr(&["sample", spec, "--results", one.to_str().unwrap()])
            .output()
            .unwrap(),
        "one process",
    );
    check(
        mfr(&[
            "launch",
            "--nproc",
            "2",
            "sample",
            spec,
            "--results",
            two.to_str().unwrap(),
        ])
        .output()
        .unwrap(),
        "two processes",
    );
    let npz = |r: &Path| std::fs::read(run_dir(r).join("samples/samples-1nfe.npz")).unwrap();
    let (a, b) = (npz(&one), npz(&two));
    assert!(a.len() > 30 * 8 * 8 * 3);
    assert!(
        a == b,
        "the .npz of two processes differs from one process's"
    );
}
