use std::fmt;

/// One spec problem, named by file, line, key and what was expected.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecError {
    pub file: String,
    /// 1-based (line, column) where the file shows the problem, when it does.
    pub position: Option<(usize, usize)>,
    /// Dotted key path such as `meanflow.omega`, when one is to blame.
    pub key: Option<String>,
    pub message: String,
}

impl std::error::Error for SpecError {}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl SpecError {
    pub fn whole(file: &str, message: String) -> Self {
        Self {
            file: file.to_owned(),
            position: None,
            key: None,
            message,
        }
    }

    pub(crate) fn from_serde(
        file: &str,
        src: &str,
        e: serde_path_to_error::Error<toml::de::Error>,
    ) -> Self {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let position = inner.span().map(|s| line_col(src, s.start));
        let key = (path != "." && !path.is_empty()).then_some(path);
        let message = inner.message().trim().replace('\n', "; ");
        let message = if key.is_none() && position.is_some() && !message.starts_with("missing") {
            format!("invalid TOML: {message}")
        } else {
            message
        };
        Self {
            file: file.to_owned(),
            position,
            key,
            message,
        }
    }

    pub(crate) fn at_key(file: &str, src: &str, key: &str, message: String) -> Self {
        Self {
            file: file.to_owned(),
            position: locate(src, key),
            key: Some(key.to_owned()),
            message,
        }
    }
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Where a dotted key is written in the file (None when it took its default).
fn locate(src: &str, key: &str) -> Option<(usize, usize)> {
    let doc = toml_edit::ImDocument::parse(src).ok()?;
    let mut table = doc.as_table() as &dyn toml_edit::TableLike;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            let (k, _) = table.get_key_value(part)?;
            return k.span().map(|s| line_col(src, s.start));
        }
        table = table.get(part)?.as_table_like()?;
    }
    None
}
