//! What one run of the feeder reads, decided before anything is sent: where the listing
//! resumes (the checkpoint), and its parts: one range, key ranges listed at once
//! (`LIST_RANGES`, [`crate::ranges`]), or the data files of an S3 Inventory report
//! (`INVENTORY_MANIFEST`, [`crate::inventory`]), each part with its own saved position.
//!
//! Promises: a run resumes the input an earlier run began (the same report, or the listing),
//! and refuses another with an error that says how to go on; nothing is saved on a dry run.

use std::sync::Arc;

use anyhow::Context;
use common::db::Checkpoint;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::inventory::{self, Manifest};
use crate::list::{Item, Lister};
use crate::settings::RunArgs;
use crate::store::ranges::{self as saved, KeyRange};
use common::setup::Clients;

/// The input of a run that has work to do.
pub(crate) struct Input {
    pub(crate) checkpoint: Checkpoint,
    /// The parts; one range without saved ranges, whose position is the checkpoint's own.
    pub(crate) ranges: Vec<KeyRange>,
    /// Whether the parts are saved (several key ranges, or inventory files).
    pub(crate) in_ranges: bool,
    pub(crate) inventory: Option<Arc<Manifest>>,
    /// The key the run resumes after, when it resumes from a checkpoint.
    pub(crate) resumed_after: Option<String>,
}

/// What a run is to read.
pub(crate) enum Prepared {
    Input(Input),
    /// The prefix was listed completely before (and `--restart` not asked): nothing to do.
    AlreadyListed(Checkpoint),
}

/// Reads the checkpoint and the saved parts of the listing of `lister`'s bucket and prefix,
/// and plans the parts of a run that starts afresh.
pub(crate) async fn prepare(clients: &Clients, args: &RunArgs, lister: &Arc<Lister>) -> anyhow::Result<Prepared> {
    let (db, bucket, prefix) = (&clients.db, lister.bucket.as_str(), lister.prefix.as_str());
    let mut checkpoint =
        common::db::load_checkpoint(db, bucket, prefix).await.context("reading the feeder checkpoint")?;
    if args.restart {
        checkpoint = Checkpoint::default();
        if !args.dry_run {
            saved::replace_ranges(db, bucket, prefix, &[]).await.context("clearing the listing's ranges")?;
        }
    } else if checkpoint.finished {
        return Ok(Prepared::AlreadyListed(checkpoint));
    }
    let mut ranges = saved::load_ranges(db, bucket, prefix).await.context("reading the listing's ranges")?;
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
                saved::replace_ranges(db, bucket, prefix, &ranges).await.context("saving the input's parts")?;
            }
        }
        let saved_files: Vec<Option<&str>> = ranges.iter().map(|r| r.inventory_file.as_deref()).collect();
        anyhow::ensure!(
            saved_files == files,
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
        ranges = crate::ranges::plan(lister, resumed_after.as_deref(), args.list_ranges.into()).await?;
        if !args.dry_run {
            saved::replace_ranges(db, bucket, prefix, &ranges).await.context("saving the listing's ranges")?;
        }
        tracing::info!(ranges = ranges.len(), "listing in key ranges at once");
    }
    if let Some(key) = &resumed_after {
        tracing::info!(after = key, listed_before = checkpoint.listed, "resuming from the checkpoint");
    }
    let in_ranges = !ranges.is_empty();
    if !in_ranges {
        ranges.push(KeyRange { after: resumed_after.clone(), ..KeyRange::default() });
    }
    Ok(Prepared::Input(Input { checkpoint, ranges, in_ranges, inventory, resumed_after }))
}

impl Input {
    /// Starts a task per unfinished part, listing it (or reading its inventory file) page by
    /// page; the pages arrive on the receiver tagged with their part's index.
    pub(crate) fn spawn(
        &self,
        clients: &Clients,
        lister: &Arc<Lister>,
        args: &RunArgs,
        shutdown: &CancellationToken,
    ) -> (mpsc::Receiver<Item>, Vec<tokio::task::JoinHandle<()>>) {
        let (tx, pages) = mpsc::channel(2 * self.ranges.len());
        let tasks = self
            .ranges
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.finished)
            .map(|(i, r)| match &self.inventory {
                Some(manifest) => inventory::spawn(
                    clients.s3.clone(),
                    manifest.clone(),
                    i,
                    lister.prefix.clone(),
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
        (pages, tasks)
    }

    /// The parts not listed to their end yet.
    pub(crate) fn unfinished(&self) -> usize {
        self.ranges.iter().filter(|r| !r.finished).count()
    }
}
