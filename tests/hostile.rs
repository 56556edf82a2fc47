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

fn mfr(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mfr"))
        .args(args)
        .current_dir(dir)
        .env("MFR_CACHE", dir.join("cache"))
        .env("MFR_RESULTS", dir.join("results"))
        .env("MFR_REPORTS", dir.join("reports"))
        .env("MFR_DIST", "0")
        .output()
        .unwrap()
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
    let reference = dir.join("ref.npz");
    npz(&reference, &[("arr_0", u8_images(&[6, 16, 16, 3]))]);
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
    refused(&bench_json(&dir, &dir), "directory");
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
