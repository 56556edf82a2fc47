//! Hostile input, class by class: a file whose code would run if loaded, specs whose values
//! would silently change results or abort, reference batches and sample files crafted to break
//! the evaluator. Each must end in a non-zero exit with one sentence naming the thing, no panic
//! text, and (for payloads) no trace of the payload having run.
mod common;
use common::{import_fixture, temp_dir};
use meanflow_repro::data::npy;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `mfr args` in `dir`, with its cache, results and reports inside `dir`.
fn command(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mfr"));
    command
        .args(args)
        .current_dir(dir)
        .env("MFR_CACHE", dir.join("cache"))
        .env("MFR_RESULTS", dir.join("results"))
        .env("MFR_REPORTS", dir.join("reports"))
        .env("MFR_DIST", "0")
        .env("MFR_QUIET", "1");
    command
}

fn mfr(dir: &Path, args: &[&str]) -> Output {
    command(dir, args).output().unwrap()
}

/// Asserts a refusal: non-zero exit, `expected` in the error, and no panic or libtorch stack.
fn refused(out: &Output, expected: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "accepted; expected `{expected}`:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked")
            && !stderr.contains("stack backtrace")
            && !stderr.contains("frame #"),
        "a panic or a raw stack instead of a sentence:\n{stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && stderr.contains(expected),
        "expected one error naming `{expected}`:\n{stderr}"
    );
    println!("refused, exit {:?}: {last}", out.status.code());
    stderr
}

// --- Code in files never runs ---------------------------------------------------------------

#[test]
fn a_torchscript_payload_never_runs_through_import_or_evaluate() {
    let dir = temp_dir("payload");
    let payload = import_fixture("torchscript_setstate.pt");
    let marker = dir.join("mfr-setstate-ran");
    let out = mfr(
        &dir,
        &[
            "import",
            payload.to_str().unwrap(),
            "--out",
            "x.safetensors",
        ],
    );
    refused(&out, "torchscript_setstate.pt");
    assert!(
        !marker.exists(),
        "mfr import ran the archive's __setstate__"
    );
    // As the Inception weights of an evaluation: refused before any image is read.
    let images = tch::Tensor::randint(255, [8, 16, 16, 3], (tch::Kind::Uint8, tch::Device::Cpu));
    let npz = dir.join("s.npz");
    meanflow_repro::eval::npz::write_images(&npz, &images).unwrap();
    let out = mfr(
        &dir,
        &[
            "evaluate",
            "s.npz",
            "s.npz",
            "--inception",
            payload.to_str().unwrap(),
        ],
    );
    refused(&out, "torchscript_setstate.pt");
    assert!(
        !marker.exists(),
        "mfr evaluate ran the archive's __setstate__"
    );
}

#[test]
fn torchscript_weights_are_read_without_libtorchs_loader_and_equal_its_parameters() {
    let bundled = meanflow_repro::import::inception::bundled_torchscript().unwrap();
    let module = meanflow_repro::import::torch_file::load_torchscript(&bundled).unwrap();
    let ours: std::collections::BTreeMap<String, tch::Tensor> =
        meanflow_repro::import::torch_file::module_tensors(&module)
            .into_iter()
            .collect();
    let want =
        tch::Tensor::read_safetensors(import_fixture("fid_helper_parameters.safetensors")).unwrap();
    assert_eq!(ours.len(), want.len());
    for (name, w) in &want {
        let t = ours
            .get(name)
            .unwrap_or_else(|| panic!("{name} not found by our reader"));
        assert!(t.equal(w), "{name} differs from torch.jit.load's");
    }
}

// --- Spec values that would abort, overflow or silently change results ----------------------

const BASE: &str = r#"
[experiment]
name = "h"
[model]
preset = "micro/2"
input_size = 8
in_channels = 1
num_classes = 10
[train]
data = "digits"
batch = 64
epochs = 1
precision = "f32"
device = "cpu"
[sample]
num_samples = 20
batch = 10
"#;

/// BASE with `key = value` set (the last `[section]` wins over an earlier line).
fn spec_with(dir: &Path, name: &str, edit: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, format!("{BASE}{edit}\n")).unwrap();
    path
}

#[test]
fn spec_values_that_would_change_results_are_refused_by_key() {
    let dir = temp_dir("spec-values");
    let cases: &[(&str, &str, &str)] = &[
        (
            "accum100",
            "[train]\ngrad_accumulation = 100",
            "train.grad_accumulation",
        ),
        (
            "accum-4",
            "[train]\ngrad_accumulation = -4",
            "train.grad_accumulation",
        ),
        (
            "accum3",
            "[train]\ngrad_accumulation = 3",
            "train.grad_accumulation",
        ),
        (
            "nan-schedule",
            "[sample]\nschedules = [[1.0, nan, 0.0]]",
            "sample.schedules",
        ),
        (
            "same-steps",
            "[sample]\nschedules = [[1.0, 0.5, 0.0], [1.0, 0.25, 0.0]]",
            "sample.schedules",
        ),
        ("norm-p-inf", "[meanflow]\nnorm_p = inf", "meanflow.norm_p"),
        (
            "norm-eps-inf",
            "[meanflow]\nnorm_eps = inf",
            "meanflow.norm_eps",
        ),
        ("p-std-inf", "[meanflow]\nP_std = inf", "meanflow.P_std"),
        ("p-mean-nan", "[meanflow]\nP_mean = nan", "meanflow.P_mean"),
        ("omega-inf", "[meanflow]\nomega = inf", "meanflow.omega"),
        ("lr-inf", "[train]\nlr = inf", "train.lr"),
        ("clip-nan", "[train]\ngrad_clip = nan", "train.grad_clip"),
        (
            "epochs-max",
            "[train]\nepochs = 9223372036854775807",
            "train.epochs",
        ),
        (
            "betas-3",
            "[train]\nbetas = [0.9, 0.95, 0.99]",
            "train.betas",
        ),
        ("betas-1", "[train]\nbetas = [0.9]", "train.betas"),
        ("depth-huge", "[model]\ndepth = 100000", "model.depth"),
        (
            "tolerance-nan",
            "[paper]\ntolerance = nan",
            "paper.tolerance",
        ),
        (
            "samples-0",
            "[sample]\nnum_samples = 0",
            "sample.num_samples",
        ),
        // Fewer samples than precision and recall's neighbours: refused before training, not
        // a panic in the evaluate stage.
        (
            "samples-3",
            "[sample]\nnum_samples = 3",
            "sample.num_samples",
        ),
        // (l + eps)^p overflows: the weighted loss would be 0 and nothing would train.
        (
            "norm-p-huge",
            "[meanflow]\nnorm_p = 1e308",
            "meanflow.norm_p",
        ),
        (
            "classes-float",
            "[model]\nnum_classes = 2e24",
            "model.num_classes",
        ),
        (
            "classes-huge",
            "[model]\nnum_classes = 9223372036854775807",
            "model.num_classes",
        ),
    ];
    for (name, edit, key) in cases {
        // Re-opening a section is a TOML error: put the edit's key into the base's section,
        // replacing the base's own line for it.
        let (section, body) = edit.split_once('\n').unwrap();
        let leaf = body.split(" = ").next().unwrap();
        let base: String = BASE
            .lines()
            .filter(|l| !l.starts_with(&format!("{leaf} = ")))
            .map(|l| format!("{l}\n"))
            .collect();
        let text = if base.contains(section) {
            base.replacen(section, &format!("{section}\n{body}"), 1)
        } else {
            format!("{base}{edit}\n")
        };
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = mfr(&dir, &["resolve", path.to_str().unwrap()]);
        refused(&out, key);
    }
}

#[test]
fn an_unknown_paper_row_is_refused_before_any_work() {
    let dir = temp_dir("spec-paper-row");
    let path = spec_with(&dir, "row", "[paper]\nrows = [\"table1a.nope\"]");
    for command in ["resolve", "check", "run"] {
        let stderr = refused(
            &mfr(&dir, &[command, path.to_str().unwrap()]),
            "table1a.nope",
        );
        assert!(stderr.contains("[paper] rows"), "{command}: {stderr}");
    }
    assert!(!dir.join("results").exists(), "nothing trained");
}

#[test]
fn experiment_names_are_one_plain_folder() {
    let dir = temp_dir("spec-names");
    for (i, name) in ["../../x", "/tmp/abs", "", ".", "..", "a/b", ".hidden"]
        .iter()
        .enumerate()
    {
        let text = BASE.replacen("name = \"h\"", &format!("name = {name:?}"), 1);
        let path = dir.join(format!("name{i}.toml"));
        std::fs::write(&path, text).unwrap();
        refused(
            &mfr(&dir, &["resolve", path.to_str().unwrap()]),
            "experiment.name",
        );
    }
    assert!(!dir.join("x").exists() && !dir.parent().unwrap().join("x").exists());
}

#[test]
fn sweep_points_that_collide_are_refused() {
    let dir = temp_dir("spec-sweep");
    let path = spec_with(&dir, "sweep", "[sweep]\n\"meanflow.omega\" = [2.0, 2.0]");
    refused(
        &mfr(&dir, &["resolve", path.to_str().unwrap()]),
        "omega=2.0",
    );
}

#[test]
fn a_network_beyond_memory_is_refused_with_the_numbers() {
    let dir = temp_dir("spec-memory");
    let path = dir.join("huge.toml");
    let text = BASE.replacen(
        "preset = \"micro/2\"",
        "depth = 1024\nhidden_size = 65536\nnum_heads = 16\npatch_size = 2",
        1,
    );
    std::fs::write(&path, text).unwrap();
    let stderr = refused(&mfr(&dir, &["train", path.to_str().unwrap()]), "GiB");
    assert!(
        stderr.contains("parameters") && stderr.contains("can hold"),
        "{stderr}"
    );
}

// --- Files crafted for the evaluator ----------------------------------------------------------

/// An .npz of raw members (name, .npy bytes).
fn npz(path: &Path, members: &[(&str, Vec<u8>)]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let options =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in members {
        zip.start_file(format!("{name}.npy"), options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

fn u8_images(shape: &[usize]) -> Vec<u8> {
    let n: usize = shape.iter().product();
    npy::encode(
        "|u1",
        shape,
        &(0..n).map(|i| (i * 37 % 251) as u8).collect::<Vec<_>>(),
    )
}

fn f64_array(shape: &[usize], values: impl Fn(usize) -> f64) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let body: Vec<u8> = (0..n).flat_map(|i| values(i).to_le_bytes()).collect();
    npy::encode("<f8", shape, &body)
}

/// A version-1 .npy whose header-length field says `len`, followed by `rest`.
fn raw_npy(len: u16, rest: &[u8]) -> Vec<u8> {
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(rest);
    out
}

#[test]
fn crafted_evaluator_inputs_get_one_sentence() {
    let dir = temp_dir("evaluate-inputs");
    let good = dir.join("good.npz");
    npz(&good, &[("arr_0", u8_images(&[6, 16, 16, 3]))]);
    let d = 2048usize;
    let stats = |name: &str, sigma: Vec<u8>, mu: Vec<u8>| {
        let path = dir.join(name);
        npz(&path, &[("mu", mu), ("sigma", sigma)]);
        path
    };
    let cases: Vec<(&str, PathBuf, PathBuf, &str)> = vec![
        (
            "few samples",
            good.clone(),
            {
                let p = dir.join("three.npz");
                npz(&p, &[("arr_0", u8_images(&[3, 16, 16, 3]))]);
                p
            },
            "at least 4",
        ),
        (
            "few references",
            {
                let p = dir.join("ref3.npz");
                npz(&p, &[("arr_0", u8_images(&[3, 16, 16, 3]))]);
                p
            },
            good.clone(),
            "at least 4",
        ),
        (
            "header shorter than 2",
            good.clone(),
            {
                let p = dir.join("h1.npz");
                npz(&p, &[("arr_0", raw_npy(1, b"{"))]);
                p
            },
            "h1.npz",
        ),
        (
            "header length beyond the file",
            good.clone(),
            {
                let p = dir.join("hbig.npz");
                npz(&p, &[("arr_0", raw_npy(60_000, b"{'descr'"))]);
                p
            },
            "hbig.npz",
        ),
        (
            "zero height",
            good.clone(),
            {
                let p = dir.join("zero.npz");
                npz(&p, &[("arr_0", npy::encode("|u1", &[6, 0, 16, 3], &[]))]);
                p
            },
            "no images",
        ),
        (
            "overflowing count",
            good.clone(),
            {
                let p = dir.join("overflow.npz");
                npz(
                    &p,
                    &[(
                        "arr_0",
                        npy::encode("|u1", &[usize::MAX / 2, 4096, 4096, 3], &[]),
                    )],
                );
                p
            },
            "overflow.npz",
        ),
        (
            "huge declared shape",
            good.clone(),
            {
                let p = dir.join("huge.npz");
                npz(
                    &p,
                    &[(
                        "arr_0",
                        npy::encode("|u1", &[100_000, 4096, 4096, 3], &[1, 2, 3]),
                    )],
                );
                p
            },
            "huge.npz",
        ),
        (
            "channel-first data",
            good.clone(),
            {
                let p = dir.join("nchw.npz");
                npz(&p, &[("arr_0", u8_images(&[6, 3, 16, 3]))]);
                p
            },
            "channel-first",
        ),
        (
            "mu of the wrong shape",
            stats(
                "mu-shape.npz",
                f64_array(&[d, d], |i| (i % (d + 1) == 0) as u8 as f64),
                f64_array(&[10], |_| 0.0),
            ),
            good.clone(),
            "(2048,)",
        ),
        (
            "sigma not symmetric",
            stats(
                "asym.npz",
                f64_array(&[d, d], |i| {
                    if i == 1 {
                        5.0
                    } else {
                        (i % (d + 1) == 0) as u8 as f64
                    }
                }),
                f64_array(&[d], |_| 0.0),
            ),
            good.clone(),
            "not symmetric",
        ),
        (
            "sigma not PSD",
            stats(
                "npsd.npz",
                f64_array(&[d, d], |i| {
                    if i == 0 {
                        -3.0
                    } else {
                        (i % (d + 1) == 0) as u8 as f64
                    }
                }),
                f64_array(&[d], |_| 0.0),
            ),
            good.clone(),
            "negative eigenvalue",
        ),
    ];
    for (what, reference, samples, expected) in cases {
        let out = mfr(
            &dir,
            &[
                "evaluate",
                reference.to_str().unwrap(),
                samples.to_str().unwrap(),
                "--batch",
                "4",
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted\n{stderr}");
        refused(&out, expected);
    }
}

#[test]
fn a_png_folder_of_mixed_sizes_is_named_without_a_stack() {
    let dir = temp_dir("pngs");
    let pngs = dir.join("pngs");
    std::fs::create_dir_all(&pngs).unwrap();
    for (i, side) in [16u32, 16, 16, 20, 16].iter().enumerate() {
        image::RgbImage::from_pixel(*side, *side, image::Rgb([i as u8 * 40, 9, 9]))
            .save(pngs.join(format!("{i}.png")))
            .unwrap();
    }
    reference_batch(&dir);
    let out = mfr(&dir, &["evaluate", "ref.npz", "pngs", "--batch", "8"]);
    refused(&out, "3.png");
}

// --- Sweeps that would abort or name folders badly -------------------------------------------

#[test]
fn a_sweep_of_too_many_points_is_refused_before_it_is_built() {
    let dir = temp_dir("spec-sweep-size");
    // 10^8 points: counted, not built (building them aborted on allocation).
    let values: Vec<String> = (0..100).map(|i| format!("{}", 1.0 + i as f64)).collect();
    let list = values.join(", ");
    let path = spec_with(
        &dir,
        "huge",
        &format!(
            "[sweep]\n\"meanflow.omega\" = [{list}]\n\"meanflow.P_mean\" = [{list}]\n\"train.lr\" = [{list}]\n\"train.seed\" = [{}]",
            (0..100).map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
        ),
    );
    refused(
        &mfr(&dir, &["resolve", path.to_str().unwrap()]),
        "10000 runs",
    );
}

#[test]
fn a_sweep_value_with_a_control_character_names_no_folder() {
    let dir = temp_dir("spec-sweep-newline");
    let path = spec_with(&dir, "nl", "[sweep]\n\"sample.vae\" = [\"a\\nb\", \"c\"]");
    refused(
        &mfr(&dir, &["run", path.to_str().unwrap(), "--dry-run"]),
        "control character",
    );
    assert!(!dir.join("results").exists());
}

// --- Numbers from the environment ---------------------------------------------------------------

#[test]
fn durations_from_the_environment_are_range_checked() {
    let dir = temp_dir("env-ranges");
    let path = spec_with(&dir, "env", "");
    for (key, value) in [
        ("MFR_DIST_TIMEOUT", "inf"),
        ("MFR_DIST_TIMEOUT", "1e30"),
        ("MFR_DIST_TIMEOUT", "-5"),
        ("MFR_LOG_INTERVAL", "1e30"),
        ("MFR_LOG_INTERVAL", "nan"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_mfr"))
            .args(["resolve", path.to_str().unwrap()])
            .env(key, value)
            .output()
            .unwrap();
        let stderr = refused(&out, key);
        assert!(stderr.contains("seconds in ["), "{stderr}");
    }
    let out = mfr(
        &dir,
        &[
            "launch",
            "--nproc",
            "1",
            "--timeout",
            "1e30",
            path.to_str().unwrap(),
        ],
    );
    refused(&out, "--timeout");
}

// --- What mfr writes: never through a link, never over a device -------------------------------

/// `mfr bench train` on the smallest network, one step: the cheapest command with --json.
fn bench_json(dir: &Path, json: &Path) -> Output {
    mfr(
        dir,
        &[
            "bench",
            "train",
            "--model",
            "micro/2",
            "--batch",
            "2",
            "--precision",
            "f32",
            "--device",
            "cpu",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--json",
            json.to_str().unwrap(),
        ],
    )
}

fn is_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

#[test]
fn a_json_output_is_written_through_links_and_devices_never_replacing_them() {
    use std::os::unix::fs::FileTypeExt;
    let dir = temp_dir("json-targets");
    // A symlink the user pointed at their own file: the file gets the JSON, the link stays.
    let mine = dir.join("mine.json");
    std::fs::write(&mine, "old").unwrap();
    let link = dir.join("link.json");
    std::os::unix::fs::symlink(&mine, &link).unwrap();
    let out = bench_json(&dir, &link);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::read_to_string(&mine)
        .unwrap()
        .contains("ms_per_step"));

    // A FIFO with a reader: the JSON goes down the pipe, the FIFO stays a FIFO.
    let fifo = dir.join("out.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
    };
    // The reader must have opened the FIFO before mfr writes (mfr refuses a FIFO nobody reads).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = bench_json(&dir, &fifo);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(reader.join().unwrap().contains("ms_per_step"));
    assert!(is_fifo(&fifo), "the FIFO was replaced");

    // A FIFO nobody reads: one sentence at once, not a hang.
    let lonely = dir.join("lonely.fifo");
    assert!(Command::new("mkfifo")
        .arg(&lonely)
        .status()
        .unwrap()
        .success());
    refused(&bench_json(&dir, &lonely), "no reader");
    assert!(is_fifo(&lonely));

    // A character device (a twin of /dev/null, where mknod is allowed): written into, not
    // replaced by a regular file.
    let twin = dir.join("null");
    let made = Command::new("mknod")
        .args([twin.to_str().unwrap(), "c", "1", "3"])
        .status()
        .is_ok_and(|s| s.success());
    if made {
        let out = bench_json(&dir, &twin);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let kind = std::fs::symlink_metadata(&twin).unwrap().file_type();
        assert!(
            kind.is_char_device(),
            "the device was replaced by a {kind:?}"
        );
    }
    // A directory is refused by name.
    refused(&bench_json(&dir, &dir), "a folder");
}

#[test]
fn a_symlinked_lock_or_log_in_a_run_is_not_written_through() {
    let dir = temp_dir("run-links");
    let spec = common::micro_spec(&dir, "links", "epochs = 1\n");
    let run = dir.join("results/links/default");
    std::fs::create_dir_all(&run).unwrap();
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, run.join("lock")).unwrap();
    refused(
        &mfr(&dir, &["train", spec.to_str().unwrap()]),
        "symbolic link",
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");

    // The same for the append-only log once the lock is a file again.
    std::fs::remove_file(run.join("lock")).unwrap();
    std::os::unix::fs::symlink(&victim, run.join("stats.jsonl")).unwrap();
    refused(
        &mfr(&dir, &["train", spec.to_str().unwrap()]),
        "symbolic link",
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
}

#[test]
fn an_overflowing_distance_names_the_reference_and_a_zero_batch_the_batch() {
    let dir = temp_dir("evaluate-overflow");
    let samples = dir.join("samples.npz");
    npz(&samples, &[("arr_0", u8_images(&[6, 16, 16, 3]))]);
    // Finite statistics whose distance to anything overflows: |mu|^2 = 2048e400.
    let d = 2048usize;
    let reference = dir.join("huge-mu.npz");
    npz(
        &reference,
        &[
            ("mu", f64_array(&[d], |_| 1e200)),
            (
                "sigma",
                f64_array(&[d, d], |i| f64::from(u8::from(i % (d + 1) == 0))),
            ),
        ],
    );
    let stderr = refused(
        &mfr(&dir, &["evaluate", "huge-mu.npz", "samples.npz"]),
        "not finite",
    );
    assert!(stderr.contains("huge-mu.npz"), "{stderr}");
    let stderr = refused(
        &mfr(
            &dir,
            &["evaluate", "samples.npz", "samples.npz", "--batch", "0"],
        ),
        "batch",
    );
    assert!(!stderr.contains("no images"), "{stderr}");
}

// --- Readers, round two: non-regular files, loops, sizes, budgets, duplicates ----------------

/// `mfr` with a deadline: a reader that blocks (on a FIFO, in a loop) fails the test, naming the
/// command, instead of hanging the suite.
fn mfr_within(dir: &Path, args: &[&str], secs: u64) -> Output {
    let mut child = command(dir, args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("mfr {args:?} still running after {secs} s: it hangs");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// The SD-VAE with random weights the Makefile writes for the VAE tests (full size: what
/// `prepare-imagenet --vae FILE` loads).
fn vae_fixture() -> PathBuf {
    let dir = std::env::var_os("MFR_VAE_FIXTURES").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/vae-fixtures"),
        PathBuf::from,
    );
    let path = dir.join("sd/diffusion_pytorch_model.safetensors");
    assert!(
        path.exists(),
        "{}: missing (run `make test`, which writes the fixtures first)",
        path.display()
    );
    path
}

/// `mfr prepare-imagenet` over `train` into `prepared/` with the fixture VAE on the CPU: 64-pixel
/// crops.
fn prepare_imagenet(dir: &Path, train: &Path, extra: &[&str]) -> Output {
    let vae = vae_fixture();
    let mut args = vec![
        "prepare-imagenet",
        train.to_str().unwrap(),
        "prepared",
        "--vae",
        vae.to_str().unwrap(),
        "--device",
        "cpu",
        "--size",
        "64",
        "--batch",
        "2",
    ];
    args.extend_from_slice(extra);
    mfr_within(dir, &args, 120)
}

/// dir/ref.npz: a reference batch of 6 images of 16 x 16.
fn reference_batch(dir: &Path) {
    npz(
        &dir.join("ref.npz"),
        &[("arr_0", u8_images(&[6, 16, 16, 3]))],
    );
}

/// A PNG folder the evaluator takes: 6 images of 16 x 16.
fn png_folder(dir: &Path, name: &str) -> PathBuf {
    let pngs = dir.join(name);
    std::fs::create_dir_all(&pngs).unwrap();
    for i in 0..6u8 {
        image::RgbImage::from_pixel(16, 16, image::Rgb([i * 40, 9, 9]))
            .save(pngs.join(format!("{i}.png")))
            .unwrap();
    }
    pngs
}

#[test]
fn non_regular_files_are_refused_by_every_reader_before_they_block() {
    let dir = temp_dir("fifos");
    let fifo = dir.join("weights.pth");
    mkfifo(&fifo);
    let socket_path = dir.join("weights.sock");
    let _socket = std::os::unix::net::UnixListener::bind(&socket_path).unwrap();
    reference_batch(&dir);
    // An orbax checkpoint folder whose `checkpoint` is a FIFO.
    let orbax = dir.join("checkpoint_7");
    std::fs::create_dir_all(&orbax).unwrap();
    mkfifo(&orbax.join("checkpoint"));
    // A PNG folder with a FIFO among its images.
    let pngs = png_folder(&dir, "pngs");
    mkfifo(&pngs.join("9.png"));
    // A latent folder (where the spec's data is) with a FIFO among its latents.
    common::latent_tree(&dir.join("data"), 8, None);
    mkfifo(&dir.join("data/vae-sd/00000/img-mean-std-00000099.npy"));
    let spec = common::micro_spec(&dir, "fifo", "epochs = 1\n");
    // An ImageNet-layout folder with a FIFO among its photos.
    let train = dir.join("train");
    std::fs::create_dir_all(train.join("n0001")).unwrap();
    mkfifo(&train.join("n0001/a.JPEG"));

    let f = fifo.to_str().unwrap();
    let cases: Vec<(&str, Output, &str)> = vec![
        (
            "import a FIFO",
            mfr_within(&dir, &["import", f], 30),
            "FIFO",
        ),
        (
            "import a character device",
            mfr_within(&dir, &["import", "/dev/null"], 30),
            "character device",
        ),
        (
            "import a socket",
            mfr_within(&dir, &["import", socket_path.to_str().unwrap()], 30),
            "socket",
        ),
        (
            "import an orbax folder",
            mfr_within(&dir, &["import", orbax.to_str().unwrap()], 30),
            "FIFO",
        ),
        (
            "evaluate a FIFO",
            mfr_within(&dir, &["evaluate", "ref.npz", f, "--batch", "4"], 60),
            "FIFO",
        ),
        (
            "evaluate a PNG folder",
            mfr_within(&dir, &["evaluate", "ref.npz", "pngs", "--batch", "4"], 120),
            "FIFO",
        ),
        (
            "Inception weights",
            mfr_within(
                &dir,
                &["evaluate", "ref.npz", "ref.npz", "--inception", f],
                60,
            ),
            "FIFO",
        ),
        (
            "train on a latent folder",
            mfr_within(&dir, &["train", spec.to_str().unwrap()], 60),
            "FIFO",
        ),
        (
            "prepare an image folder",
            prepare_imagenet(&dir, &train, &[]),
            "FIFO",
        ),
    ];
    for (what, out, expected) in &cases {
        eprintln!("{what}");
        refused(out, expected);
    }
    println!("non-regular files: {} cases refused", cases.len());
}

#[test]
fn symlink_loops_in_walked_folders_end_in_a_sentence() {
    let dir = temp_dir("loops");
    let mut cases = Vec::new();
    // A latent folder with a link back to its parent, and one with two links to one folder.
    for (name, links) in [
        ("loop", vec![("vae-sd/00000/up", "..")]),
        ("twice", vec![("vae-sd/a", "00000"), ("vae-sd/b", "00000")]),
    ] {
        // The spec's latent folder is root/data.
        let root = dir.join(name);
        common::latent_tree(&root.join("data"), 8, None);
        for (link, target) in links {
            std::os::unix::fs::symlink(target, root.join("data").join(link)).unwrap();
        }
        let spec = common::micro_spec(&root, name, "epochs = 1\n");
        cases.push((
            name,
            mfr_within(&root, &["train", spec.to_str().unwrap()], 60),
            "reached twice",
        ));
    }
    // A folder of flax checkpoints whose newest links to the folder itself.
    let ckpts = dir.join("ckpts");
    std::fs::create_dir_all(&ckpts).unwrap();
    std::os::unix::fs::symlink(".", ckpts.join("checkpoint_9")).unwrap();
    cases.push((
        "flax folder",
        mfr_within(&dir, &["import", ckpts.to_str().unwrap()], 30),
        "checkpoint_9",
    ));
    for (what, out, expected) in &cases {
        eprintln!("{what}");
        refused(out, expected);
    }
    println!("symlink loops: {} cases refused", cases.len());
}

/// A PNG whose header declares `w` x `h` RGB pixels, with one empty IDAT chunk: what a reader
/// learns from the header alone.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut crc = flate2::Crc::new();
        crc.update(&out[start..]);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

/// A real 16 x 16 JPEG whose frame header (SOF0) is rewritten to declare `w` x `h`.
fn jpeg_header(w: u16, h: u16) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(16, 16, image::Rgb([90, 120, 150]));
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut bytes)
        .encode_image(&img)
        .unwrap();
    let sof = bytes
        .windows(2)
        .position(|m| m == [0xff, 0xc0])
        .expect("a baseline JPEG");
    bytes[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    bytes
}

#[test]
fn images_beyond_the_pixel_budget_are_refused_from_their_header() {
    let dir = temp_dir("pixels");
    let strip = |w: u32, h: u32| {
        let mut bytes = Vec::new();
        image::RgbImage::from_pixel(w, h, image::Rgb([1, 2, 3]))
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageOutputFormat::Png,
            )
            .unwrap();
        bytes
    };
    let files: Vec<(&str, Vec<u8>, &str)> = vec![
        ("wide.png", strip(100_000, 1), "100000 x 1 image"),
        ("tall.png", strip(1, 100_000), "1 x 100000 image"),
        (
            "huge.png",
            png_header(65_536, 65_536),
            "65536 x 65536 pixels",
        ),
        (
            "huge.JPEG",
            jpeg_header(65_500, 65_500),
            "65500 x 65500 pixels",
        ),
    ];
    let mut cases = 0;
    for (name, bytes, expected) in &files {
        let train = dir.join(format!("train-{name}"));
        std::fs::create_dir_all(train.join("n0001")).unwrap();
        std::fs::write(train.join("n0001").join(name), bytes).unwrap();
        let stderr = refused(&prepare_imagenet(&dir, &train, &[]), expected);
        assert!(stderr.contains(name), "{stderr}");
        cases += 1;
    }
    // The evaluator reads a PNG folder through the same budget.
    let pngs = png_folder(&dir, "pngs");
    std::fs::write(pngs.join("7.png"), png_header(65_536, 65_536)).unwrap();
    reference_batch(&dir);
    refused(
        &mfr_within(&dir, &["evaluate", "ref.npz", "pngs", "--batch", "4"], 120),
        "65536 x 65536 pixels",
    );
    cases += 1;
    println!("pixel budget: {cases} cases refused");
}

#[test]
fn prepare_sizes_and_batches_are_checked_before_any_work() {
    let dir = temp_dir("sizes");
    let train = dir.join("train");
    std::fs::create_dir_all(train.join("n0001")).unwrap();
    image::RgbImage::from_pixel(40, 40, image::Rgb([5, 5, 5]))
        .save(train.join("n0001/a.png"))
        .unwrap();
    let t = train.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["bench", "prepare", t, "--size", "0"], "--size 0"),
        (&["bench", "prepare", t, "--size", "7"], "multiple of 8"),
        (&["bench", "prepare", t, "--size", "8192"], "from 8 to 4096"),
        (&["bench", "prepare", t, "--batch", "0"], "--batch 0"),
        (&["prepare-imagenet", t, "out", "--size", "0"], "--size 0"),
        (
            &["prepare-imagenet", t, "out", "--size", "7"],
            "multiple of 8",
        ),
        (&["prepare-imagenet", t, "out", "--batch", "0"], "--batch 0"),
    ];
    for (args, expected) in cases {
        // Checked before the VAE is looked for: the default asset is not in this cache.
        let stderr = refused(&mfr_within(&dir, args, 30), expected);
        assert!(!stderr.contains("sd-vae"), "{stderr}");
    }
    assert!(!dir.join("out").exists());
    println!("sizes: {} cases refused", cases.len());
}

// --- Crafted flax msgpack files ---------------------------------------------------------------

/// flax's ndarray extension: msgpack of (shape, dtype name, bytes).
fn flax_array(shape: &[u64], dtype: &str, bytes: Vec<u8>) -> rmpv::Value {
    use rmpv::Value as V;
    let inner = V::Array(vec![
        V::Array(shape.iter().map(|&d| V::from(d)).collect()),
        V::from(dtype),
        V::Binary(bytes),
    ]);
    let mut payload = Vec::new();
    rmpv::encode::write_value(&mut payload, &inner).unwrap();
    V::Ext(1, payload)
}

fn map(entries: Vec<(&str, rmpv::Value)>) -> rmpv::Value {
    rmpv::Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

/// A training state holding `leaf` as its one parameter: `{params: {net: {x: leaf}}}`.
fn flax_state(leaf: rmpv::Value) -> Vec<u8> {
    let state = map(vec![("params", map(vec![("net", map(vec![("x", leaf)]))]))]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &state).unwrap();
    out
}

fn chunked(shape: &[u64], chunks: Vec<rmpv::Value>) -> rmpv::Value {
    let dict = |items: Vec<rmpv::Value>| {
        rmpv::Value::Map(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (i.to_string().into(), v))
                .collect(),
        )
    };
    map(vec![
        ("__msgpack_chunked_array__", true.into()),
        ("shape", dict(shape.iter().map(|&d| d.into()).collect())),
        ("chunks", dict(chunks)),
    ])
}

#[test]
fn flax_files_declaring_what_they_do_not_hold_are_refused() {
    let dir = temp_dir("flax");
    let f32s = |n: usize| vec![0u8; 4 * n];
    let deep = (0..200).fold(rmpv::Value::Nil, |v, _| rmpv::Value::Array(vec![v]));
    // {params: [0, 0, ... 5M times]}: 5 MB that rmpv would build into a 200 MB tree.
    let mut many = vec![0x81, 0xa6];
    many.extend_from_slice(b"params");
    rmp::encode::write_array_len(&mut many, 5_000_000).unwrap();
    many.resize(many.len() + 5_000_000, 0);
    let mut trailing = flax_state(flax_array(&[2], "float32", f32s(2)));
    trailing.push(0xc0);
    let twice = {
        let net = rmpv::Value::Map(vec![
            ("x".into(), flax_array(&[2], "float32", f32s(2))),
            ("x".into(), flax_array(&[2], "float32", f32s(2))),
        ]);
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &map(vec![("params", map(vec![("net", net)]))]))
            .unwrap();
        out
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("no chunks", flax_state(chunked(&[4], vec![])), "no chunks"),
        (
            "a 2-D chunk",
            flax_state(chunked(&[4], vec![flax_array(&[2, 2], "float32", f32s(4))])),
            "not 1-D",
        ),
        (
            "an absurd shape",
            flax_state(chunked(
                &[1 << 40, 1 << 40],
                vec![flax_array(&[4], "float32", f32s(4))],
            )),
            "chunks hold 4 values",
        ),
        (
            "chunks short of the shape",
            flax_state(chunked(&[3, 4], vec![flax_array(&[4], "float32", f32s(4))])),
            "chunks hold 4 values",
        ),
        (
            "chunks of two dtypes",
            flax_state(chunked(
                &[4],
                vec![
                    flax_array(&[2], "float32", f32s(2)),
                    flax_array(&[2], "float64", vec![0; 16]),
                ],
            )),
            "chunk 1 is Double",
        ),
        (
            "an array larger than its bytes",
            flax_state(flax_array(&[1_000_000, 1_000_000], "float32", f32s(1))),
            "holds 4 bytes",
        ),
        (
            "a complex extension",
            flax_state(rmpv::Value::Ext(2, vec![0x92, 0, 0])),
            "extension 2",
        ),
        ("a key given twice", twice, "`x` twice"),
        (
            "5M one-byte values",
            many,
            "more values than a checkpoint holds",
        ),
        ("200 levels deep", flax_state(deep), "nesting deeper"),
        ("bytes after the end", trailing, "bytes after"),
    ];
    for (what, bytes, expected) in &cases {
        let path = dir.join("state.msgpack");
        std::fs::write(&path, bytes).unwrap();
        eprintln!("{what}");
        let stderr = refused(
            &mfr_within(&dir, &["import", path.to_str().unwrap()], 60),
            expected,
        );
        assert!(stderr.contains("state.msgpack"), "{stderr}");
    }
    println!("flax msgpack: {} cases refused", cases.len());
}

// --- Crafted torch.save files -----------------------------------------------------------------

/// A pickle (protocol 2) written opcode by opcode.
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn text(self, s: &str) -> Self {
        let mut p = self.op(b"X");
        p.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.op(s.as_bytes())
    }
    fn int(self, v: i64) -> Self {
        let mut p = self.op(b"\x8a\x08");
        p.0.extend_from_slice(&v.to_le_bytes());
        p
    }
    fn ints(self, values: &[i64]) -> Self {
        values.iter().fold(self.op(b"("), |p, &v| p.int(v)).op(b"t")
    }
    /// `_rebuild_tensor_v2` of float storage `key` (of `numel` floats) as `size` / `stride`.
    fn tensor(self, key: &str, numel: i64, size: &[i64], stride: &[i64]) -> Self {
        self.op(b"ctorch._utils\n_rebuild_tensor_v2\n(")
            .op(b"(")
            .text("storage")
            .op(b"ctorch\nFloatStorage\n")
            .text(key)
            .text("cpu")
            .int(numel)
            .op(b"tQ")
            .int(0)
            .ints(size)
            .ints(stride)
            .op(b"\x89ccollections\nOrderedDict\n)RtR")
    }
}

/// A torch.save archive of `pickle` and raw storage records (name, bytes, deflated?).
fn torch_archive(path: &Path, pickle: &Pickle, storages: &[(&str, &[u8], bool)]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let stored =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut data = pickle.0.clone();
    data.push(b'.');
    zip.start_file("archive/data.pkl", stored).unwrap();
    zip.write_all(&data).unwrap();
    zip.start_file("archive/byteorder", stored).unwrap();
    zip.write_all(b"little").unwrap();
    for (key, bytes, deflated) in storages {
        let options = if *deflated {
            stored
                .compression_method(zip::CompressionMethod::Deflated)
                .large_file(true)
        } else {
            stored
        };
        zip.start_file(format!("archive/data/{key}"), options)
            .unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

#[test]
fn torch_saves_that_expand_past_their_size_or_say_two_things_are_refused() {
    let dir = temp_dir("torch-saves");
    let one = 1.0f32.to_le_bytes();
    // 64 stride-0 views of one float, 64 MiB each: 4 GiB declared by a file of a few KB.
    let views = (0..64).fold(Pickle::default().op(b"\x80\x02}("), |p, i| {
        p.text(&format!("t{i}")).tensor("0", 1, &[1 << 24], &[0])
    });
    torch_archive(
        &dir.join("views.pth"),
        &views.op(b"u"),
        &[("0", &one, false)],
    );
    // A storage of 512 MiB of zeros, deflated to well under a MiB.
    let zeros = vec![0u8; 512 << 20];
    let bomb = Pickle::default()
        .op(b"\x80\x02}(")
        .text("w")
        .tensor("0", 128 << 20, &[128 << 20], &[1])
        .op(b"u");
    torch_archive(&dir.join("bomb.pth"), &bomb, &[("0", &zeros, true)]);
    drop(zeros);
    // Optimizer state with index 0 twice, under 'opt' / 'state'.
    let dup = Pickle::default()
        .op(b"\x80\x02}(")
        .text("opt")
        .op(b"}(")
        .text("state")
        .op(b"}(")
        .int(0)
        .int(1)
        .int(0)
        .int(2)
        .op(b"uuu");
    torch_archive(&dir.join("dup-keys.pth"), &dup, &[]);
    // 40 levels of lists holding the level below twice: 750 bytes that expand to 2^40 values.
    let laughs = (1..40u8).fold(
        Pickle::default().op(b"\x80\x02}").text("k0").op(b"]q\x01s"),
        |p, i| {
            p.text(&format!("k{i}"))
                .op(&[b']', b'(', b'h', i, b'h', i, b'e', b'q', i + 1, b's'])
        },
    );
    torch_archive(&dir.join("laughs.pth"), &laughs, &[]);
    // The same storage record twice in the archive.
    let small = Pickle::default()
        .op(b"\x80\x02}(")
        .text("w")
        .tensor("0", 1, &[1], &[1])
        .op(b"u");
    torch_archive(
        &dir.join("dup-records.pth"),
        &small,
        &[("0", &one, false), ("0", &2.0f32.to_le_bytes(), false)],
    );
    // A real SiT state dict with a class table of 10^9 rows (a stride-0 view), an input
    // convolution of 0 channels, a position table of 0 tokens, and a NaN.
    let flat = import_fixture("sit_flat.pth");
    let edit = "import sys, torch
sd = torch.load(sys.argv[1])
case, p = sys.argv[2], '_orig_mod.'
if case == 'rows': sd[p + 'y_embedder.embedding_table.weight'] = torch.zeros(1, 32).expand(10**9 + 1, 32)
if case == 'channels': sd[p + 'x_embedder.proj.weight'] = torch.zeros(32, 0, 2, 2)
if case == 'positions': sd[p + 'pos_embed'] = torch.zeros(1, 0, 32)
if case == 'nan': sd[p + 'blocks.0.attn.qkv.weight'][0, 0] = float('nan')
torch.save(sd, sys.argv[3])";
    for case in ["rows", "channels", "positions", "nan"] {
        let out = dir.join(format!("sit-{case}.pth"));
        common::run_python(edit, &[flat.to_str().unwrap(), case, out.to_str().unwrap()]);
    }
    let cases: &[(&str, &str)] = &[
        ("views.pth", "4 times"),
        ("bomb.pth", "4 times"),
        ("laughs.pth", "more than 2000000 values"),
        ("dup-keys.pth", "['opt']['state'] has the key 0 twice"),
        ("dup-records.pth", "two records named archive/data/0"),
        ("sit-rows.pth", "4 times"),
        ("sit-channels.pth", "0 input channels"),
        ("sit-positions.pth", "0 pixels a side"),
        ("sit-nan.pth", "blocks.0.attn.qkv.weight holds NaN"),
    ];
    for (file, expected) in cases {
        let out = dir.join(format!("{file}.safetensors"));
        let stderr = refused(
            &mfr_within(&dir, &["import", file, "--out", out.to_str().unwrap()], 60),
            expected,
        );
        // The input is named; nothing is left behind.
        assert!(stderr.contains(file), "{stderr}");
        assert!(!out.exists(), "{file}: an output was written");
    }
    println!("torch.save: {} cases refused", cases.len());
}

// --- Crafted .npy headers -----------------------------------------------------------------------

#[test]
fn npy_headers_with_a_repeated_or_odd_key_are_refused() {
    let dir = temp_dir("npy-headers");
    reference_batch(&dir);
    let body: Vec<u8> = (0..6 * 16 * 16 * 3).map(|i| (i % 251) as u8).collect();
    let with_header = |header: &str| {
        let mut h = header.to_owned();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        raw_npy(h.len() as u16, &[h.as_bytes(), &body].concat())
    };
    let shape = "(6, 16, 16, 3)";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "a repeated shape",
            format!("{{'descr': '|u1', 'fortran_order': False, 'shape': (1, 16, 16, 3), 'shape': {shape}, }}"),
            "gives `shape` twice",
        ),
        (
            "a capitalised key",
            format!("{{'descr': '|u1', 'fortran_order': False, 'Shape': {shape}, }}"),
            "\"Shape\" is not one of numpy's",
        ),
        (
            "an extra key",
            format!("{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, 'x': 1, }}"),
            "\"x\" is not one of numpy's",
        ),
        (
            "a key with a space",
            format!("{{'descr ': '|u1', 'fortran_order': False, 'shape': {shape}, }}"),
            "\"descr \" is not one of numpy's",
        ),
        (
            "a number for a shape",
            "{'descr': '|u1', 'fortran_order': False, 'shape': (6), }".to_owned(),
            "is a number, not a tuple",
        ),
        (
            "an escaped string",
            format!("{{'descr': '|\\u1', 'fortran_order': False, 'shape': {shape}, }}"),
            "escaped string",
        ),
        (
            "text after the dict",
            format!("{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }} x"),
            "text after",
        ),
    ];
    for (what, header, expected) in &cases {
        let path = dir.join("bad.npz");
        npz(&path, &[("arr_0", with_header(header))]);
        eprintln!("{what}");
        refused(
            &mfr_within(
                &dir,
                &["evaluate", "ref.npz", "bad.npz", "--batch", "4"],
                60,
            ),
            expected,
        );
    }
    // Python spells the same dict with double quotes and Python 2 longs: still numpy's header.
    let path = dir.join("good.npz");
    npz(
        &path,
        &[(
            "arr_0",
            with_header(
                "{\"descr\": \"|u1\", \"fortran_order\": False, \"shape\": (6L, 16L, 16L, 3L)}",
            ),
        )],
    );
    let mut npz_file = meanflow_repro::eval::npz::Npz::open(&path).unwrap();
    assert_eq!(npz_file.images("arr_0").unwrap().shape, [6, 16, 16, 3]);
    println!(".npy headers: {} cases refused", cases.len());
}

#[test]
fn inputs_naming_a_thing_twice_are_refused() {
    let dir = temp_dir("twice");
    reference_batch(&dir);
    npz(
        &dir.join("two.npz"),
        &[
            ("arr_0", u8_images(&[6, 16, 16, 3])),
            ("arr_0", u8_images(&[5, 16, 16, 3])),
        ],
    );
    refused(
        &mfr_within(
            &dir,
            &["evaluate", "ref.npz", "two.npz", "--batch", "4"],
            60,
        ),
        "two members named arr_0.npy",
    );
    // A label file that lists one latent twice (in the spec's latent folder, dir/data).
    common::latent_tree(&dir.join("data"), 8, None);
    let index = dir.join("data/vae-sd/dataset.json");
    let mut labels: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    let first = labels["labels"][0].clone();
    labels["labels"].as_array_mut().unwrap().push(first);
    std::fs::write(&index, labels.to_string()).unwrap();
    let spec = common::micro_spec(&dir, "twice", "epochs = 1\n");
    refused(
        &mfr_within(&dir, &["train", spec.to_str().unwrap()], 60),
        "listed twice",
    );
}
