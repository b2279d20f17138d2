//! `feeder cleanup`: deletes legacy objects once they are safely moved.
//!
//! Promises:
//! - a legacy object is deleted only when its copy exists with the same bytes (the identity
//!   rule of `verify --objects`) and no row references its legacy path, by the delete protocol
//!   of `common::deletion`: tombstones committed, every older transaction waited for, the
//!   references checked again, the delete conditional on the ETag listed (an object replaced
//!   since is kept);
//! - with `--yes` it refuses to start without the fence (`feeder fence install`) unless
//!   `--legacy-writes-stopped` says the live service no longer writes legacy paths, and it
//!   holds the lease on the legacy objects exclusively (no rollback, no other cleanup, no
//!   consumer deleting sources meanwhile);
//! - without `--yes` it is a dry run: it lists and counts what it would delete, deleting and
//!   saving nothing;
//! - deletes go in `DeleteObjects` batches of at most 1,000 (one `DeleteObject` each for keys
//!   XML cannot carry), at most `--rate` objects per second; each key the answer reports as
//!   failed is counted and kept;
//! - its position and counts are saved after each page (`avatar_migration_scans`), so an
//!   interrupted cleanup resumes; a finished one starts over next time.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use common::db::fence::Tombstone;
use common::db::lease::{Lease, Mode};
use common::deletion::Deleter;
use common::message::ObjectMessage;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::Ops;
use super::objects::{Verdict, copy_verdict};
use crate::list::Lister;
use crate::scan::{self, Ended};
use crate::settings::CleanupArgs;
use crate::store::scans::{self, ScanKind, ScanPosition};
use common::setup::Clients;

/// What cleanup decided, over the whole scan (resumed runs included).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub objects: i64,
    /// Deleted (dry: that would be).
    pub deleted: i64,
    /// Kept: a row still references the legacy path.
    pub referenced: i64,
    /// Kept: no copy, or a copy that is not provably the same bytes.
    pub not_copied: i64,
    /// Kept: the delete failed (replaced since it was listed, or refused).
    pub failed: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleanup {
    pub dry_run: bool,
    pub scan: ScanPosition<Counts>,
}

impl Cleanup {
    pub fn json(&self) -> String {
        let c = &self.scan.counts;
        serde_json::json!({
            "dry_run": self.dry_run,
            "legacy_objects": c.objects,
            "deleted": c.deleted,
            "kept_referenced": c.referenced,
            "kept_not_copied": c.not_copied,
            "kept_delete_failed": c.failed,
            "complete": self.scan.finished,
        })
        .to_string()
    }
}

impl Cleanup {
    fn print_summary(&self) {
        let verb = if self.dry_run { "would delete" } else { "deleted" };
        let c = &self.scan.counts;
        println!(
            "cleanup: {} legacy objects: {verb} {}; kept {} a row still references, {} without a copy of the same \
             bytes, {} whose delete failed{}",
            c.objects,
            c.deleted,
            c.referenced,
            c.not_copied,
            c.failed,
            if self.dry_run { " (dry run: pass --yes to delete)" } else { "" }
        );
    }
}

/// Waits until `deleted` deletes since `started` are at most `rate` per second (or shutdown).
async fn keep_to_rate(rate: NonZeroUsize, deleted: i64, started: Instant, shutdown: &CancellationToken) {
    let due = Duration::from_secs_f64(deleted as f64 / rate.get() as f64);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

pub async fn cleanup(cx: &Ops<'_>, args: &CleanupArgs) -> anyhow::Result<Cleanup> {
    let Ops { clients, mapping, shutdown, .. } = cx;
    let (bucket, prefix) = (mapping.source_bucket.as_str(), mapping.source_prefix.as_str());
    let dry_run = !args.yes;
    let lease = if dry_run { None } else { Some(take_lease(args, clients).await?) };
    let deleter = Deleter {
        db: clients.db.clone(),
        s3: clients.s3.clone(),
        bucket: bucket.to_owned(),
        targets: clients.targets.clone(),
        wait: args.delete_wait,
    };
    let mut state = Cleanup { dry_run, ..Cleanup::default() };
    if !dry_run
        && let Some(saved) = scans::load(&clients.db, ScanKind::Cleanup, bucket, prefix).await?
        && !saved.finished
    {
        state.scan = saved;
    }
    let lister = Arc::new(Lister {
        s3: clients.s3.clone(),
        bucket: bucket.to_owned(),
        prefix: prefix.to_owned(),
        page_size: 1000,
    });
    // Tombstones are written and objects deleted batch by batch: each waits while the
    // database is unhealthy.
    let mut health = common::health::Health::connect(&cx.settings.health).await?;
    let name = format!("feeder cleanup on {}", common::host::name().unwrap_or_else(|| "this host".into()));
    let started = Instant::now();
    let segment = (state.scan.last_key.clone(), None);
    let ended = scan::each_page(lister, segment, shutdown, async |page| {
        let counts = &mut state.scan.counts;
        let doomed = deletable(cx, args, &page, counts).await?;
        if dry_run {
            for object in &doomed {
                println!("cleanup: would delete {}", object.legacy);
            }
            counts.deleted += doomed.len() as i64;
        } else if let Some(lease) = &lease
            && !doomed.is_empty()
        {
            health.wait_healthy(&clients.db, &name, shutdown).await?;
            let out = deleter.delete(lease, &doomed).await?;
            counts.referenced += out.referenced.len() as i64;
            counts.failed += (out.failed.len() + out.elsewhere.len()) as i64;
            counts.deleted += out.deleted.len() as i64;
            if let Some(rate) = args.rate {
                keep_to_rate(rate, counts.deleted, started, shutdown).await;
            }
        }
        state.scan.last_key = page.last().map(|o| o.key.clone()).or(state.scan.last_key.take());
        if !dry_run {
            scans::save(&clients.db, ScanKind::Cleanup, bucket, prefix, &state.scan).await?;
        }
        Ok(true)
    })
    .await?;
    state.scan.finished = ended == Ended::Complete;
    if !dry_run {
        scans::save(&clients.db, ScanKind::Cleanup, bucket, prefix, &state.scan).await?;
    }
    health.done(&clients.db, &name).await;
    state.print_summary();
    if args.json {
        println!("{}", state.json());
    }
    if let Some(lease) = lease {
        lease.end().await;
    }
    Ok(state)
}

/// The objects of a page that may be deleted: their copy holds the same bytes and no row
/// references them (the delete protocol checks the references again); the others counted.
async fn deletable(
    cx: &Ops<'_>,
    args: &CleanupArgs,
    page: &[ObjectMessage],
    counts: &mut Counts,
) -> anyhow::Result<Vec<Tombstone>> {
    let Ops { clients, mapping, .. } = cx;
    let checks: Vec<(bool, Verdict, String)> = futures::stream::iter(page.iter().map(|o| async move {
        let (destination, copy) = copy_verdict(clients, mapping, &o.key).await?;
        let referenced =
            common::db::count_all_naming(&clients.db, &clients.targets, &mapping.source_bucket, &o.key).await? > 0;
        anyhow::Ok((referenced, copy, destination))
    }))
    .buffered(args.concurrency.get())
    .try_collect()
    .await?;
    let mut doomed = Vec::new();
    for (object, (referenced, copy, destination)) in page.iter().zip(checks) {
        counts.objects += 1;
        match (referenced, copy) {
            (true, _) => counts.referenced += 1,
            (false, Verdict::Same) => {
                doomed.push(Tombstone { legacy: object.key.clone(), new: destination, etag: object.etag.clone() })
            }
            (false, _) => counts.not_copied += 1,
        }
    }
    Ok(doomed)
}

/// The exclusive lease, after checking that deletes are protected (the fence) or declared
/// safe without it.
async fn take_lease(args: &CleanupArgs, clients: &Clients) -> anyhow::Result<Lease> {
    if common::db::fence::protects(&clients.db, &clients.targets).await.context("looking for the fence")? {
        tracing::info!("the fence is installed: a write of a legacy path being deleted names its copy instead");
    } else if args.legacy_writes_stopped {
        tracing::warn!(
            "deleting without the fence (--legacy-writes-stopped): a legacy path the live service writes after its \
             object's check names a deleted object"
        );
    } else {
        anyhow::bail!(
            "cleanup --yes refuses to delete without the fence: the live service could write a legacy path after \
             cleanup checked it and before its object is deleted, leaving a row that names nothing. Install it \
             (`feeder fence install`), or pass --legacy-writes-stopped once the live service no longer writes \
             legacy paths"
        );
    }
    Ok(Lease::take(&clients.db, "feeder cleanup", Mode::Exclusive).await?)
}
