//! Which priority a free slot takes next.

/// Smooth weighted round robin over the priorities that have work.
///
/// Among priorities with waiting tasks, each pick adds every competitor's weight to its credit,
/// takes the one with the most credit, and charges it the sum of the competitors' weights. Over
/// any run of `Σ weights` picks each priority gets exactly its weight's share, evenly spread, so
/// a lower priority is never starved while a higher one is flooded. Credits restart whenever the
/// set of competitors changes: a critical task that arrives behind a backlog of low ones is
/// therefore picked next, not after the backlog has spent credit it saved up.
#[derive(Debug, Clone)]
pub struct PriorityPicker {
    weights: [i64; 4],
    credit: [i64; 4],
    competing: [bool; 4],
}

impl PriorityPicker {
    /// A picker with weights indexed by `Priority::index` (critical first). Zero weights are
    /// treated as one.
    pub fn new(weights: [u32; 4]) -> Self {
        PriorityPicker { weights: weights.map(|w| i64::from(w.max(1))), credit: [0; 4], competing: [false; 4] }
    }

    /// Chooses among the priorities whose flag in `has_work` is set; `None` when none is.
    pub fn pick(&mut self, has_work: [bool; 4]) -> Option<usize> {
        if !has_work.iter().any(|w| *w) {
            return None;
        }
        if has_work != self.competing {
            self.competing = has_work;
            self.credit = [0; 4];
        }
        let mut total = 0;
        let mut best: Option<usize> = None;
        for i in (0..4).filter(|i| has_work[*i]) {
            self.credit[i] += self.weights[i];
            total += self.weights[i];
            // Ties go to the higher priority (lower index) because of the strict `>`.
            if best.is_none_or(|b| self.credit[i] > self.credit[b]) {
                best = Some(i);
            }
        }
        let chosen = best?;
        self.credit[chosen] -= total;
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: [u32; 4] = [16, 8, 4, 1];

    #[test]
    fn nothing_to_pick() {
        assert_eq!(PriorityPicker::new(W).pick([false; 4]), None);
    }

    #[test]
    fn critical_overtakes_a_low_backlog_at_once() {
        let mut p = PriorityPicker::new(W);
        for _ in 0..100 {
            assert_eq!(p.pick([false, false, false, true]), Some(3));
        }
        assert_eq!(p.pick([true, false, false, true]), Some(0));
    }

    #[test]
    fn shares_follow_weights_under_full_load() {
        let mut p = PriorityPicker::new(W);
        let mut counts = [0; 4];
        for _ in 0..29 * 100 {
            counts[p.pick([true; 4]).unwrap()] += 1;
        }
        assert_eq!(counts, [1600, 800, 400, 100]);
    }

    #[test]
    fn low_is_never_starved_by_a_critical_flood() {
        let mut p = PriorityPicker::new(W);
        let picks: Vec<usize> = (0..170).map(|_| p.pick([true, false, false, true]).unwrap()).collect();
        // In every window of 17 consecutive picks, low gets exactly one.
        for window in picks.windows(17).step_by(17) {
            assert_eq!(window.iter().filter(|i| **i == 3).count(), 1, "{picks:?}");
        }
        assert_eq!(picks[0], 0, "the flood's first pick is critical");
    }

    #[test]
    fn higher_priority_wins_ties() {
        let mut p = PriorityPicker::new([1, 1, 1, 1]);
        assert_eq!(p.pick([false, true, true, false]), Some(1));
        assert_eq!(p.pick([false, true, true, false]), Some(2));
    }
}
