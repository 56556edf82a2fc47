//! paper/meanflow.toml: every number of the paper (and the official README) this project compares
//! against, with its source. Nothing else in the code holds a paper number.
use crate::spec::Spec;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// The file in the repository, compiled in so a report renders anywhere.
const BUNDLED: &str = include_str!("../../paper/meanflow.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Paper {
    pub sources: BTreeMap<String, String>,
    pub recipe: Recipe,
    #[serde(rename = "model")]
    pub models: Vec<ModelRow>,
    #[serde(rename = "row")]
    pub rows: Vec<Row>,
    /// The known causes of FID gaps, in the order a discrepancy report lists them.
    #[serde(rename = "cause", default)]
    pub causes: Vec<Cause>,
}

/// The paper's training recipe as resolved-spec keys, and how the PyTorch port departs from it.
#[derive(Debug, Clone, Deserialize)]
pub struct Recipe {
    pub source: String,
    #[serde(default)]
    pub port: BTreeMap<String, String>,
    /// The official code's configuration key of each spec key.
    #[serde(default)]
    pub official: BTreeMap<String, String>,
    #[serde(flatten)]
    pub keys: BTreeMap<String, toml::Value>,
}

/// A key of the recipe where a spec departs from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Departure {
    /// The dotted spec key ("train.batch").
    pub key: String,
    pub paper: toml::Value,
    /// The spec's value (None: the spec has no such key).
    pub ours: Option<toml::Value>,
}

impl Recipe {
    /// The recipe keys whose value in `spec` differs from the paper's.
    pub fn departures(&self, spec: &Spec) -> Vec<Departure> {
        let resolved = toml::Value::try_from(spec).expect("a spec serialises to TOML");
        let implicit = crate::spec::implicit_defaults();
        self.keys
            .iter()
            .filter_map(|(key, want)| {
                let got = key
                    .split('.')
                    .try_fold(&resolved, |v, k| v.get(k))
                    .or_else(|| implicit.iter().find(|(k, _)| k == key).map(|(_, v)| v));
                (!got.is_some_and(|g| same_value(g, want))).then(|| Departure {
                    key: key.clone(),
                    paper: want.clone(),
                    ours: got.cloned(),
                })
            })
            .collect()
    }
}

/// A line of paper Table 4.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRow {
    pub preset: String,
    pub depth: i64,
    pub hidden: i64,
    pub heads: i64,
    pub patch: i64,
    pub params_m: i64,
    pub gflops: f64,
    pub epochs: i64,
}

/// One reported number and what defines it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    pub id: String,
    pub table: String,
    pub label: String,
    pub model: String,
    pub epochs: Option<i64>,
    pub nfe: Option<i64>,
    pub value: f64,
    #[serde(default = "fid50k")]
    pub metric: String,
    pub source: String,
    pub note: Option<String>,
    #[serde(default)]
    pub also: Vec<Also>,
    /// Resolved-spec keys (dotted) and the values that define the row.
    #[serde(default)]
    pub settings: BTreeMap<String, toml::Value>,
}

/// The same number as another source gives it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Also {
    pub value: f64,
    pub source: String,
    pub note: Option<String>,
}

/// A cause users of the public code found behind FID gaps: a discrepancy report lists it (for
/// the data it bears on) and ticks it when `when` holds for the run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cause {
    pub when: When,
    /// The recipe key of a `departs` cause.
    pub key: Option<String>,
    /// Bears on latent data only (the VAE, the latent cache): not listed for pixel-space data.
    #[serde(default)]
    pub latents_only: bool,
    /// A minijinja template (Markdown) over the run's resolved spec and the recipe: see the
    /// comment above `[[cause]]` in paper/meanflow.toml.
    pub text: String,
}

/// When a [`Cause`] applies to a run, each decided from the run's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum When {
    /// The run's value of the cause's `key` departs from the recipe.
    Departs,
    /// The run trained here, on cached latents.
    TrainedOnLatents,
    /// The FIDs are not FID-50K.
    NotFid50k,
    /// Fewer epochs done than the spec plans.
    Undertrained,
    /// The paper row the run is held to does not pin the trained-in guidance.
    GuidanceUnpinned,
}

fn fid50k() -> String {
    "FID-50K".to_owned()
}

impl Paper {
    pub fn bundled() -> Paper {
        Paper::parse(BUNDLED, "paper/meanflow.toml")
            .expect("the bundled paper/meanflow.toml parses")
    }

    pub fn load(path: &Path) -> Result<Paper> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        Paper::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, file: &str) -> Result<Paper> {
        let paper: Paper =
            toml::from_str(text).with_context(|| format!("{file}: not a paper table"))?;
        for (i, cause) in paper.causes.iter().enumerate() {
            match (cause.when, &cause.key) {
                (When::Departs, Some(key)) if paper.recipe.keys.contains_key(key) => {}
                (When::Departs, key) => bail!(
                    "{file}: cause {} (`departs`) needs a `key` of [recipe], got {key:?}",
                    i + 1
                ),
                (_, Some(key)) => bail!(
                    "{file}: cause {} has a `key` ({key}) but only `departs` causes take one",
                    i + 1
                ),
                (_, None) => {}
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for row in &paper.rows {
            if !seen.insert(&row.id) {
                bail!("{file}: row id `{}` appears twice", row.id);
            }
            for s in std::iter::once(&row.source).chain(row.also.iter().map(|a| &a.source)) {
                if !paper.sources.contains_key(s) {
                    bail!("{file}: row `{}` cites an unknown source `{s}`", row.id);
                }
            }
        }
        Ok(paper)
    }

    /// The row named `id`, or an error listing the ids that share its table prefix.
    pub fn row(&self, id: &str) -> Result<&Row> {
        if let Some(row) = self.rows.iter().find(|r| r.id == id) {
            return Ok(row);
        }
        let prefix = id.split('.').next().unwrap_or(id);
        let near: Vec<&str> = self
            .rows
            .iter()
            .filter(|r| r.id.starts_with(prefix))
            .map(|r| r.id.as_str())
            .collect();
        bail!(
            "paper/meanflow.toml has no row `{id}`{}",
            if near.is_empty() {
                String::new()
            } else {
                format!(" (rows with that prefix: {})", near.join(", "))
            }
        )
    }

    /// The rows among `ids` that describe the run of `spec`, checking every id exists.
    pub fn rows_for<'a>(&'a self, ids: &[String], spec: &Spec) -> Result<Vec<&'a Row>> {
        let mut out = Vec::new();
        for id in ids {
            let row = self.row(id)?;
            if row.matches(spec) {
                out.push(row);
            }
        }
        Ok(out)
    }

    pub fn source<'a>(&'a self, key: &'a str) -> &'a str {
        self.sources.get(key).map_or(key, String::as_str)
    }

    pub fn model(&self, preset: &str) -> Option<&ModelRow> {
        self.models.iter().find(|m| m.preset == preset)
    }
}

impl Row {
    /// Whether a resolved spec holds every one of this row's settings (model and length aside:
    /// see [`Row::incomparable`]).
    pub fn matches(&self, spec: &Spec) -> bool {
        let resolved = toml::Value::try_from(spec).expect("a spec serialises to TOML");
        self.settings.iter().all(|(key, want)| {
            let got = key.split('.').try_fold(&resolved, |v, k| v.get(k));
            got.is_some_and(|got| same_value(got, want))
        })
    }

    /// Why a run of `spec` cannot be held to this row's number (None when it can): another
    /// network, another training length, or data at another scale than ImageNet 256 latents.
    pub fn incomparable(&self, spec: &Spec) -> Option<String> {
        // "SiT-XL/2+" is the XL/2 network trained longer; its epochs tell them apart.
        let model = self.model.trim_end_matches('+');
        let preset = spec.model.preset.as_deref().unwrap_or("a custom network");
        let mut why = Vec::new();
        if preset != model {
            why.push(format!("{preset} instead of {}", self.model));
        }
        if let Some(epochs) = self.epochs {
            if epochs != spec.train.epochs {
                why.push(format!("{} epochs instead of {epochs}", spec.train.epochs));
            }
        }
        let scale = super::runs::Scale::of(spec);
        if !scale.is_papers() {
            why.push(format!(
                "{} instead of ImageNet 256 latents",
                scale.describe()
            ));
        }
        (!why.is_empty()).then(|| why.join(", "))
    }
}

/// TOML values equal as the spec means them: 1 and 1.0 are the same number.
fn same_value(a: &toml::Value, b: &toml::Value) -> bool {
    let num = |v: &toml::Value| v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
    match (a, b, num(a), num(b)) {
        (_, _, Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        (toml::Value::Array(x), toml::Value::Array(y), _, _) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(x, y))
        }
        _ => a == b,
    }
}
