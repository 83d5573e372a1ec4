//! Tasks pulled from JetStream and waiting for a free slot, one lane per priority.

use crate::scheduler::PriorityPicker;
use async_nats::jetstream::Message;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::Notify;

/// A delivered dispatch message waiting to run.
pub(crate) struct Delivery {
    pub msg: Message,
    pub priority: usize,
    /// Holds a place in its puller's prefetch budget until the task leaves the buffer.
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Rate limits whose token this task already holds (booked before a deferral).
    pub granted: Vec<String>,
    /// When this delivery was first deferred by its handler (every provider's breaker open).
    pub deferred_since: Option<std::time::Instant>,
}

struct State {
    lanes: [VecDeque<Delivery>; 4],
    picker: PriorityPicker,
    closed: bool,
}

/// The ready buffer shared by the pullers (which push) and the executor (which pops in
/// weighted priority order).
pub(crate) struct Lanes {
    state: Mutex<State>,
    ready: Notify,
}

impl Lanes {
    pub fn new(weights: [u32; 4]) -> Self {
        Lanes {
            state: Mutex::new(State { lanes: Default::default(), picker: PriorityPicker::new(weights), closed: false }),
            ready: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the deques inconsistent, so a poisoned
        // lock is still safe to use.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Buffers a delivery; once closed, hands it back instead.
    #[must_use = "a delivery handed back must be returned to JetStream"]
    pub fn push(&self, d: Delivery) -> Option<Delivery> {
        let mut s = self.lock();
        if s.closed {
            return Some(d);
        }
        s.lanes[d.priority].push_back(d);
        drop(s);
        self.ready.notify_one();
        None
    }

    /// Waits for the next delivery by priority; `None` once closed.
    pub async fn pop(&self) -> Option<Delivery> {
        loop {
            let notified = self.ready.notified();
            {
                let mut s = self.lock();
                if s.closed {
                    return None;
                }
                let has_work = [0, 1, 2, 3].map(|i| !s.lanes[i].is_empty());
                if let Some(i) = s.picker.pick(has_work) {
                    return s.lanes[i].pop_front();
                }
            }
            notified.await;
        }
    }

    /// Stops `pop` and hands back everything still buffered.
    pub fn close(&self) -> Vec<Delivery> {
        let mut s = self.lock();
        s.closed = true;
        let out = s.lanes.iter_mut().flat_map(|l| l.drain(..)).collect();
        drop(s);
        self.ready.notify_waiters();
        out
    }

    /// Reply subjects of every buffered message, for heartbeats.
    pub fn reply_subjects(&self) -> Vec<async_nats::Subject> {
        let s = self.lock();
        s.lanes.iter().flat_map(|l| l.iter().filter_map(|d| d.msg.reply.clone())).collect()
    }
}
