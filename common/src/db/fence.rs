//! The fence and the tombstones: what makes deleting a legacy object safe while the live
//! service keeps writing `avatars.path`.
//!
//! A legacy object is deleted only after a *tombstone* for its key (and the key of its copy,
//! which holds the same bytes) is committed. The *fence* is a trigger on `avatars`, installed
//! and removed by the operator (`feeder fence install|remove|status`): a row written with a
//! tombstoned legacy path is written with the copy's path instead (`rewrite`, the default), or
//! refused with a clear error (`reject`). The delete protocol ([`crate::deletion`]) commits
//! the tombstones, waits until every transaction open at that moment has ended
//! ([`wait_for_older_transactions`]: only those could write a tombstoned path without the
//! fence seeing the tombstone), checks the references again, and only then deletes. So a row
//! can never be left naming a deleted object, whatever the timing.
//!
//! Promises:
//! - install and remove are idempotent; creating or dropping the trigger takes the brief
//!   `SHARE ROW EXCLUSIVE` lock a trigger change needs on `avatars`, with a short
//!   `lock_timeout`, retried, so that it never queues the live service's writes behind a long
//!   transaction; the mode (`rewrite`, `reject`, `off`) is a row of the migration's own table,
//!   changed without touching `avatars`; a role that may create the trigger (`TRIGGER`) but not
//!   drop it (only the owner may) turns it off instead;
//! - the trigger runs with its owner's rights (`SECURITY DEFINER`, a fixed `search_path`): the
//!   live service's role needs no grant on the migration's tables;
//! - each rewrite by the fence is counted (a sequence: no lock, no row contended by writers);
//! - a tombstone is claimed by one deleter (the holder of a [`super::lease`]); one left by a
//!   holder whose lease ran out is taken over; a tombstone is withdrawn only when its object is
//!   known not to have been deleted.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::PgPool;

use super::references::{Target, Targets};
use crate::keys::KeyMapping;

/// The tables, created by `db::prepare`.
pub const TABLES: &str = "
    CREATE TABLE IF NOT EXISTS avatar_migration_tombstones (
        legacy_path text PRIMARY KEY,
        new_path    text NOT NULL,
        etag        text NOT NULL DEFAULT '',
        holder_id   text NOT NULL,
        created_at  timestamptz NOT NULL DEFAULT now(),
        deleted_at  timestamptz
    );
    CREATE SEQUENCE IF NOT EXISTS avatar_migration_fence_rewrites;
    CREATE TABLE IF NOT EXISTS avatar_migration_fence (
        id   boolean PRIMARY KEY DEFAULT true CHECK (id),
        mode text NOT NULL CHECK (mode IN ('rewrite', 'reject', 'off'))
    );";

/// What the fence does with a row written with a tombstoned legacy path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Write the path of the object's copy instead (the same bytes).
    Rewrite,
    /// Refuse the write with an error (SQLSTATE 23514) naming the path to write instead.
    Reject,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Rewrite => "rewrite",
            Mode::Reject => "reject",
        }
    }
}

/// The fence's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// `None`: not installed.
    pub mode: Option<Mode>,
    /// Installed but disabled (`ALTER TABLE ... DISABLE TRIGGER`): it protects nothing.
    pub disabled: bool,
    /// Tombstones: legacy objects being deleted (`pending`) or deleted.
    pub pending: i64,
    pub deleted: i64,
    /// Writes the fence rewrote to the copy's path since the tables were made.
    pub rewrites: i64,
}

/// The fence's state as it is installed now on every reference.
pub async fn status(pool: &PgPool, targets: &Targets) -> sqlx::Result<Status> {
    let (mode, disabled): (Option<Mode>, bool) = match installed(pool, targets).await? {
        Some((mode, enabled)) => (Some(mode), !enabled),
        None => (None, false),
    };
    let (pending, deleted, rewrites): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM avatar_migration_tombstones WHERE deleted_at IS NULL),
                (SELECT count(*) FROM avatar_migration_tombstones WHERE deleted_at IS NOT NULL),
                (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM avatar_migration_fence_rewrites)",
    )
    .fetch_one(pool)
    .await?;
    Ok(Status { mode, disabled, pending, deleted, rewrites })
}

/// The fence's mode and whether its trigger is enabled on every reference; `None` when a
/// reference has no trigger, or the fence was turned off (`remove` by a role that may not drop
/// it leaves it doing nothing).
pub async fn installed(pool: &PgPool, targets: &Targets) -> sqlx::Result<Option<(Mode, bool)>> {
    let mode: Option<String> =
        sqlx::query_scalar("SELECT mode FROM avatar_migration_fence WHERE id").fetch_optional(pool).await?;
    let mode = match mode.as_deref() {
        Some("rewrite") => Mode::Rewrite,
        Some("reject") => Mode::Reject,
        _ => return Ok(None),
    };
    let mut all_enabled = true;
    for target in targets.iter() {
        match trigger(pool, target).await? {
            None => return Ok(None),
            Some(enabled) => all_enabled &= enabled,
        }
    }
    Ok(Some((mode, all_enabled)))
}

/// Whether deletes are protected: the fence is installed, on, and its trigger enabled on every
/// reference.
pub async fn protects(pool: &PgPool, targets: &Targets) -> sqlx::Result<bool> {
    Ok(matches!(installed(pool, targets).await?, Some((_, true))))
}

/// How many times a trigger change tries for its lock, [`LOCK_WAIT`] each.
const LOCK_TRIES: u32 = 20;
const LOCK_WAIT: &str = "2s";

/// Installs the fence on every reference (or changes its mode); nothing to do when it is
/// installed as asked. Returns whether anything changed. The mode is a row of the migration's
/// own table, read by the triggers: changing it takes no lock on the referencing tables, and
/// needs no right on them.
pub async fn install(pool: &PgPool, targets: &Targets, mapping: &KeyMapping, mode: Mode) -> anyhow::Result<bool> {
    let before = installed(pool, targets).await?;
    let schema: String = sqlx::query_scalar("SELECT quote_ident(current_schema())").fetch_one(pool).await?;
    for target in targets.iter() {
        // Replacing the function takes no lock on the table.
        sqlx::raw_sql(&function(&schema, target, mapping))
            .execute(pool)
            .await
            .with_context(|| format!("creating the fence's function for {target}"))?;
    }
    sqlx::query(
        "INSERT INTO avatar_migration_fence (id, mode) VALUES (true, $1)
         ON CONFLICT (id) DO UPDATE SET mode = EXCLUDED.mode",
    )
    .bind(mode.as_str())
    .execute(pool)
    .await?;
    for target in targets.iter() {
        if trigger(pool, target).await?.is_none() {
            let (name, column) = (target.fence_name(), target.column());
            let statement = format!(
                "CREATE TRIGGER {name} BEFORE INSERT OR UPDATE OF {column} ON {}
                     FOR EACH ROW WHEN (NEW.{column} IS NOT NULL) EXECUTE FUNCTION {schema}.{name}()",
                target.table()
            );
            change_trigger(pool, target, &statement)
                .await
                .with_context(|| format!("installing the fence on {target}"))?;
        }
    }
    Ok(before != Some((mode, true)))
}

/// The fence's function for one reference: the legacy key a written value names (in the
/// reference's form), looked up among the tombstones; a tombstoned one is written as its
/// copy's value (`rewrite`) or refused (`reject`).
fn function(schema: &str, target: &Target, mapping: &KeyMapping) -> String {
    let form = &target.reference.form;
    let (lead, tail) = form.around(&mapping.source_bucket);
    let (new_lead, new_tail) = form.around(&mapping.destination_bucket);
    let (lead, tail, new_lead, new_tail) = (literal(&lead), literal(&tail), literal(&new_lead), literal(&new_tail));
    let (decode, encode) = if form.encodes() {
        (format!("{schema}.avatar_migration_url_decode"), format!("{schema}.avatar_migration_url_encode"))
    } else {
        (String::new(), String::new())
    };
    let (name, column, label) = (target.fence_name(), target.column(), literal(&target.label()));
    format!(
        "CREATE OR REPLACE FUNCTION {schema}.{name}() RETURNS trigger
         LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fence$
         DECLARE
             written text := NEW.{column};
             legacy text;
             moved text;
             fence text;
         BEGIN
             IF NOT starts_with(written, {lead}) OR right(written, length({tail})) <> {tail}
                OR length(written) < length({lead}) + length({tail}) THEN
                 RETURN NEW;
             END IF;
             legacy := {decode}(substr(written, length({lead}) + 1, length(written) - length({lead}) - length({tail})));
             SELECT t.new_path INTO moved FROM {schema}.avatar_migration_tombstones t WHERE t.legacy_path = legacy;
             IF NOT FOUND THEN
                 RETURN NEW;
             END IF;
             SELECT f.mode INTO fence FROM {schema}.avatar_migration_fence f WHERE f.id;
             IF fence IS DISTINCT FROM 'rewrite' AND fence IS DISTINCT FROM 'reject' THEN
                 RETURN NEW;
             END IF;
             moved := {new_lead} || {encode}(moved) || {new_tail};
             IF fence = 'reject' THEN
                 RAISE EXCEPTION '% % names a legacy object that the avatar migration deletes',
                     {label}, quote_literal(written)
                     USING ERRCODE = 'check_violation',
                           DETAIL = format('Its copy, with the same bytes, is %s.', quote_literal(moved)),
                           HINT = 'Write the new value (feeder fence status shows the fence).';
             END IF;
             PERFORM nextval('{schema}.avatar_migration_fence_rewrites');
             NEW.{column} := moved;
             RETURN NEW;
         END
         $fence$"
    )
}

/// A string as an SQL literal, read the same whatever `standard_conforming_strings` says (an
/// escape string: `\` and `'` doubled).
fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// Whether the fence's trigger is on a reference's table: `None` without it, else whether it
/// is enabled.
async fn trigger(pool: &PgPool, target: &Target) -> sqlx::Result<Option<bool>> {
    let enabled: Option<String> =
        sqlx::query_scalar("SELECT tgenabled::text FROM pg_trigger WHERE tgrelid = $1::int8::oid AND tgname = $2")
            .bind(i64::from(target.oid))
            .bind(target.fence_name())
            .fetch_optional(pool)
            .await?;
    Ok(enabled.map(|e| e != "D"))
}

/// What [`remove`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// There was no fence.
    NotInstalled,
    /// The trigger is gone.
    Dropped,
    /// The fence is off, but its trigger stays (doing nothing): only the table's owner may
    /// drop it.
    TurnedOff,
}

/// Turns the fence off and drops its triggers where this role may.
pub async fn remove(pool: &PgPool, targets: &Targets) -> anyhow::Result<Removed> {
    let was = installed(pool, targets).await?;
    sqlx::query("UPDATE avatar_migration_fence SET mode = 'off' WHERE id").execute(pool).await?;
    let mut removed = if was.is_some() { Removed::Dropped } else { Removed::NotInstalled };
    for target in targets.iter() {
        if trigger(pool, target).await?.is_none() {
            continue;
        }
        let statement = format!("DROP TRIGGER IF EXISTS {} ON {}", target.fence_name(), target.table());
        match change_trigger(pool, target, &statement).await {
            Ok(()) if removed != Removed::TurnedOff => removed = Removed::Dropped,
            Ok(()) => {}
            Err(ChangeError::NotAllowed(..)) => removed = Removed::TurnedOff,
            Err(err) => return Err(anyhow::Error::new(err).context(format!("removing the fence from {target}"))),
        }
    }
    Ok(removed)
}

#[derive(Debug, thiserror::Error)]
enum ChangeError {
    #[error(
        "this role may not change triggers on {1} ({0}): grant it TRIGGER on the table (deploy/database-role.sql \
         does for avatars; `feeder grants` prints the grants), or run the command as the table's owner"
    )]
    NotAllowed(sqlx::Error, String),
    #[error("a transaction kept {0} locked for {LOCK_TRIES} tries of {LOCK_WAIT}: try again later")]
    Locked(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Runs a trigger change in one transaction under a short `lock_timeout`, trying again when
/// the lock is not had in time (a long transaction on the table), so that the live service's
/// writes never queue long behind it.
async fn change_trigger(pool: &PgPool, target: &Target, statement: &str) -> Result<(), ChangeError> {
    for attempt in 1..=LOCK_TRIES {
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(&format!("SET LOCAL lock_timeout = '{LOCK_WAIT}'")).execute(&mut *tx).await?;
        match sqlx::raw_sql(statement).execute(&mut *tx).await {
            Ok(_) => {
                tx.commit().await?;
                return Ok(());
            }
            Err(err) if sql_state(&err).as_deref() == Some("55P03") => {
                tracing::warn!(attempt, table = %target.table_name, "a transaction on the table holds its lock; trying again");
                tx.rollback().await?;
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt.min(6)))).await;
            }
            Err(err) if sql_state(&err).as_deref() == Some("42501") => {
                return Err(ChangeError::NotAllowed(err, target.table_name.clone()));
            }
            Err(err) => return Err(err.into()),
        }
    }
    Err(ChangeError::Locked(target.table_name.clone()))
}

fn sql_state(err: &sqlx::Error) -> Option<String> {
    err.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned())
}

/// One legacy object to delete: its key, the ETag it was listed with, and its copy's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    pub legacy: String,
    pub new: String,
    pub etag: String,
}

/// Commits tombstones for these objects, for `holder`. Returns the keys now claimed by
/// `holder`: new ones, ones it already held, and pending ones whose holder's lease ran out;
/// another live holder's, or a deleted one's, are not.
pub async fn claim(pool: &PgPool, holder: &str, tombstones: &[Tombstone]) -> sqlx::Result<HashSet<String>> {
    let legacy: Vec<&str> = tombstones.iter().map(|t| t.legacy.as_str()).collect();
    let new: Vec<&str> = tombstones.iter().map(|t| t.new.as_str()).collect();
    let etag: Vec<&str> = tombstones.iter().map(|t| t.etag.as_str()).collect();
    let claimed: Vec<String> = sqlx::query_scalar(
        "INSERT INTO avatar_migration_tombstones AS t (legacy_path, new_path, etag, holder_id)
         SELECT DISTINCT ON (l) l, n, e, $4 FROM UNNEST($1::text[], $2::text[], $3::text[]) AS u(l, n, e)
         ON CONFLICT (legacy_path) DO UPDATE
         SET holder_id = EXCLUDED.holder_id, new_path = EXCLUDED.new_path, etag = EXCLUDED.etag
         WHERE t.deleted_at IS NULL
           AND (t.holder_id = EXCLUDED.holder_id
                OR NOT EXISTS (SELECT 1 FROM avatar_migration_leases l
                               WHERE l.holder_id = t.holder_id AND l.alive_until > now()))
         RETURNING legacy_path",
    )
    .bind(&legacy)
    .bind(&new)
    .bind(&etag)
    .bind(holder)
    .fetch_all(pool)
    .await?;
    Ok(claimed.into_iter().collect())
}

/// Marks these tombstones' objects deleted.
pub async fn mark_deleted(pool: &PgPool, holder: &str, keys: &[&str]) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE avatar_migration_tombstones SET deleted_at = now()
         WHERE legacy_path = ANY($1) AND holder_id = $2 AND deleted_at IS NULL",
    )
    .bind(keys)
    .bind(holder)
    .execute(pool)
    .await?;
    Ok(())
}

/// Withdraws `holder`'s pending tombstones of objects known not to have been deleted.
pub async fn withdraw(pool: &PgPool, holder: &str, keys: &[&str]) -> sqlx::Result<()> {
    sqlx::query(
        "DELETE FROM avatar_migration_tombstones
         WHERE legacy_path = ANY($1) AND holder_id = $2 AND deleted_at IS NULL",
    )
    .bind(keys)
    .bind(holder)
    .execute(pool)
    .await?;
    Ok(())
}

/// Which of these legacy paths have a tombstone (being or already deleted).
pub async fn tombstoned(pool: &PgPool, keys: &[&str]) -> sqlx::Result<HashSet<String>> {
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT legacy_path FROM avatar_migration_tombstones WHERE legacy_path = ANY($1)")
            .bind(keys)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Which of these legacy keys (of `bucket`) some row of some reference names (through each
/// column's index).
pub async fn referenced(
    pool: &PgPool,
    targets: &Targets,
    bucket: &str,
    keys: &[&str],
) -> sqlx::Result<HashSet<String>> {
    let mut named = HashSet::new();
    for target in targets.iter() {
        let form = &target.reference.form;
        let values: HashMap<String, &str> = keys.iter().map(|k| (form.value(bucket, k), *k)).collect();
        let wanted: Vec<&str> = values.keys().map(String::as_str).collect();
        let statement = format!(
            "SELECT DISTINCT {column}::text FROM {} WHERE {column} = ANY($1)",
            target.table(),
            column = target.column()
        );
        let rows: Vec<String> = sqlx::query_scalar(&statement).bind(&wanted).fetch_all(pool).await?;
        named.extend(rows.iter().filter_map(|v| values.get(v)).map(|k| (*k).to_owned()));
    }
    Ok(named)
}

/// A transaction the delete protocol waits for.
#[derive(Debug, Clone, PartialEq)]
pub struct OlderTransaction {
    pub pid: Option<i32>,
    pub application: String,
    /// How long it has been open; `None` where this role may not see it (`pg_read_all_stats`
    /// lets it).
    pub open_s: Option<f64>,
}

impl std::fmt::Display for OlderTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "process {pid}")?,
            None => write!(f, "a prepared transaction")?,
        }
        if !self.application.is_empty() {
            write!(f, " ({})", self.application)?;
        }
        if let Some(open) = self.open_s {
            write!(f, ", open {open:.0}s")?;
        }
        Ok(())
    }
}

/// Waiting for older transactions took longer than allowed.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} transaction(s) open since before the tombstones were committed did not end within {}s (DELETE_WAIT): {}; \
     nothing was deleted",
    waiting.len(), bound.as_secs(), waiting.iter().take(3).map(|t| t.to_string()).collect::<Vec<_>>().join("; ")
)]
pub struct WaitTimedOut {
    pub bound: Duration,
    pub waiting: Vec<OlderTransaction>,
}

/// The transactions open now in this database, other than this connection's (autovacuum
/// excepted: it never writes a row): each by its virtual transaction id, which every
/// transaction holds, and which anyone may see in `pg_locks`.
const OPEN_TRANSACTIONS: &str = "
    SELECT l.virtualxid, l.pid, coalesce(a.application_name, ''), extract(epoch FROM now() - a.xact_start)::float8
    FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'virtualxid' AND l.granted AND l.pid IS DISTINCT FROM pg_backend_pid()
      AND (a.datid IS NULL OR a.datid = (SELECT oid FROM pg_database WHERE datname = current_database()))
      AND a.backend_type IS DISTINCT FROM 'autovacuum worker'
      AND ($1::text[] IS NULL OR l.virtualxid = ANY($1))";

async fn open_transactions(pool: &PgPool, among: Option<&[String]>) -> sqlx::Result<Vec<(String, OlderTransaction)>> {
    let rows: Vec<(String, Option<i32>, String, Option<f64>)> =
        sqlx::query_as(OPEN_TRANSACTIONS).bind(among).fetch_all(pool).await?;
    Ok(rows
        .into_iter()
        .map(|(vxid, pid, application, open_s)| (vxid, OlderTransaction { pid, application, open_s }))
        .collect())
}

/// Waits until every transaction open now in this database has ended (the way
/// `CREATE INDEX CONCURRENTLY` waits for older snapshots): called right after tombstones are
/// committed, it returns once no transaction can still write a tombstoned path unseen by the
/// fence, or hold such a write uncommitted. Says who it waits for every [`REPORT_EVERY`];
/// gives up after `bound`.
pub async fn wait_for_older_transactions(pool: &PgPool, bound: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut waiting: Vec<String> =
        open_transactions(pool, None).await.context("listing open transactions")?.into_iter().map(|(v, _)| v).collect();
    let mut reported = Instant::now();
    let mut pause = Duration::from_millis(20);
    while !waiting.is_empty() {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
        let still = open_transactions(pool, Some(&waiting)).await.context("listing open transactions")?;
        if still.is_empty() {
            break;
        }
        if started.elapsed() >= bound {
            return Err(WaitTimedOut { bound, waiting: still.into_iter().map(|(_, t)| t).collect() }.into());
        }
        if reported.elapsed() >= REPORT_EVERY {
            reported = Instant::now();
            let oldest: Vec<String> = still.iter().take(3).map(|(_, t)| t.to_string()).collect();
            tracing::info!(
                transactions = still.len(),
                waited_s = started.elapsed().as_secs(),
                oldest = oldest.join("; "),
                "before deleting, waiting for transactions open since before the tombstones"
            );
        }
        waiting = still.into_iter().map(|(v, _)| v).collect();
    }
    Ok(())
}

/// How often a long wait for older transactions is reported.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);
