//! The queue's attributes the tool reads: whether it exists, its visibility timeout, its
//! retention, its redrive policy and its depth.

use anyhow::{Context, anyhow};
use aws_sdk_sqs::types::QueueAttributeName;

use super::error::{AwsError, Call, NO_SUCH_QUEUE_CODES, refusal_or_unavailable};
use aws_sdk_sqs::Client as Sqs;

/// Checks that the queue exists; returns its `VisibilityTimeout` in seconds.
pub async fn check_queue(sqs: &Sqs, queue_url: &str) -> anyhow::Result<i32> {
    let out = sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::VisibilityTimeout)
        .send()
        .await
        .map_err(|err| {
            let err = AwsError::new("GetQueueAttributes", err);
            if NO_SUCH_QUEUE_CODES.contains(&err.code()) {
                anyhow!("QUEUE_URL: queue {queue_url} does not exist: create it or fix QUEUE_URL")
            } else {
                refusal_or_unavailable(
                    &err,
                    format!(
                        "QUEUE_URL: cannot reach queue {queue_url} ({err}): check AWS_ENDPOINT_URL, the network and the credentials"
                    ),
                )
            }
        })?;
    out.attributes()
        .and_then(|a| a.get(&QueueAttributeName::VisibilityTimeout))
        .map(|v| v.parse::<i32>())
        .transpose()
        .context("queue VisibilityTimeout is not a number")
        .map(|v| v.unwrap_or(30))
}

/// How long the queue keeps a message before SQS deletes it (`MessageRetentionPeriod`).
pub async fn queue_retention(sqs: &Sqs, queue_url: &str) -> anyhow::Result<std::time::Duration> {
    let out = sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::MessageRetentionPeriod)
        .send()
        .await
        .call(|| format!("reading the retention period of {queue_url}"))?;
    let secs = out
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::MessageRetentionPeriod))
        .map(|v| v.parse::<u64>())
        .transpose()
        .context("the queue's MessageRetentionPeriod is not a number")?
        .unwrap_or(345_600); // SQS's default, 4 days
    Ok(std::time::Duration::from_secs(secs))
}

/// The queue's redrive policy: its dead-letter queue's name and `maxReceiveCount`; `None`
/// without one. One `GetQueueAttributes` on the queue itself.
pub async fn redrive_policy(sqs: &Sqs, queue_url: &str) -> anyhow::Result<Option<(String, u32)>> {
    let out = sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await
        .call(|| format!("reading the redrive policy of {queue_url}"))?;
    let Some(policy) = out.attributes().and_then(|a| a.get(&QueueAttributeName::RedrivePolicy)) else {
        return Ok(None);
    };
    let policy: serde_json::Value = serde_json::from_str(policy).context("the queue's RedrivePolicy is not JSON")?;
    let Some(name) = policy["deadLetterTargetArn"].as_str().and_then(|arn| arn.rsplit(':').next()) else {
        return Ok(None);
    };
    // SQS writes it as a number or as a string, depending on who set it.
    let max = &policy["maxReceiveCount"];
    let max = max.as_u64().or_else(|| max.as_str().and_then(|s| s.parse().ok())).unwrap_or(0) as u32;
    Ok(Some((name.to_owned(), max)))
}

/// The dead-letter queue's URL and `maxReceiveCount` (`redrive_policy`, then `GetQueueUrl` on
/// the dead-letter queue); `None` without one.
pub async fn dead_letter_queue(sqs: &Sqs, queue_url: &str) -> anyhow::Result<Option<(String, u32)>> {
    let Some((name, max)) = redrive_policy(sqs, queue_url).await? else { return Ok(None) };
    let url =
        sqs.get_queue_url().queue_name(&name).send().await.call(|| format!("finding the dead-letter queue {name}"))?;
    Ok(url.queue_url().map(|u| (u.to_owned(), max)))
}

/// Messages waiting, in flight and delayed in a queue (SQS's approximate counts).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    pub visible: u64,
    pub in_flight: u64,
    pub delayed: u64,
}

impl QueueDepth {
    /// Every message of the queue, whatever its state.
    pub fn total(&self) -> u64 {
        self.visible + self.in_flight + self.delayed
    }
}

pub async fn queue_depth(sqs: &Sqs, queue_url: &str) -> anyhow::Result<QueueDepth> {
    let out = sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
        .send()
        .await
        .call(|| format!("reading the depth of {queue_url}"))?;
    let get = |name: QueueAttributeName| {
        out.attributes().and_then(|a| a.get(&name)).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    Ok(QueueDepth {
        visible: get(QueueAttributeName::ApproximateNumberOfMessages),
        in_flight: get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        delayed: get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
    })
}

/// Why SQS did not take one entry of a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct EntryRefused {
    pub code: String,
    pub message: String,
    /// The entry itself is wrong (sending it again fails the same way), not SQS.
    pub sender_fault: bool,
}

/// What SQS did with each entry of a batch, in the order given.
pub type Entries = Vec<Result<(), EntryRefused>>;

/// The most entries one SQS batch call takes.
pub const BATCH_ENTRIES: usize = 10;

/// Sends `bodies` (at most [`BATCH_ENTRIES`]) in one `SendMessageBatch`.
pub async fn send_batch(sqs: &Sqs, queue_url: &str, bodies: &[&str]) -> Result<Entries, AwsError> {
    let entries = bodies.iter().enumerate().map(|(i, body)| {
        aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder().id(i.to_string()).message_body(*body).build()
    });
    let entries = entries.collect::<Result<Vec<_>, _>>().expect("id and body are set");
    let out = sqs
        .send_message_batch()
        .queue_url(queue_url)
        .set_entries(Some(entries))
        .send()
        .await
        .call(|| format!("SendMessageBatch to {queue_url}"))?;
    Ok(per_entry(bodies.len(), out.failed().iter().map(|f| (f.id(), f.code(), f.message(), f.sender_fault()))))
}

/// Deletes the messages of `receipt_handles` (at most [`BATCH_ENTRIES`]) in one
/// `DeleteMessageBatch`.
pub async fn delete_batch(sqs: &Sqs, queue_url: &str, receipt_handles: &[&str]) -> Result<Entries, AwsError> {
    let entries = receipt_handles.iter().enumerate().map(|(i, handle)| {
        aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(*handle).build()
    });
    let entries = entries.collect::<Result<Vec<_>, _>>().expect("id and receipt handle are set");
    let out = sqs
        .delete_message_batch()
        .queue_url(queue_url)
        .set_entries(Some(entries))
        .send()
        .await
        .call(|| format!("DeleteMessageBatch on {queue_url}"))?;
    Ok(per_entry(receipt_handles.len(), out.failed().iter().map(|f| (f.id(), f.code(), f.message(), f.sender_fault()))))
}

/// The batch's answer per entry: every entry taken but those `failed` names by their id (the
/// entry's index). A failure naming no entry of the batch fails none.
fn per_entry<'a>(len: usize, failed: impl Iterator<Item = (&'a str, &'a str, Option<&'a str>, bool)>) -> Entries {
    let mut entries: Entries = vec![Ok(()); len];
    for (id, code, message, sender_fault) in failed {
        if let Some(slot) = id.parse::<usize>().ok().and_then(|i| entries.get_mut(i)) {
            *slot = Err(EntryRefused {
                code: code.to_owned(),
                message: message.unwrap_or_default().to_owned(),
                sender_fault,
            });
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_answer_is_read_per_entry_by_index() {
        let failed = [("2", "InternalError", Some("try again"), false), ("0", "InvalidMessageContents", None, true)];
        let entries = per_entry(3, failed.into_iter());
        assert_eq!(
            entries[0],
            Err(EntryRefused { code: "InvalidMessageContents".into(), message: String::new(), sender_fault: true })
        );
        assert_eq!(entries[1], Ok(()));
        assert!(matches!(&entries[2], Err(e) if !e.sender_fault && e.to_string() == "InternalError: try again"));
        assert_eq!(per_entry(1, [("7", "X", None, false)].into_iter()), vec![Ok(())], "an id outside the batch");
    }
}
