//! The registry of attempts in progress (and of deliveries being admitted, and of deferred
//! tasks waiting in memory), for heartbeats, cancellation, progress events and the drain.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use taskfleet_proto::TaskEvent;
use tokio_util::sync::CancellationToken;

/// One entry: a task this worker holds outside the lanes.
pub(crate) struct RunningTask {
    /// The dispatch message's reply subject, for heartbeats and hand-backs.
    pub reply: Option<async_nats::Subject>,
    /// Cancels the attempt (or the deferral's wait).
    pub cancel: CancellationToken,
    /// The attempt's event template.
    pub base: TaskEvent,
}

/// Entries by delivery token; cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Running(Arc<Mutex<HashMap<u64, RunningTask>>>);

impl Running {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, RunningTask>> {
        // Every update is a single map operation, so a poisoned lock still holds a valid map.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the task of delivery `token`.
    pub fn insert(&self, token: u64, task: RunningTask) {
        self.lock().insert(token, task);
    }

    /// Forgets delivery `token`; false when it was gone already (handed back by the drain).
    pub fn remove(&self, token: u64) -> bool {
        self.lock().remove(&token).is_some()
    }

    /// Whether delivery `token` is registered.
    pub fn contains(&self, token: u64) -> bool {
        self.lock().contains_key(&token)
    }

    /// How many tasks are registered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Reply subjects of every registered task, for heartbeats.
    pub fn reply_subjects(&self) -> Vec<async_nats::Subject> {
        self.lock().values().filter_map(|r| r.reply.clone()).collect()
    }

    /// Cancels every registered attempt of task `id`; returns how many there were.
    pub fn cancel_task(&self, id: uuid::Uuid) -> usize {
        let map = self.lock();
        let matching: Vec<_> = map.values().filter(|r| r.base.task_id == id).collect();
        matching.iter().for_each(|r| r.cancel.cancel());
        matching.len()
    }

    /// The event template of a registered attempt of task `id`.
    pub fn base_of(&self, id: uuid::Uuid) -> Option<TaskEvent> {
        self.lock().values().find(|r| r.base.task_id == id).map(|r| r.base.clone())
    }

    /// Removes and returns every entry (the drain hands them back).
    pub fn drain(&self) -> Vec<RunningTask> {
        self.lock().drain().map(|(_, r)| r).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskfleet_proto::EventKind;

    fn task(id: uuid::Uuid) -> RunningTask {
        RunningTask { reply: None, cancel: CancellationToken::new(), base: TaskEvent::new(id, EventKind::Started, "q") }
    }

    #[test]
    fn cancels_only_the_named_task_and_drains_once() {
        let running = Running::default();
        let (a, b) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        running.insert(1, task(a));
        running.insert(2, task(b));
        assert_eq!(running.cancel_task(a), 1);
        assert_eq!(running.base_of(b).map(|e| e.task_id), Some(b));
        assert!(running.contains(1));
        assert!(running.remove(1));
        assert!(!running.remove(1), "a second removal finds nothing");
        assert!(!running.contains(1));
        let left = running.drain();
        assert_eq!(left.len(), 1);
        assert!(!left[0].cancel.is_cancelled());
        assert_eq!(running.len(), 0);
    }
}
