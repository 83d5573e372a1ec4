//! Leadership of a background loop among coordinator replicas (a Postgres advisory lock per
//! loop), kept from one round to the next.

use taskfleet_store::{LeaderLock, Store};

/// One loop's claim to run on this replica.
pub(crate) struct Leadership {
    name: &'static str,
    lock: Option<LeaderLock>,
}

impl Leadership {
    pub fn new(name: &'static str) -> Self {
        Leadership { name, lock: None }
    }

    /// Whether this replica runs the loop this round: `Some(true)` when it has just taken the
    /// lock (the loop starts afresh), `Some(false)` when it still holds it, `None` otherwise.
    pub async fn hold(&mut self, store: &Store) -> Option<bool> {
        if let Some(l) = self.lock.as_mut()
            && !l.still_held().await
        {
            tracing::warn!(job = self.name, "lost the lock of a background job");
            self.lock = None;
        }
        if self.lock.is_some() {
            return Some(false);
        }
        match store.try_leader_lock(self.name).await {
            Ok(Some(l)) => {
                tracing::info!("this coordinator now runs the {}", self.name);
                self.lock = Some(l);
                Some(true)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(job = self.name, error = %e, "cannot take the lock of a background job");
                None
            }
        }
    }
}
