//! `feeder status`: where the migration stands: the listing checkpoint, the queue and
//! dead-letter queue depths, rows by prefix and failures by reason. Writes nothing. Counting
//! rows scans the table (exempt from the statement timeout).

use anyhow::Context;
use aws_sdk_sqs::types::QueueAttributeName;
use common::aws::{describe, queue_depth};

use crate::{Clients, Settings};

pub async fn status(settings: &Settings, clients: &Clients) -> anyhow::Result<()> {
    let mapping = settings.storage.mapping()?;
    let cp = common::db::load_checkpoint(&clients.db, &mapping.source_bucket, mapping.source_prefix.as_str()).await?;
    println!(
        "listing:  {} objects in {} pages enqueued{}{}",
        cp.listed,
        cp.pages,
        if cp.finished { ", complete" } else { ", not complete" },
        cp.last_key.map(|k| format!(", last key {k:?}")).unwrap_or_default()
    );
    let ranges = common::db::load_ranges(&clients.db, &mapping.source_bucket, mapping.source_prefix.as_str()).await?;
    if !ranges.is_empty() {
        let finished = ranges.iter().filter(|r| r.finished).count();
        println!("ranges:   {} key ranges listed at once, {finished} complete", ranges.len());
    }
    let depth = queue_depth(&clients.sqs, &settings.queue.queue_url).await?;
    let dlq = match dead_letter_queue(clients, &settings.queue.queue_url).await? {
        Some(url) => {
            let d = queue_depth(&clients.sqs, &url).await?;
            format!("{} messages in the dead-letter queue", d.total())
        }
        None => "no dead-letter queue configured".to_owned(),
    };
    println!("queue:    {} waiting, {} in flight, {} delayed; {dlq}", depth.visible, depth.in_flight, depth.delayed);
    let rows = common::db::count_rows(&clients.db, mapping.source_prefix.as_str(), mapping.destination_prefix.as_str())
        .await?;
    println!(
        "rows:     {} in all: {} legacy, {} modern, {} other",
        rows.all,
        rows.legacy,
        rows.modern,
        rows.all - rows.legacy - rows.modern
    );
    let failures = common::db::failure_counts(&clients.db).await?;
    let failures = failures.iter().map(|(r, n)| format!("{n} {r}")).collect::<Vec<_>>().join(", ");
    println!("set aside: {}", if failures.is_empty() { "none".to_owned() } else { failures });
    Ok(())
}

async fn dead_letter_queue(clients: &Clients, queue_url: &str) -> anyhow::Result<Option<String>> {
    let out = clients
        .sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("reading the redrive policy of {queue_url}: {}", describe(&e)))?;
    let Some(policy) = out.attributes().and_then(|a| a.get(&QueueAttributeName::RedrivePolicy)) else {
        return Ok(None);
    };
    let policy: serde_json::Value = serde_json::from_str(policy).context("the queue's RedrivePolicy is not JSON")?;
    let Some(name) = policy["deadLetterTargetArn"].as_str().and_then(|arn| arn.rsplit(':').next()) else {
        return Ok(None);
    };
    let url = clients
        .sqs
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("finding the dead-letter queue {name}: {}", describe(&e)))?;
    Ok(url.queue_url().map(str::to_owned))
}
