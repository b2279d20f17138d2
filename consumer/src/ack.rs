//! Acknowledge stage: deletes the messages whose objects are done, ten per
//! `DeleteMessageBatch`.
//!
//! Promises: only messages handed to [`Acker::ack`] are deleted; a worker hands its message
//! over and goes on (a delete is not part of an object's latency), so batches can linger for
//! company and be full: one call per ten messages rather than per two or three. An entry a
//! batch reports as failed, or a call that fails as a whole, is logged and counted as not
//! acknowledged: the message simply comes back later, which is harmless (I5). When every handle
//! is dropped the pending deletes are flushed before the task ends.

use std::sync::Arc;
use std::time::Duration;

use common::aws::Sqs;
use common::aws::queue::{BATCH_ENTRIES, delete_batch};

use crate::batch::{Batcher, Shape};
use crate::metrics::Stats;

/// How long a delete waits for nine others. Messages stay invisible for the visibility
/// timeout (a minute by default), so this costs nothing but this much delay before the queue
/// shows them gone.
const LINGER: Duration = Duration::from_millis(250);

#[derive(Clone)]
pub(crate) struct Acker {
    /// Receipt handles, with the number of objects each message carried (for the count).
    batcher: Batcher<(String, u64), ()>,
}

impl Acker {
    pub(crate) fn spawn(sqs: Sqs, queue_url: String, stats: Arc<Stats>) -> (Self, tokio::task::JoinHandle<()>) {
        // Ten is the most SQS takes per batch.
        let (batcher, handle) =
            Batcher::spawn(Shape::fixed(BATCH_ENTRIES, LINGER, 4), move |items: Vec<(String, u64)>| {
                let (sqs, queue_url, stats) = (sqs.clone(), queue_url.clone(), stats.clone());
                async move {
                    let n = items.len();
                    let handles: Vec<&str> = items.iter().map(|(handle, _)| handle.as_str()).collect();
                    let entries = match delete_batch(&sqs, &queue_url, &handles).await {
                        Ok(entries) => entries,
                        Err(err) => {
                            tracing::warn!(error = %err, "messages not deleted: they come back, harmlessly");
                            return vec![(); n];
                        }
                    };
                    for (entry, (_, objects)) in entries.into_iter().zip(&items) {
                        match entry {
                            Ok(()) => {
                                stats.deleted.inc();
                                stats.acked.inc_by(*objects);
                            }
                            Err(why) => tracing::warn!(error = %why, "message not deleted: it comes back, harmlessly"),
                        }
                    }
                    vec![(); n]
                }
            });
        (Self { batcher }, handle)
    }

    /// Hands the message with this receipt handle, which carried `objects` objects, over for
    /// deletion.
    pub(crate) async fn ack(&self, receipt_handle: String, objects: u64) {
        if !self.batcher.hand_over((receipt_handle, objects)).await {
            tracing::warn!("the acknowledger has stopped: the message comes back, harmlessly");
        }
    }
}
