//! `feeder reconcile`: the second pass that finishes the job. Streams every reference's table
//! (`REFERENCES`) and enqueues one message for every legacy object a row still names that is
//! not migrated yet and was not set aside with a
//! reason, so that the consumers move it like any other object. This catches what the listing
//! pass cannot see: messages lost or expired (a backlog that outlived the queue's retention),
//! rows written with a legacy path after their key was processed, objects whose rows the live
//! service held too long.
//!
//! Promises: rows are read in key order in pages (no long transaction, no lock); every message
//! names an object that exists (HEADed first, with its current size and ETag); a legacy row
//! whose object is missing is recorded (`row_object_missing`), never enqueued; respects
//! `MAX_BACKLOG`. Writes queue messages and failure records only. Safe to run again: a
//! message for an object already moved is harmless (I5).

use std::collections::BTreeSet;

use anyhow::Context;
use common::db::keyset::Keyset;
use common::db::{Reason, Target};
use common::identity::head_object;
use common::message::ObjectMessage;
use futures::{StreamExt, TryStreamExt};

use super::{Ops, ROWS_PAGE, Side, classify};
use crate::settings::ReconcileArgs;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciliation {
    pub rows: u64,
    /// Legacy rows seen.
    pub legacy_rows: u64,
    /// Messages sent (one per distinct legacy path of a page).
    pub enqueued: u64,
    /// Legacy rows left alone because their path was set aside with a reason.
    pub set_aside: u64,
    /// Legacy rows whose object is missing (recorded).
    pub object_missing: u64,
}

pub async fn reconcile(cx: &Ops<'_>, args: &ReconcileArgs) -> anyhow::Result<Reconciliation> {
    let Ops { clients, shutdown, .. } = cx;
    let mut result = Reconciliation::default();
    for target in clients.targets.iter() {
        reconcile_reference(cx, args, target, &mut result).await?;
    }
    let state = if shutdown.is_cancelled() { "interrupted (safe to run again)" } else { "done" };
    println!(
        "reconcile: {state}: {} rows read, {} legacy: {} messages enqueued, {} left alone (set aside with a reason; \
         --include-set-aside enqueues them too), {} whose object is missing (recorded as row_object_missing)",
        result.rows, result.legacy_rows, result.enqueued, result.set_aside, result.object_missing
    );
    Ok(result)
}

/// One reference's rows.
async fn reconcile_reference(
    cx: &Ops<'_>,
    args: &ReconcileArgs,
    target: &Target,
    result: &mut Reconciliation,
) -> anyhow::Result<()> {
    let Ops { settings, clients, mapping, shutdown } = cx;
    let queue_url = &settings.queue.queue_url;
    let mut pages = Keyset::after(None);
    let table = |after| crate::store::rows::rows_after(&clients.db, target, after, ROWS_PAGE);
    while !shutdown.is_cancelled()
        && let Some(rows) = pages.next(table, |(key, _)| Some(key.clone())).await?
    {
        result.rows += rows.len() as u64;
        let form = &target.reference.form;
        let legacy: Vec<String> = rows
            .into_iter()
            .filter_map(|(_, value)| match classify(value.as_deref(), form, mapping) {
                (Side::Legacy, key) => key,
                _ => None,
            })
            .collect();
        result.legacy_rows += legacy.len() as u64;
        let distinct: BTreeSet<&str> = legacy.iter().map(String::as_str).collect();
        let recorded = if args.include_set_aside {
            Default::default()
        } else {
            let paths: Vec<&str> = distinct.iter().copied().collect();
            super::standing::standing(clients, mapping, &paths, args.concurrency.get()).await?
        };
        result.set_aside += legacy.iter().filter(|p| recorded.contains(*p)).count() as u64;
        let heads = futures::stream::iter(distinct.into_iter().filter(|p| !recorded.contains(*p)).map(|path| {
            let bucket = &mapping.source_bucket;
            async move {
                let head = head_object(&clients.s3, bucket, path).await?;
                Ok::<_, anyhow::Error>((path, head))
            }
        }))
        .buffer_unordered(args.concurrency.get())
        .try_collect::<Vec<_>>()
        .await?;
        let mut messages = Vec::new();
        for (path, head) in heads {
            match head {
                Some(head) => messages.push(ObjectMessage::new(path.to_owned(), head.size, head.etag)),
                None => {
                    result.object_missing += legacy.iter().filter(|p| *p == path).count() as u64;
                    let detail = format!(
                        "a row of {target} points at s3://{}/{path}, which does not exist",
                        mapping.source_bucket
                    );
                    common::db::record_failure(&clients.db, path, Reason::RowObjectMissing, &detail).await?;
                }
            }
        }
        if messages.is_empty() {
            continue;
        }
        let held_back = Default::default();
        crate::enqueue::wait_for_room(clients, queue_url, settings.run.max_backlog, &held_back, shutdown).await?;
        result.enqueued += crate::enqueue::enqueue(
            &clients.sqs,
            queue_url,
            &messages,
            settings.run.objects_per_message.into(),
            settings.run.send_concurrency.get(),
        )
        .await
        .context("enqueueing legacy rows")?
        .objects;
    }
    Ok(())
}
