//! The worker's status report: every `worker.status_interval` it publishes its in-flight
//! count, capacity, CPU and memory on `<prefix>.workers.status` (core NATS, JSON), which the
//! aggregator turns into per-worker figures, the fleet's utilisation and memory alerts.

use crate::WorkerStats;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use taskfleet_proto::{WorkerStatus, now_ms};
use tokio_util::sync::CancellationToken;

/// What the status loop reports about.
pub(crate) struct Presence {
    pub client: async_nats::Client,
    pub subject: String,
    pub id: String,
    pub queues: Vec<String>,
    pub max_concurrent: u64,
    pub stats: Arc<WorkerStats>,
    pub every: Duration,
}

impl Presence {
    /// Reports until `stop`, then sends a last report marked `stopping`.
    pub async fn run(self, stop: CancellationToken) {
        let mut cpu = CpuMeter::new();
        let mut tick = tokio::time::interval(self.every);
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                _ = stop.cancelled() => true,
            };
            let status = WorkerStatus {
                id: self.id.clone(),
                queues: self.queues.clone(),
                in_flight: self.stats.in_flight.load(Ordering::Relaxed),
                buffered: self.stats.buffered.load(Ordering::Relaxed),
                max_concurrent: self.max_concurrent,
                cpu_percent: cpu.percent(),
                rss_bytes: rss_bytes().unwrap_or(0),
                memory_limit_bytes: memory_limit_bytes().unwrap_or(0),
                at: now_ms(),
                stopping,
            };
            if let Ok(body) = serde_json::to_vec(&status)
                && let Err(e) = self.client.publish(self.subject.clone(), body.into()).await
            {
                tracing::debug!(error = %e, "cannot publish worker status");
            }
            if stopping {
                let _ = self.client.flush().await;
                return;
            }
        }
    }
}

/// CPU time of this process between two readings, as a percentage of one core.
struct CpuMeter {
    last: Option<(Instant, f64)>,
}

impl CpuMeter {
    fn new() -> Self {
        CpuMeter { last: cpu_seconds().map(|s| (Instant::now(), s)) }
    }

    fn percent(&mut self) -> f64 {
        let (Some(now_cpu), Some((then, then_cpu))) = (cpu_seconds(), self.last) else { return 0.0 };
        let wall = then.elapsed().as_secs_f64();
        self.last = Some((Instant::now(), now_cpu));
        if wall <= 0.0 { 0.0 } else { ((now_cpu - then_cpu) / wall * 100.0).max(0.0) }
    }
}

/// User + system CPU seconds of this process (Linux `/proc/self/stat`, 100 ticks per second).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Resident set size (Linux `/proc/self/statm`, 4 KiB pages).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The cgroup v2 memory limit, else the machine's memory.
fn memory_limit_bytes() -> Option<u64> {
    if let Ok(max) = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        && let Ok(n) = max.trim().parse::<u64>()
    {
        return Some(n);
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        assert!(rss_bytes().unwrap() > 0);
        assert!(memory_limit_bytes().unwrap() > rss_bytes().unwrap());
        let mut m = CpuMeter::new();
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        let p = m.percent();
        assert!(p > 10.0 && p < 250.0, "{p}");
    }
}
