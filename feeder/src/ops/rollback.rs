//! `feeder rollback`: points the rows the migration rewrote back at their legacy paths, from
//! the rewrite journal, while the legacy objects still exist.
//!
//! Promises:
//! - compare-and-set: a row is pointed back only while its path is still the one the
//!   migration wrote (and its id the journal's); a row the live service changed since is left
//!   alone and counted; a row another transaction holds is skipped, never waited for (run
//!   again);
//! - a row is pointed back only when its legacy object still exists (HEAD), so no row ever
//!   points at nothing;
//! - it refuses to run while the queue holds messages (consumers would migrate the rows
//!   again) unless `--force`;
//! - `--dry-run` counts what it would do and writes nothing;
//! - the journal is read in pages; each rolled-back entry is marked in the same statement.
//!   Destination objects are left in place (nothing is deleted).

use futures::StreamExt;

use super::ROWS_PAGE;
use crate::settings::RollbackArgs;
use crate::{Clients, Settings};
use common::aws::{head_etag, queue_depth};

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
    /// Entries whose legacy object no longer exists: left alone.
    pub legacy_missing: u64,
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
        })
        .to_string()
    }
}

pub async fn rollback(settings: &Settings, args: &RollbackArgs, clients: &Clients) -> anyhow::Result<Rollback> {
    let mapping = settings.storage.mapping()?;
    let source_bucket = mapping.source_bucket.as_str();
    let depth = queue_depth(&clients.sqs, &settings.queue.queue_url).await?;
    if depth.total() > 0 && !args.force && !args.dry_run {
        anyhow::bail!(
            "the queue still holds {} messages: consumers would migrate rolled-back rows again. Stop the consumers \
             and purge the queue first (or pass --force)",
            depth.total()
        );
    }
    let mut result = Rollback { dry_run: args.dry_run, ..Rollback::default() };
    let mut after = 0;
    loop {
        let page = common::db::journal_page(&clients.db, after, ROWS_PAGE, true).await?;
        let Some(last) = page.last() else { break };
        after = last.journal_id;
        result.entries += page.len() as u64;
        let checks = futures::stream::iter(page.iter().map(|e| async move {
            let exists = head_etag(&clients.s3, source_bucket, &e.old_path).await.map_err(anyhow::Error::msg)?;
            anyhow::Ok((e.journal_id, exists.is_some()))
        }))
        .buffer_unordered(args.concurrency.get())
        .collect::<Vec<_>>()
        .await;
        let mut ids = Vec::with_capacity(page.len());
        for check in checks {
            match check? {
                (id, true) => ids.push(id),
                (_, false) => result.legacy_missing += 1,
            }
        }
        let done = common::db::roll_back(&clients.db, &ids, args.dry_run).await?;
        result.rows += done.rows;
        result.changed += done.changed;
        result.held += done.held;
    }
    let verb = if args.dry_run { "would point" } else { "pointed" };
    println!(
        "rollback: {verb} {} rows back at their legacy paths; {} changed since by the live service (left alone), {} held \
         by another transaction (run again), {} whose legacy object is gone (left alone)",
        result.rows, result.changed, result.held, result.legacy_missing
    );
    if args.json {
        println!("{}", result.json());
    }
    Ok(result)
}
