//! Reports rendered from a small synthetic results tree: the HTML and Markdown hold the rows,
//! the plots exist as PNG and SVG, and the discrepancy report names the gap, the recipe
//! departures and the causes that apply.
mod common;
use common::temp_dir;
use meanflow_repro::report::{discrepancy, render, sample_grid};
use meanflow_repro::spec::Spec;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// results/demo-digits/<run> for two points of the demo spec, with made-up numbers.
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
        let dir = exp.join(&name);
        std::fs::create_dir_all(dir.join("samples")).unwrap();
        std::fs::write(dir.join("spec.toml"), point.to_toml()).unwrap();
        std::fs::write(
            dir.join("env.json"),
            r#"{"code_commit": "abc1234", "device": "cpu", "libtorch": "2.11.0", "tch": "0.24.0", "mfr_version": "0.1.0"}"#,
        )
        .unwrap();
        let stats: String = (1..=20)
            .map(|i| {
                format!(
                    "{{\"step\": {}, \"loss\": {}, \"v_loss\": {}}}\n",
                    i * 10,
                    1.0 - i as f64 * 0.01,
                    3.0 / i as f64
                )
            })
            .collect();
        std::fs::write(dir.join("stats.jsonl"), stats).unwrap();
        let metrics = serde_json::json!({
            "fid": {"1-NFE": fid, "2-NFE": fid - 3.0},
            "num_samples": 200, "num_reference": 1797,
            "inception_weights": "/x/default_1.pt",
        });
        std::fs::write(dir.join("samples/metrics.json"), metrics.to_string()).unwrap();
        let images = Tensor::randint(255, [20, 8, 8, 3], (Kind::Uint8, tch::Device::Cpu));
        sample_grid(&images, 10, 2, &dir.join("samples/grid-1nfe.png")).unwrap();
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
