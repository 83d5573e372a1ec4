//! Heartbeats: in-progress acks for every task this worker holds (buffered in the lanes, being
//! admitted, running, or deferred in memory: the last three in the running registry), so
//! JetStream does not redeliver them while they wait or run.

use crate::lanes::Lanes;
use crate::running::Running;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Every third of `ack_wait`: often enough that one lost heartbeat does not cause a
/// redelivery.
pub(crate) fn interval(ack_wait: Duration) -> Duration {
    (ack_wait / 3).max(Duration::from_millis(200))
}

/// Sends `+WPI` to every held task's reply subject each `every`; after `stop` (the drain) it
/// goes on for the running ones until aborted.
pub(crate) async fn run(
    client: async_nats::Client,
    lanes: Arc<Lanes>,
    running: Running,
    every: Duration,
    stop: CancellationToken,
    beat: taskfleet_service::Beat,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        beat.tick();
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => {}
        }
        // While NATS is unreachable an in-progress ack cannot arrive anyway, and publishing
        // could wait on the client's full buffer: skip the round, so the loop keeps beating
        // (a long outage must not make the worker look wedged and get it restarted).
        if client.connection_state() == async_nats::connection::State::Connected {
            let mut replies = lanes.reply_subjects();
            replies.extend(running.reply_subjects());
            for reply in replies {
                let _ = client.publish(reply, "+WPI".into()).await;
            }
        }
        if stop.is_cancelled() {
            tokio::time::sleep(every).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_heartbeats_per_ack_wait_with_a_floor() {
        assert_eq!(interval(Duration::from_secs(30)), Duration::from_secs(10));
        assert_eq!(interval(Duration::from_millis(300)), Duration::from_millis(200));
    }
}
