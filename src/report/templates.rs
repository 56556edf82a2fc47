//! The report's pages as minijinja templates (templates/): one table, note or figure value is
//! rendered to HTML and to Markdown by the same macros of the two formats, and every value is
//! escaped for the format it lands in unless a filter made it safe:
//! - `*.html`: [`safe::html`] (text and double-quoted attributes);
//! - `*.md`: [`safe::markdown`] (values stay text: no link, markup or cell boundary);
//! - `|href`: a link target, kept only if [`Href::is_safe`] (a percent-encoded relative path,
//!   or https); anything else stops the rendering with an error, as a bug would;
//! - `|code`: code, `<code>` in HTML and a code span (or escaped text) in Markdown;
//! - `|safe` (minijinja's): only on text the code composed from numbers and its own words
//!   (table headers, formatted numbers), never on a string that came from a file.
use super::safe::{self, Href};
use anyhow::{anyhow, Result};
use minijinja::value::Value;
use minijinja::{escape_formatter, AutoEscape, Environment, Error, ErrorKind, State};
use serde::Serialize;
use std::sync::OnceLock;

const MARKDOWN: AutoEscape = AutoEscape::Custom("markdown");

const TEMPLATES: [(&str, &str); 6] = [
    ("macros.html", include_str!("templates/macros.html")),
    ("macros.md", include_str!("templates/macros.md")),
    ("report.html", include_str!("templates/report.html")),
    ("report.md", include_str!("templates/report.md")),
    ("table.md", include_str!("templates/table.md")),
    ("discrepancy.md", include_str!("templates/discrepancy.md")),
];

fn environment() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(true);
        env.set_auto_escape_callback(|name| match name.rsplit('.').next() {
            Some("html") => AutoEscape::Html,
            Some("md") => MARKDOWN,
            _ => AutoEscape::None,
        });
        env.set_formatter(|out, state, value| {
            if value.is_none() {
                return Ok(());
            }
            match state.auto_escape() {
                _ if value.is_safe() => escape_formatter(out, state, value),
                MARKDOWN => Ok(out.write_str(&safe::markdown(&value.to_string()))?),
                AutoEscape::Html => Ok(out.write_str(&safe::html(&value.to_string()))?),
                _ => escape_formatter(out, state, value),
            }
        });
        env.add_filter("href", href);
        env.add_filter("code", code);
        for (name, source) in TEMPLATES {
            env.add_template(name, source)
                .expect("the report's templates parse");
        }
        env
    })
}

fn href(target: String) -> Result<Value, Error> {
    match Href::is_safe(&target) {
        true => Ok(Value::from_safe_string(target)),
        false => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("{target:?} is not a link a report may hold"),
        )),
    }
}

fn code(state: &State, text: String) -> Value {
    Value::from_safe_string(match state.auto_escape() {
        AutoEscape::Html => format!("<code>{}</code>", safe::html(&text)),
        _ => safe::markdown_code(&text),
    })
}

/// Renders the template `name` (one of templates/) with `context`.
pub fn render(name: &str, context: impl Serialize) -> Result<String> {
    let template = environment().get_template(name)?;
    template
        .render(context)
        .map_err(|e| anyhow!("rendering {name}: {e:#}"))
}

/// Renders a Markdown template held in data (paper/meanflow.toml's causes) with `context`;
/// `what` names it in an error.
pub fn render_markdown(what: &str, source: &str, context: impl Serialize) -> Result<String> {
    environment()
        .render_named_str("inline.md", source, context)
        .map_err(|e| anyhow!("{what}: {e:#}"))
}

/// Text made of plain words and code, rendered for either format: a note or a sentence with
/// names of runs and files in it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Prose(Vec<Span>);

#[derive(Debug, Clone, Serialize)]
struct Span {
    text: String,
    code: bool,
}

impl Prose {
    pub fn new() -> Prose {
        Prose::default()
    }

    pub fn text(mut self, text: impl Into<String>) -> Prose {
        self.0.push(Span {
            text: text.into(),
            code: false,
        });
        self
    }

    pub fn code(mut self, text: impl Into<String>) -> Prose {
        self.0.push(Span {
            text: text.into(),
            code: true,
        });
        self
    }

    /// The words alone, as a test or a terminal reads them.
    pub fn plain(&self) -> String {
        self.0.iter().map(|s| s.text.as_str()).collect()
    }
}
