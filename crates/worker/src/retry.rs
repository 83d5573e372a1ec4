//! Retry delays.

use rand::Rng;
use std::time::Duration;

/// Exponential backoff with full jitter: the delay before attempt `n + 1` is uniform in
/// `[0, min(max, base · factorⁿ⁻¹)]`. Full jitter spreads retries of many tasks that failed
/// together (a provider outage) instead of sending them back in a wave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Delay ceiling after the first failure.
    pub base: Duration,
    /// Growth per attempt.
    pub factor: f64,
    /// Largest delay.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { base: Duration::from_secs(1), factor: 2.0, max: Duration::from_secs(300) }
    }
}

impl RetryPolicy {
    /// The ceiling of the delay after failed attempt `attempt` (from 1).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = self.factor.powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = (self.base.as_secs_f64() * exp).min(self.max.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// A jittered delay after failed attempt `attempt`, at least `floor` (e.g. a Retry-After).
    pub fn delay(&self, attempt: u32, floor: Option<Duration>) -> Duration {
        let ceiling = self.ceiling(attempt);
        let jittered = Duration::from_secs_f64(rand::rng().random_range(0.0..=ceiling.as_secs_f64()));
        jittered.max(floor.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let p = RetryPolicy::default();
        assert_eq!(p.ceiling(1), Duration::from_secs(1));
        assert_eq!(p.ceiling(3), Duration::from_secs(4));
        assert_eq!(p.ceiling(30), Duration::from_secs(300));
        for attempt in 1..10 {
            let d = p.delay(attempt, None);
            assert!(d <= p.ceiling(attempt));
        }
        assert!(p.delay(1, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
    }
}
