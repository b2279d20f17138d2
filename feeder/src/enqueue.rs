//! Enqueue stage: one message per object, sent in `SendMessageBatch` calls of ten, several
//! calls in flight.
//!
//! Promises: a page counts as enqueued only when every one of its messages was accepted; the
//! entries a batch reports as failed are sent again (with backoff), and an entry SQS blames on
//! the sender is an error naming the key, never silently dropped.

use std::time::Duration;

use anyhow::{Context, bail};
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use common::aws::{Sqs, describe};
use common::message::ObjectMessage;
use futures::{StreamExt, TryStreamExt};

/// SQS takes at most ten entries per batch.
const BATCH: usize = 10;
/// Attempts per batch: SQS throttles or fails entries transiently; eight attempts with backoff
/// doubling from 100 ms wait about 25 s in all before the run stops (and can be resumed).
const ATTEMPTS: u32 = 8;

/// Sends one message per object; returns how many were sent.
pub async fn enqueue(sqs: &Sqs, queue_url: &str, objects: &[ObjectMessage], concurrency: usize) -> anyhow::Result<u64> {
    futures::stream::iter(objects.chunks(BATCH))
        .map(|chunk| send_batch(sqs, queue_url, chunk))
        .buffer_unordered(concurrency)
        .try_fold(0u64, |sent, n| async move { Ok(sent + n) })
        .await
}

async fn send_batch(sqs: &Sqs, queue_url: &str, chunk: &[ObjectMessage]) -> anyhow::Result<u64> {
    // Entry ids are indexes into the chunk; `pending` shrinks as entries are accepted.
    let mut pending: Vec<usize> = (0..chunk.len()).collect();
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=ATTEMPTS {
        let entries = pending
            .iter()
            .map(|&i| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(chunk[i].to_body())
                    .build()
                    .expect("id and body are set")
            })
            .collect::<Vec<_>>();
        match sqs.send_message_batch().queue_url(queue_url).set_entries(Some(entries)).send().await {
            Ok(out) => {
                let mut still = Vec::new();
                for failed in out.failed() {
                    let i: usize = failed.id().parse().context("SQS answered with an unknown entry id")?;
                    let key = &chunk.get(i).context("SQS answered with an unknown entry id")?.key;
                    if failed.sender_fault() {
                        bail!(
                            "SQS refused the message for key {key:?}: {}: {}",
                            failed.code(),
                            failed.message().unwrap_or_default()
                        );
                    }
                    still.push(i);
                }
                if still.is_empty() {
                    return Ok(chunk.len() as u64);
                }
                tracing::warn!(failed = still.len(), attempt, "batch entries failed; sending them again");
                pending = still;
            }
            Err(err) => {
                tracing::warn!(error = describe(&err), attempt, "SendMessageBatch failed; sending again");
                if attempt == ATTEMPTS {
                    bail!("SendMessageBatch failed {ATTEMPTS} times: {}", describe(&err));
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
    bail!("{} messages still refused after {ATTEMPTS} attempts (first key {:?})", pending.len(), chunk[pending[0]].key)
}
