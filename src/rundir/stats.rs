//! stats.jsonl: one [`StatLine`] per line, appended as training goes. Each line goes out in one
//! write, so a kill leaves at most a partial last line; readers skip it, and a resumed run
//! drops it with every line after its checkpoint, so its log reads as an uninterrupted run's.
use super::records::StatLine;
use super::tensorboard::Events;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The complete lines of a stats.jsonl's text, and whether a partial last line was left out.
fn complete_lines(text: &str) -> (Vec<&str>, bool) {
    let partial = !text.is_empty() && !text.ends_with('\n');
    let mut lines: Vec<&str> = text.split('\n').collect();
    lines.pop(); // after the last newline: empty, or the partial line
    (lines, partial)
}

/// Every complete line of a stats.jsonl (a missing file has none). A line that is not a stat
/// line is an error naming it; a partial last line (a kill mid-write) is not a line yet.
pub fn read_stats(path: &Path) -> Result<Vec<StatLine>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => bail!("{}: cannot read ({e})", path.display()),
    };
    let (lines, _) = complete_lines(&text);
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}: line {} is not a stats line", path.display(), i + 1))
        })
        .collect()
}

/// The log a training process appends to, and its TensorBoard twin.
pub struct StatsLog {
    path: PathBuf,
    file: std::fs::File,
    events: Events,
}

impl StatsLog {
    /// Opens `path` to continue after step `resumed_at` (0: a fresh start): a partial last
    /// line, lines that do not parse (an older version's kill), and lines of later steps (logged
    /// after the checkpoint resumed from, and about to be logged again) are dropped first.
    pub fn continue_after(path: &Path, resumed_at: u64, events: Events) -> Result<StatsLog> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => bail!("{}: cannot read ({e})", path.display()),
        };
        let (lines, partial) = complete_lines(&text);
        let kept: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| serde_json::from_str::<StatLine>(l).is_ok_and(|s| s.step <= resumed_at))
            .collect();
        if partial || kept.len() != lines.len() {
            let dropped = lines.len() - kept.len();
            eprintln!(
                "{}: continuing after step {resumed_at}: {dropped} later or unreadable line(s){} dropped",
                path.display(),
                if partial { " and a partial last line" } else { "" }
            );
            let body: String = kept.iter().map(|l| format!("{l}\n")).collect();
            crate::files::write_atomic(path, body.as_bytes())?;
        }
        let file = crate::files::open_append(path)?;
        events.rewrite(&read_stats(path)?)?;
        Ok(StatsLog {
            path: path.to_owned(),
            file,
            events,
        })
    }

    /// Appends one line, in one write.
    pub fn append(&mut self, line: &StatLine) -> Result<()> {
        let mut text = serde_json::to_string(line)?;
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .with_context(|| format!("{}: cannot write", self.path.display()))?;
        self.events.stat(line)
    }
}
