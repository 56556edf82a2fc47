//! The headline job walked as a user walks it (issue 24), on stand-ins of every released file
//! the B/4 path downloads, served by a local imitation of their servers (tests/common/mirror.rs)
//! under their real asset names through a test manifest ($MFR_MANIFEST: the mirror's URLs, the
//! stand-ins' sha256 pinned): `mfr fetch` of each (the Google Drive files behind Drive's
//! interstitial), `make reproduce-b4 CKPT=<asset name>` and `CKPT=<the .pth>` and a trained
//! `make reproduce-b4` beside them (tiny and CPU-only through SET=), `mfr report`, the
//! discrepancy report with its control row, and `make report-check` in headless Chromium.
//! `make rehearse` runs this file alone.
//!
//! The stand-ins come from tools/make_standins.py (`make test` and `make rehearse` write them
//! into $MFR_STANDINS, default target/standins, first); the official JAX checkpoint is
//! tests/fixtures/flax/msgpack, written by the official code, zipped here as it is released.
mod common;
// Shared with tests/fetch.rs, which uses the misbehaviours this file does not.
#[allow(dead_code)]
#[path = "common/mirror.rs"]
mod mirror;

use common::temp_dir;
use meanflow_repro::import::{self, Summary};
use meanflow_repro::rundir::{checkpoint, RunDir};
use mirror::{Drive, Mirror, Server};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::Tensor;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const MFR: &str = env!("CARGO_BIN_EXE_mfr");

/// A stand-in tools/make_standins.py wrote (`make test` and `make rehearse` run it first).
fn standin(name: &str) -> PathBuf {
    common::generated("MFR_STANDINS", "target/standins", name)
}

/// The official code's checkpoint folder `checkpoint_1234/` (a msgpack `checkpoint` inside).
fn flax_folder() -> PathBuf {
    Path::new(REPO).join("tests/fixtures/flax/msgpack/checkpoint_1234")
}

/// A zip of `files` (name in the zip, file on disk).
fn zip_files(zip: &Path, files: &[(String, PathBuf)]) {
    let mut w = zip::ZipWriter::new(std::fs::File::create(zip).unwrap());
    for (name, file) in files {
        w.start_file(name.as_str(), zip::write::FileOptions::default())
            .unwrap();
        w.write_all(&std::fs::read(file).unwrap()).unwrap();
    }
    w.finish().unwrap();
}

/// The official checkpoint folder zipped under `top/` (`MF-B4/checkpoint_1234/checkpoint`, ...),
/// as a release zips the folder it trained into.
fn zipped_folder(zip: &Path, top: &str) {
    let files: Vec<(String, PathBuf)> = std::fs::read_dir(flax_folder())
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (format!("{top}/checkpoint_1234/{name}"), p)
        })
        .collect();
    zip_files(zip, &files);
}

fn import_to(file: &Path, out: &Path) -> Summary {
    let opts = import::Options {
        out: Some(out.to_owned()),
        preset: None,
        cache: out.parent().unwrap().join("cache"),
    };
    import::import(file, &opts).unwrap_or_else(|e| panic!("{}: {e:#}", file.display()))
}

/// The EMA tensors of an imported checkpoint, by name without `ema.`.
fn ema_of(out: &Path) -> BTreeMap<String, Tensor> {
    checkpoint::read_tensors(out)
        .unwrap()
        .into_iter()
        .filter_map(|(k, t)| Some((k.strip_prefix("ema.")?.to_owned(), t)))
        .collect()
}

#[test]
fn every_released_form_of_the_b4_weights_imports_to_one_network() {
    let dir = temp_dir("rehearse-forms");
    let single = dir.join("single.zip");
    zip_files(
        &single,
        &[("MF-B4.msgpack".to_owned(), flax_folder().join("checkpoint"))],
    );
    let folder_zip = dir.join("folder.zip");
    zipped_folder(&folder_zip, "MF-B4");
    let forms: [(&str, PathBuf); 6] = [
        ("checkpoint folder", flax_folder()),
        (
            "folder of checkpoints",
            flax_folder().parent().unwrap().to_owned(),
        ),
        ("msgpack file", flax_folder().join("checkpoint")),
        ("zip of the folder", folder_zip.clone()),
        ("zip of the msgpack file", single.clone()),
        ("the port's .pth", standin("meanflow-B4.pth")),
    ];
    let first = dir.join("form-0.safetensors");
    for (i, (form, path)) in forms.iter().enumerate() {
        let out = dir.join(format!("form-{i}.safetensors"));
        let summary = import_to(path, &out);
        assert_eq!(
            summary.preset.as_deref(),
            Some("micro/2 (t,t-r)"),
            "{form}: {summary}"
        );
        // The record names the release as given (a zip, not the file unpacked from it, which
        // is gone): the control row's provenance.
        let record = &checkpoint::read_metadata(&out).unwrap()["import"];
        let hashed = match path.is_dir() {
            true => meanflow_repro::import::flax::msgpack_file(path).unwrap(),
            false => path.clone(),
        };
        let sha = meanflow_repro::files::sha256_file(&hashed).unwrap();
        assert!(record.contains(&sha), "{form}: {record}");
        assert!(
            !dir.join(format!("form-{i}.unzipped.tmp")).exists(),
            "{form}: the unpacked zip was left behind"
        );
        let (want, got) = (ema_of(&first), ema_of(&out));
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>(),
            "{form}"
        );
        for (name, t) in &got {
            let diff = (t - &want[name]).abs().max().double_value(&[]);
            // The .pth's position table was computed by numpy in float64 and rounded, ours by
            // libtorch: the same sines to an ulp of float32 (values in [-1, 1]: 1.2e-7). Every
            // other tensor is the official code's own bytes, moved by name and layout rules
            // only: exact.
            let tolerance = if name == "pos_embed" { 2.5e-7 } else { 0.0 };
            assert!(diff <= tolerance, "{form}: {name} differs by {diff:e}");
        }
    }
}

/// A test manifest's entry: the shipped asset `name` served from `url`, pinned to `file`'s
/// size and sha256.
fn entry(name: &str, url: &str, file: &Path) -> String {
    format!(
        "[[asset]]\nname = \"{name}\"\nurl = \"{url}\"\nsize = {}\nsha256 = \"{}\"\n\n",
        std::fs::metadata(file).unwrap().len(),
        meanflow_repro::files::sha256_file(file).unwrap()
    )
}

/// Every released file the B/4 path downloads: its asset name, its file name as released, its
/// stand-in (none: the official checkpoint folder, zipped), and for a Google Drive file its id
/// and how Drive answers (the interstitial's form, or its older cookie token).
type Release = (
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<(&'static str, Drive)>,
);
#[rustfmt::skip]
const RELEASES: [Release; 7] = [
    ("meanflow-b4-jax", "meanflow-b4-jax.zip", None,
        Some(("19MR1WLycyqc627gsOJF4yzR4ZkU8fvOu", Drive::Form))),
    ("meanflow-b4-jax-fid-stats", "meanflow-b4-jax-fid-stats.npz", Some("fid-stats.npz"),
        Some(("1sESI-bE4SpB0noJ6VQ_OE6XAI_o4c-qK", Drive::Cookie))),
    ("meanflow-b4-pth", "meanflow-B4.pth", Some("meanflow-B4.pth"),
        Some(("1jcsM02gvPWe0IkXkZhDmLk6bIucsJG-b", Drive::Form))),
    ("VIRTUAL_imagenet256_labeled", "VIRTUAL_imagenet256_labeled.npz",
        Some("VIRTUAL_imagenet256_labeled.npz"), None),
    ("pt_inception", "pt_inception-2015-12-05-6726825d.pth", Some("pt_inception.pth"), None),
    ("sd-vae-ft-mse", "sd-vae-ft-mse.safetensors", Some("sd-vae.safetensors"), None),
    ("sd-vae-ft-ema", "sd-vae-ft-ema.safetensors", Some("sd-vae.safetensors"), None),
];

/// Serves the releases from `dir/served` (hard links where the file system allows) and writes
/// the manifest pinning them; returns the server and the manifest's path.
fn serve(dir: &Path) -> (Server, PathBuf) {
    let served = dir.join("served");
    std::fs::create_dir_all(&served).unwrap();
    let mut mirror = Mirror::new(&served);
    let mut text = String::new();
    let mut entries = Vec::new();
    for (name, file, source, drive) in RELEASES {
        let to = served.join(file);
        match source {
            None => zipped_folder(&to, "MF-B4"),
            Some(source) => {
                let source = standin(source);
                if std::fs::hard_link(&source, &to).is_err() {
                    std::fs::copy(&source, &to).unwrap();
                }
            }
        }
        if let Some((id, answer)) = drive {
            mirror = mirror.drive(id, file, answer);
        }
        entries.push((name, file, to, drive));
    }
    let server = mirror.start();
    for (name, file, path, drive) in entries {
        let url = match drive {
            Some((id, _)) => server.drive_url(id),
            None => server.url(file),
        };
        text += &entry(name, &url, &path);
    }
    let manifest = dir.join("manifest.toml");
    std::fs::write(&manifest, text).unwrap();
    (server, manifest)
}

/// A command with the rehearsal's environment: the test manifest, and a cache, results and
/// reports of its own (no mirror of the user's).
fn user(program: &str, dir: &Path, manifest: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(REPO)
        .env("MFR_MANIFEST", manifest)
        .env("MFR_CACHE", dir.join("cache"))
        .env("MFR_RESULTS", dir.join("results"))
        .env("MFR_REPORTS", dir.join("reports"))
        .env_remove("MFR_MIRROR")
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS");
    cmd
}

/// Runs `cmd`, asserting it succeeds; its output.
fn ok(cmd: &mut Command, what: &str) -> Output {
    let t = std::time::Instant::now();
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    println!("{what}: {:.1} s", t.elapsed().as_secs_f64());
    out
}

#[test]
fn mfr_import_of_an_asset_name_fetches_it_first() {
    let dir = temp_dir("rehearse-import-name");
    let (server, manifest) = serve(&dir);
    let out = dir.join("imported/b4.safetensors");
    let run = ok(
        user(MFR, &dir, &manifest)
            .args(["import", "meanflow-b4-jax", "--out"])
            .arg(&out),
        "mfr import meanflow-b4-jax",
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("meanflow-b4-jax.zip: official JAX (flax) checkpoint micro/2"),
        "{stdout}"
    );
    assert!(dir.join("cache/assets/meanflow-b4-jax.zip").is_file());
    // Through Drive's interstitial: the direct link, then the form's confirmation.
    let hits = server.hits();
    assert!(
        hits.iter().any(|h| h.target.contains("confirm=")),
        "{hits:?}"
    );
    assert_eq!(checkpoint::read_state(&out).unwrap().step, 1234);

    let none = user(MFR, &dir, &manifest)
        .args(["import", "meanflow-b4-jaks"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&none.stderr);
    assert!(
        !none.status.success()
            && stderr.lines().count() == 1
            && stderr
                .contains("meanflow-b4-jaks: no such file or folder, and no asset of that name"),
        "{stderr}"
    );
}

/// What makes B/4's specs tiny and CPU-only: the stand-ins' network, few samples, few
/// resamples. Both evaluations must agree on everything the control is matched by.
const TINY: &str = "model.preset=micro/2 model.num_classes=10 train.device=cpu \
    train.precision=f32 sample.num_samples=12 sample.batch=12 eval.batch=12 eval.bootstrap=2";

/// The 1-NFE FID of the run in `results/<experiment>/default`.
fn fid_1nfe(dir: &Path, experiment: &str) -> f64 {
    let run = RunDir::new(dir.join("results").join(experiment).join("default"));
    let metrics = run.read_metrics().unwrap().expect("an evaluated run");
    metrics.fid["1-NFE"]
}

#[test]
fn the_b4_path_walks_end_to_end_on_stand_ins() {
    let _serial = common::serial();
    let start = std::time::Instant::now();
    let dir = temp_dir("rehearse");
    let (_server, manifest) = serve(&dir);
    let mfr = |args: &[&str]| {
        let mut cmd = user(MFR, &dir, &manifest);
        cmd.args(args);
        cmd
    };
    let make = |args: &[String]| {
        let mut cmd = user("make", &dir, &manifest);
        cmd.arg("--no-print-directory")
            .arg(format!("RELEASE={MFR}"))
            .args(args);
        cmd
    };

    // 1. Every release fetched, hash checked; the listing says so.
    for (name, ..) in RELEASES {
        let out = ok(&mut mfr(&["fetch", name]), &format!("mfr fetch {name}"));
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("{name}: ")));
    }
    let listing = ok(&mut mfr(&["fetch"]), "mfr fetch (listing)");
    let listing = String::from_utf8_lossy(&listing.stdout);
    for (name, ..) in RELEASES {
        let line = listing.lines().find(|l| l.starts_with(&format!("{name} ")));
        assert!(
            line.is_some_and(|l| l.contains(" verified ")),
            "{name}: {line:?}"
        );
    }

    // 2. The released weights, both forms, through `make reproduce-b4 CKPT=`.
    let tiny = format!("SET={TINY}");
    let pth = dir.join("cache/assets/meanflow-B4.pth");
    // The second release at 1-NFE only: what it must agree on (each evaluating process spends
    // most of its time on the reference's 2048 x 2048 eigenproblems, whatever the sample size).
    for (ckpt, experiment, more) in [
        ("meanflow-b4-jax".to_owned(), "b4-public", ""),
        (
            pth.display().to_string(),
            "b4-public-pth",
            " sample.schedules=[[1.0,0.0]]",
        ),
    ] {
        let imported = dir.join(format!("imported/{experiment}.safetensors"));
        ok(
            &mut make(&[
                "reproduce-b4".to_owned(),
                format!("CKPT={ckpt}"),
                format!("IMPORTED={}", imported.display()),
                format!("{tiny} experiment.name={experiment}{more}"),
            ]),
            &format!("make reproduce-b4 CKPT={ckpt}"),
        );
        assert!(imported.is_file());
    }
    // One network in two releases: the same samples, the same FID (but for a rare pixel that
    // the position tables' last-bit difference rounds the other way).
    let (jax, pth_fid) = (fid_1nfe(&dir, "b4-public"), fid_1nfe(&dir, "b4-public-pth"));
    assert!(
        (jax - pth_fid).abs() <= 1e-3 * jax,
        "FID {jax} (JAX release) vs {pth_fid} (.pth)"
    );

    // 3. A trained run beside them: experiments/b4.toml's default row on stand-in latents, a
    // few steps, as `make reproduce-b4` runs it (check, then run) but for its first point only
    // (the omega = 3 ablation would double the time and walk nothing new).
    let data = dir.join("latents");
    // SD-VAE latents of ImageNet 256 (4 x 32 x 32) over the stand-ins' 10 classes.
    common::latents_of(&data, 24, [4, 32, 10], None);
    let mut sets = vec!["experiments/b4.toml".to_owned()];
    for kv in TINY.split_whitespace().map(str::to_owned).chain([
        format!("train.data={}", data.display()),
        "train.batch=8".to_owned(),
        "train.epochs=1".to_owned(),
    ]) {
        sets.extend(["--set".to_owned(), kv]);
    }
    let args = |first: &str| [first.to_owned()].into_iter().chain(sets.iter().cloned());
    ok(
        user(MFR, &dir, &manifest).args(args("check")),
        "mfr check experiments/b4.toml",
    );
    ok(
        user(MFR, &dir, &manifest)
            .args(args("run"))
            .args(["--point", "0", "--resume"]),
        "mfr run experiments/b4.toml --point 0 (trained)",
    );

    // 4. The report and the discrepancy report, its control row from the imported weights.
    let report = ok(
        &mut mfr(&["report", &dir.join("results/b4").display().to_string()]),
        "mfr report",
    );
    let index = PathBuf::from(String::from_utf8_lossy(&report.stdout).trim());
    assert!(index.is_file(), "{}", index.display());
    let written = ok(
        &mut mfr(&[
            "discrepancy",
            &dir.join("results/b4/default").display().to_string(),
        ]),
        "mfr discrepancy",
    );
    let path = PathBuf::from(String::from_utf8_lossy(&written.stdout).trim());
    let text = std::fs::read_to_string(&path).unwrap();
    let control = text
        .lines()
        .find(|l| l.contains("control: released weights"))
        .unwrap_or_else(|| panic!("no control row in {}:\n{text}", path.display()));
    assert!(
        control.contains("b4-public.safetensors") || control.contains("b4-public-pth.safetensors"),
        "the control row does not name the imported weights: {control}"
    );
    // The stand-in control is a micro network on 12 samples: it cannot miss or hold the paper.
    assert!(
        text.contains("The control is not comparable with the paper")
            && !text.contains("The control misses the paper too"),
        "{text}"
    );

    // 5. The rendered report in headless Chromium.
    if Command::new("chromium").arg("--version").output().is_err() {
        eprintln!("report-check skipped: Chromium is not installed (`apt-get install chromium`)");
    } else {
        ok(
            &mut make(&[
                "report-check".to_owned(),
                format!("REPORT={}", index.parent().unwrap().display()),
            ]),
            "make report-check",
        );
    }
    println!("the rehearsal took {:.0} s", start.elapsed().as_secs_f64());
}
