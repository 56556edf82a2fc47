//! Experiment specs: the TOML file schema (serde, unknown keys rejected), its validation, and the
//! checked runtime configs the other modules take. A resolved spec has every default filled in;
//! it serialises back to TOML, and the sha256 of that text identifies the experiment.
mod error;
mod runtime;
mod schema;
mod validate;

pub use error::SpecError;
pub use schema::{
    implicit_defaults, EvalSection, ExperimentSection, ImfSection, MeanFlowSection, Method,
    ModelSection, PaperSection, Precision, SampleLabels, SamplePrecision, SampleSection, Spec,
    TrainSection,
};

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

impl Spec {
    /// Reads, parses, resolves and validates a spec file.
    pub fn load(path: &Path) -> Result<Spec, SpecError> {
        Spec::load_with(path, &[])
    }

    /// [`Spec::load`] after applying `key=value` overrides (`train.epochs=2`; the value is
    /// TOML, or a bare string).
    pub fn load_with(path: &Path, sets: &[String]) -> Result<Spec, SpecError> {
        let file = path.display().to_string();
        let src = std::fs::read_to_string(path)
            .map_err(|e| SpecError::whole(&file, format!("cannot read the spec: {e}")))?;
        if sets.is_empty() {
            return Spec::parse(&src, &file);
        }
        let mut doc: toml_edit::DocumentMut = src.parse().map_err(|e: toml_edit::TomlError| {
            SpecError::whole(&file, format!("invalid TOML: {}", e.message()))
        })?;
        for set in sets {
            let (key, value) = set.split_once('=').ok_or_else(|| {
                SpecError::whole(
                    &file,
                    format!("--set {set}: expected key=value, e.g. train.epochs=2"),
                )
            })?;
            let value: toml_edit::Value =
                value.trim().parse().unwrap_or_else(|_| value.trim().into());
            let parts = toml_edit::Key::parse(key.trim()).map_err(|e| {
                SpecError::whole(
                    &file,
                    format!("--set {key}: not a TOML key path ({})", e.message().trim()),
                )
            })?;
            let (last, tables) = parts.split_last().expect("a parsed key has a part");
            let mut table = doc.as_table_mut();
            for part in tables {
                table = table
                    .entry(part.get())
                    .or_insert_with(toml_edit::table)
                    .as_table_mut()
                    .ok_or_else(|| {
                        SpecError::whole(
                            &file,
                            format!("--set {key}: `{}` is not a section", part.get()),
                        )
                    })?;
            }
            table.insert(last.get(), toml_edit::value(value));
        }
        Spec::parse(&doc.to_string(), &format!("{file} (with --set)"))
    }

    /// The runs this spec stands for: one named `default`, one per point of its sweep (named by
    /// the swept values, `data_proportion=0.75`), or `default` and the other points of its
    /// ablation groups, each with its own resolved spec.
    pub fn points(&self, file: &str) -> Result<Vec<(String, Spec)>, SpecError> {
        let mut base = self.clone();
        base.sweep.clear();
        base.ablations.clear();
        match (self.sweep.is_empty(), self.ablations.is_empty()) {
            (true, true) => Ok(vec![("default".to_owned(), base)]),
            (false, true) => {
                let points = grid(&base, &self.sweep, "sweep", file)?;
                let mut names = std::collections::BTreeSet::new();
                if let Some((name, _)) = points.iter().find(|(n, _)| !names.insert(n.clone())) {
                    return Err(SpecError::whole(
                        file,
                        format!("two sweep points are both `{name}` (a value listed twice?): each point is a run directory of its own"),
                    ));
                }
                Ok(points)
            }
            (true, false) => {
                let base_sha = base.sha256();
                let mut seen = std::collections::BTreeSet::from([base_sha.clone()]);
                let mut out = vec![("default".to_owned(), base.clone())];
                for (group, keys) in &self.ablations {
                    for (name, spec) in grid(&base, keys, &format!("ablations.{group}"), file)? {
                        if seen.insert(spec.sha256()) {
                            out.push((name, spec));
                        }
                    }
                }
                let mut names = std::collections::BTreeSet::new();
                if let Some((name, _)) = out.iter().find(|(n, _)| !names.insert(n.clone())) {
                    return Err(SpecError::whole(
                        file,
                        format!("two ablation points are both named `{name}`: give their keys distinct values"),
                    ));
                }
                Ok(out)
            }
            (false, false) => Err(SpecError::whole(
                file,
                "`sweep` and `ablations`: use one of them (ablation groups are sweeps of their own)"
                    .into(),
            )),
        }
    }

    /// Parses TOML text; `file` names it in errors.
    pub fn parse(src: &str, file: &str) -> Result<Spec, SpecError> {
        let de = toml::Deserializer::new(src);
        let mut spec: Spec = serde_path_to_error::deserialize(de)
            .map_err(|e| SpecError::from_serde(file, src, e))?;
        spec.resolve()
            .map_err(|(key, msg)| SpecError::at_key(file, src, &key, msg))?;
        spec.validate()
            .map_err(|(key, msg)| SpecError::at_key(file, src, &key, msg))?;
        // Every sweep point must be a valid spec too.
        spec.points(file)?;
        Ok(spec)
    }

    /// The resolved spec as TOML: every field explicit, defaults included.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a resolved spec serialises")
    }

    /// sha256 of [`Spec::to_toml`] without the `[paper]` section, lowercase hex: what a run
    /// computes does not depend on which paper rows it is compared with.
    pub fn sha256(&self) -> String {
        let mut computed = self.clone();
        computed.paper = PaperSection::default();
        let digest = Sha256::digest(computed.to_toml().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// More runs than this in one spec is a typo (a list pasted twice, a range too fine), not an
/// experiment; the grid is counted before any point is built.
pub const MAX_POINTS: usize = 10_000;

/// A run's name is a folder of results/ (at most 255 bytes on common filesystems).
const MAX_NAME: usize = 255;

/// Every point of the grid `keys` spans around `base`, named by its values.
fn grid(
    base: &Spec,
    keys: &BTreeMap<String, Vec<toml::Value>>,
    table: &str,
    file: &str,
) -> Result<Vec<(String, Spec)>, SpecError> {
    let mut base = toml::Value::try_from(base).expect("a resolved spec is TOML");
    // A top-level key left out at its default (`method`) can be swept too.
    if let Some(table) = base.as_table_mut() {
        for (key, value) in schema::implicit_defaults() {
            if !key.contains('.') {
                table.entry(key).or_insert(value);
            }
        }
    }
    let points = keys
        .values()
        .try_fold(1usize, |n, values| n.checked_mul(values.len()))
        .filter(|n| *n <= MAX_POINTS);
    if points.is_none() {
        let sizes: Vec<String> = keys.values().map(|v| v.len().to_string()).collect();
        return Err(SpecError::whole(
            file,
            format!(
                "`{table}` spans {} points, more than the {MAX_POINTS} runs one spec may hold: split it",
                sizes.join(" x ")
            ),
        ));
    }
    let mut grid: Vec<Vec<(&String, &toml::Value)>> = vec![Vec::new()];
    for (key, values) in keys {
        if key == "model.preset" {
            return Err(SpecError::whole(
                file,
                format!(
                    "`{table}.model.preset`: sweep the shape fields (model.depth, ...) instead"
                ),
            ));
        }
        if values.is_empty() {
            return Err(SpecError::whole(
                file,
                format!("`{table}.{key}`: expected a non-empty list of values"),
            ));
        }
        grid = grid
            .into_iter()
            .flat_map(|point| {
                values
                    .iter()
                    .map(move |v| [point.clone(), vec![(key, v)]].concat())
            })
            .collect();
    }
    grid.into_iter()
        .map(|point| {
            let mut value = base.clone();
            let mut names = Vec::new();
            for (key, v) in &point {
                let slot = key
                    .split('.')
                    .try_fold(&mut value, |node, part| node.get_mut(part))
                    .ok_or_else(|| {
                        SpecError::whole(file, format!("`{table}.{key}`: not a field of the spec"))
                    })?;
                *slot = (*v).clone();
                let shown = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                if shown.chars().any(char::is_control) {
                    return Err(SpecError::whole(
                        file,
                        format!("`{table}.{key}`: the value {shown:?} holds a control character, and run folders are named by their values: remove it"),
                    ));
                }
                names.push(
                    format!("{}={}", key.rsplit('.').next().unwrap_or(key), shown)
                        .replace(['/', ' '], "_"),
                );
            }
            let name = names.join(",");
            if name.len() > MAX_NAME {
                return Err(SpecError::whole(
                    file,
                    format!("`{table}`: the run name `{}...` is longer than {MAX_NAME} bytes (a folder name): use shorter values", &name[..name.floor_char_boundary(40)]),
                ));
            }
            let keys: Vec<String> = point.iter().map(|(k, _)| format!("{table}.{k}")).collect();
            let at =
                |msg: String| SpecError::whole(file, format!("`{}`: {msg}", keys.join("`, `")));
            let mut spec: Spec =
                serde_path_to_error::deserialize(value).map_err(|e| at(e.inner().to_string()))?;
            // A point of another method takes that method's defaults.
            spec.resolve().map_err(|(_, msg)| at(msg))?;
            spec.validate().map_err(|(_, msg)| at(msg))?;
            Ok((name, spec))
        })
        .collect()
}
