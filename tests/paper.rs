//! paper/meanflow.toml against the specs and presets that cite it: every row a spec names
//! exists, every run of a spec finds its row, Table 4 agrees with the presets, and the recipe
//! diff names exactly the keys a spec changes.
use meanflow_repro::model::SiTConfig;
use meanflow_repro::report::paper::Paper;
use meanflow_repro::spec::Spec;
use std::path::PathBuf;

fn experiments() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 8,
        "expected the demo and the paper's specs, got {files:?}"
    );
    files
}

#[test]
fn every_spec_row_exists_and_every_run_matches_one_and_every_row_a_run() {
    let paper = Paper::bundled();
    for file in experiments() {
        let spec = Spec::load(&file).unwrap();
        let points = spec.points(&file.display().to_string()).unwrap();
        assert!(
            !spec.paper.rows.is_empty(),
            "{}: names no paper row",
            file.display()
        );
        let mut used = std::collections::BTreeSet::new();
        for (name, point) in &points {
            let rows = paper.rows_for(&spec.paper.rows, point).unwrap();
            assert!(
                !rows.is_empty(),
                "{}: run {name} matches none of its rows",
                file.display()
            );
            used.extend(rows.iter().map(|r| r.id.clone()));
        }
        for id in &spec.paper.rows {
            assert!(
                used.contains(id),
                "{}: row {id} matches no run",
                file.display()
            );
        }
    }
}

#[test]
fn an_unknown_row_id_is_named_with_its_neighbours() {
    let err = Paper::bundled()
        .row("table1a.ratio30")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no row `table1a.ratio30`"), "{err}");
    assert!(err.contains("table1a.ratio25"), "{err}");
}

#[test]
fn table_4_agrees_with_the_presets() {
    let paper = Paper::bundled();
    assert_eq!(paper.models.len(), 6);
    for m in &paper.models {
        let c = SiTConfig::preset(m.preset.trim_end_matches('+')).unwrap();
        assert_eq!(
            (c.depth, c.hidden_size, c.num_heads, c.patch_size),
            (m.depth, m.hidden, m.heads, m.patch),
            "{}",
            m.preset
        );
    }
}

#[test]
fn the_recipe_diff_names_the_keys_a_spec_changes() {
    let paper = Paper::bundled();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let b4 = Spec::load(&root.join("experiments/b4.toml")).unwrap();
    let keys: Vec<String> = paper
        .recipe
        .departures(&b4)
        .into_iter()
        .map(|d| d.key)
        .collect();
    // bf16 autocast, the ft-ema decoder, the time embedders' init and balanced labels (the
    // PyTorch port's choices, left at their defaults); the rest is the paper's.
    assert_eq!(
        keys,
        [
            "model.embedder_init",
            "sample.labels",
            "sample.vae",
            "train.precision"
        ]
    );
    // The official run departs in nothing the harness can choose.
    let official = Spec::load(&root.join("experiments/b4-official.toml")).unwrap();
    let keys: Vec<String> = paper
        .recipe
        .departures(&official)
        .into_iter()
        .map(|d| d.key)
        .collect();
    assert!(keys.is_empty(), "b4-official departs on {keys:?}");
    let demo = Spec::load(&root.join("experiments/demo-digits.toml")).unwrap();
    let keys: Vec<String> = paper
        .recipe
        .departures(&demo)
        .into_iter()
        .map(|d| d.key)
        .collect();
    for k in ["train.batch", "train.lr", "train.ema_decay"] {
        assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
    }
}

#[test]
fn a_demo_run_matches_its_row_but_is_not_held_to_its_number() {
    let paper = Paper::bundled();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let demo = Spec::load(&root.join("experiments/demo-digits.toml")).unwrap();
    let points = demo.points("demo").unwrap();
    let (_, half) = points
        .iter()
        .find(|(n, _)| n == "data_proportion=0.5")
        .unwrap();
    let rows = paper.rows_for(&demo.paper.rows, half).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].id, "table1a.ratio50");
    let why = rows[0].incomparable(half).unwrap();
    assert!(
        why.contains("tiny/2 instead of SiT-B/4")
            && why.contains("8x8 pixel images (digits) instead of ImageNet 256 latents"),
        "{why}"
    );
    let b4 = Spec::load(&root.join("experiments/b4.toml")).unwrap();
    let row = paper.row("table1.default").unwrap();
    assert!(row.matches(&b4) && row.incomparable(&b4).is_none());
}

#[test]
fn every_cause_names_a_recipe_key_where_it_needs_one() {
    let bundled = include_str!("../paper/meanflow.toml");
    let paper = Paper::bundled();
    assert!(paper.causes.len() >= 10, "{}", paper.causes.len());
    // A `departs` cause must name a key of [recipe]; other causes take none.
    let unknown =
        format!("{bundled}\n[[cause]]\nwhen = \"departs\"\nkey = \"train.nope\"\ntext = \"x\"\n");
    let err = Paper::parse(&unknown, "crafted.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("crafted.toml: cause 11 (`departs`) needs a `key` of [recipe]"),
        "{err}"
    );
    let keyed = format!(
        "{bundled}\n[[cause]]\nwhen = \"undertrained\"\nkey = \"train.batch\"\ntext = \"x\"\n"
    );
    let err = Paper::parse(&keyed, "crafted.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("only `departs` causes take one"), "{err}");
    let spelled = format!("{bundled}\n[[cause]]\nwhen = \"sometimes\"\ntext = \"x\"\n");
    assert!(Paper::parse(&spelled, "crafted.toml").is_err());
}
