//! Reports rendered from small synthetic results trees, written through the run directory's own
//! records: the HTML and Markdown name runs in the paper's terms, carry FID intervals as
//! [low, high], say which runs the noise does not tell apart and whether the orderings agree,
//! hold their plots, grids, Markdown twins and discrepancy links; the discrepancy report is
//! headed by its verdict, shows a control from a run of released weights, and names files by
//! hash, not by folder. Crafted run names, descriptions, paths and record strings stay text in
//! every page (checked by parsing the HTML's tags and the Markdown as GitHub would), links stay
//! inside the report, and images that are not the run's own regular files are left out.
mod common;
use common::temp_dir;
use meanflow_repro::eval::bootstrap::Interval;
use meanflow_repro::eval::AdmScores;
use meanflow_repro::report::safe::Href;
use meanflow_repro::report::tables::{pearson, ranks};
use meanflow_repro::report::{discrepancy, render, sample_grid};
use meanflow_repro::rundir::{
    Contention, Env, HistoryPoint, Metrics, RunDir, SampleInputs, StatLine,
};
use meanflow_repro::spec::Spec;
use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Kind, Tensor};

fn spec_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("experiments")
        .join(name)
}

fn env_record() -> Env {
    Env {
        code_commit: "abc1234".into(),
        device: "NVIDIA H200".into(),
        cuda_driver: Some("13.0".into()),
        cuda_runtime: Some("12.8".into()),
        world_size: 8,
        command: "mfr run experiments/b4.toml".into(),
        ..Env::current(Ok(tch::Device::Cpu), 1)
    }
}

/// A run directory of `spec` at `dir`, prepared with `env`, with a made-up training log.
fn prepared_with(dir: &RunDir, spec: &Spec, env: &Env) {
    let lock = dir.lock("the test", Contention::Refuse).unwrap();
    dir.prepare(spec, env, &lock).unwrap();
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

fn prepared(dir: &RunDir, spec: &Spec) {
    prepared_with(dir, spec, &env_record());
}

/// An interval of `fid` reaching `below` under it and `above` over it, made as metrics.json
/// holds it (through serde, so that fields the record gains with defaults still read).
fn interval(fid: f64, below: f64, above: f64) -> Interval {
    serde_json::from_value(serde_json::json!({
        "low": fid - below,
        "high": fid + above,
        "level": 0.95,
        "resamples": 200,
        "method": "half-samples",
    }))
    .unwrap()
}

/// metrics.json of `fids` (NFE -> (FID, room below, room above)) scored against `reference`
/// (None: the training images).
fn metrics(
    spec: &Spec,
    fids: &[(i64, f64, f64, f64)],
    reference: Option<&str>,
    inception: &str,
) -> Metrics {
    let key = |n: i64| format!("{n}-NFE");
    let adm = fids
        .iter()
        .map(|&(n, fid, below, above)| {
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
                fid_interval: Some(interval(fid, below, above)),
            };
            (key(n), scores)
        })
        .collect();
    Metrics {
        fid: fids.iter().map(|&(n, f, _, _)| (key(n), f)).collect(),
        fid_interval: fids
            .iter()
            .map(|&(n, f, b, a)| (key(n), interval(f, b, a)))
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

fn demo_points() -> Vec<(String, Spec)> {
    Spec::load(&spec_file("demo-digits.toml"))
        .unwrap()
        .points("demo")
        .unwrap()
}

fn write_grid(path: &Path) {
    let images = Tensor::randint(255, [20, 8, 8, 3], (Kind::Uint8, tch::Device::Cpu));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    sample_grid(&images, 10, 2, path).unwrap();
}

/// results/demo-digits/<run> for three points of the demo spec: 25% and 50% r != t whose
/// intervals overlap, and 0% apart from both (its interval lopsided). A real grid and a sample
/// grid for one of them.
fn demo_tree(root: &Path) -> PathBuf {
    let exp = root.join("demo-digits");
    for (name, point) in demo_points() {
        let (fid, below, above) = match name.as_str() {
            "data_proportion=0.75" => (34.5, 3.0, 3.0),
            "data_proportion=0.5" => (33.0, 3.0, 3.0),
            "data_proportion=1.0" => (65.0, 2.0, 6.0),
            _ => continue,
        };
        let dir = RunDir::new(exp.join(&name));
        prepared(&dir, &point);
        let mut m = metrics(
            &point,
            &[(1, fid, below, above), (2, fid - 3.0, below, above)],
            None,
            "/x/default_1.pt",
        );
        // FID at a checkpoint of eval.steps and at the end (the run has no checkpoint here,
        // so both are rows of their own in the frame); the checkpoint's without an interval.
        for (step, nfe, value) in [
            (100, 1, fid + 10.0),
            (200, 1, fid),
            (100, 2, fid + 5.0),
            (200, 2, fid - 3.0),
        ] {
            m.history.push(HistoryPoint {
                step,
                nfe: format!("{nfe}-NFE"),
                fid: value,
                fid_interval: (step == 200).then(|| interval(value, below, above)),
            });
        }
        dir.write_metrics(&m).unwrap();
        if name == "data_proportion=0.75" {
            write_grid(&dir.grid(1));
            write_grid(&dir.real_grid());
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
    assert!(
        md.contains("| 25% r != t | `data_proportion=0.75` | table1a.ratio25 |"),
        "the runs table lists the run's own paper row: {md}"
    );
    assert!(
        html.contains("<td title=\"spec: data_proportion=0.75\">25% r != t</td>"),
        "{html}"
    );
    // Apostrophes are escaped in HTML text; the sentences below are checked as read.
    let shown = html.replace("&#39;", "'");
    for text in [&shown, &md] {
        // The value with its interval, as [low, high] (lopsided where the interval is).
        assert!(text.contains("34.50 [31.50, 37.50]"), "{text}");
        assert!(text.contains("65.00 [63.00, 71.00]"), "{text}");
        assert!(!text.contains('±'), "{text}");
        assert!(text.contains("not comparable (tiny/2 instead of SiT-B/4"));
        // The scale from the runs' data, device and samples, not from a data set's name.
        assert!(
            text.contains("Scales differ: these runs train tiny/2 on 8x8 pixel images (digits) on NVIDIA H200 and score FID on 200 samples against 1797 training images; the paper's numbers are FID-50K of SiT-B/4 on ImageNet 256."),
            "{text}"
        );
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
        // How the intervals are made, said once.
        assert!(
            text.contains("95% interval from 200 resamples: the spread of FID over half-samples"),
            "{text}"
        );
    }
    assert!(
        !html.contains("r != t: 100%") && !html.contains(">100% r != t<"),
        "no run of that row exists"
    );
    for plot in ["loss", "fid-by-nfe", "fid-by-step", "ordering-1nfe"] {
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
        assert!(html.contains(&format!("src=\"{grid}\"")), "{grid}");
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
    assert!(
        md.contains("| 0% r != t (flow matching) | 2 | 62.00 [60.00, 68.00] |"),
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
        md.contains("| 328.91 | 65.00 [63.00, 71.00] | -263.91 | -80.2% |"),
        "{md}"
    );
    assert!(
        md.contains("| `train.batch` | `training.batch_size` | 256 | 64 |"),
        "{md}"
    );
    assert!(md.contains("| depth | 12 | 4 |"), "{md}");
    assert!(md.contains("- [x] Global batch: 64 here"), "{md}");
    assert!(
        md.contains("- [x] Guidance: trained in with omega = 1.0 and kappa = 0.0"),
        "the Table 1a rows pin no guidance: {md}"
    );
    assert!(md.contains("Not fully trained: 0 of 20 epochs"), "{md}");
    assert!(
        md.contains("These FIDs are of 8x8 pixel images (digits) scored on 200 samples"),
        "{md}"
    );
    // Pixel-space data: the causes of the VAE and the latent cache are not listed.
    let causes = md
        .split("#### Known causes")
        .nth(1)
        .unwrap()
        .split("<details>")
        .next()
        .unwrap();
    assert!(causes.contains("- [x] FID pipeline"), "{causes}");
    for latent in ["VAE", "latents"] {
        assert!(!causes.contains(latent), "{latent}: {causes}");
    }
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
    assert!(md.contains("\n```toml\n[experiment]\n"), "{md}");
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
        &[(1, 80.0, 0.5, 0.5)],
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
            &[(1, fid, 0.1, 0.2)],
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
    assert!(md.contains("11.30 [11.20, 11.50]"), "{md}");
    assert!(
        md.contains("the gap lies in training, not in sampling or evaluation"),
        "{md}"
    );
    assert!(md.contains("- [x] Cached vs online latents"), "{md}");
    assert!(
        md.contains("- [x] VAE variant: samples decoded with `sd-vae-ft-ema`"),
        "latent data lists it: {md}"
    );
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

/// Run names a hostile user would give (each a legal folder name), and what of each must show.
const LINK_NAME: &str = "[x](javascript:alert(1))";
const PERCENT_NAME: &str = "seed%3D1%2Fx";
const TAG_NAME: &str = "<img src=x onerror=alert(4)>";
const PIPE_NAME: &str = "evil|pipe` *b* ~s~ $m$";
const DESCRIPTION: &str =
    "<script>alert(1)</script>\n# heading [d](javascript:alert(2)) | a | b &lt; ![i](x.png)";

/// results/demo-digits/ with runs under crafted names, a crafted description, weights path,
/// environment and record strings; a grid that is a symlink to /etc/passwd, a real grid that is
/// a symlink to a PNG out of its run, and a grid reached through a samples folder that is a
/// symlink out of its run.
fn hostile_tree(root: &Path) -> PathBuf {
    let exp = root.join("results/demo-digits");
    let points = demo_points();
    let outside = root.join("outside");
    write_grid(&outside.join("grid-1nfe.png"));
    let env = Env {
        command: "mfr run `x` | <script>alert(6)</script> [c](javascript:alert(7))".into(),
        device: "<b>gpu</b> *bold*".into(),
        code_commit: "[c](javascript:alert(5))".into(),
        ..env_record()
    };
    for (i, name) in [LINK_NAME, PERCENT_NAME, TAG_NAME, PIPE_NAME]
        .into_iter()
        .enumerate()
    {
        let mut spec = points[i].1.clone();
        spec.experiment.description = DESCRIPTION.into();
        if name == PIPE_NAME {
            spec.model.weights = Some("/x/[w](javascript:alert(3))<i>.safetensors".into());
        }
        let dir = RunDir::new(exp.join(name));
        prepared_with(&dir, &spec, &env);
        let m = metrics(
            &spec,
            &[(1, 30.0 + i as f64, 1.0, 2.0)],
            None,
            "/x/<img src=y onerror=alert(8)>.pt",
        );
        dir.write_metrics(&m).unwrap();
        match name {
            LINK_NAME | PERCENT_NAME => {
                write_grid(&dir.grid(1));
                write_grid(&dir.real_grid());
            }
            TAG_NAME => {
                std::os::unix::fs::symlink("/etc/passwd", dir.grid(1)).unwrap();
                std::fs::create_dir_all(dir.samples()).unwrap();
                std::os::unix::fs::symlink(outside.join("grid-1nfe.png"), dir.real_grid()).unwrap();
            }
            _ => {
                std::fs::remove_dir_all(dir.samples()).unwrap();
                std::os::unix::fs::symlink(&outside, dir.samples()).unwrap();
            }
        }
    }
    exp
}

/// Every tag of an HTML page written by the report (all text '<' is escaped, so each '<'
/// opens a tag): its name and attributes.
fn html_tags(html: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut tags = Vec::new();
    let mut rest = html;
    while let Some(at) = rest.find('<') {
        rest = &rest[at + 1..];
        let end = rest.find('>').expect("a tag ends");
        let inner = &rest[..end];
        rest = &rest[end + 1..];
        let name_end = inner
            .find(|c: char| c.is_whitespace())
            .unwrap_or(inner.len());
        let (name, mut attrs) = inner.split_at(name_end);
        let mut parsed = Vec::new();
        loop {
            attrs = attrs.trim_start();
            if attrs.is_empty() {
                break;
            }
            let key_end = attrs.find(['=', ' ']).unwrap_or(attrs.len());
            let key = attrs[..key_end].to_owned();
            attrs = &attrs[key_end..];
            let mut value = String::new();
            if let Some(after) = attrs.strip_prefix('=') {
                let after = after
                    .strip_prefix('"')
                    .expect("attributes are double-quoted");
                let close = after.find('"').expect("a quoted value ends");
                value = after[..close].to_owned();
                attrs = &after[close + 1..];
            }
            parsed.push((key, value));
        }
        tags.push((name.to_ascii_lowercase(), parsed));
    }
    tags
}

/// Asserts the page holds only the report's own tags and attributes, and links only to safe
/// targets; returns the link targets.
fn assert_html_safe(html: &str) -> Vec<String> {
    const TAGS: [&str; 21] = [
        "!doctype",
        "html",
        "head",
        "meta",
        "title",
        "style",
        "body",
        "h1",
        "p",
        "table",
        "caption",
        "a",
        "tr",
        "th",
        "td",
        "code",
        "figure",
        "img",
        "figcaption",
        "div",
        "/",
    ];
    const ATTRIBUTES: [&str; 8] = [
        "lang", "charset", "class", "href", "src", "alt", "title", "html",
    ];
    let mut targets = Vec::new();
    for (name, attrs) in html_tags(html) {
        let bare = name.trim_start_matches('/');
        assert!(
            TAGS.contains(&bare) || name.starts_with('/') && TAGS.contains(&bare),
            "a tag the report does not write: <{name}>"
        );
        for (key, value) in attrs {
            assert!(
                ATTRIBUTES.contains(&key.as_str()),
                "attribute {key} on <{name}>"
            );
            if key == "href" || key == "src" {
                assert!(Href::is_safe(&value), "<{name} {key}=\"{value}\">");
                targets.push(value);
            }
        }
    }
    targets
}

/// What GitHub would make of a Markdown file: its link and image targets, raw HTML, text, and
/// the cell count of each table row.
struct Parsed {
    targets: Vec<String>,
    html: Vec<String>,
    text: String,
    cells: Vec<(usize, usize)>,
}

fn parse_markdown(md: &str) -> Parsed {
    let options = Options::ENABLE_TABLES
        | Options::ENABLE_STRIKETHROUGH
        | Options::ENABLE_TASKLISTS
        | Options::ENABLE_MATH
        | Options::ENABLE_GFM;
    let mut parsed = Parsed {
        targets: Vec::new(),
        html: Vec::new(),
        text: String::new(),
        cells: Vec::new(),
    };
    let (mut head, mut row) = (0, 0);
    for event in Parser::new_ext(md, options) {
        match event {
            Event::Start(Tag::Link { dest_url, .. })
            | Event::Start(Tag::Image { dest_url, .. }) => {
                parsed.targets.push(dest_url.to_string())
            }
            Event::Start(
                t @ (Tag::Emphasis | Tag::Strong | Tag::Strikethrough | Tag::Heading { .. }),
            ) => parsed.html.push(format!("markup {t:?}")),
            Event::InlineMath(m) | Event::DisplayMath(m) => parsed.html.push(format!("math {m}")),
            Event::Html(h) | Event::InlineHtml(h) => parsed.html.push(h.to_string()),
            Event::Text(t) | Event::Code(t) => parsed.text.push_str(&t),
            Event::SoftBreak => parsed.text.push(' '),
            Event::Start(Tag::TableHead) | Event::Start(Tag::TableRow) => row = 0,
            Event::Start(Tag::TableCell) => row += 1,
            Event::End(TagEnd::TableHead) => head = row,
            Event::End(TagEnd::TableRow) => parsed.cells.push((head, row)),
            _ => {}
        }
    }
    parsed
}

/// Asserts a Markdown page of the report holds no HTML but its own `<details>` blocks, no
/// markup from values, links only to safe targets, and tables whose rows keep their cells.
fn assert_markdown_safe(file: &Path) -> Parsed {
    let md = std::fs::read_to_string(file).unwrap();
    let parsed = parse_markdown(&md);
    for h in &parsed.html {
        let h = h.trim();
        let ours = (h.starts_with("<details><summary>") && h.ends_with("</summary>"))
            || h == "</details>"
            || h == "markup Heading { level: H1, id: None, classes: [], attrs: [] }"
            || h == "markup Heading { level: H3, id: None, classes: [], attrs: [] }"
            || h == "markup Heading { level: H4, id: None, classes: [], attrs: [] }"
            || h == "markup Strong"
            || h == "markup Emphasis";
        assert!(ours, "{}: HTML or markup from a value: {h}", file.display());
    }
    for t in &parsed.targets {
        assert!(Href::is_safe(t), "{}: a link to {t}", file.display());
    }
    for (head, row) in &parsed.cells {
        assert_eq!(head, row, "{}: a row's cells moved", file.display());
    }
    parsed
}

#[test]
fn crafted_names_stay_text_and_links_stay_in_the_report() {
    let root = temp_dir("hostile");
    let exp = hostile_tree(&root);
    let out = render::report(&exp, &root.join("reports")).unwrap();
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    let targets = assert_html_safe(&html);
    // Crafted strings are shown as text.
    for shown in [
        LINK_NAME,
        "&lt;img src=x onerror=alert(4)&gt;",
        "&lt;script&gt;alert(1)&lt;/script&gt;",
        "[c](javascript:alert(5))",
        "&lt;b&gt;gpu&lt;/b&gt;",
        "[w](javascript:alert(3))&lt;i&gt;.safetensors",
        "&lt;img src=y onerror=alert(8)&gt;.pt",
    ] {
        assert!(html.contains(shown), "{shown}: {html}");
    }
    // The percent-encoded name loads its image; the symlinked grids were not copied.
    assert!(
        targets.contains(&"grids/seed%253D1%252Fx-1nfe.png".to_owned()),
        "{targets:?}"
    );
    assert!(out.join("grids/seed%3D1%2Fx-1nfe.png").is_file());
    let grids: Vec<String> = std::fs::read_dir(out.join("grids"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        grids.len(),
        3,
        "two runs' grids and one real grid: {grids:?}"
    );
    for g in &grids {
        let bytes = std::fs::read(out.join("grids").join(g)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{g}");
    }
    // The first run's real grid is a symlink out of it: the next run's own one is shown.
    assert_eq!(
        std::fs::read(out.join("grids/real-digits.png")).unwrap(),
        std::fs::read(RunDir::new(exp.join(LINK_NAME)).real_grid()).unwrap()
    );
    // Every relative target is a file of the report.
    for t in &targets {
        let file = t.replace("%25", "%");
        assert!(out.join(&file).is_file(), "{t} -> {file}");
    }

    let mut pages = vec![out.join("report.md")];
    for dir in [out.clone(), out.join("tables")] {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "md") && !pages.contains(&p) {
                pages.push(p);
            }
        }
    }
    assert_eq!(pages.len(), 1 + 4 + 5, "{pages:?}");
    for page in &pages {
        assert_markdown_safe(page);
    }
    let report = assert_markdown_safe(&out.join("report.md"));
    for shown in [
        LINK_NAME,
        TAG_NAME,
        PIPE_NAME,
        "<script>alert(1)</script> # heading [d](javascript:alert(2)) | a | b &lt; ![i](x.png)",
    ] {
        assert!(report.text.contains(shown), "{shown}: {}", report.text);
    }
    let issue = assert_markdown_safe(
        &out.join(meanflow_repro::report::tables::discrepancy_file(PIPE_NAME)),
    );
    for shown in [
        PIPE_NAME,
        "[w](javascript:alert(3))<i>.safetensors",
        "mfr run `x` | <script>alert(6)</script> [c](javascript:alert(7))",
        "<b>gpu</b> *bold*",
    ] {
        assert!(issue.text.contains(shown), "{shown}: {}", issue.text);
    }
}

/// The repository's Python (`make setup`), as the Makefile runs tools/report_check.py.
fn report_check(dir: &Path) -> std::process::Output {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tools/report_check.py"))
        .arg(dir)
        .output()
        .expect("the project's .venv python (make setup)")
}

#[test]
fn the_report_check_fails_on_any_link_but_relative_files_and_https() {
    let root = temp_dir("check-links");
    let (scheme, absolute, outside, code) = (
        "(only files of the report and https)",
        "an absolute path",
        "a path out of the report",
        "(a report holds no code)",
    );
    for (i, (link, why)) in [
        ("<a href=\"javascript:alert(1)\">x</a>", scheme),
        ("<a href=\" JaVaScRiPt:alert(1)\">x</a>", scheme),
        ("<a href=\"java&#x09;script:alert(1)\">x</a>", scheme),
        ("<a href='javascript:alert(1)'>x</a>", scheme),
        ("<a href=javascript:alert(1)>x</a>", scheme),
        ("<img src=\"data:image/png;base64,AAAA\">", scheme),
        ("<a href=\"http://evil.example/x\">x</a>", scheme),
        ("<a href=\"//evil.example/x\">x</a>", absolute),
        ("<a href=\"/etc/passwd\">x</a>", absolute),
        ("<a href=\"../outside.md\">x</a>", outside),
        ("<script>alert(1)</script>", code),
        ("<p onclick=\"alert(1)\">x</p>", code),
    ]
    .iter()
    .enumerate()
    {
        let dir = root.join(format!("page{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ok.md"), "a file of the report").unwrap();
        std::fs::write(
            dir.join("index.html"),
            format!("<!doctype html><html><body><table><tr><td>1</td></tr></table><a href=\"ok.md\">ok</a> <a href=\"https://arxiv.org/abs/2505.13447\">paper</a> {link}</body></html>"),
        )
        .unwrap();
        let out = report_check(&dir);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{link} passed: {said}");
        assert!(said.contains(why), "{link}: {said}");
        assert_eq!(said.lines().count(), 2, "only {link} is named: {said}");
    }
}

#[test]
fn the_report_check_passes_a_report_of_crafted_names_in_chromium() {
    if Command::new("chromium").arg("--version").output().is_err() {
        eprintln!("skipped: Chromium is not installed (`apt-get install chromium`)");
        return;
    }
    let root = temp_dir("check-hostile");
    let exp = hostile_tree(&root);
    let out = render::report(&exp, &root.join("reports")).unwrap();
    let check = report_check(&out);
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let said = String::from_utf8_lossy(&check.stdout);
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    let images = html.matches("<img ").count();
    assert!(images >= 6, "plots and grids: {html}");
    assert!(said.contains(&format!("{images} images loaded")), "{said}");
}

#[test]
fn mfr_results_gathers_every_run_into_csv_and_parquet() {
    use polars::prelude::*;
    let root = temp_dir("results-frame");
    demo_tree(&root.join("results"));
    control_tree(&root, Some(11.3));
    let out = root.join("frame");
    let run = Command::new(env!("CARGO_BIN_EXE_mfr"))
        .arg("results")
        .arg(root.join("results"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let header = csv.lines().next().unwrap();
    assert!(
        header.starts_with("experiment,run,label,paper_rows,data,preset,weights,is_final,step,nfe,fid,fid_low,fid_high"),
        "{header}"
    );
    let parquet = ParquetReader::new(std::fs::File::open(out.join("results.parquet")).unwrap())
        .finish()
        .unwrap();
    // Three demo runs at two NFEs and two more steps each, the trained B/4 run and the
    // released weights' run.
    assert_eq!(parquet.height(), 3 * (2 + 4) + 1 + 1, "{parquet}");
    let rows = meanflow_repro::report::frame::ResultRow::read(&parquet).unwrap();
    let row = rows
        .iter()
        .find(|r| r.run == "data_proportion=1.0" && r.nfe == Some(2))
        .unwrap();
    assert_eq!(row.experiment, "demo-digits");
    assert_eq!(row.label, "0% r != t (flow matching)");
    assert_eq!(row.paper_rows, "table1a.ratio0");
    assert_eq!(
        (row.fid, row.fid_low, row.fid_high),
        (Some(62.0), Some(60.0), Some(68.0))
    );
    assert_eq!(
        (row.sfid, row.precision, row.recall),
        (Some(124.0), Some(0.5), Some(0.25))
    );
    let early = rows
        .iter()
        .find(|r| r.run == "data_proportion=1.0" && r.step == Some(100) && r.nfe == Some(1))
        .unwrap();
    assert_eq!(
        (early.is_final, early.fid, early.fid_low),
        (false, Some(75.0), None)
    );
    let late = rows
        .iter()
        .find(|r| r.run == "data_proportion=1.0" && r.step == Some(200) && r.nfe == Some(2))
        .unwrap();
    assert_eq!(
        (late.fid, late.fid_low, late.fid_high),
        (Some(62.0), Some(60.0), Some(68.0))
    );
    let control = rows.iter().find(|r| r.experiment == "b4-public").unwrap();
    assert_eq!(control.weights.as_deref(), Some("meanflow-B4.safetensors"));
    assert_eq!(control.step, None, "imported weights have no training step");
    assert!(csv.contains("demo-digits,data_proportion=1.0,0% r != t (flow matching),table1a.ratio0,digits,tiny/2,,true,"), "{csv}");
}
