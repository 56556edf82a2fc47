//! Reports rendered from small synthetic results trees, written through the run directory's own
//! records: the HTML and Markdown name runs in the paper's terms, carry FID intervals, say which
//! runs the noise does not tell apart and whether the orderings agree, hold their plots, grids,
//! Markdown twins and discrepancy links; the discrepancy report is headed by its verdict, shows
//! a control from a run of released weights, and names files by hash, not by folder.
mod common;
use common::temp_dir;
use meanflow_repro::eval::bootstrap::{Interval, Method};
use meanflow_repro::eval::AdmScores;
use meanflow_repro::report::tables::{pearson, ranks};
use meanflow_repro::report::{discrepancy, render, sample_grid};
use meanflow_repro::rundir::{Contention, Env, Metrics, RunDir, SampleInputs, StatLine};
use meanflow_repro::spec::Spec;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

fn spec_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("experiments")
        .join(name)
}

/// A run directory of `spec` at `dir`, prepared, with a made-up training log.
fn prepared(dir: &RunDir, spec: &Spec) {
    let lock = dir.lock("the test", Contention::Refuse).unwrap();
    let env = Env {
        code_commit: "abc1234".into(),
        device: "NVIDIA H200".into(),
        cuda_driver: Some("13.0".into()),
        cuda_runtime: Some("12.8".into()),
        world_size: 8,
        command: "mfr run experiments/b4.toml".into(),
        ..Env::current(Ok(tch::Device::Cpu), 1)
    };
    dir.prepare(spec, &env, &lock).unwrap();
    let mut log = dir.stats_log(0).unwrap();
    for i in 1..=20u64 {
        log.append(&StatLine {
            step: i * 10,
            epoch: i / 5,
            loss: 1.0 - i as f64 * 0.01,
            v_loss: 3.0 / i as f64,
            adaptive_weight: Some(3.0 / i as f64 + 0.01),
            grad_norm: 1.0,
            lr: 1e-3,
            img_per_s: 100.0,
            wall_s: i as f64,
        })
        .unwrap();
    }
}

fn interval(fid: f64, half: f64) -> Interval {
    Interval {
        low: fid - half,
        high: fid + half,
        level: 0.95,
        resamples: 200,
        method: Method::HalfSamples,
    }
}

/// metrics.json of `fids` (NFE -> (FID, interval half-width)) scored against `reference`
/// (None: the training images).
fn metrics(
    spec: &Spec,
    fids: &[(i64, f64, f64)],
    reference: Option<&str>,
    inception: &str,
) -> Metrics {
    let key = |n: i64| format!("{n}-NFE");
    let adm = fids
        .iter()
        .map(|&(n, fid, half)| {
            let scores = AdmScores {
                inception_score: None,
                fid,
                sfid: Some(fid * 2.0),
                precision: Some(0.5),
                recall: Some(0.25),
                reference: reference.unwrap_or("digits training images").into(),
                samples: "samples.npz".into(),
                num_samples: spec.sample.num_samples as usize,
                num_reference: 1797,
                inception_weights: inception.into(),
                device: "cpu".into(),
                img_per_s: 10.0,
                fid_interval: Some(interval(fid, half)),
            };
            (key(n), scores)
        })
        .collect();
    Metrics {
        fid: fids.iter().map(|&(n, f, _)| (key(n), f)).collect(),
        fid_interval: fids
            .iter()
            .map(|&(n, f, h)| (key(n), interval(f, h)))
            .collect(),
        history: Vec::new(),
        adm,
        num_samples: spec.sample.num_samples,
        num_reference: 1797,
        note: String::new(),
        reference: reference.map(str::to_owned),
        inputs: SampleInputs {
            weights: "checkpoints/step-00000200.safetensors".into(),
            schedules: spec.sample.schedules.clone(),
            num_samples: spec.sample.num_samples,
            seed: 0,
            vae: (reference.is_some()).then(|| spec.sample.vae.clone()),
            steps: Vec::new(),
            precision: "float32".into(),
            labels: "balanced".into(),
        },
        inception_weights: inception.into(),
    }
}

/// results/demo-digits/<run> for three points of the demo spec: 25% and 50% r != t whose
/// intervals overlap, and 0% apart from both. A real grid and a sample grid for one of them.
fn demo_tree(root: &Path) -> PathBuf {
    let spec = Spec::load(&spec_file("demo-digits.toml")).unwrap();
    let exp = root.join("demo-digits");
    for (name, point) in spec.points("demo").unwrap() {
        let (fid, half) = match name.as_str() {
            "data_proportion=0.75" => (34.5, 3.0),
            "data_proportion=0.5" => (33.0, 3.0),
            "data_proportion=1.0" => (65.0, 4.0),
            _ => continue,
        };
        let dir = RunDir::new(exp.join(&name));
        prepared(&dir, &point);
        let m = metrics(
            &point,
            &[(1, fid, half), (2, fid - 3.0, half)],
            None,
            "/x/default_1.pt",
        );
        dir.write_metrics(&m).unwrap();
        if name == "data_proportion=0.75" {
            let images = Tensor::randint(255, [20, 8, 8, 3], (Kind::Uint8, tch::Device::Cpu));
            std::fs::create_dir_all(dir.samples()).unwrap();
            sample_grid(&images, 10, 2, &dir.grid(1)).unwrap();
            sample_grid(&images, 10, 2, &dir.real_grid()).unwrap();
        }
    }
    exp
}

#[test]
fn the_report_names_runs_by_paper_row_with_intervals_orderings_and_links() {
    let root = temp_dir("render");
    let exp = demo_tree(&root.join("results"));
    let out = render::report(&exp, &root.join("reports")).unwrap();
    assert_eq!(out, root.join("reports/demo-digits"));
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for text in [&html, &md] {
        // Runs in the paper's terms, the value with its interval beside the paper's.
        assert!(
            text.contains("| 25% r != t | `data_proportion=0.75` |")
                || html.contains(
                    "<td class=\"\" title=\"spec: data_proportion=0.75\">25% r != t</td>"
                ),
            "{text}"
        );
        assert!(text.contains("34.50 [31.50, 37.50]"), "{text}");
        assert!(text.contains("65.00 [61.00, 69.00]"), "{text}");
        assert!(text.contains("not comparable (tiny/2 instead of SiT-B/4"));
        assert!(text.contains("Scales differ"));
        // The noise: 25% and 50% overlap, 0% overlaps neither.
        assert!(
            text.contains("do not tell them apart at this sample size: 50% r != t and 25% r != t.")
                || text.contains(
                    "do not tell them apart at this sample size: 25% r != t and 50% r != t."
                ),
            "{text}"
        );
        assert!(!text.contains("0% r != t (flow matching) and"), "{text}");
        // The paper orders 25% < 50% < 0% at 1-NFE; ours 50% < 25% < 0%.
        assert!(text.contains("the paper has 25% r != t, then 50% r != t, then 0% r != t (flow matching); ours 50% r != t, then 25% r != t, then 0% r != t (flow matching) (best first; Spearman's rho 0.50). 1 of the pairs"), "{text}");
        assert!(text.contains("abc1234"), "provenance names the code commit");
        assert!(!text.contains("/x/"), "no machine's folders: {text}");
    }
    assert!(html.contains("title=\"spec: data_proportion=0.75\""));
    assert!(
        !html.contains("r != t: 100%") && !html.contains(">100% r != t<"),
        "no run of that row exists"
    );
    for plot in ["loss", "fid-by-nfe", "ordering-1nfe"] {
        for ext in ["png", "svg"] {
            let f = out.join("plots").join(format!("{plot}.{ext}"));
            assert!(
                std::fs::metadata(&f).unwrap().len() > 1000,
                "{}",
                f.display()
            );
        }
    }
    // Every row is not comparable: no bars of paper against ours.
    assert!(!out.join("plots/paper-vs-ours.png").exists());
    assert!(!html.contains("paper-vs-ours.png"));
    for grid in [
        "grids/data_proportion_0.75-1nfe.png",
        "grids/real-digits.png",
    ] {
        assert!(out.join(grid).exists(), "{grid}");
        assert!(html.contains(grid), "{grid}");
    }
    // A Markdown twin of each table, linked from its caption; each run's discrepancy report.
    for twin in ["runs", "paper-vs-ours", "metrics", "training", "provenance"] {
        let file = format!("tables/{twin}.md");
        let text = std::fs::read_to_string(out.join(&file)).unwrap();
        assert!(text.lines().count() > 4, "{file}: {text}");
        assert!(html.contains(&format!("href=\"{file}\"")), "{file}");
    }
    for run in [
        "data_proportion_0.75",
        "data_proportion_0.5",
        "data_proportion_1.0",
    ] {
        let file = format!("discrepancy-{run}.md");
        assert!(out.join(&file).exists(), "{file}");
        assert!(html.contains(&format!("<a href=\"{file}\">")), "{file}");
    }
    // sFID, precision and recall in the metrics table where the evaluate stage made them.
    assert!(
        md.contains("| 25% r != t | 1 | 34.50 [31.50, 37.50] | 69.000 | 0.500 | 0.250 | - |"),
        "{md}"
    );
}

#[test]
fn a_discrepancy_report_is_headed_by_its_verdict_and_names_files_by_hash() {
    let root = temp_dir("discrepancy");
    let exp = demo_tree(&root.join("results"));
    let path =
        discrepancy::discrepancy(&exp.join("data_proportion=1.0"), &root.join("reports")).unwrap();
    assert_eq!(
        path,
        root.join("reports/demo-digits/discrepancy-data_proportion_1.0.md")
    );
    let md = std::fs::read_to_string(path).unwrap();
    assert!(
        md.starts_with("### MeanFlow reproduction: 0% r != t (flow matching) (`demo-digits/data_proportion=1.0`) cannot be held to the paper's numbers"),
        "{md}"
    );
    assert!(
        md.contains("| 328.91 | 65.00 [61.00, 69.00] | -263.91 | -80.2% |"),
        "{md}"
    );
    assert!(
        md.contains("| `train.batch` | `training.batch_size` | 256 | 64 |"),
        "{md}"
    );
    assert!(md.contains("| depth | 12 | 4 |"), "{md}");
    assert!(md.contains("- [x] Global batch: 64 here"), "{md}");
    assert!(
        md.contains("- [ ] Cached vs online latents"),
        "pixels train on no latents: {md}"
    );
    assert!(
        md.contains("- [x] Guidance: trained in with omega = 1 and kappa = 0"),
        "the Table 1a rows pin no guidance: {md}"
    );
    assert!(md.contains("Not fully trained: 0 of 20 epochs"), "{md}");
    assert!(
        md.contains("no released weights exist for this data"),
        "{md}"
    );
    for fact in [
        "- device: NVIDIA H200",
        "- NVIDIA driver (CUDA version): 13.0",
        "- CUDA runtime of libtorch: 12.8",
        "- processes (world size): 8",
        "- command: `mfr run experiments/b4.toml`",
        "- code commit: abc1234",
    ] {
        assert!(md.contains(fact), "{fact}: {md}");
    }
    // Files by name and hash: the Inception weights are not on this machine, the samples are.
    assert!(
        md.contains("Inception weights `default_1.pt` (not on this machine)"),
        "{md}"
    );
    assert!(md.contains("<details><summary>Resolved spec</summary>"));
    assert!(!md.contains(root.to_str().unwrap()), "{md}");
}

/// results/b4/default (trained) and results/b4-public/default (the released weights, a tiny
/// file standing in for them) scored with the same evaluation settings; `control_fid` is the
/// released weights' 1-NFE FID.
fn control_tree(root: &Path, control_fid: Option<f64>) -> PathBuf {
    let reference = root.join("cache/VIRTUAL_imagenet256_labeled.npz");
    std::fs::create_dir_all(reference.parent().unwrap()).unwrap();
    std::fs::write(&reference, b"a stand-in reference").unwrap();
    let inception = "/somewhere/pt_inception-2015-12-05.safetensors";
    let results = root.join("results");
    let trained = Spec::load(&spec_file("b4.toml")).unwrap();
    let (name, trained) = trained.points("b4").unwrap().remove(0);
    let dir = RunDir::new(results.join("b4").join(&name));
    prepared(&dir, &trained);
    let m = metrics(
        &trained,
        &[(1, 80.0, 0.5)],
        Some(reference.to_str().unwrap()),
        inception,
    );
    dir.write_metrics(&m).unwrap();
    if let Some(fid) = control_fid {
        let weights = root.join("meanflow-B4.safetensors");
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _ = vs.root().zeros("w", &[2, 2]);
        vs.save(&weights).unwrap();
        let public = Spec::load(&spec_file("b4-public.toml")).unwrap();
        let (pname, mut public) = public.points("b4-public").unwrap().remove(0);
        public.model.weights = Some(weights.display().to_string());
        let control = RunDir::new(results.join("b4-public").join(&pname));
        prepared(&control, &public);
        let m = metrics(
            &public,
            &[(1, fid, 0.1)],
            Some(reference.to_str().unwrap()),
            inception,
        );
        control.write_metrics(&m).unwrap();
    }
    dir.path().to_path_buf()
}

#[test]
fn a_control_from_released_weights_says_where_the_gap_lies() {
    let root = temp_dir("control");
    let run = control_tree(&root, Some(11.3));
    let path = discrepancy::discrepancy(&run, &root.join("reports")).unwrap();
    let md = std::fs::read_to_string(path).unwrap();
    assert!(md.contains("misses the paper"), "{md}");
    assert!(
        md.contains("| control: released weights `meanflow-B4.safetensors` through this pipeline (`b4-public/"),
        "{md}"
    );
    assert!(md.contains("11.30 [11.20, 11.40]"), "{md}");
    assert!(
        md.contains("the gap lies in training, not in sampling or evaluation"),
        "{md}"
    );
    assert!(md.contains("- [x] Cached vs online latents"), "{md}");
    assert!(
        md.contains("- [ ] Guidance"),
        "table1.default pins omega and kappa: {md}"
    );

    // The released weights missing too point at evaluation.
    let root = temp_dir("control-misses");
    let run = control_tree(&root, Some(30.0));
    let md =
        std::fs::read_to_string(discrepancy::discrepancy(&run, &root.join("reports")).unwrap())
            .unwrap();
    assert!(md.contains("The control misses the paper too"), "{md}");

    // Without one, the line that says how to get it.
    let root = temp_dir("no-control");
    let run = control_tree(&root, None);
    let md =
        std::fs::read_to_string(discrepancy::discrepancy(&run, &root.join("reports")).unwrap())
            .unwrap();
    assert!(md.contains("No control in the results"), "{md}");
    assert!(md.contains("make reproduce-b4 CKPT="), "{md}");
}

#[test]
fn a_control_needs_the_same_evaluation_settings() {
    let root = temp_dir("control-settings");
    let run = control_tree(&root, Some(11.3));
    // The control scored other labels: its FID is not comparable with the trained run's.
    let control = RunDir::new(root.join("results/b4-public"))
        .path()
        .to_path_buf();
    let dir = meanflow_repro::rundir::runs_of(&control).unwrap().remove(0);
    let mut m = dir.read_metrics().unwrap().unwrap();
    m.inputs.labels = "random".into();
    dir.write_metrics(&m).unwrap();
    let md =
        std::fs::read_to_string(discrepancy::discrepancy(&run, &root.join("reports")).unwrap())
            .unwrap();
    assert!(md.contains("No control in the results"), "{md}");
}

#[test]
fn ranks_share_ties_and_spearman_reads_the_order() {
    // Ties take their mean rank, as Spearman's rho needs.
    assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), vec![3.5, 1.0, 3.5, 2.0]);
    assert!((pearson(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]) - 1.0).abs() < 1e-12);
    assert!((pearson(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
    // One swap of four: rho = 1 - 6 * 2 / (4 * 15) = 0.8.
    assert!((pearson(&[1.0, 2.0, 3.0, 4.0], &[2.0, 1.0, 3.0, 4.0]) - 0.8).abs() < 1e-12);
}

#[test]
fn a_folder_without_runs_is_refused_with_the_command_to_make_them() {
    let root = temp_dir("empty");
    let err = render::report(&root, &root.join("reports"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("holds no run directories") && err.contains("mfr run SPEC"),
        "{err}"
    );
    let err = discrepancy::discrepancy(&root, &root.join("reports"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a run directory"), "{err}");
}
