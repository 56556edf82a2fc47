//! Experiment specs: every shipped spec parses, and each kind of bad input gets one clear error
//! naming the file, the line and the key.
use meanflow_repro::spec::Spec;
use std::path::Path;

const MINIMAL: &str = "[experiment]\nname = \"x\"\n\n[model]\npreset = \"micro/2\"\n";

fn parse_err(src: &str) -> String {
    Spec::parse(src, "bad.toml")
        .expect_err("the spec should be refused")
        .to_string()
}

#[test]
fn every_shipped_spec_parses_and_round_trips() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let spec = Spec::load(&path).unwrap_or_else(|e| panic!("{e}"));
            let again = Spec::parse(&spec.to_toml(), "resolved").unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                again,
                spec,
                "{} does not survive resolve -> TOML -> parse",
                path.display()
            );
            assert_eq!(again.sha256(), spec.sha256());
            count += 1;
        }
    }
    assert!(
        count >= 2,
        "expected the shipped specs in {}",
        dir.display()
    );
}

#[test]
fn a_preset_fills_the_model_and_defaults_follow_the_paper() {
    let spec = Spec::parse(
        "[experiment]\nname = \"b4\"\n[model]\npreset = \"SiT-B/4\"\n",
        "b4.toml",
    )
    .unwrap();
    let m = spec.model_config();
    assert_eq!(
        (m.depth, m.hidden_size, m.num_heads, m.patch_size),
        (12, 768, 12, 4)
    );
    let cfg = spec.meanflow_config();
    assert_eq!(cfg.data_proportion, 0.75);
    assert_eq!((cfg.norm_p, cfg.norm_eps), (1.0, 0.01));
    assert_eq!((cfg.tangent.dr, cfg.tangent.dt), (0.0, 1.0));
    assert_eq!(spec.sha256().len(), 64);
}

#[test]
fn a_changed_field_changes_the_hash() {
    let a = Spec::parse(MINIMAL, "a.toml").unwrap();
    let b = Spec::parse(&format!("{MINIMAL}\n[meanflow]\nomega = 3.0\n"), "b.toml").unwrap();
    assert_ne!(a.sha256(), b.sha256());
}

#[test]
fn malformed_toml_names_the_file_and_line() {
    let err = parse_err("[experiment]\nname = \"x\"\n[model\npreset = 1\n");
    assert!(err.starts_with("bad.toml:3:"), "{err}");
    assert!(err.contains("invalid TOML"), "{err}");
}

#[test]
fn an_unknown_key_is_named_with_what_was_expected() {
    let err = parse_err(&format!("{MINIMAL}\n[meanflow]\nomgea = 3.0\n"));
    assert!(err.starts_with("bad.toml:8:1"), "{err}");
    assert!(
        err.contains("unknown field `omgea`") && err.contains("`omega`"),
        "{err}"
    );
}

#[test]
fn a_wrong_type_names_the_key_and_the_type_expected() {
    let err = parse_err(&format!("{MINIMAL}\n[train]\nbatch = \"256\"\n"));
    assert!(err.starts_with("bad.toml:8:"), "{err}");
    assert!(
        err.contains("`train.batch`") && err.contains("expected i64"),
        "{err}"
    );
}

#[test]
fn an_out_of_range_value_names_the_key_and_the_range() {
    let err = parse_err(&format!("{MINIMAL}\n[meanflow]\ndata_proportion = 1.5\n"));
    assert_eq!(
        err,
        "bad.toml:8:1: `meanflow.data_proportion`: expected a number in [0, 1], got 1.5"
    );
}

#[test]
fn an_unknown_preset_lists_the_presets() {
    let err = parse_err("[experiment]\nname = \"x\"\n[model]\npreset = \"SiT-Q/3\"\n");
    assert!(
        err.starts_with("bad.toml:4:1: `model.preset`: unknown preset `SiT-Q/3`"),
        "{err}"
    );
    assert!(err.contains("SiT-XL/2"), "{err}");
}

#[test]
fn a_bad_schedule_and_a_bad_variant_are_refused() {
    let err = parse_err(&format!(
        "{MINIMAL}\n[sample]\nschedules = [[1.0, 0.5, 0.6, 0.0]]\n"
    ));
    assert!(
        err.contains("`sample.schedules`") && err.contains("strictly decrease"),
        "{err}"
    );
    let err = parse_err(&format!("{MINIMAL}\n[meanflow]\njvp_tangent = \"v,2,1\"\n"));
    assert!(
        err.contains("`meanflow.jvp_tangent`") && err.contains("v,0,1"),
        "{err}"
    );
}

#[test]
fn a_missing_file_is_one_sentence() {
    let err = Spec::load(Path::new("experiments/nope.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("experiments/nope.toml: cannot read the spec:"),
        "{err}"
    );
}

#[test]
fn set_overrides_a_field_and_names_itself_in_errors() {
    let dir = std::env::temp_dir().join(format!("mfr-set-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.toml");
    std::fs::write(&path, MINIMAL).unwrap();
    let sets = [
        "train.epochs=3".to_owned(),
        "meanflow.jvp_tangent=v,1,1".to_owned(),
        "sweep.\"meanflow.omega\"=[1.0, 2.0]".to_owned(),
    ];
    let spec = Spec::load_with(&path, &sets).unwrap();
    assert_eq!(spec.train.epochs, 3);
    assert_eq!(spec.meanflow_config().tangent.dr, 1.0);
    assert_eq!(spec.points("s.toml").unwrap().len(), 2);
    let err = Spec::load_with(&path, &["train.batch=-1".to_owned()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("(with --set)") && err.contains("`train.batch`"),
        "{err}"
    );
    let err = Spec::load_with(&path, &["train.batch".to_owned()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected key=value"), "{err}");
}

#[test]
fn ablation_groups_vary_one_factor_around_one_shared_default_run() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/b4-ablations.toml");
    let spec = Spec::load(&path).unwrap();
    let points = spec.points("b4-ablations").unwrap();
    let names: Vec<&str> = points.iter().map(|(n, _)| n.as_str()).collect();
    // The default, then per group its settings other than the default's: ratio, tangent,
    // conditioning 3 each, uniform sampler 1, logit-normal 3, p 4, omega 4, Table 5's kappa 4.
    assert_eq!(points.len(), 1 + 3 + 3 + 3 + 1 + 3 + 4 + 4 + 4, "{names:?}");
    assert_eq!(names[0], "default");
    assert_eq!(points[0].1.meanflow.data_proportion, 0.75);
    assert!(names.contains(&"P_mean=-0.2,P_std=1.2"), "{names:?}");
    assert!(names.contains(&"kappa=0.5,omega=1.0"), "{names:?}");
    let shas: std::collections::BTreeSet<String> = points.iter().map(|(_, s)| s.sha256()).collect();
    assert_eq!(shas.len(), points.len(), "every run is a distinct spec");
    let err = parse_err(&format!(
        "{MINIMAL}[sweep]\n\"meanflow.omega\" = [1.0]\n[ablations.a]\n\"meanflow.kappa\" = [0.5]\n"
    ));
    assert!(err.contains("use one of them"), "{err}");
}

#[test]
fn the_paper_rows_are_not_part_of_what_a_run_computes() {
    let base = Spec::parse(MINIMAL, "a.toml").unwrap();
    let cited = Spec::parse(
        &format!("{MINIMAL}[paper]\nrows = [\"table1.default\"]\n"),
        "b.toml",
    )
    .unwrap();
    assert_eq!(base.sha256(), cited.sha256());
    let other = Spec::parse(&format!("{MINIMAL}[train]\nlr = 2e-4\n"), "c.toml").unwrap();
    assert_ne!(base.sha256(), other.sha256());
}

#[test]
fn the_cuda_graph_switch_is_read_and_off_leaves_the_hash_as_it_was() {
    let plain = Spec::parse(MINIMAL, "a.toml").unwrap();
    assert!(!plain.train.cuda_graph);
    assert!(!plain.to_toml().contains("cuda_graph"));
    let off = Spec::parse(
        &format!("{MINIMAL}\n[train]\ncuda_graph = false\n"),
        "b.toml",
    )
    .unwrap();
    assert_eq!(off.sha256(), plain.sha256());
    let on = Spec::parse(
        &format!("{MINIMAL}\n[train]\ncuda_graph = true\n"),
        "c.toml",
    )
    .unwrap();
    assert!(on.train.cuda_graph);
    assert_ne!(on.sha256(), plain.sha256());
}

#[test]
fn resolve_lists_each_default_it_leaves_out_by_its_full_key() {
    // `precision` is a key of [train] in every resolved spec; `sample.precision` is still at its
    // default and must be listed (a leaf of the same name elsewhere does not hide it).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.toml");
    std::fs::write(&path, MINIMAL).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mfr"))
        .args(["resolve", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    let resolved = text.split("# at their defaults").next().unwrap();
    assert!(resolved.contains("\nprecision = "), "{text}");
    for key in ["sample.precision", "sample.labels", "eval.bootstrap"] {
        assert!(
            text.contains(&format!("#   {key} = ")),
            "{key} not listed:\n{text}"
        );
    }
    // Set to another value, it is part of the spec and no longer listed.
    std::fs::write(
        &path,
        format!("{MINIMAL}\n[sample]\nprecision = \"bf16\"\n"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mfr"))
        .args(["resolve", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("\nprecision = \"bf16\""), "{text}");
    assert!(!text.contains("#   sample.precision"), "{text}");
}

#[test]
fn resolve_into_a_closed_pipe_ends_quietly() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.toml");
    std::fs::write(&path, MINIMAL).unwrap();
    // The reader closes its end before mfr writes: as `mfr resolve SPEC | head -0` does.
    let mut child = Command::new(env!("CARGO_BIN_EXE_mfr"))
        .args(["resolve", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{stderr}");
}
