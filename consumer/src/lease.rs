//! A message's lease: while an object is worked on, its message's visibility is extended every
//! half timeout so no second consumer gets it.
//!
//! Promises: the lease ends when the guard is dropped, whatever the reason (done, failed,
//! panicked, abandoned at shutdown): a message is never kept hidden by a worker that is gone.

use std::time::Duration;

use common::aws::{Call, Sqs};
use tokio::task::JoinHandle;

/// Extends a message's visibility until dropped.
pub(crate) struct Lease {
    keeper: JoinHandle<()>,
}

impl Lease {
    pub(crate) fn start(sqs: Sqs, queue_url: String, receipt_handle: String, timeout: Duration) -> Self {
        let keeper = tokio::spawn(async move {
            // SQS takes 0 to 43,200 s (12 h).
            let secs = i32::try_from(timeout.as_secs()).unwrap_or(43_200).clamp(1, 43_200);
            let mut tick = tokio::time::interval(timeout / 2);
            tick.tick().await; // the first tick is immediate; the receive already set the timeout
            loop {
                tick.tick().await;
                match sqs
                    .change_message_visibility()
                    .queue_url(&queue_url)
                    .receipt_handle(&receipt_handle)
                    .visibility_timeout(secs)
                    .send()
                    .await
                    .call(|| "ChangeMessageVisibility".to_owned())
                {
                    Ok(_) => tracing::debug!(secs, "visibility extended"),
                    Err(err) => tracing::warn!(error = %err, "cannot extend visibility"),
                }
            }
        });
        Self { keeper }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}
