//! Progress of long work (training, sampling, featurising, preparing, downloading), for a person
//! at a terminal and for a log file alike: on a terminal, an indicatif bar; when stderr is a file
//! or a pipe (sbatch, nohup, `make demo > log`), one timestamped line every interval
//! ($MFR_LOG_INTERVAL seconds, default 60) and one at the end:
//!
//! ```text
//! 2026-11-30T01:02:03Z demo-digits train 280/560 (50%) 9.7/s eta 0:00:29 loss 0.9995 v_loss 31.4
//! ```
//!
//! `--quiet` (or $MFR_QUIET=1) silences both.
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Silences every progress report of this process (`--quiet`).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed) || std::env::var("MFR_QUIET").is_ok_and(|v| v == "1")
}

/// Seconds between two progress lines in a log file (checked at start-up by
/// [`crate::settings::check`]).
fn interval() -> Duration {
    crate::settings::LOG_INTERVAL
        .get()
        .unwrap_or(Duration::from_secs(60))
}

/// A UTC timestamp, `2026-11-30T01:02:03Z`.
pub fn timestamp(at: SystemTime) -> String {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days: the proleptic Gregorian date of a day count.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
}

/// What a log-file reporter remembers between lines.
struct Lines {
    label: String,
    unit: &'static str,
    total: u64,
    position: u64,
    /// Where this process started (a resumed run starts past 0): rates count from here.
    start_position: u64,
    message: String,
    started: Instant,
    last_line: Option<Instant>,
    every: Duration,
}

impl Lines {
    fn line(&self) -> String {
        let elapsed = self.started.elapsed();
        let done = self.position.saturating_sub(self.start_position) as f64;
        let rate = done / elapsed.as_secs_f64().max(1e-9);
        let percent = match self.total {
            0 => String::new(),
            t => format!(" ({:.0}%)", 100.0 * self.position as f64 / t as f64),
        };
        let eta = match (rate > 0.0, self.total > self.position) {
            (true, true) => format!(
                " eta {}",
                clock(Duration::from_secs_f64(
                    (self.total - self.position) as f64 / rate
                ))
            ),
            _ => String::new(),
        };
        let unit = match self.unit {
            "" => String::new(),
            u => format!(" {u}"),
        };
        let message = match self.message.as_str() {
            "" => String::new(),
            m => format!(" {m}"),
        };
        format!(
            "{} {} {}/{}{unit}{percent} {rate:.1}/s{eta} elapsed {}{message}",
            timestamp(SystemTime::now()),
            self.label,
            self.position,
            self.total,
            clock(elapsed)
        )
    }

    fn maybe_print(&mut self) {
        let due = self.last_line.is_none_or(|t| t.elapsed() >= self.every);
        if due {
            eprintln!("{}", self.line());
            self.last_line = Some(Instant::now());
        }
    }
}

enum Mode {
    Hidden,
    Bar(ProgressBar),
    Lines(Mutex<Lines>),
}

/// One piece of long work's progress: `total` units of `unit` ("images", "steps", ...).
pub struct Progress {
    mode: Mode,
}

impl Progress {
    /// A report labelled `label`; a bar on a terminal, lines in a log file, nothing when quiet.
    pub fn new(label: &str, total: u64, unit: &'static str) -> Progress {
        let mode = if quiet() {
            Mode::Hidden
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            let template = match unit {
                "bytes" => "{prefix} {bytes}/{total_bytes} [{elapsed_precise}<{eta_precise}] {bytes_per_sec} {wide_bar}",
                _ => "{prefix} [{elapsed_precise}<{eta_precise}] {wide_bar} {pos}/{len} {msg}",
            };
            bar.set_style(ProgressStyle::with_template(template).expect("a valid template"));
            bar.set_prefix(label.to_owned());
            Mode::Bar(bar)
        } else {
            Mode::Lines(Mutex::new(Lines {
                label: label.to_owned(),
                unit,
                total,
                position: 0,
                start_position: 0,
                message: String::new(),
                started: Instant::now(),
                last_line: None,
                every: interval(),
            }))
        };
        Progress { mode }
    }

    /// A report that shows nothing (a data-parallel rank other than 0).
    pub fn hidden() -> Progress {
        Progress { mode: Mode::Hidden }
    }

    fn with_lines(&self, f: impl FnOnce(&mut Lines)) {
        if let Mode::Lines(lines) = &self.mode {
            f(&mut lines.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }

    /// Where the work starts (a resumed run's first step): shown at once, not counted in rates.
    pub fn start_at(&self, position: u64) {
        match &self.mode {
            Mode::Bar(bar) => bar.set_position(position),
            _ => self.with_lines(|l| {
                l.position = position;
                l.start_position = position;
            }),
        }
    }

    pub fn set_position(&self, position: u64) {
        match &self.mode {
            Mode::Bar(bar) => bar.set_position(position),
            _ => self.with_lines(|l| {
                l.position = position;
                l.maybe_print();
            }),
        }
    }

    pub fn inc(&self, n: u64) {
        match &self.mode {
            Mode::Bar(bar) => bar.inc(n),
            _ => self.with_lines(|l| {
                l.position += n;
                l.maybe_print();
            }),
        }
    }

    pub fn position(&self) -> u64 {
        match &self.mode {
            Mode::Bar(bar) => bar.position(),
            Mode::Lines(l) => l.lock().unwrap_or_else(|p| p.into_inner()).position,
            Mode::Hidden => 0,
        }
    }

    /// The text after the counts (`loss 0.9995 v_loss 31.4`).
    pub fn set_message(&self, message: String) {
        match &self.mode {
            Mode::Bar(bar) => bar.set_message(message),
            _ => self.with_lines(|l| l.message = message),
        }
    }

    /// The work is done: the bar is cleared, a log gets its last line.
    pub fn finish(&self) {
        match &self.mode {
            Mode::Bar(bar) => bar.finish_and_clear(),
            _ => self.with_lines(|l| eprintln!("{}", l.line())),
        }
    }

    /// The work stopped early (an error, a signal): the bar stays as it was.
    pub fn abandon(&self) {
        match &self.mode {
            Mode::Bar(bar) => bar.abandon(),
            _ => self.with_lines(|l| eprintln!("{}", l.line())),
        }
    }
}
