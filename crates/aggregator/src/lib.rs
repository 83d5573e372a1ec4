//! The metrics aggregator's engine: live figures per series over a sliding window with HDR
//! histograms ([`stats`]), per run name ([`runs`]) and alert rules over them ([`alerts`]). The figures it produces are
//! the `/v1/stats` snapshot of the wire contract ([`taskfleet_proto::Snapshot`]).

pub mod alerts;
mod rollup;
pub mod runs;
mod slot;
pub mod stats;
