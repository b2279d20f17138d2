//! The rewrite journal (`avatar_migration_journal`): pages, the rate, totals, and the
//! compare-and-set rollback.

use std::time::Duration;

use sqlx::PgPool;

/// One rewrite the journal recorded.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct JournalEntry {
    pub journal_id: i64,
    pub row_id: String,
    pub old_path: String,
    pub new_path: String,
    /// RFC 3339, UTC.
    pub rewritten_at: String,
    pub rolled_back: bool,
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
        "SELECT journal_id, row_id, old_path, new_path,
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

/// Points the rows of these journal entries back at their old path, compare-and-set: only a
/// row whose path is still the one the entry wrote, with the entry's id, and never at a legacy
/// path with a tombstone (its object is being or was deleted: see [`fence`]); held rows are
/// skipped (`SKIP LOCKED`). Rolled-back entries are marked in the same statement. `dry`:
/// counts only, writes nothing.
pub async fn roll_back(pool: &PgPool, journal_ids: &[i64], dry: bool) -> sqlx::Result<RolledBack> {
    let (entries, at_new, back): (i64, i64, i64) = sqlx::query_as(
        "WITH j AS (SELECT journal_id, row_id, old_path, new_path FROM avatar_migration_journal
                    WHERE journal_id = ANY($1) AND rolled_back_at IS NULL
                      AND NOT EXISTS (SELECT 1 FROM avatar_migration_tombstones t WHERE t.legacy_path = old_path)),
         at_new AS (SELECT a.id, j.journal_id, j.old_path, j.new_path
                    FROM avatars a JOIN j ON a.path = j.new_path AND a.id::text = j.row_id),
         held AS (SELECT a.id, at_new.journal_id, at_new.old_path, at_new.new_path
                  FROM avatars a JOIN at_new ON a.id = at_new.id
                  WHERE NOT $2 ORDER BY a.id FOR UPDATE OF a SKIP LOCKED),
         back AS (UPDATE avatars a SET path = held.old_path FROM held
                  WHERE a.id = held.id AND a.path = held.new_path
                  RETURNING held.journal_id),
         mark AS (UPDATE avatar_migration_journal SET rolled_back_at = now()
                  WHERE journal_id IN (SELECT journal_id FROM back))
         SELECT (SELECT count(*) FROM j), (SELECT count(*) FROM at_new), (SELECT count(*) FROM back)",
    )
    .bind(journal_ids)
    .bind(dry)
    .fetch_one(pool)
    .await?;
    let (entries, at_new, back) = (entries as u64, at_new as u64, back as u64);
    Ok(if dry {
        RolledBack { rows: at_new, changed: entries - at_new, held: 0 }
    } else {
        RolledBack { rows: back, changed: entries - at_new, held: at_new - back }
    })
}
