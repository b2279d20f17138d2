//! Enqueue stage: objects grouped into messages (up to `OBJECTS_PER_MESSAGE` each, and within
//! one 64 KiB billing chunk), sent in `SendMessageBatch` calls of up to ten messages and
//! 256 KiB, several calls in flight.
//!
//! Promises: a page counts as enqueued only when every one of its messages was accepted; the
//! entries a batch reports as failed are sent again (with backoff), and an entry SQS blames on
//! the sender is an error naming its first key, never silently dropped.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::bail;
use common::aws::{Sqs, queue, queue_depth};
use common::message::{ObjectMessage, encode};
use common::setup::Clients;
use futures::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

/// SQS takes at most ten entries per batch...
const BATCH: usize = queue::BATCH_ENTRIES;
/// ... and at most 256 KiB in all.
const BATCH_BYTES: usize = 256 * 1024;
/// A message stays within one 64 KiB chunk, which SQS bills as one request.
const MESSAGE_BYTES: usize = 64 * 1024;
/// Attempts per batch: SQS throttles or fails entries transiently; eight attempts with backoff
/// doubling from 100 ms wait about 25 s in all before the run stops (and can be resumed).
const ATTEMPTS: u32 = 8;

/// One message to send: its body, how many objects it carries, and its first key (for errors).
struct Outgoing<'a> {
    body: String,
    objects: usize,
    first_key: &'a str,
}

/// An upper bound of what one object adds to a version-2 body.
fn entry_bytes(o: &ObjectMessage) -> usize {
    // {"key":…,"size":<at most 20 characters>,"etag":…}, plus a comma
    common::message::to_ascii_json(&o.key).len() + common::message::to_ascii_json(&o.etag).len() + 40
}

/// Splits `items` into consecutive runs of at most `max_items` items whose `size`s, added to
/// `base`, stay within `max_bytes` (an item too large alone still gets a run of its own).
fn runs<T>(items: &[T], max_items: usize, max_bytes: usize, base: usize, size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, base);
    for (i, item) in items.iter().enumerate() {
        let add = size(item);
        if i > start && (i - start == max_items || bytes + add > max_bytes) {
            out.push(&items[start..i]);
            (start, bytes) = (i, base);
        }
        bytes += add;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// Groups objects into messages of at most `per_message` objects and [`MESSAGE_BYTES`].
fn messages(objects: &[ObjectMessage], per_message: usize) -> Vec<Outgoing<'_>> {
    const HEADER: usize = r#"{"v":2,"objects":[]}"#.len();
    runs(objects, per_message, MESSAGE_BYTES, HEADER, entry_bytes)
        .into_iter()
        .map(|run| Outgoing { body: encode(run), objects: run.len(), first_key: &run[0].key })
        .collect()
}

/// How many messages these objects go in.
pub(crate) fn message_count(objects: &[ObjectMessage], per_message: usize) -> usize {
    messages(objects, per_message).len()
}

/// What enqueueing these objects takes, as [`enqueue`] would send them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Shape {
    pub(crate) messages: u64,
    /// Messages of two objects or more (a consumer lists their destinations first with
    /// `DESTINATION_CHECK=before-copy`).
    pub(crate) shared: u64,
    /// `SendMessageBatch` requests.
    pub(crate) batches: u64,
}

pub(crate) fn shape(objects: &[ObjectMessage], per_message: usize) -> Shape {
    let messages = messages(objects, per_message);
    Shape {
        messages: messages.len() as u64,
        shared: messages.iter().filter(|m| m.objects >= 2).count() as u64,
        batches: batches(&messages).len() as u64,
    }
}

/// Groups messages into batches of at most [`BATCH`] entries and [`BATCH_BYTES`].
fn batches<'a, 'o>(messages: &'a [Outgoing<'o>]) -> Vec<&'a [Outgoing<'o>]> {
    runs(messages, BATCH, BATCH_BYTES, 0, |m| m.body.len())
}

/// What [`enqueue`] sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Sent {
    pub(crate) objects: u64,
    pub(crate) messages: u64,
}

/// Sends the objects, `per_message` to a message.
pub(crate) async fn enqueue(
    sqs: &Sqs,
    queue_url: &str,
    objects: &[ObjectMessage],
    per_message: usize,
    concurrency: usize,
) -> anyhow::Result<Sent> {
    let messages = messages(objects, per_message.max(1));
    let objects = futures::stream::iter(batches(&messages))
        .map(|chunk| send_batch(sqs, queue_url, chunk))
        .buffer_unordered(concurrency)
        .try_fold(0u64, |sent, n| async move { Ok(sent + n) })
        .await?;
    Ok(Sent { objects, messages: messages.len() as u64 })
}

async fn send_batch(sqs: &Sqs, queue_url: &str, chunk: &[Outgoing<'_>]) -> anyhow::Result<u64> {
    // `pending` holds indexes into the chunk, and shrinks as entries are accepted.
    let mut pending: Vec<usize> = (0..chunk.len()).collect();
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=ATTEMPTS {
        let bodies: Vec<&str> = pending.iter().map(|&i| chunk[i].body.as_str()).collect();
        match queue::send_batch(sqs, queue_url, &bodies).await {
            Ok(entries) => {
                let mut still = Vec::new();
                for (&i, entry) in pending.iter().zip(entries) {
                    match entry {
                        Ok(()) => {}
                        Err(refused) if refused.sender_fault => bail!(
                            "SQS refused the message for key {:?} (and the objects sent with it): {refused}",
                            chunk[i].first_key
                        ),
                        Err(_) => still.push(i),
                    }
                }
                if still.is_empty() {
                    return Ok(chunk.iter().map(|m| m.objects as u64).sum());
                }
                tracing::warn!(failed = still.len(), attempt, "batch entries failed; sending them again");
                pending = still;
            }
            // A refused grant, a queue gone: no attempt can succeed.
            Err(err) if err.for_queue() == common::aws::ErrorClass::Fatal => {
                return Err(anyhow::Error::new(err).context("no retry can fix this"));
            }
            Err(err) => {
                tracing::warn!(error = %err, attempt, "SendMessageBatch failed; sending again");
                if attempt == ATTEMPTS {
                    bail!("SendMessageBatch failed {ATTEMPTS} times: {err}");
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
    bail!(
        "{} messages still refused after {ATTEMPTS} attempts (first key {:?})",
        pending.len(),
        chunk[pending[0]].first_key
    )
}

/// With a backlog limit, waits until the queue holds no more than it, adding each second
/// waited to `held_back_secs` as it passes.
pub(crate) async fn wait_for_room(
    clients: &Clients,
    queue_url: &str,
    max_backlog: u64,
    held_back_secs: &AtomicU64,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    if max_backlog == 0 {
        return Ok(());
    }
    let mut logged = false;
    loop {
        let depth = queue_depth(&clients.sqs, queue_url).await?;
        if depth.total() <= max_backlog || shutdown.is_cancelled() {
            return Ok(());
        }
        if !logged {
            tracing::info!(backlog = depth.total(), max_backlog, "queue backlog above the limit: waiting");
            logged = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        held_back_secs.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(keys: &[String]) -> Vec<ObjectMessage> {
        keys.iter().map(|k| ObjectMessage::new(k.clone(), 1, "\"e\"".into())).collect()
    }

    #[test]
    fn every_object_goes_in_exactly_one_message_in_order() {
        let keys: Vec<String> = (0..95).map(|i| format!("image/{i}.png")).collect();
        let objs = objects(&keys);
        for per in [1, 3, 10, 100] {
            let msgs = messages(&objs, per);
            assert!(msgs.iter().all(|m| m.objects <= per));
            let decoded: Vec<String> =
                msgs.iter().flat_map(|m| common::message::decode(&m.body).unwrap()).map(|o| o.key).collect();
            assert_eq!(decoded, keys, "per message {per}");
            let sent: Vec<&Outgoing> = batches(&msgs).into_iter().flatten().collect();
            assert_eq!(sent.len(), msgs.len());
            assert!(batches(&msgs).iter().all(|b| b.len() <= BATCH));
        }
    }

    #[test]
    fn messages_and_batches_stay_within_sqs_limits() {
        // Long keys full of characters JSON escapes six times over.
        let keys: Vec<String> = (0..300).map(|i| format!("image/{i}-{}", "\u{1}".repeat(1000))).collect();
        let objs = objects(&keys);
        let msgs = messages(&objs, 100);
        assert!(msgs.iter().all(|m| m.body.len() <= MESSAGE_BYTES), "{:?}", msgs.iter().map(|m| m.body.len()).max());
        assert_eq!(msgs.iter().map(|m| m.objects).sum::<usize>(), 300);
        for batch in batches(&msgs) {
            assert!(batch.iter().map(|m| m.body.len()).sum::<usize>() <= BATCH_BYTES);
        }
    }
}
