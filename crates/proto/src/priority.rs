//! Task priorities.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How urgently a task should run. Workers prefer higher priorities but keep a bounded share
/// of their slots for lower ones, so nothing starves.
///
/// The derived ordering puts `Critical` first: `Priority::Critical < Priority::Low`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Runs before everything else.
    Critical,
    /// Runs before normal and low work.
    High,
    /// The default.
    #[default]
    Normal,
    /// Background work; gets what is left, plus its guaranteed share.
    Low,
}

impl Priority {
    /// All priorities, most urgent first.
    pub const ALL: [Priority; 4] = [Priority::Critical, Priority::High, Priority::Normal, Priority::Low];

    /// The lowercase name used in subjects, consumer names and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// Position in [`Priority::ALL`]: 0 for critical … 3 for low.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error returned when a string names no priority.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown priority {0:?} (expected critical, high, normal or low)")]
pub struct UnknownPriority(pub String);

impl FromStr for Priority {
    type Err = UnknownPriority;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "critical" => Ok(Priority::Critical),
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            _ => Err(UnknownPriority(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_and_names_round_trip() {
        assert!(Priority::Critical < Priority::High && Priority::Normal < Priority::Low);
        for (i, p) in Priority::ALL.iter().enumerate() {
            assert_eq!(p.index(), i);
            assert_eq!(p.as_str().parse::<Priority>().unwrap(), *p);
        }
        assert!("urgent".parse::<Priority>().is_err());
    }
}
