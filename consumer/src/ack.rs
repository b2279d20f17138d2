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

use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
use common::aws::{Sqs, describe};

use crate::batch::Batcher;
use crate::metrics::Stats;

/// How long a delete waits for nine others. Messages stay invisible for the visibility
/// timeout (a minute by default), so this costs nothing but this much delay before the queue
/// shows them gone.
const LINGER: Duration = Duration::from_millis(250);

#[derive(Clone)]
pub struct Acker {
    /// Receipt handles, with the number of objects each message carried (for the count).
    batcher: Batcher<(String, u64), ()>,
}

impl Acker {
    pub fn spawn(sqs: Sqs, queue_url: String, stats: Arc<Stats>) -> (Self, tokio::task::JoinHandle<()>) {
        // Ten is the most SQS takes per batch.
        let (batcher, handle) = Batcher::spawn(10, LINGER, 4, move |items: Vec<(String, u64)>| {
            let (sqs, queue_url, stats) = (sqs.clone(), queue_url.clone(), stats.clone());
            async move {
                let n = items.len();
                let (handles, objects): (Vec<String>, Vec<u64>) = items.into_iter().unzip();
                for (result, objects) in delete_batch(&sqs, &queue_url, handles).await.into_iter().zip(objects) {
                    match result {
                        Ok(()) => {
                            stats.deleted.inc();
                            stats.acked.inc_by(objects);
                        }
                        Err(why) => tracing::warn!(error = why, "message not deleted: it comes back, harmlessly"),
                    }
                }
                vec![(); n]
            }
        });
        (Self { batcher }, handle)
    }

    /// Hands the message with this receipt handle, which carried `objects` objects, over for
    /// deletion.
    pub async fn ack(&self, receipt_handle: String, objects: u64) {
        if !self.batcher.hand_over((receipt_handle, objects)).await {
            tracing::warn!("the acknowledger has stopped: the message comes back, harmlessly");
        }
    }
}

async fn delete_batch(sqs: &Sqs, queue_url: &str, handles: Vec<String>) -> Vec<Result<(), String>> {
    let entries = handles
        .iter()
        .enumerate()
        .map(|(i, h)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(h)
                .build()
                .expect("id and receipt handle are set")
        })
        .collect::<Vec<_>>();
    let out = match sqs.delete_message_batch().queue_url(queue_url).set_entries(Some(entries)).send().await {
        Ok(out) => out,
        Err(err) => {
            let why = format!("DeleteMessageBatch: {}", describe(&err));
            return handles.iter().map(|_| Err(why.clone())).collect();
        }
    };
    let mut results: Vec<Result<(), String>> = handles.iter().map(|_| Ok(())).collect();
    for failed in out.failed() {
        if let Some(slot) = failed.id().parse::<usize>().ok().and_then(|i| results.get_mut(i)) {
            *slot = Err(format!("delete failed: {}: {}", failed.code(), failed.message().unwrap_or_default()));
        }
    }
    results
}
