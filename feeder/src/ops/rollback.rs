//! `feeder rollback`: points the rows the migration rewrote back at their legacy paths, from
//! the rewrite journal, while the legacy objects still exist.
//!
//! Promises:
//! - compare-and-set: a row is pointed back only while its path is still the one the
//!   migration wrote (and its id the journal's); a row the live service changed since is left
//!   alone and counted; a row another transaction holds is skipped, never waited for (run
//!   again);
//! - a row is pointed back only when its legacy object still exists (HEAD) and has no
//!   tombstone (it is not being deleted: `common::db::fence`), so no row ever points at
//!   nothing; it holds the lease on the legacy objects exclusively (no cleanup and no consumer
//!   deleting sources meanwhile);
//! - it refuses to run while the queue holds messages (consumers would migrate the rows
//!   again) unless `--force`;
//! - `--dry-run` counts what it would do and writes nothing;
//! - a row is pointed back only while the copy it names still holds the legacy object's bytes
//!   (the identity rule of `verify --objects`): a new avatar the live service uploaded at the
//!   same key is never undone; such an entry is left alone and counted;
//! - the journal is read in pages; each rolled-back entry is marked in the same statement.
//!   Destination objects are left in place (nothing is deleted).

use futures::StreamExt;

use anyhow::Context;
use common::db::keyset::Keyset;
use common::db::lease::{Lease, Mode};

use super::Ops;
use super::ROWS_PAGE;
use super::objects::{Verdict, verdict};
use crate::settings::RollbackArgs;
use crate::store::journal::JournalEntry;
use common::aws::queue_depth;
use common::identity::head_etag;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rollback {
    pub dry_run: bool,
    /// Journal entries looked at (not rolled back before).
    pub entries: u64,
    /// Rows pointed back (dry: that would be).
    pub rows: u64,
    /// Rows the live service changed since (or deleted): left alone.
    pub changed: u64,
    /// Rows held by another transaction: skipped.
    pub held: u64,
    /// Entries whose legacy object no longer exists, or has a tombstone (being or already
    /// deleted): left alone.
    pub legacy_missing: u64,
    /// Entries whose copy no longer holds the legacy bytes (the live service uploaded a new
    /// object at its key), or cannot be proven to: left alone.
    pub copy_replaced: u64,
}

/// What the objects of one journal entry allow.
enum Check {
    Back,
    LegacyMissing,
    CopyReplaced,
}

impl Rollback {
    pub fn json(&self) -> String {
        serde_json::json!({
            "dry_run": self.dry_run,
            "entries": self.entries,
            "rows_rolled_back": self.rows,
            "rows_changed_since": self.changed,
            "rows_held": self.held,
            "legacy_missing": self.legacy_missing,
            "copy_replaced": self.copy_replaced,
        })
        .to_string()
    }
}

impl Rollback {
    fn print_summary(&self) {
        let verb = if self.dry_run { "would point" } else { "pointed" };
        println!(
            "rollback: {verb} {} rows back at their legacy paths; {} changed since by the live service (left alone), \
             {} held by another transaction (run again), {} whose legacy object is gone (left alone), {} whose copy \
             was replaced since by a new upload (left alone)",
            self.rows, self.changed, self.held, self.legacy_missing, self.copy_replaced
        );
    }
}

/// What the objects of one journal entry allow.
async fn check(cx: &Ops<'_>, entry: &JournalEntry) -> anyhow::Result<Check> {
    let Ops { clients, mapping, .. } = cx;
    let source = (mapping.source_bucket.as_str(), entry.key());
    if head_etag(&clients.s3, source.0, source.1).await?.is_none() {
        return Ok(Check::LegacyMissing);
    }
    // The copy the row names must still hold the legacy bytes: a new upload at the same key
    // (the live service's write) is never undone.
    let Some(copy) = mapping.destination_key(entry.key()) else { return Ok(Check::CopyReplaced) };
    let copy = verdict(clients, source, (mapping.destination_bucket.as_str(), &copy)).await?;
    Ok(if matches!(copy, Verdict::Conflict | Verdict::Unproven) { Check::CopyReplaced } else { Check::Back })
}

pub async fn rollback(cx: &Ops<'_>, args: &RollbackArgs) -> anyhow::Result<Rollback> {
    let Ops { settings, clients, .. } = cx;
    let depth = queue_depth(&clients.sqs, &settings.queue.queue_url).await?;
    if depth.total() > 0 && !args.force && !args.dry_run {
        anyhow::bail!(
            "the queue still holds {} messages: consumers would migrate rolled-back rows again. Stop the consumers \
             and purge the queue first (or pass --force)",
            depth.total()
        );
    }
    let lease =
        if args.dry_run { None } else { Some(Lease::take(&clients.db, "feeder rollback", Mode::Exclusive).await?) };
    let mut result = Rollback { dry_run: args.dry_run, ..Rollback::default() };
    // The lease is given back whatever happened (held on, it would keep cleanup and
    // DELETE_SOURCE waiting out its expiry).
    let rolled = roll_back_pages(cx, args, lease.as_ref(), &mut result).await;
    if let Some(lease) = lease {
        lease.end().await;
    }
    rolled?;
    result.print_summary();
    if args.json {
        println!("{}", result.json());
    }
    Ok(result)
}

/// The journal, page by page.
async fn roll_back_pages(
    cx: &Ops<'_>,
    args: &RollbackArgs,
    lease: Option<&Lease>,
    result: &mut Rollback,
) -> anyhow::Result<()> {
    let Ops { settings, clients, .. } = cx;
    // Rows are written page by page: each page waits while the database is unhealthy.
    let mut health = common::health::Health::connect(&settings.health).await?;
    let name = format!("feeder rollback on {}", common::host::name().unwrap_or_else(|| "this host".into()));
    let mut pages = Keyset::after(0);
    let journal = |after| crate::store::journal::journal_page(&clients.db, after, ROWS_PAGE, true);
    while let Some(page) = pages.next(journal, |e| e.journal_id).await? {
        if !args.dry_run {
            health.wait_healthy(&clients.db, &name, &cx.shutdown).await?;
        }
        result.entries += page.len() as u64;
        if let Some(e) = page.iter().find(|e| clients.targets.by_label(e.reference.as_deref()).is_none()) {
            anyhow::bail!(
                "the journal holds rewrites of {}, which REFERENCES does not name: run rollback with REFERENCES \
                 naming every column the migration rewrote",
                e.reference()
            );
        }
        let keys: Vec<&str> = page.iter().map(JournalEntry::key).collect();
        let deleted = common::db::fence::tombstoned(&clients.db, &keys).await.context("reading the tombstones")?;
        let checks = futures::stream::iter(page.iter().filter(|e| !deleted.contains(e.key())))
            .map(|e| async move { Ok::<_, anyhow::Error>((e.journal_id, check(cx, e).await?)) })
            .buffer_unordered(args.concurrency.get())
            .collect::<Vec<_>>()
            .await;
        result.legacy_missing += (page.len() - checks.len()) as u64;
        anyhow::ensure!(
            lease.is_none_or(Lease::valid),
            "the lease on the legacy objects could not be renewed in time (the database is out of reach?): stopped; \
             run rollback again"
        );
        let mut ids = std::collections::HashSet::with_capacity(page.len());
        for check in checks {
            match check? {
                (id, Check::Back) => {
                    ids.insert(id);
                }
                (_, Check::LegacyMissing) => result.legacy_missing += 1,
                (_, Check::CopyReplaced) => result.copy_replaced += 1,
            }
        }
        // One statement per reference.
        for target in clients.targets.iter() {
            let ids: Vec<i64> = page
                .iter()
                .filter(|e| {
                    ids.contains(&e.journal_id) && clients.targets.by_label(e.reference.as_deref()) == Some(target)
                })
                .map(|e| e.journal_id)
                .collect();
            if ids.is_empty() {
                continue;
            }
            let done = crate::store::journal::roll_back(&clients.db, target, &ids, args.dry_run).await?;
            result.rows += done.rows;
            result.changed += done.changed;
            result.held += done.held;
        }
    }
    health.done(&clients.db, &name).await;
    Ok(())
}
