//! `feeder redrive`: moves the dead-letter queue's messages back to the main queue once what
//! made them fail is fixed.
//!
//! Promises: a message is deleted from the dead-letter queue only after the main queue
//! accepted its copy (an entry that fails to send stays, and comes back after the visibility
//! timeout); the objects' `retries_exhausted` records are forgotten as they are retried (they
//! are recorded again if they fail again). `--dry-run` shows the depth and a sample of keys,
//! and moves nothing. Works on any SQS (AWS also offers `StartMessageMoveTask`).

use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use common::aws::{describe, queue_depth, redrive_policy};
use common::db::Reason;

use crate::settings::RedriveArgs;
use crate::{Clients, Settings};

/// How long a received dead letter stays invisible while it is moved.
const VISIBILITY: i32 = 60;

pub async fn redrive(settings: &Settings, args: &RedriveArgs, clients: &Clients) -> anyhow::Result<u64> {
    let queue = &settings.queue.queue_url;
    let Some((dlq, _)) = redrive_policy(&clients.sqs, queue).await? else {
        anyhow::bail!("{queue} has no dead-letter queue (no RedrivePolicy): nothing to redrive");
    };
    if args.dry_run {
        let depth = queue_depth(&clients.sqs, &dlq).await?;
        println!("redrive: {} messages in the dead-letter queue {dlq}; nothing moved (dry run)", depth.total());
        // Seen, not taken: a visibility timeout of 0 leaves them where they are.
        let sample = receive(clients, &dlq, 0).await?;
        for message in &sample {
            let keys = common::message::decode(message.body().unwrap_or_default())
                .map(|objects| objects.into_iter().map(|o| o.key).collect::<Vec<_>>().join(", "))
                .unwrap_or_else(|e| format!("(unreadable: {e})"));
            println!("redrive: would move {keys}");
        }
        return Ok(0);
    }
    let mut moved = 0;
    let mut empty = 0;
    while empty < 3 {
        let messages = receive(clients, &dlq, VISIBILITY).await?;
        if messages.is_empty() {
            empty += 1;
            continue;
        }
        empty = 0;
        let entries = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(m.body().unwrap_or_default())
                    .build()
                    .expect("id and body are set")
            })
            .collect::<Vec<_>>();
        let sent = clients
            .sqs
            .send_message_batch()
            .queue_url(queue)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("sending dead letters back to {queue}: {}", describe(&e)))?;
        for failed in sent.failed() {
            tracing::warn!(id = failed.id(), code = failed.code(), "not moved: it stays in the dead-letter queue");
        }
        let moved_now: Vec<&aws_sdk_sqs::types::Message> = sent
            .successful()
            .iter()
            .filter_map(|ok| ok.id().parse::<usize>().ok().and_then(|i| messages.get(i)))
            .collect();
        let keys: Vec<String> = moved_now
            .iter()
            .filter_map(|m| common::message::decode(m.body().unwrap_or_default()).ok())
            .flatten()
            .map(|o| o.key)
            .collect();
        common::db::clear_failures(&clients.db, &keys, Reason::RetriesExhausted).await?;
        for m in &moved_now {
            let handle = m.receipt_handle().unwrap_or_default();
            clients
                .sqs
                .delete_message()
                .queue_url(&dlq)
                .receipt_handle(handle)
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("deleting a moved dead letter from {dlq}: {}", describe(&e)))?;
            moved += 1;
        }
    }
    println!("redrive: moved {moved} messages from {dlq} back to {queue}");
    Ok(moved)
}

async fn receive(clients: &Clients, dlq: &str, visibility: i32) -> anyhow::Result<Vec<aws_sdk_sqs::types::Message>> {
    let out = clients
        .sqs
        .receive_message()
        .queue_url(dlq)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .visibility_timeout(visibility)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("receiving from the dead-letter queue {dlq}: {}", describe(&e)))?;
    Ok(out.messages.unwrap_or_default())
}
