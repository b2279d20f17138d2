//! `feeder redrive`: moves the dead-letter queue's messages back to the main queue once what
//! made them fail is fixed.
//!
//! Promises: a message is deleted from the dead-letter queue only after the main queue
//! accepted its copy (an entry that fails to send stays, and comes back after the visibility
//! timeout); the objects' `retries_exhausted` records are forgotten as they are retried (they
//! are recorded again if they fail again). `--dry-run` shows the depth and a sample of keys,
//! and moves nothing. Works on any SQS (AWS also offers `StartMessageMoveTask`).

use common::aws::{Call, dead_letter_queue, queue, queue_depth};
use common::db::Reason;

use super::Ops;
use crate::settings::RedriveArgs;
use common::setup::Clients;

/// How long a received dead letter stays invisible while it is moved.
const VISIBILITY: i32 = 60;

pub async fn redrive(cx: &Ops<'_>, args: &RedriveArgs) -> anyhow::Result<u64> {
    let Ops { settings, clients, .. } = cx;
    let queue = &settings.queue.queue_url;
    let Some((dlq, _)) = dead_letter_queue(&clients.sqs, queue).await? else {
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
        let bodies: Vec<&str> = messages.iter().map(|m| m.body().unwrap_or_default()).collect();
        let sent = queue::send_batch(&clients.sqs, queue, &bodies).await?;
        let mut moved_now = Vec::new();
        for (message, entry) in messages.iter().zip(sent) {
            match entry {
                Ok(()) => moved_now.push(message),
                Err(why) => tracing::warn!(error = %why, "not moved: it stays in the dead-letter queue"),
            }
        }
        let keys: Vec<String> = moved_now
            .iter()
            .filter_map(|m| common::message::decode(m.body().unwrap_or_default()).ok())
            .flatten()
            .map(|o| o.key)
            .collect();
        common::db::clear_failures(&clients.db, &keys, Reason::RetriesExhausted).await?;
        let handles: Vec<&str> = moved_now.iter().map(|m| m.receipt_handle().unwrap_or_default()).collect();
        for deleted in queue::delete_batch(&clients.sqs, &dlq, &handles).await? {
            // Not deleted: it is sent again after its visibility timeout, its object found done.
            if let Err(why) = deleted {
                tracing::warn!(error = %why, "a moved dead letter not deleted: it comes back, harmlessly");
            }
        }
        moved += handles.len() as u64;
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
        .call(|| format!("receiving from the dead-letter queue {dlq}"))?;
    Ok(out.messages.unwrap_or_default())
}
