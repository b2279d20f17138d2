//! The feeder: lists the source prefix and enqueues one message per object, checkpointing
//! after every fully enqueued page; also the operator's commands (`status`, `verify`,
//! `reconcile`, `failures`).
//!
//! Stages, one module each: [`list`] -> [`enqueue`] (-> checkpoint, in `common::db`);
//! [`ops`] for the operator's commands, one file each.

mod enqueue;
mod input;
mod inventory;
mod list;
pub mod ops;
pub mod progress;
mod ranges;
mod scan;
pub mod settings;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
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
    let lister = Arc::new(list::Lister {
        s3: clients.s3.clone(),
        bucket: bucket.to_owned(),
        prefix: prefix.to_owned(),
        page_size: args.page_size,
    });
    let mut input = match input::prepare(clients, args, &lister).await? {
        input::Prepared::Input(input) => input,
        input::Prepared::AlreadyListed(checkpoint) => {
            println!(
                "feeder: s3://{bucket}/{prefix} was already listed completely ({} objects); nothing to do \
                 (use `feeder --restart true` to list it again)",
                checkpoint.listed
            );
            let resumed_after = checkpoint.last_key;
            return Ok(Summary { listed: 0, enqueued: 0, messages: 0, resumed_after, finished: true });
        }
    };
    warn_about_retention(settings, args, clients).await;
    let (pages, listers) = input.spawn(clients, &lister, args, &shutdown);
    let resumed_after = input.resumed_after.clone();
    let mut summary = Summary { listed: 0, enqueued: 0, messages: 0, resumed_after, finished: false };
    let counts = Arc::new(progress::Counts::default());
    let sending = Sending { settings, args, clients, bucket, prefix, shutdown: &shutdown, counts: counts.clone() };
    let metrics = args.cloudwatch_namespace.clone().map(|namespace| {
        let stop = CancellationToken::new();
        (tokio::spawn(common::emf::run(namespace, &progress::METRICS, counts, stop.clone())), stop)
    });
    let sent = sending.pages(&mut input, pages, &mut summary).await;
    // The last line, with what the last minute enqueued, is written whatever the outcome.
    if let Some((task, stop)) = metrics {
        stop.cancel();
        let _ = task.await;
    }
    let unfinished = sent?;
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
    let checkpoint = &mut input.checkpoint;
    if unfinished == 0 {
        checkpoint.finished = true;
        common::db::save_checkpoint(&clients.db, bucket, prefix, checkpoint)
            .await
            .context("saving the feeder checkpoint")?;
        summary.finished = true;
    } else if !shutdown.is_cancelled() {
        anyhow::bail!("the listing of s3://{bucket}/{prefix} stopped before its end: run the feeder again to resume");
    }
    print_summary(&mapping, &summary, checkpoint, started.elapsed());
    Ok(summary)
}

/// SQS deletes a message older than the queue's retention period, whether or not it was
/// consumed: the backlog limit keeps the queue from holding that much; `verify` and
/// `reconcile` catch whatever expires anyway.
async fn warn_about_retention(settings: &Settings, args: &RunArgs, clients: &Clients) {
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
}

/// What sending a run's pages needs.
struct Sending<'a> {
    settings: &'a Settings,
    args: &'a RunArgs,
    clients: &'a Clients,
    bucket: &'a str,
    prefix: &'a str,
    shutdown: &'a CancellationToken,
    counts: Arc<progress::Counts>,
}

impl Sending<'_> {
    /// Enqueues the pages as they arrive, saving each part's position after each page, until
    /// every part is listed or `shutdown` fires; the parts left unfinished.
    async fn pages(
        &self,
        input: &mut input::Input,
        mut pages: mpsc::Receiver<list::Item>,
        summary: &mut Summary,
    ) -> anyhow::Result<usize> {
        let (args, db, bucket, prefix) = (self.args, &self.clients.db, self.bucket, self.prefix);
        let mut progress = progress::Progress::start(input.checkpoint.listed as u64);
        let mut unfinished = input.unfinished();
        while let Some((i, item)) = pages.recv().await {
            let page = match item? {
                list::Listing::Page { objects, rows_through } => {
                    if let Some(rows) = rows_through {
                        input.ranges[i].rows_done = rows as i64;
                    }
                    objects
                }
                list::Listing::Complete => {
                    input.ranges[i].finished = true;
                    unfinished -= 1;
                    if input.in_ranges && !args.dry_run {
                        let part = Some(&input.ranges[i]);
                        store::ranges::save_progress(db, bucket, prefix, &input.checkpoint, part)
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
            self.send(input, i, &page, summary).await?;
            let checkpoint = &input.checkpoint;
            progress.update(checkpoint.listed as u64, checkpoint.last_key.as_deref());
            if self.shutdown.is_cancelled() {
                break;
            }
        }
        drop(pages);
        progress.finish();
        Ok(unfinished)
    }

    /// Enqueues one page of part `i`, then saves the part's position past it.
    async fn send(
        &self,
        input: &mut input::Input,
        i: usize,
        page: &[common::message::ObjectMessage],
        summary: &mut Summary,
    ) -> anyhow::Result<()> {
        let (args, db, bucket, prefix) = (self.args, &self.clients.db, self.bucket, self.prefix);
        let queue_url = &self.settings.queue.queue_url;
        let held_back = &self.counts.held_back_secs;
        enqueue::wait_for_room(self.clients, queue_url, args.max_backlog, held_back, self.shutdown).await?;
        let per_message = args.objects_per_message.into();
        let sent = enqueue::enqueue(&self.clients.sqs, queue_url, page, per_message, args.send_concurrency.get())
            .await
            .with_context(|| format!("enqueueing a page of s3://{bucket}/{prefix}"))?;
        summary.messages += sent.messages;
        summary.listed += page.len() as u64;
        summary.enqueued += sent.objects;
        self.counts.enqueued.fetch_add(sent.objects, std::sync::atomic::Ordering::Relaxed);
        let checkpoint = &mut input.checkpoint;
        checkpoint.listed += page.len() as i64;
        checkpoint.pages += 1;
        checkpoint.last_key = page.last().map(|o| o.key.clone());
        let range = &mut input.ranges[i];
        range.listed += page.len() as i64;
        range.last_key.clone_from(&checkpoint.last_key);
        let part = input.in_ranges.then_some(&*range);
        store::ranges::save_progress(db, bucket, prefix, checkpoint, part)
            .await
            .context("saving the feeder checkpoint")?;
        tracing::info!(
            listed = checkpoint.listed,
            range = i,
            last_key = checkpoint.last_key.as_deref(),
            "page enqueued"
        );
        Ok(())
    }
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
