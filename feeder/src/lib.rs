//! The feeder: lists the source prefix and enqueues one message per object, checkpointing
//! after every fully enqueued page; also the operator's commands (`status`, `verify`,
//! `reconcile`, `failures`).
//!
//! Stages, one module each: [`list`] -> [`enqueue`] (-> checkpoint, in `common::db`);
//! [`ops`] for the operator's commands, one file each.

mod enqueue;
mod inventory;
mod list;
pub mod ops;
mod progress;
mod ranges;
mod scan;
pub mod settings;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::store::ranges::KeyRange;
use anyhow::Context;
use common::aws::queue_depth;
use common::db::Checkpoint;
use common::exit::Failure;
use common::keys::KeyMapping;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use common::setup::Clients;
pub use settings::{Command, RunArgs, Settings};

/// Connects to everything and checks it (see `common::setup::connect`); every problem here is a
/// setup failure (exit code 2).
pub async fn connect(settings: &Settings) -> Result<Clients, Failure> {
    common::setup::connect(&settings.storage, &settings.queue, &settings.database, 4, settings.startup_wait).await
}

/// What one run of the feeder did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Objects listed by this run.
    pub listed: u64,
    /// Objects sent by this run.
    pub enqueued: u64,
    /// Messages they went in (with `--dry-run`: would go in).
    pub messages: u64,
    /// The key this run resumed after, when it resumed from a checkpoint.
    pub resumed_after: Option<String>,
    /// Whether the whole prefix has now been listed and enqueued.
    pub finished: bool,
}

/// Lists and enqueues until the prefix is exhausted or `shutdown` fires (then the current page
/// is finished and checkpointed first).
pub async fn feed(
    settings: &Settings,
    args: &RunArgs,
    clients: &Clients,
    shutdown: CancellationToken,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let mapping = settings.storage.mapping()?;
    let (bucket, prefix) = (mapping.source_bucket.as_str(), mapping.source_prefix.as_str());
    let mut checkpoint =
        common::db::load_checkpoint(&clients.db, bucket, prefix).await.context("reading the feeder checkpoint")?;
    if args.restart {
        checkpoint = Checkpoint::default();
        if !args.dry_run {
            crate::store::ranges::replace_ranges(&clients.db, bucket, prefix, &[])
                .await
                .context("clearing the listing's ranges")?;
        }
    } else if checkpoint.finished {
        println!(
            "feeder: s3://{bucket}/{prefix} was already listed completely ({} objects); nothing to do \
             (use `feeder --restart true` to list it again)",
            checkpoint.listed
        );
        return Ok(Summary { listed: 0, enqueued: 0, messages: 0, resumed_after: checkpoint.last_key, finished: true });
    }
    // SQS deletes a message older than the queue's retention period, whether or not it was
    // consumed: the backlog limit keeps the queue from holding that much; `verify` and
    // `reconcile` catch whatever expires anyway.
    match common::aws::queue_retention(&clients.sqs, &settings.queue.queue_url).await {
        Ok(retention) if args.max_backlog == 0 => tracing::warn!(
            retention_secs = retention.as_secs(),
            "MAX_BACKLOG=0: no backlog limit; messages not consumed within the queue's retention period are \
             lost to SQS (feeder verify finds their rows, feeder reconcile enqueues them again)"
        ),
        Ok(retention) => {
            tracing::info!(retention_secs = retention.as_secs(), max_backlog = args.max_backlog, "backlog limit")
        }
        Err(err) => tracing::warn!(error = format!("{err:#}"), "cannot read the queue's retention period"),
    }
    let lister = Arc::new(list::Lister {
        s3: clients.s3.clone(),
        bucket: bucket.to_owned(),
        prefix: prefix.to_owned(),
        page_size: args.page_size,
    });
    let mut ranges =
        crate::store::ranges::load_ranges(&clients.db, bucket, prefix).await.context("reading the listing's ranges")?;
    let resumed_after = checkpoint.last_key.clone();
    let inventory = match &args.inventory {
        Some(location) => Some(Arc::new(inventory::read_manifest(&clients.s3, location, bucket).await?)),
        None => None,
    };
    if let Some(manifest) = &inventory {
        let files: Vec<Option<&str>> = manifest.files.iter().map(|f| Some(f.key.as_str())).collect();
        if ranges.is_empty() && checkpoint.listed == 0 {
            ranges = (0..files.len())
                .map(|no| KeyRange {
                    no: no as i32,
                    inventory_file: files[no].map(str::to_owned),
                    ..KeyRange::default()
                })
                .collect();
            if !args.dry_run {
                crate::store::ranges::replace_ranges(&clients.db, bucket, prefix, &ranges)
                    .await
                    .context("saving the input's parts")?;
            }
        }
        let saved: Vec<Option<&str>> = ranges.iter().map(|r| r.inventory_file.as_deref()).collect();
        anyhow::ensure!(
            saved == files,
            "the checkpoint of s3://{bucket}/{prefix} is not of this inventory report (an earlier run listed the \
             prefix or read another report): finish that input, or start over with RESTART=true"
        );
    } else if ranges.iter().any(|r| r.inventory_file.is_some()) {
        anyhow::bail!(
            "an earlier run read s3://{bucket}/{prefix} from an inventory report: set the same INVENTORY_MANIFEST to \
             resume it, or start over with RESTART=true"
        );
    }
    if ranges.is_empty() && args.list_ranges > 1 {
        ranges = ranges::plan(&lister, resumed_after.as_deref(), args.list_ranges.into()).await?;
        if !args.dry_run {
            crate::store::ranges::replace_ranges(&clients.db, bucket, prefix, &ranges)
                .await
                .context("saving the listing's ranges")?;
        }
        tracing::info!(ranges = ranges.len(), "listing in key ranges at once");
    }
    if let Some(key) = &resumed_after {
        tracing::info!(after = key, listed_before = checkpoint.listed, "resuming from the checkpoint");
    }
    // One range without saved ranges: the checkpoint's own position is the range's.
    let in_ranges = !ranges.is_empty();
    if !in_ranges {
        ranges.push(KeyRange { after: resumed_after.clone(), ..KeyRange::default() });
    }
    let (tx, mut pages) = mpsc::channel(2 * ranges.len());
    let listers: Vec<_> = ranges
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.finished)
        .map(|(i, r)| match &inventory {
            Some(manifest) => inventory::spawn(
                clients.s3.clone(),
                manifest.clone(),
                i,
                prefix.to_owned(),
                r.rows_done as u64,
                args.page_size as usize,
                tx.clone(),
                shutdown.clone(),
            ),
            None => {
                let bounds = (r.resume_after().map(str::to_owned), r.until.clone());
                lister.clone().spawn(i, bounds, tx.clone(), shutdown.clone())
            }
        })
        .collect();
    drop(tx);
    let mut summary = Summary { listed: 0, enqueued: 0, messages: 0, resumed_after, finished: false };
    let mut progress = progress::Progress::start(checkpoint.listed as u64);
    let mut unfinished = ranges.iter().filter(|r| !r.finished).count();
    while let Some((i, item)) = pages.recv().await {
        let page = match item? {
            list::Listing::Page { objects, rows_through } => {
                if let Some(rows) = rows_through {
                    ranges[i].rows_done = rows as i64;
                }
                objects
            }
            list::Listing::Complete => {
                ranges[i].finished = true;
                unfinished -= 1;
                if in_ranges && !args.dry_run {
                    crate::store::ranges::save_progress(&clients.db, bucket, prefix, &checkpoint, Some(&ranges[i]))
                        .await
                        .context("saving the feeder checkpoint")?;
                }
                if unfinished == 0 {
                    break;
                }
                continue;
            }
        };
        if args.dry_run {
            summary.listed += page.len() as u64;
            summary.messages += enqueue::message_count(&page, args.objects_per_message.into()) as u64;
            continue;
        }
        wait_for_room(clients, &settings.queue.queue_url, args.max_backlog, &shutdown).await?;
        let sent = enqueue::enqueue(
            &clients.sqs,
            &settings.queue.queue_url,
            &page,
            args.objects_per_message.into(),
            args.send_concurrency.get(),
        )
        .await
        .with_context(|| format!("enqueueing a page of s3://{bucket}/{prefix}"))?;
        summary.messages += sent.messages;
        summary.listed += page.len() as u64;
        summary.enqueued += sent.objects;
        checkpoint.listed += page.len() as i64;
        checkpoint.pages += 1;
        checkpoint.last_key = page.last().map(|o| o.key.clone());
        let range = &mut ranges[i];
        range.listed += page.len() as i64;
        range.last_key.clone_from(&checkpoint.last_key);
        crate::store::ranges::save_progress(&clients.db, bucket, prefix, &checkpoint, in_ranges.then_some(&*range))
            .await
            .context("saving the feeder checkpoint")?;
        tracing::info!(
            listed = checkpoint.listed,
            range = i,
            last_key = checkpoint.last_key.as_deref(),
            "page enqueued"
        );
        progress.update(checkpoint.listed as u64, checkpoint.last_key.as_deref());
        if shutdown.is_cancelled() {
            break;
        }
    }
    drop(pages);
    progress.finish();
    // A lister ends by itself once its channel is gone; a panic in one is an error, never the
    // end of the listing.
    for lister in listers {
        lister.await.context("a listing task failed")?;
    }
    if args.dry_run {
        println!(
            "feeder: dry run: would enqueue {} objects of s3://{bucket}/{prefix} in {} messages; nothing was sent or \
             saved",
            summary.listed, summary.messages
        );
        summary.finished = unfinished == 0;
        return Ok(summary);
    }
    if unfinished == 0 {
        checkpoint.finished = true;
        common::db::save_checkpoint(&clients.db, bucket, prefix, &checkpoint)
            .await
            .context("saving the feeder checkpoint")?;
        summary.finished = true;
    } else if !shutdown.is_cancelled() {
        anyhow::bail!("the listing of s3://{bucket}/{prefix} stopped before its end: run the feeder again to resume");
    }
    print_summary(&mapping, &summary, &checkpoint, started.elapsed());
    Ok(summary)
}

fn print_summary(mapping: &KeyMapping, summary: &Summary, checkpoint: &Checkpoint, elapsed: Duration) {
    let secs = elapsed.as_secs_f64();
    let resumed = summary.resumed_after.as_ref().map(|k| format!(" (resumed after {k:?})")).unwrap_or_default();
    let state = if summary.finished { "done" } else { "interrupted: run again to resume" };
    println!(
        "feeder: {state}: listed {} objects under s3://{}/{}{resumed}, enqueued {} objects in {} messages in \
         {secs:.1}s ({:.0} objects/s); {} listed in all",
        summary.listed,
        mapping.source_bucket,
        mapping.source_prefix,
        summary.enqueued,
        summary.messages,
        summary.enqueued as f64 / secs.max(0.001),
        checkpoint.listed,
    );
}

/// With a backlog limit, waits until the queue holds no more than it.
pub(crate) async fn wait_for_room(
    clients: &Clients,
    queue_url: &str,
    max_backlog: u64,
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
    }
}
