//! The operator's commands: `status` (where the migration stands), `verify` (does every row
//! resolve?) and `failures` (what was set aside, and why).
//!
//! Promises: `verify` reads rows in id order in pages (no long transaction, no lock) and only
//! HEADs objects; it records every row whose legacy object is missing (reason
//! `row_object_missing`) so the operator can list them with `failures`.

use std::collections::BTreeMap;

use anyhow::Context;
use aws_sdk_sqs::types::QueueAttributeName;
use common::aws::{describe, head_etag};
use common::db::Reason;
use futures::{StreamExt, TryStreamExt};
use sqlx::Row;

use crate::settings::VerifyArgs;
use common::aws::queue_depth;

use crate::{Clients, Settings};

/// Rows read per page by `verify`.
const VERIFY_PAGE: i64 = 1000;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verification {
    pub rows: u64,
    pub modern: u64,
    pub legacy: u64,
    pub other_prefix: u64,
    /// Rows with a legacy or modern path that names no existing object (rows with another
    /// prefix are counted in `other_prefix`, not checked).
    pub unresolved: u64,
    /// Of those, legacy rows whose object is missing (recorded for the operator).
    pub legacy_missing: u64,
}

impl Verification {
    pub fn all_resolve(&self) -> bool {
        self.unresolved == 0
    }
}

enum Side {
    Source,
    Destination,
    Other,
}

/// Checks that every row's path names an existing object.
pub async fn verify(settings: &Settings, args: &VerifyArgs, clients: &Clients) -> anyhow::Result<Verification> {
    let mapping = settings.storage.mapping()?;
    let mut result = Verification::default();
    let mut after_id: i64 = i64::MIN;
    loop {
        let rows = sqlx::query("SELECT id::bigint, path FROM avatars WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after_id)
            .bind(VERIFY_PAGE)
            .fetch_all(&clients.db)
            .await
            .context("reading avatars")?;
        let Some(last) = rows.last() else { break };
        after_id = last.get(0);
        let rows: Vec<(i64, Option<String>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let checks = futures::stream::iter(rows.into_iter().map(|(id, path)| {
            let mapping = &mapping;
            async move {
                let path = path.unwrap_or_default();
                let (side, bucket) = if path.starts_with(mapping.destination_prefix.as_str()) {
                    (Side::Destination, &mapping.destination_bucket)
                } else if path.starts_with(mapping.source_prefix.as_str()) {
                    (Side::Source, &mapping.source_bucket)
                } else {
                    // Neither prefix: which bucket it names is not ours to guess; counted apart.
                    return Ok::<_, anyhow::Error>((id, path, Side::Other, false));
                };
                let exists = head_etag(&clients.s3, bucket, &path).await.map_err(anyhow::Error::msg)?.is_some();
                Ok((id, path, side, exists))
            }
        }))
        .buffer_unordered(args.concurrency.get())
        .try_collect::<Vec<_>>()
        .await?;
        for (id, path, side, exists) in checks {
            result.rows += 1;
            match side {
                Side::Destination => result.modern += 1,
                Side::Source => result.legacy += 1,
                Side::Other => result.other_prefix += 1,
            }
            if !exists && !matches!(side, Side::Other) {
                result.unresolved += 1;
                tracing::warn!(id, path, "row does not resolve to an object");
            }
            if matches!(side, Side::Source) && !exists {
                result.legacy_missing += 1;
                common::db::record_failure(
                    &clients.db,
                    &path,
                    Reason::RowObjectMissing,
                    &format!("row id {id} points at s3://{}/{path}, which does not exist", mapping.source_bucket),
                )
                .await?;
            }
        }
    }
    println!(
        "verify: {} rows: {} modern, {} legacy, {} with another prefix (not checked); {} resolve, \
         {} do not ({} legacy rows whose object is missing, recorded as row_object_missing)",
        result.rows,
        result.modern,
        result.legacy,
        result.other_prefix,
        result.modern + result.legacy - result.unresolved,
        result.unresolved,
        result.legacy_missing,
    );
    Ok(result)
}

/// Prints where the migration stands.
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
    let depth = queue_depth(&clients.sqs, &settings.queue.queue_url).await?;
    let dlq = match dead_letter_queue(clients, &settings.queue.queue_url).await? {
        Some(url) => {
            let d = queue_depth(&clients.sqs, &url).await?;
            format!("{} messages in the dead-letter queue", d.total())
        }
        None => "no dead-letter queue configured".to_owned(),
    };
    println!("queue:    {} waiting, {} in flight, {} delayed; {dlq}", depth.visible, depth.in_flight, depth.delayed);
    let row = sqlx::query(
        "SELECT count(*) FILTER (WHERE left(path, length($1)) = $1),
                count(*) FILTER (WHERE left(path, length($2)) = $2),
                count(*)
         FROM avatars",
    )
    .bind(mapping.source_prefix.as_str())
    .bind(mapping.destination_prefix.as_str())
    .fetch_one(&clients.db)
    .await?;
    let (legacy, modern, all): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    println!("rows:     {all} in all: {legacy} legacy, {modern} modern, {} other", all - legacy - modern);
    let mut by_reason = BTreeMap::new();
    for f in common::db::list_failures(&clients.db).await? {
        *by_reason.entry(f.reason).or_insert(0u64) += 1;
    }
    let failures = by_reason.iter().map(|(r, n)| format!("{n} {r}")).collect::<Vec<_>>().join(", ");
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

/// Prints what was set aside, one per line: reason, subject, occurrences, detail.
pub async fn failures(clients: &Clients) -> anyhow::Result<()> {
    let all = common::db::list_failures(&clients.db).await?;
    for f in &all {
        println!("{}\t{}\t{}\t{}", f.reason, f.subject, f.occurrences, f.detail);
    }
    eprintln!("{} set aside", all.len());
    Ok(())
}
