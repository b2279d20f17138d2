//! A message's place in the consumer: what the receive loop hands a worker with each message.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A message's place: one of the CONCURRENCY permits while its objects are copied, then one
/// of the finishing places while its rows are rewritten (lingering for company, `crate::record`)
/// and its delete handed over, so that the next message's copies do not wait on this one's
/// rows.
pub(crate) struct Slot {
    permit: OwnedSemaphorePermit,
    finishing: Arc<Semaphore>,
}

impl Slot {
    /// A place holding one of the copy permits; `finishing` holds the finishing places.
    pub(crate) fn new(permit: OwnedSemaphorePermit, finishing: Arc<Semaphore>) -> Self {
        Self { permit, finishing }
    }

    /// The copies are done: takes a finishing place (waiting for one while they are all
    /// taken), then gives the copy permit back. The place is held until it is dropped.
    pub(crate) async fn copies_done(self) -> Option<OwnedSemaphorePermit> {
        let place = self.finishing.acquire_owned().await.ok();
        drop(self.permit);
        place
    }
}
