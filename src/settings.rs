//! Numbers read from the environment, each range-checked before it becomes a duration: a
//! typo'd or absurd value (`inf`, `1e30`) is one sentence naming the variable and its range,
//! never a panic deep inside `Duration`.
use anyhow::{bail, Result};
use std::time::Duration;

/// Seconds between two progress lines in a log file: `MFR_LOG_INTERVAL`, 60 by default.
pub const LOG_INTERVAL: Seconds = Seconds {
    key: "MFR_LOG_INTERVAL",
    default: 60.0,
    min: 0.0,
    max: 86_400.0,
};

/// How long a rank waits for the others in a collective: `MFR_DIST_TIMEOUT`, 1800 by default
/// (the range allows short test timeouts and a week-long stall at most).
pub const DIST_TIMEOUT: Seconds = Seconds {
    key: "MFR_DIST_TIMEOUT",
    default: 1800.0,
    min: 1.0,
    max: 604_800.0,
};

/// A number of seconds an environment variable may set.
pub struct Seconds {
    pub key: &'static str,
    pub default: f64,
    pub min: f64,
    pub max: f64,
}

impl Seconds {
    /// `value` checked against the range.
    pub fn parse(&self, value: &str) -> Result<Duration> {
        match value.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && (self.min..=self.max).contains(&s) => {
                Ok(Duration::from_secs_f64(s))
            }
            _ => bail!(
                "{}={value}: expected a number of seconds in [{}, {}]",
                self.key,
                self.min,
                self.max
            ),
        }
    }

    /// The variable's value, or the default when it is unset or empty.
    pub fn get(&self) -> Result<Duration> {
        match std::env::var(self.key) {
            Ok(v) if !v.trim().is_empty() => self.parse(&v),
            _ => Ok(Duration::from_secs_f64(self.default)),
        }
    }
}

/// Every variable above, checked once at start-up so that a bad value stops the command before
/// any work (readers deep inside long work then take the value as given).
pub fn check() -> Result<()> {
    LOG_INTERVAL.get()?;
    DIST_TIMEOUT.get()?;
    Ok(())
}
