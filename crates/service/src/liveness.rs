//! Liveness: every long-running loop registers a [`Beat`] and ticks it each iteration (one
//! atomic store); `/healthz` answers 503 naming any loop silent for longer than its maximum.
//! A loop that ends drops its beat and is no longer watched.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// Milliseconds since the first use in this process: the clock of every beat.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

struct Slot {
    name: String,
    max_silence: Duration,
    last_ms: AtomicU64,
}

/// The registry of watched loops; clones share it.
#[derive(Clone, Default)]
pub struct Liveness {
    slots: Arc<Mutex<Vec<Weak<Slot>>>>,
}

/// One loop's heartbeat, ticked every iteration. Dropping it unregisters the loop.
pub struct Beat(Arc<Slot>);

impl Beat {
    /// Notes that the loop is alive now.
    pub fn tick(&self) {
        self.0.last_ms.store(now_ms(), Ordering::Relaxed);
    }
}

impl Liveness {
    /// Watches a loop called `name` that must tick at least every `max_silence` (it counts as
    /// alive from now).
    pub fn register(&self, name: impl Into<String>, max_silence: Duration) -> Beat {
        let slot = Arc::new(Slot { name: name.into(), max_silence, last_ms: AtomicU64::new(now_ms()) });
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|w| w.strong_count() > 0);
        slots.push(Arc::downgrade(&slot));
        Beat(slot)
    }

    /// `Ok` when every watched loop ticked within its maximum, else the silent ones, e.g.
    /// `"recorder silent for 130s (max 120s)"`.
    pub fn check(&self) -> Result<(), String> {
        let now = now_ms();
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let silent: Vec<String> = slots
            .iter()
            .filter_map(Weak::upgrade)
            .filter_map(|s| {
                let silence = Duration::from_millis(now.saturating_sub(s.last_ms.load(Ordering::Relaxed)));
                (silence > s.max_silence).then(|| {
                    format!(
                        "{} silent for {:.1}s (max {:.1}s)",
                        s.name,
                        silence.as_secs_f64(),
                        s.max_silence.as_secs_f64()
                    )
                })
            })
            .collect();
        if silent.is_empty() { Ok(()) } else { Err(silent.join("; ")) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_registry_is_alive() {
        assert_eq!(Liveness::default().check(), Ok(()));
    }

    #[test]
    fn a_loop_silent_past_its_maximum_is_named_and_a_tick_revives_it() {
        let live = Liveness::default();
        let quick = live.register("quick", Duration::from_millis(50));
        let _slow = live.register("slow", Duration::from_secs(60));
        assert_eq!(live.check(), Ok(()));
        std::thread::sleep(Duration::from_millis(120));
        let err = live.check().expect_err("quick is silent");
        assert!(err.starts_with("quick silent for"), "{err}");
        assert!(!err.contains("slow"), "{err}");
        quick.tick();
        assert_eq!(live.check(), Ok(()));
    }

    #[test]
    fn a_dropped_beat_is_no_longer_watched() {
        let live = Liveness::default();
        let beat = live.register("ended", Duration::from_millis(10));
        std::thread::sleep(Duration::from_millis(40));
        assert!(live.check().is_err());
        drop(beat);
        assert_eq!(live.check(), Ok(()));
        assert_eq!(live.slots.lock().unwrap().iter().filter(|w| w.strong_count() > 0).count(), 0);
    }

    #[test]
    fn clones_share_the_registry_and_every_silent_loop_is_named() {
        let live = Liveness::default();
        let (_a, _b) = (live.clone().register("a", Duration::ZERO), live.register("b", Duration::ZERO));
        std::thread::sleep(Duration::from_millis(5));
        let err = live.check().expect_err("both silent");
        assert!(err.contains("a silent") && err.contains("b silent"), "{err}");
    }
}
