//! Progress: handlers' progress reports, published as `progress` events of their attempt.

use crate::events::{AfterPublish, EventSender};
use crate::running::Running;
use taskfleet_proto::{EventKind, now_ms};
use tokio::sync::mpsc;

/// Where handlers send progress reports.
pub(crate) type ProgressSender = mpsc::UnboundedSender<(uuid::Uuid, serde_json::Value)>;

/// Turns each report of a running task into a `progress` event, until every sender is gone.
pub(crate) async fn run(
    mut rx: mpsc::UnboundedReceiver<(uuid::Uuid, serde_json::Value)>,
    running: Running,
    events: EventSender,
) {
    while let Some((task_id, value)) = rx.recv().await {
        if let Some(mut ev) = running.base_of(task_id) {
            ev.kind = EventKind::Progress;
            ev.at = now_ms();
            ev.result = Some(value);
            events.send(ev, AfterPublish::Nothing);
        }
    }
}
