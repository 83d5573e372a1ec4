//! Alert rules over the fleet's live figures: each rule fires when its condition holds and
//! resolves when it stops holding; every change is returned (to be published on
//! `<prefix>.alerts`) and the latest state of every rule that ever fired is kept for the page.

use std::collections::BTreeMap;
use taskfleet_config::AlertRule;
use taskfleet_proto::{Alert, AlertState, Figures, WorkerFigures};

/// Evaluates the configured rules.
pub struct Alerts {
    /// Rules by name.
    rules: Vec<(String, AlertRule)>,
    min_samples: u64,
    latest: BTreeMap<String, Alert>,
}

impl Alerts {
    /// Rules to evaluate; latency and rate rules wait for `min_samples` final states in the window.
    pub fn new<'a>(rules: impl IntoIterator<Item = (&'a str, &'a AlertRule)>, min_samples: u64) -> Alerts {
        let rules = rules.into_iter().map(|(name, rule)| (name.to_string(), rule.clone())).collect();
        Alerts { rules, min_samples, latest: BTreeMap::new() }
    }

    /// The value of a rule's metric, when there is enough to judge by.
    fn value(&self, metric: &str, fleet: &Figures, workers: &[WorkerFigures]) -> Option<f64> {
        let sampled = fleet.end_to_end_ms.count >= self.min_samples;
        let max_of = |f: fn(&WorkerFigures) -> f64| workers.iter().map(f).reduce(f64::max);
        match metric {
            "p50_ms" if sampled => fleet.end_to_end_ms.p50,
            "p95_ms" if sampled => fleet.end_to_end_ms.p95,
            "p99_ms" if sampled => fleet.end_to_end_ms.p99,
            "max_ms" if sampled => fleet.end_to_end_ms.max,
            "queue_wait_p95_ms" if sampled => fleet.queue_wait_ms.p95,
            "run_p95_ms" if sampled => fleet.run_ms.p95,
            "error_rate" if sampled => fleet.error_rate,
            "retry_rate" if sampled => fleet.retry_rate,
            "cache_hit_rate" if sampled => fleet.cache_hit_rate,
            "throughput_per_s" => Some(fleet.throughput_per_s),
            "utilization" => fleet.utilization,
            "memory_percent" => max_of(|w| w.memory_percent),
            "cpu_percent" => max_of(|w| w.cpu_percent),
            _ => None,
        }
    }

    /// Evaluates every rule; returns the alerts whose state changed.
    pub fn evaluate(&mut self, fleet: &Figures, workers: &[WorkerFigures], now_ms: u64) -> Vec<Alert> {
        let mut changes = Vec::new();
        for (name, rule) in &self.rules {
            let Some(value) = self.value(&rule.metric, fleet, workers) else { continue };
            let holds = if rule.above { value > rule.threshold } else { value < rule.threshold };
            let firing = self.latest.get(name).is_some_and(|a| a.state == AlertState::Firing);
            if holds == firing {
                continue;
            }
            let op = if rule.above { ">" } else { "<" };
            let alert = Alert {
                rule: name.clone(),
                state: if holds { AlertState::Firing } else { AlertState::Resolved },
                metric: rule.metric.clone(),
                value,
                op: op.to_string(),
                threshold: rule.threshold,
                since: now_ms,
                message: if holds {
                    format!("{name}: {} is {} ({op} {})", rule.metric, round(value), rule.threshold)
                } else {
                    format!("{name}: {} back to {} (threshold {op} {})", rule.metric, round(value), rule.threshold)
                },
            };
            changes.push(alert.clone());
        }
        for a in &changes {
            self.latest.insert(a.rule.clone(), a.clone());
        }
        changes
    }

    /// The latest state of every rule that ever fired, firing ones first.
    pub fn latest(&self) -> Vec<Alert> {
        let mut v: Vec<Alert> = self.latest.values().cloned().collect();
        v.sort_by_key(|a| (a.state != AlertState::Firing, std::cmp::Reverse(a.since)));
        v
    }
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskfleet_proto::Latency;

    fn rule(metric: &str, above: bool, threshold: f64) -> AlertRule {
        AlertRule { metric: metric.into(), above, threshold }
    }

    #[test]
    fn fires_once_then_resolves() {
        let (slow, cache) = (rule("p95_ms", true, 5000.0), rule("cache_hit_rate", false, 0.5));
        let mut alerts = Alerts::new([("slow", &slow), ("cache", &cache)], 20);
        let mut fleet = Figures {
            end_to_end_ms: Latency { count: 100, p50: Some(10.0), p95: Some(6000.0), p99: Some(7000.0), max: None },
            cache_hit_rate: Some(0.9),
            ..Figures::default()
        };
        let fired = alerts.evaluate(&fleet, &[], 1);
        assert_eq!(fired.len(), 1);
        assert_eq!((fired[0].rule.as_str(), fired[0].state), ("slow", AlertState::Firing));
        assert!(alerts.evaluate(&fleet, &[], 2).is_empty(), "no repeat while it holds");
        fleet.end_to_end_ms.p95 = Some(100.0);
        let resolved = alerts.evaluate(&fleet, &[], 3);
        assert_eq!(resolved[0].state, AlertState::Resolved);
        // Too few samples: no judgement either way.
        fleet.end_to_end_ms.count = 5;
        fleet.cache_hit_rate = Some(0.1);
        assert!(alerts.evaluate(&fleet, &[], 4).is_empty());
        assert_eq!(alerts.latest().len(), 1);
    }
}
