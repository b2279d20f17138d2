//! `DELETE_SOURCE`: deletes each legacy object once its copy holds its bytes and its rows
//! moved, by the delete protocol of `common::deletion` (tombstones, a wait for the older
//! transactions, the references checked again, a delete conditional on the listed ETag).
//!
//! Promises:
//! - nothing here holds a message: objects are handed over after their message may go, and
//!   deleted in batches (up to 1,000, gathered for up to a second) in the background; an
//!   object not deleted (a failure, a shutdown, a lost lease) stays for `feeder cleanup`;
//! - deletes happen only under the shared lease on the legacy objects, taken at start-up
//!   ([`SourceDeleter::start`]): never while a rollback or a cleanup runs;
//! - at start-up, it refuses to run without the fence unless `LEGACY_WRITES_STOPPED` says the
//!   live service no longer writes legacy paths.

use std::sync::Arc;
use std::time::Duration;

use common::db::fence::Tombstone;
use common::db::lease::{Lease, Mode};
use common::deletion::Deleter;
use tokio::task::JoinHandle;

use crate::batch::{Batcher, Shape};
use crate::metrics::Stats;

/// Objects deleted in one protocol run at most.
const BATCH: usize = 1000;
/// How long a batch gathers company.
const LINGER: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub(crate) struct SourceDeleter {
    batcher: Batcher<Tombstone, ()>,
}

impl SourceDeleter {
    /// Checks that deletes are protected (the fence, or `legacy_writes_stopped`), takes the
    /// shared lease and starts the background deleter.
    pub(crate) async fn start(
        deleter: Deleter,
        legacy_writes_stopped: bool,
        stats: Arc<Stats>,
    ) -> anyhow::Result<(Self, JoinHandle<()>)> {
        if common::db::fence::protects(&deleter.db, &deleter.targets).await? {
            tracing::info!("DELETE_SOURCE: the fence is installed");
        } else if legacy_writes_stopped {
            tracing::warn!(
                "DELETE_SOURCE without the fence (LEGACY_WRITES_STOPPED): the live service must not write legacy paths"
            );
        } else {
            anyhow::bail!(
                "DELETE_SOURCE refuses to delete without the fence: the live service could write a legacy path after \
                 its references were checked and before its object is deleted, leaving a row that names nothing. \
                 Install it (`feeder fence install`), or set LEGACY_WRITES_STOPPED=true once the live service no \
                 longer writes legacy paths"
            );
        }
        let lease = Arc::new(Lease::take(&deleter.db, "consumer (DELETE_SOURCE)", Mode::Shared).await?);
        let held = lease.clone();
        let (batcher, task) = Batcher::spawn(Shape::fixed(BATCH, LINGER, 2), move |batch: Vec<Tombstone>| {
            let (deleter, lease, stats) = (deleter.clone(), held.clone(), stats.clone());
            async move {
                let n = batch.len();
                match deleter.delete(&lease, &batch).await {
                    Ok(out) => {
                        stats.sources_deleted.inc_by(out.deleted.len() as u64);
                        let kept = out.referenced.len() + out.failed.len() + out.elsewhere.len();
                        if kept > 0 {
                            tracing::info!(
                                referenced = out.referenced.len(),
                                refused = out.failed.len(),
                                elsewhere = out.elsewhere.len(),
                                "sources kept (feeder cleanup looks at them again)"
                            );
                        }
                    }
                    Err(err) => tracing::warn!(
                        objects = n,
                        error = format!("{err:#}"),
                        "sources kept: the delete protocol stopped (feeder cleanup looks at them again)"
                    ),
                }
                vec![(); n]
            }
        });
        // Once every batch is done, the lease ends (saved before the process exits, so a
        // rollback or cleanup right after need not wait for it to run out).
        let task = tokio::spawn(async move {
            let _ = task.await;
            if let Ok(lease) = Arc::try_unwrap(lease) {
                lease.end().await;
            }
        });
        Ok((Self { batcher }, task))
    }

    /// Hands one moved object over for deletion; returns at once.
    pub(crate) fn delete(&self, tombstone: Tombstone) {
        let batcher = self.batcher.clone();
        tokio::spawn(async move { batcher.submit(tombstone).await });
    }
}
