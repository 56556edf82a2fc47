//! Reports rendered from a small synthetic results tree: the HTML and Markdown hold the rows,
//! the plots exist as PNG and SVG, and the discrepancy report names the gap, the recipe
//! departures and the causes that apply.
mod common;
use common::temp_dir;
use meanflow_repro::report::{discrepancy, render, sample_grid};
use meanflow_repro::rundir::{Contention, Env, Metrics, RunDir, SampleInputs, StatLine};
use meanflow_repro::spec::Spec;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// results/demo-digits/<run> for two points of the demo spec, with made-up numbers, written
/// through the run directory's own records.
fn results_tree(root: &Path) -> PathBuf {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("experiments/demo-digits.toml");
    let spec = Spec::load(&file).unwrap();
    let exp = root.join("demo-digits");
    for (name, point) in spec.points("demo").unwrap() {
        let fid = match name.as_str() {
            "data_proportion=0.75" => 34.5,
            "data_proportion=1.0" => 65.0,
            _ => continue,
        };
        let dir = RunDir::new(exp.join(&name));
        let lock = dir.lock("the test", Contention::Refuse).unwrap();
        let env = Env {
            code_commit: "abc1234".into(),
            device: "cpu".into(),
            ..Env::current(String::new())
        };
        dir.prepare(&point, &env, &lock).unwrap();
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
        let inputs = SampleInputs {
            weights: "checkpoints/step-00000200.safetensors".into(),
            schedules: point.sample.schedules.clone(),
            num_samples: 200,
            seed: 0,
            vae: None,
            steps: Vec::new(),
            precision: "float32".into(),
            labels: "balanced".into(),
        };
        dir.write_metrics(&Metrics {
            fid: BTreeMap::from([("1-NFE".into(), fid), ("2-NFE".into(), fid - 3.0)]),
            fid_interval: BTreeMap::new(),
            history: Vec::new(),
            adm: BTreeMap::new(),
            num_samples: 200,
            num_reference: 1797,
            note: String::new(),
            reference: None,
            inputs,
            inception_weights: "/x/default_1.pt".into(),
        })
        .unwrap();
        let images = Tensor::randint(255, [20, 8, 8, 3], (Kind::Uint8, tch::Device::Cpu));
        std::fs::create_dir_all(dir.samples()).unwrap();
        sample_grid(&images, 10, 2, &dir.grid(1)).unwrap();
    }
    exp
}

#[test]
fn the_report_holds_every_matched_row_and_its_plots() {
    let root = temp_dir("render");
    let exp = results_tree(&root.join("results"));
    let out = render::report(&exp, &root.join("reports")).unwrap();
    assert_eq!(out, root.join("reports/demo-digits"));
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for text in [&html, &md] {
        // The paper's numbers from paper/meanflow.toml beside ours, one cell each.
        assert!(text.contains("328.91 / 65.00"), "{text}");
        assert!(text.contains("61.06 / 34.50"), "{text}");
        assert!(text.contains("ratio of r != t: 25%"));
        assert!(text.contains("not comparable (tiny/2 instead of SiT-B/4"));
        assert!(text.contains("Scales differ"));
        assert!(text.contains("abc1234"), "provenance names the code commit");
    }
    assert!(
        !html.contains("ratio of r != t: 50%"),
        "no run of that row exists"
    );
    for plot in ["loss", "fid-by-nfe", "paper-vs-ours"] {
        for ext in ["png", "svg"] {
            let f = out.join("plots").join(format!("{plot}.{ext}"));
            assert!(
                std::fs::metadata(&f).unwrap().len() > 1000,
                "{}",
                f.display()
            );
        }
    }
    let grid = out.join("grids/data_proportion_0.75-1nfe.png");
    assert!(grid.exists());
    assert!(html.contains("grids/data_proportion_0.75-1nfe.png"));
}

#[test]
fn a_discrepancy_report_names_the_gap_the_departures_and_the_causes() {
    let root = temp_dir("discrepancy");
    let exp = results_tree(&root.join("results"));
    let path =
        discrepancy::discrepancy(&exp.join("data_proportion=1.0"), &root.join("reports")).unwrap();
    assert_eq!(
        path,
        root.join("reports/demo-digits/discrepancy-data_proportion_1.0.md")
    );
    let md = std::fs::read_to_string(path).unwrap();
    assert!(md.contains("| 328.91 | 65.00 | -263.91 | -80.2% |"), "{md}");
    assert!(md.contains("| `train.batch` | 256 | 64 |"), "{md}");
    assert!(md.contains("| depth | 12 | 4 |"), "{md}");
    assert!(md.contains("- [x] Global batch: 64 here"), "{md}");
    assert!(md.contains("- [ ] Sampling-time CFG"), "{md}");
    assert!(md.contains("Not fully trained: 0 of 20 epochs"), "{md}");
    assert!(md.contains("code_commit: abc1234"));
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
