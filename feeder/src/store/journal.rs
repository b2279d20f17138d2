//! The rewrite journal (`avatar_migration_journal`): pages, the rate, totals, and the
//! compare-and-set rollback.

use std::time::Duration;

use common::db::Target;
use sqlx::PgPool;

/// The reference of the journal's entries that name none: earlier versions rewrote
/// `avatars.path` alone.
pub const EARLIER_REFERENCE: &str = "avatars.path";

/// One rewrite the journal recorded.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct JournalEntry {
    pub journal_id: i64,
    /// The reference's label (`schema.table.column`); `None`: `avatars.path`, by an earlier
    /// version.
    pub reference: Option<String>,
    pub row_id: String,
    /// The values: as the row held it, as the rewrite wrote it.
    pub old_path: String,
    pub new_path: String,
    /// The legacy object's key; `None`: `old_path` is the key.
    pub legacy_key: Option<String>,
    /// RFC 3339, UTC.
    pub rewritten_at: String,
    pub rolled_back: bool,
}

impl JournalEntry {
    /// The reference's label ([`EARLIER_REFERENCE`] for an entry of an earlier version).
    pub fn reference(&self) -> &str {
        self.reference.as_deref().unwrap_or(EARLIER_REFERENCE)
    }

    /// The legacy object's key.
    pub fn key(&self) -> &str {
        self.legacy_key.as_deref().unwrap_or(&self.old_path)
    }
}

/// Journal entries after `after_id`, in order, at most `limit`; with `pending_only`, only
/// those not rolled back.
pub async fn journal_page(
    pool: &PgPool,
    after_id: i64,
    limit: i64,
    pending_only: bool,
) -> sqlx::Result<Vec<JournalEntry>> {
    sqlx::query_as(
        "SELECT journal_id, reference, row_id, old_path, new_path, legacy_key,
                to_char(rewritten_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS rewritten_at,
                rolled_back_at IS NOT NULL AS rolled_back
         FROM avatar_migration_journal
         WHERE journal_id > $1 AND (NOT $3 OR rolled_back_at IS NULL)
         ORDER BY journal_id LIMIT $2",
    )
    .bind(after_id)
    .bind(limit)
    .bind(pending_only)
    .fetch_all(pool)
    .await
}

/// What the journal says of the run so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JournalSummary {
    /// The highest journal id: about the rewrites recorded (a cheap counter: ids of aborted
    /// statements are skipped).
    pub last_id: i64,
    /// Rewrites recorded within the window.
    pub recent: i64,
    pub window_s: f64,
}

/// The journal's progress counter and the rewrites of the last `window`.
pub async fn journal_summary(pool: &PgPool, window: Duration) -> sqlx::Result<JournalSummary> {
    let (last_id, recent): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT coalesce(max(journal_id), 0) FROM avatar_migration_journal),
                (SELECT count(*) FROM avatar_migration_journal
                 WHERE rewritten_at > now() - make_interval(secs => $1))",
    )
    .bind(window.as_secs_f64())
    .fetch_one(pool)
    .await?;
    Ok(JournalSummary { last_id, recent, window_s: window.as_secs_f64() })
}

/// What the whole journal holds, for the report.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct JournalTotals {
    pub rewrites: i64,
    pub rolled_back: i64,
    /// When the first and the last rewrite were made (RFC 3339, UTC); `None` without any.
    pub first: Option<String>,
    pub last: Option<String>,
}

/// Rewrites and rollbacks by reference (`None`: `avatars.path`, by an earlier version), in one
/// pass over the journal.
pub async fn journal_by_reference(pool: &PgPool) -> sqlx::Result<Vec<(Option<String>, i64, i64)>> {
    sqlx::query_as(
        "SELECT reference, count(*), count(rolled_back_at) FROM avatar_migration_journal GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(pool)
    .await
}

pub async fn journal_totals(pool: &PgPool) -> sqlx::Result<JournalTotals> {
    sqlx::query_as(
        "SELECT count(*) AS rewrites, count(rolled_back_at) AS rolled_back,
                to_char(min(rewritten_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS first,
                to_char(max(rewritten_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS last
         FROM avatar_migration_journal",
    )
    .fetch_one(pool)
    .await
}

/// What a rollback did (or, dry, would do) for some journal entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RolledBack {
    /// Rows pointed back at their old path (dry: that would be).
    pub rows: u64,
    /// Entries whose row no longer holds the path we wrote (the live service changed it, or
    /// the row is gone): left alone.
    pub changed: u64,
    /// Rows another transaction holds: skipped, never waited for (run again).
    pub held: u64,
}

/// Points the rows of these journal entries (all of `target`) back at their old value,
/// compare-and-set: only a row whose value is still the one the entry wrote, with the entry's
/// key, and never at a legacy object with a tombstone (it is being or was deleted: see
/// [`fence`]); held rows are skipped (`SKIP LOCKED`). Rolled-back entries are marked in the
/// same statement. `dry`: counts only, writes nothing.
pub async fn roll_back(pool: &PgPool, target: &Target, journal_ids: &[i64], dry: bool) -> sqlx::Result<RolledBack> {
    let (table, column, key, key_type) = (target.table(), target.column(), target.key(), &target.key_type);
    let statement = format!(
        "WITH j AS (SELECT journal_id, row_id, old_path, new_path FROM avatar_migration_journal
                    WHERE journal_id = ANY($1) AND rolled_back_at IS NULL
                      AND NOT EXISTS (SELECT 1 FROM avatar_migration_tombstones t
                                      WHERE t.legacy_path = coalesce(legacy_key, old_path))),
         at_new AS (SELECT a.{key} AS row_key, j.journal_id, j.old_path, j.new_path
                    FROM {table} a JOIN j ON a.{column} = j.new_path AND a.{key} = j.row_id::{key_type}),
         held AS (SELECT at_new.* FROM {table} a JOIN at_new ON a.{key} = at_new.row_key
                  WHERE NOT $2 ORDER BY a.{key} FOR UPDATE OF a SKIP LOCKED),
         back AS (UPDATE {table} a SET {column} = held.old_path FROM held
                  WHERE a.{key} = held.row_key AND a.{column} = held.new_path
                  RETURNING held.journal_id),
         mark AS (UPDATE avatar_migration_journal SET rolled_back_at = now()
                  WHERE journal_id IN (SELECT journal_id FROM back))
         SELECT (SELECT count(*) FROM j), (SELECT count(*) FROM at_new), (SELECT count(*) FROM back)"
    );
    let (entries, at_new, back): (i64, i64, i64) =
        sqlx::query_as(&statement).bind(journal_ids).bind(dry).fetch_one(pool).await?;
    let (entries, at_new, back) = (entries as u64, at_new as u64, back as u64);
    Ok(if dry {
        RolledBack { rows: at_new, changed: entries - at_new, held: 0 }
    } else {
        RolledBack { rows: back, changed: entries - at_new, held: at_new - back }
    })
}
