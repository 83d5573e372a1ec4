//! The metrics aggregator's engine: live figures per series over a sliding window with HDR
//! histograms ([`stats`]), alert rules over them ([`alerts`]), and the `/v1/stats` snapshot
//! ([`Snapshot`]) that the dashboard, `taskfleet top` and the `<prefix>.stats` feed share.

pub mod alerts;
pub mod stats;

use serde::Serialize;
use stats::{Figures, HistoryPoint, SeriesFigures, WorkerFigures};
use taskfleet_proto::Alert;

/// Everything the dashboard shows, as served at `/v1/stats`.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// When it was taken, Unix epoch ms.
    pub generated_at: u64,
    /// The window of the live figures, seconds.
    pub window_s: u64,
    /// The whole fleet.
    pub fleet: Figures,
    /// Per queue, kind and priority.
    pub series: Vec<SeriesFigures>,
    /// Workers reporting.
    pub workers: Vec<WorkerFigures>,
    /// Latest state of every alert rule that fired.
    pub alerts: Vec<Alert>,
    /// Chart points, oldest first.
    pub history: Vec<HistoryPoint>,
}
