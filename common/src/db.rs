//! Database access: connecting, preparing the schema online, the compare-and-set rewrite of
//! `avatars.path`, the failure records operators list, and the feeder's checkpoint.
//!
//! Promises:
//! - preparing never takes a table lock on `avatars`: the index on `path` is built with
//!   `CREATE INDEX CONCURRENTLY`, and preparation is serialized between processes with a
//!   *polled* advisory lock (a blocked `pg_advisory_lock` would hold a snapshot that the
//!   concurrent index build waits for, a deadlock);
//! - `prepare` returns only once a valid index on `avatars(path)` exists, and the planner has
//!   statistics on `path` (analyzed if missing), so no rewrite ever runs as a full scan;
//! - the rewrite is `UPDATE ... WHERE path = old` (I4): a row the live service changed is left
//!   alone.

pub mod fence;
pub mod lease;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Row};

/// Name of the index the migration creates when `avatars(path)` has none.
pub const PATH_INDEX: &str = "avatars_path_idx";
const PREPARE_LOCK_KEY: i64 = 0x6176_6174_6172_6d67; // "avatarmg"

/// Opens a pool; failures name the host and database, never the password.
pub async fn connect(options: PgConnectOptions, max_connections: u32) -> anyhow::Result<PgPool> {
    let target = format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("(default database)")
    );
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(15))
        .connect_with(options)
        .await
        .map_err(|e| {
            // sqlx's errors never hold the connection string; the source is kept for
            // `is_unavailable`.
            anyhow::Error::new(e).context(format!(
                "cannot connect to the database at {target} given by DATABASE_URL (check that PostgreSQL \
                 is running and the URL's host, port, user, password and database)"
            ))
        })?;
    Ok(pool)
}

/// Whether a database error means the server is not available *now*: the network (refused,
/// reset, timed out), no connection within the pool's wait, or the server saying so itself
/// (starting up, shutting down, too many connections, a connection exception), or a
/// conversation cut short. Authentication, a missing database, a statement's own error: not.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
        // What sqlx makes of a connection closed before the server's first answer (a proxy or
        // load balancer in front of a server that is down): "unexpected response from
        // SSLRequest".
        sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(e) => {
            let code = e.code().unwrap_or_default();
            // 57P01-57P03: admin/crash shutdown, cannot connect now; 53300: too many
            // connections; class 08: connection exceptions.
            code.starts_with("57P") || code == "53300" || code.starts_with("08")
        }
        _ => false,
    }
}

/// Prepares the database idempotently: the bookkeeping tables and a valid index on
/// `avatars(path)`. Safe to call from every process at once.
pub async fn prepare(pool: &PgPool) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await.context("cannot get a database connection")?;
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass('avatars')::text")
        .fetch_one(&mut *conn)
        .await
        .context("cannot look up table avatars")?;
    anyhow::ensure!(
        exists.is_some(),
        "table avatars does not exist in this database: apply add-ons/sre-challenge-addon1.sql \
         or point DATABASE_URL at the production database"
    );

    // Building an index concurrently waits for every older transaction and takes one pass
    // over the table: the migration's short timeouts do not apply to preparation.
    sqlx::raw_sql("SET lock_timeout = 0; SET statement_timeout = 0").execute(&mut *conn).await?;
    // Polled, not blocking: see the module documentation.
    loop {
        let got: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(PREPARE_LOCK_KEY).fetch_one(&mut *conn).await?;
        if got {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let result = prepare_locked(&mut conn).await;
    let unlock = sqlx::query("SELECT pg_advisory_unlock($1)").bind(PREPARE_LOCK_KEY).execute(&mut *conn).await;
    // Back to the session's timeouts (DB_LOCK_TIMEOUT, DB_STATEMENT_TIMEOUT) before the
    // connection returns to the pool; a connection that cannot be reset is not returned.
    if sqlx::raw_sql("RESET lock_timeout; RESET statement_timeout").execute(&mut *conn).await.is_err() {
        conn.detach();
    }
    result?;
    unlock?;
    Ok(())
}

async fn prepare_locked(conn: &mut PgConnection) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS avatar_migration_checkpoint (
             source_bucket text NOT NULL,
             source_prefix text NOT NULL,
             last_key      text,
             listed        bigint NOT NULL DEFAULT 0,
             pages         bigint NOT NULL DEFAULT 0,
             finished      boolean NOT NULL DEFAULT false,
             updated_at    timestamptz NOT NULL DEFAULT now(),
             feeder_alive_until timestamptz,
             PRIMARY KEY (source_bucket, source_prefix)
         );
         CREATE TABLE IF NOT EXISTS avatar_migration_ranges (
             source_bucket text NOT NULL,
             source_prefix text NOT NULL,
             range_no      integer NOT NULL,
             after_key     text,
             until_key     text,
             inventory_file text,
             rows_done     bigint NOT NULL DEFAULT 0,
             last_key      text,
             listed        bigint NOT NULL DEFAULT 0,
             finished      boolean NOT NULL DEFAULT false,
             PRIMARY KEY (source_bucket, source_prefix, range_no)
         );
         CREATE TABLE IF NOT EXISTS avatar_migration_journal (
             journal_id     bigserial PRIMARY KEY,
             row_id         text NOT NULL,
             old_path       text NOT NULL,
             new_path       text NOT NULL,
             rewritten_at   timestamptz NOT NULL DEFAULT now(),
             rolled_back_at timestamptz
         );
         CREATE INDEX IF NOT EXISTS avatar_migration_journal_at
             ON avatar_migration_journal USING brin (rewritten_at);
         CREATE TABLE IF NOT EXISTS avatar_migration_verify (
             source_bucket text NOT NULL,
             source_prefix text NOT NULL,
             last_key      text,
             objects       bigint NOT NULL DEFAULT 0,
             missing_copy  bigint NOT NULL DEFAULT 0,
             conflicts     bigint NOT NULL DEFAULT 0,
             unproven      bigint NOT NULL DEFAULT 0,
             finished      boolean NOT NULL DEFAULT false,
             PRIMARY KEY (source_bucket, source_prefix)
         );
         CREATE TABLE IF NOT EXISTS avatar_migration_cleanup (
             source_bucket text NOT NULL,
             source_prefix text NOT NULL,
             last_key      text,
             objects       bigint NOT NULL DEFAULT 0,
             deleted       bigint NOT NULL DEFAULT 0,
             referenced    bigint NOT NULL DEFAULT 0,
             not_copied    bigint NOT NULL DEFAULT 0,
             failed        bigint NOT NULL DEFAULT 0,
             finished      boolean NOT NULL DEFAULT false,
             PRIMARY KEY (source_bucket, source_prefix)
         );
         CREATE TABLE IF NOT EXISTS avatar_migration_failures (
             subject     text NOT NULL,
             reason      text NOT NULL,
             detail      text NOT NULL,
             occurrences integer NOT NULL DEFAULT 1,
             first_seen  timestamptz NOT NULL DEFAULT now(),
             last_seen   timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (subject, reason)
         );",
    )
    .execute(&mut *conn)
    .await
    .context("cannot create the migration's bookkeeping tables")?;
    sqlx::raw_sql(crate::control::TABLES)
        .execute(&mut *conn)
        .await
        .context("cannot create the migration's control tables")?;
    sqlx::raw_sql(lease::TABLES).execute(&mut *conn).await.context("cannot create the migration's lease table")?;
    sqlx::raw_sql(fence::TABLES).execute(&mut *conn).await.context("cannot create the migration's tombstones")?;
    // A table made by an earlier version lacks the feeder's lease. `ALTER TABLE` takes an
    // exclusive lock even when the column exists, so it runs only when the column is missing.
    let has_lease: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('avatar_migration_checkpoint')
                        AND attname = 'feeder_alive_until' AND NOT attisdropped)",
    )
    .fetch_one(&mut *conn)
    .await?;
    if !has_lease {
        sqlx::raw_sql(
            "ALTER TABLE avatar_migration_checkpoint ADD COLUMN IF NOT EXISTS feeder_alive_until timestamptz",
        )
        .execute(&mut *conn)
        .await
        .context("cannot add the feeder's lease to avatar_migration_checkpoint")?;
    }

    if !path_index_valid(conn).await? {
        build_path_index(conn).await?;
    }
    ensure_statistics(conn).await
}

/// Builds the index on `avatars(path)` concurrently (dropping one of ours left invalid first).
async fn build_path_index(conn: &mut PgConnection) -> anyhow::Result<()> {
    // An index left invalid by an interrupted concurrent build is dropped and built again.
    let ours_invalid: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indexrelid = to_regclass($1) AND NOT indisvalid)",
    )
    .bind(PATH_INDEX)
    .fetch_one(&mut *conn)
    .await?;
    if ours_invalid {
        tracing::warn!(index = PATH_INDEX, "dropping an invalid index left by an interrupted build");
        sqlx::raw_sql(&format!("DROP INDEX CONCURRENTLY IF EXISTS {PATH_INDEX}")).execute(&mut *conn).await?;
    }
    tracing::info!(index = PATH_INDEX, "creating the index on avatars(path) concurrently");
    sqlx::raw_sql(&format!("CREATE INDEX CONCURRENTLY IF NOT EXISTS {PATH_INDEX} ON avatars (path)"))
        .execute(&mut *conn)
        .await
        .context("cannot create the index on avatars(path)")?;
    anyhow::ensure!(path_index_valid(conn).await?, "the index on avatars(path) is not valid after building it");
    Ok(())
}

/// Makes sure the planner has statistics on `avatars.path`. Without them (a table loaded and
/// not yet analyzed, a database fresh from `pg_restore` or `pg_upgrade`) it guesses that each
/// path matches 0.5 % of the table, and plans every batched rewrite as two full scans with hash
/// joins instead of index lookups: measured 18 ms instead of 1.3 ms per batch of ten on 20,000
/// rows, and worse as the table grows. `ANALYZE` reads a sample of the table and takes no lock
/// that the live service's reads and writes wait for; only the table's owner may run it, so
/// another role gets a warning naming the fix.
pub async fn ensure_statistics(conn: &mut PgConnection) -> anyhow::Result<()> {
    if has_path_statistics(conn).await? {
        return Ok(());
    }
    tracing::info!("avatars has no planner statistics on path: analyzing it");
    // PostgreSQL before 17 only warns ("skipping ...") when the role does not own the table;
    // 17 refuses (42501). Either way the statistics are looked for again.
    match sqlx::raw_sql("ANALYZE avatars").execute(&mut *conn).await {
        Err(err) if err.as_database_error().and_then(|e| e.code()).as_deref() != Some("42501") => {
            return Err(err).context("cannot analyze avatars");
        }
        _ => {}
    }
    let empty: bool = sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM avatars)").fetch_one(&mut *conn).await?;
    if !empty && !has_path_statistics(conn).await? {
        tracing::warn!(
            "avatars has no planner statistics and this role may not analyze it: each batched rewrite may scan \
             the whole table until autovacuum analyzes it; ask its owner to run ANALYZE avatars \
             (deploy/database-role.sql does)"
        );
    }
    Ok(())
}

/// Whether `pg_stats` holds statistics on `avatars.path` (an empty or never analyzed table has none).
pub async fn has_path_statistics(conn: &mut PgConnection) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stats s JOIN pg_class c ON c.relname = s.tablename
                        JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = s.schemaname
                        WHERE c.oid = 'avatars'::regclass AND s.attname = 'path')",
    )
    .fetch_one(conn)
    .await?)
}

/// Whether a valid, ready index leads with `avatars.path` (ours or one the schema already had).
pub async fn path_index_valid(conn: &mut PgConnection) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (
             SELECT 1 FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
             WHERE i.indrelid = 'avatars'::regclass AND a.attname = 'path'
               AND i.indisvalid AND i.indisready)",
    )
    .fetch_one(conn)
    .await?)
}

/// What a rewrite did for one old path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rewritten {
    /// Rows this statement pointed at the new path.
    pub rows: u64,
    /// Rows still at the old path because another transaction holds them (skipped, never
    /// waited for); the object's message must come back for them.
    pub held: u64,
}

/// The batched compare-and-set rewrite (see [`rewrite_paths`]): `$1` old paths, `$2` new
/// paths, `$3` whether to journal.
///
/// Written so that every access to `avatars` is an index lookup whatever the batch size and
/// the table size: rows are found by `path = ANY($1)` (the index on `path`) and updated by
/// `id = ANY(ARRAY(...))` (the primary key). Joined to the batch instead, PostgreSQL plans a
/// hash join over a full scan of `avatars` as soon as it expects a hundred rows or so on a
/// table of tens of thousands (measured: 18 ms instead of 1.3 ms a batch on 20,000 rows).
pub const REWRITE_STATEMENT: &str =
    "WITH v AS (SELECT DISTINCT * FROM UNNEST($1::text[], $2::text[]) AS u(old_path, new_path)),
         held AS (SELECT a.id FROM avatars a WHERE a.path = ANY($1::text[])
                  ORDER BY a.id FOR UPDATE OF a SKIP LOCKED),
         moved AS (UPDATE avatars a SET path = v.new_path FROM v
                   WHERE a.id = ANY(ARRAY(SELECT id FROM held)) AND a.path = v.old_path
                   RETURNING a.id, v.old_path, v.new_path),
         journal AS (INSERT INTO avatar_migration_journal (row_id, old_path, new_path)
                     SELECT id::text, old_path, new_path FROM moved WHERE $3)
         SELECT v.old_path,
                (SELECT count(*) FROM moved WHERE moved.old_path = v.old_path),
                (SELECT count(*) FROM avatars a WHERE a.path = v.old_path)
         FROM v";

/// Rewrites every row whose path is an `old` to its `new`, compare-and-set (I4), in one
/// statement. Rows another transaction holds are skipped (`FOR UPDATE SKIP LOCKED`), never
/// waited for: a live transaction on one row must not stall the batch, and the batch must not
/// hold the other rows' locks while it waits (the live service's writes would queue behind
/// it). With `journal`, the same statement records each rewritten row (its id, old and new
/// path) in `avatar_migration_journal`: a rewrite is never without its record, for `feeder
/// report` and `feeder rollback`. Returns, for each `old` path, what was done.
pub async fn rewrite_paths(
    pool: &PgPool,
    pairs: &[(String, String)],
    journal: bool,
) -> sqlx::Result<HashMap<String, Rewritten>> {
    let (old, new): (Vec<&str>, Vec<&str>) = pairs.iter().map(|(o, n)| (o.as_str(), n.as_str())).unzip();
    // `pointing` reads the statement's snapshot, taken before the update: the rows at the old
    // path, held or not. What was not rewritten among them is held by someone else.
    let rows: Vec<(String, i64, i64)> =
        sqlx::query_as(REWRITE_STATEMENT).bind(&old).bind(&new).bind(journal).fetch_all(pool).await?;
    Ok(rows
        .into_iter()
        .map(|(old, rows, pointing)| {
            let rows = rows as u64;
            (old, Rewritten { rows, held: (pointing as u64).saturating_sub(rows) })
        })
        .collect())
}

/// How many rows point at `path` (through the index on `path`).
pub async fn count_at_path(pool: &PgPool, path: &str) -> sqlx::Result<u64> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM avatars WHERE path = $1").bind(path).fetch_one(pool).await?;
    Ok(n as u64)
}

/// Why an object (or message) was set aside for the operator; a value of `feeder failures
/// --reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Reason {
    /// The source object no longer exists; nothing to copy.
    SourceMissing,
    /// The destination key holds different content; never overwritten (I3).
    DestinationConflict,
    /// The message could not be read.
    MalformedMessage,
    /// The message names a key outside SOURCE_PREFIX.
    OutsidePrefix,
    /// A row points at a legacy object that does not exist (found by `feeder verify`).
    RowObjectMissing,
    /// Larger than one CopyObject can copy (5 GiB): recorded by versions before multipart
    /// copies; no longer recorded.
    TooLarge,
    /// The destination exists with the same size but its identity with the source could not
    /// be proven without reading more than `COMPARE_MAX_BYTES`; left as it is.
    DestinationUnproven,
    /// S3 denies access to this object (403 AccessDenied on it).
    AccessDenied,
    /// The object is archived (Glacier, Deep Archive, Intelligent-Tiering archive): restore it
    /// first (`InvalidObjectState`).
    ObjectArchived,
    /// The destination key would be longer than S3 allows (`KeyTooLongError`).
    KeyTooLong,
    /// The object's KMS key is disabled, missing or not granted (`KMS.*`).
    EncryptionKeyUnusable,
    /// Failed on every delivery up to the queue's `maxReceiveCount`: its message goes to the
    /// dead-letter queue; the detail holds the last error. `feeder redrive` retries it.
    RetriesExhausted,
}

impl Reason {
    /// The reason recorded as `name`, if any.
    pub fn parse(name: &str) -> Option<Reason> {
        <Reason as clap::ValueEnum>::value_variants().iter().copied().find(|r| r.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::SourceMissing => "source_missing",
            Reason::DestinationConflict => "destination_conflict",
            Reason::MalformedMessage => "malformed_message",
            Reason::OutsidePrefix => "outside_prefix",
            Reason::RowObjectMissing => "row_object_missing",
            Reason::TooLarge => "too_large",
            Reason::DestinationUnproven => "destination_unproven",
            Reason::AccessDenied => "access_denied",
            Reason::ObjectArchived => "object_archived",
            Reason::KeyTooLong => "key_too_long",
            Reason::EncryptionKeyUnusable => "encryption_key_unusable",
            Reason::RetriesExhausted => "retries_exhausted",
        }
    }
}

/// Records a failure; recording it again bumps its count.
pub async fn record_failure(pool: &PgPool, subject: &str, reason: Reason, detail: &str) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO avatar_migration_failures (subject, reason, detail) VALUES ($1, $2, $3)
         ON CONFLICT (subject, reason) DO UPDATE
         SET detail = EXCLUDED.detail, occurrences = avatar_migration_failures.occurrences + 1,
             last_seen = now()",
    )
    .bind(subject)
    .bind(reason.as_str())
    .bind(detail)
    .execute(pool)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureRecord {
    pub subject: String,
    pub reason: String,
    pub detail: String,
    pub occurrences: i32,
}

pub async fn list_failures(pool: &PgPool) -> sqlx::Result<Vec<FailureRecord>> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = failures_page(pool, None, after.as_ref(), 1000).await?;
        let Some(last) = page.last() else { return Ok(all) };
        after = Some((last.reason.clone(), last.subject.clone()));
        all.extend(page);
    }
}

/// Failure records after `after` (reason, subject) in that order, at most `limit`; only of
/// `reason` when given. Pages through the records without loading them all.
pub async fn failures_page(
    pool: &PgPool,
    reason: Option<&str>,
    after: Option<&(String, String)>,
    limit: i64,
) -> sqlx::Result<Vec<FailureRecord>> {
    let (after_reason, after_subject) =
        after.map(|(r, s)| (Some(r.as_str()), Some(s.as_str()))).unwrap_or((None, None));
    let rows = sqlx::query(
        "SELECT subject, reason, detail, occurrences FROM avatar_migration_failures
         WHERE ($1::text IS NULL OR reason = $1)
           AND ($2::text IS NULL OR (reason, subject) > ($2, $3))
         ORDER BY reason, subject LIMIT $4",
    )
    .bind(reason)
    .bind(after_reason)
    .bind(after_subject)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| FailureRecord { subject: r.get(0), reason: r.get(1), detail: r.get(2), occurrences: r.get(3) })
        .collect())
}

/// Forgets the records of these subjects with this reason (they are being retried).
pub async fn clear_failures(pool: &PgPool, subjects: &[String], reason: Reason) -> sqlx::Result<u64> {
    let done = sqlx::query("DELETE FROM avatar_migration_failures WHERE reason = $1 AND subject = ANY($2)")
        .bind(reason.as_str())
        .bind(subjects)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

/// How many failures of each reason are recorded (one `GROUP BY`, never every row).
pub async fn failure_counts(pool: &PgPool) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as("SELECT reason, count(*) FROM avatar_migration_failures GROUP BY reason ORDER BY reason")
        .fetch_all(pool)
        .await
}

/// The reasons each of these subjects (keys) is recorded with.
pub async fn recorded_reasons(pool: &PgPool, subjects: &[&str]) -> sqlx::Result<HashMap<String, Vec<String>>> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT subject, reason FROM avatar_migration_failures WHERE subject = ANY($1)")
            .bind(subjects)
            .fetch_all(pool)
            .await?;
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for (subject, reason) in rows {
        out.entry(subject).or_default().push(reason);
    }
    Ok(out)
}

/// One page of `avatars` in id order, after `after_id`: (id, path). Keyset pagination on the
/// primary key: no long transaction, no lock, flat memory over any table size.
pub async fn rows_after(pool: &PgPool, after_id: i64, limit: i64) -> sqlx::Result<Vec<(i64, Option<String>)>> {
    sqlx::query_as("SELECT id::bigint, path FROM avatars WHERE id > $1 ORDER BY id LIMIT $2")
        .bind(after_id)
        .bind(limit)
        .fetch_all(pool)
        .await
}

/// Rows by where their path points.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowCounts {
    pub all: i64,
    pub legacy: i64,
    pub modern: i64,
    /// Legacy rows whose path is the subject of a failure record (set aside with a reason).
    pub legacy_set_aside: i64,
    /// Estimated from the planner's statistics and the journal's counter, not counted.
    pub estimated: bool,
}

/// Counts rows by prefix: one scan of the table, bounded by `timeout` (`statement_timeout`;
/// the session's `lock_timeout` still applies, so it never queues behind a DDL).
pub async fn count_rows(
    pool: &PgPool,
    legacy_prefix: &str,
    modern_prefix: &str,
    timeout: Duration,
) -> sqlx::Result<RowCounts> {
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("SET LOCAL statement_timeout = {}", timeout.as_millis().max(1))).execute(&mut *tx).await?;
    let (legacy, modern, all, legacy_set_aside): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE left(path, length($1)) = $1),
                count(*) FILTER (WHERE left(path, length($2)) = $2),
                count(*),
                count(*) FILTER (WHERE left(path, length($1)) = $1
                                 AND EXISTS (SELECT 1 FROM avatar_migration_failures f WHERE f.subject = path))
         FROM avatars",
    )
    .bind(legacy_prefix)
    .bind(modern_prefix)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(RowCounts { all, legacy, modern, legacy_set_aside, estimated: false })
}

/// The planner's estimate of the rows in `avatars` (`pg_class.reltuples`, kept by
/// autovacuum and `ANALYZE`); `None` when the table was never analyzed.
pub async fn estimated_rows(pool: &PgPool) -> sqlx::Result<Option<i64>> {
    let n: f64 = sqlx::query_scalar("SELECT reltuples::float8 FROM pg_class WHERE oid = 'avatars'::regclass")
        .fetch_one(pool)
        .await?;
    Ok((n >= 0.0).then_some(n as i64))
}

/// The feeder's position in the listing of one bucket and prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// The last key of the last fully enqueued page; listing resumes after it.
    pub last_key: Option<String>,
    pub listed: i64,
    pub pages: i64,
    pub finished: bool,
}

pub async fn load_checkpoint(pool: &PgPool, bucket: &str, prefix: &str) -> sqlx::Result<Checkpoint> {
    let row = sqlx::query(
        "SELECT last_key, listed, pages, finished FROM avatar_migration_checkpoint
         WHERE source_bucket = $1 AND source_prefix = $2",
    )
    .bind(bucket)
    .bind(prefix)
    .fetch_optional(pool)
    .await?;
    Ok(row
        .map(|r| Checkpoint { last_key: r.get(0), listed: r.get(1), pages: r.get(2), finished: r.get(3) })
        .unwrap_or_default())
}

pub async fn save_checkpoint(pool: &PgPool, bucket: &str, prefix: &str, cp: &Checkpoint) -> sqlx::Result<()> {
    save_checkpoint_on(&mut *pool.acquire().await?, bucket, prefix, cp).await
}

async fn save_checkpoint_on(conn: &mut PgConnection, bucket: &str, prefix: &str, cp: &Checkpoint) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO avatar_migration_checkpoint (source_bucket, source_prefix, last_key, listed, pages, finished)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (source_bucket, source_prefix) DO UPDATE
         SET last_key = EXCLUDED.last_key, listed = EXCLUDED.listed, pages = EXCLUDED.pages,
             finished = EXCLUDED.finished, updated_at = now()",
    )
    .bind(bucket)
    .bind(prefix)
    .bind(&cp.last_key)
    .bind(cp.listed)
    .bind(cp.pages)
    .bind(cp.finished)
    .execute(conn)
    .await?;
    Ok(())
}

/// How long a feeder's lease on its listing lasts after its last renewal: a feeder that dies
/// without ending it holds consumers' idle exits back this long, and a feeder restarted within
/// it (a supervisor, an operator) leaves no moment where the listing looks abandoned.
pub const FEEDER_LEASE: Duration = Duration::from_secs(15);
/// How often a feeder renews its lease.
const FEEDER_LEASE_RENEW: Duration = Duration::from_secs(3);

/// The state of one bucket and prefix's listing, as a consumer deciding its idle exit needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListingState {
    /// A feeder has ever saved anything for this listing.
    pub started: bool,
    /// Every object has been listed and enqueued.
    pub finished: bool,
    /// A feeder is sending messages for it now (its lease has not run out, by the database's
    /// clock, so no two hosts' clocks are compared).
    pub feeder_running: bool,
}

pub async fn listing_state(pool: &PgPool, bucket: &str, prefix: &str) -> sqlx::Result<ListingState> {
    let row = sqlx::query(
        "SELECT finished, coalesce(feeder_alive_until > now(), false) FROM avatar_migration_checkpoint
         WHERE source_bucket = $1 AND source_prefix = $2",
    )
    .bind(bucket)
    .bind(prefix)
    .fetch_optional(pool)
    .await?;
    Ok(row.map_or_else(ListingState::default, |r| ListingState {
        started: true,
        finished: r.get(0),
        feeder_running: r.get(1),
    }))
}

/// Sets (`Some`) or ends (`None`) the lease of the feeder sending messages for a listing.
async fn set_feeder_lease(pool: &PgPool, bucket: &str, prefix: &str, hold: Option<Duration>) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO avatar_migration_checkpoint (source_bucket, source_prefix, feeder_alive_until)
         VALUES ($1, $2, now() + make_interval(secs => $3))
         ON CONFLICT (source_bucket, source_prefix) DO UPDATE SET feeder_alive_until = EXCLUDED.feeder_alive_until",
    )
    .bind(bucket)
    .bind(prefix)
    .bind(hold.map(|h| h.as_secs_f64()))
    .execute(pool)
    .await?;
    Ok(())
}

/// Says, in the database, that a feeder is sending messages for a listing (a run, a
/// reconcile, a redrive), for as long as it is held: consumers with an idle exit do not exit
/// while it is, however long the queue stays empty (a feeder between pages, restarting after a
/// crash, waiting out an S3 outage). Renewed in the background every few seconds; ended by
/// [`FeederLease::end`], or by dropping it, or, when the process dies, by running out
/// ([`FEEDER_LEASE`] after its last renewal).
pub struct FeederLease {
    stop: tokio_util::sync::DropGuard,
    task: tokio::task::JoinHandle<()>,
}

impl FeederLease {
    /// Takes the lease (an error if the database cannot be written) and keeps renewing it.
    pub async fn hold(pool: &PgPool, bucket: &str, prefix: &str) -> anyhow::Result<Self> {
        set_feeder_lease(pool, bucket, prefix, Some(FEEDER_LEASE))
            .await
            .context("saving that a feeder is running (avatar_migration_checkpoint)")?;
        let token = tokio_util::sync::CancellationToken::new();
        let (pool, bucket, prefix, stop) = (pool.clone(), bucket.to_owned(), prefix.to_owned(), token.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(FEEDER_LEASE_RENEW) => {}
                    _ = stop.cancelled() => break,
                }
                if let Err(err) = set_feeder_lease(&pool, &bucket, &prefix, Some(FEEDER_LEASE)).await {
                    tracing::warn!(error = %err, "cannot renew the feeder's lease; trying again");
                }
            }
            if let Err(err) = set_feeder_lease(&pool, &bucket, &prefix, None).await {
                tracing::warn!(error = %err, "cannot end the feeder's lease; it runs out by itself");
            }
        });
        Ok(Self { stop: token.drop_guard(), task })
    }

    /// Ends the lease and waits until that is saved (or failed: then it runs out by itself).
    pub async fn end(self) {
        drop(self.stop);
        let _ = self.task.await;
    }
}

/// One key range of a listing split into ranges listed at once (`LIST_RANGES`): the keys `k`
/// with `after < k <= until` (no bound where `None`). The ranges of a listing cover its key
/// space exactly; each keeps its own position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyRange {
    pub no: i32,
    pub after: Option<String>,
    pub until: Option<String>,
    /// Set when this part of the input is a data file of an S3 Inventory report (then
    /// `after` and `until` are unset): its key in the report's bucket.
    pub inventory_file: Option<String>,
    /// Of an inventory file: the CSV rows read through the last fully enqueued page.
    pub rows_done: i64,
    /// The last key of the range's last fully enqueued page; listing resumes after it.
    pub last_key: Option<String>,
    pub listed: i64,
    pub finished: bool,
}

impl KeyRange {
    /// Where listing this range starts: after its last enqueued key, or its lower bound.
    pub fn resume_after(&self) -> Option<&str> {
        self.last_key.as_deref().or(self.after.as_deref())
    }
}

/// The saved ranges of a listing, in order (none when it is listed as one range).
pub async fn load_ranges(pool: &PgPool, bucket: &str, prefix: &str) -> sqlx::Result<Vec<KeyRange>> {
    let rows = sqlx::query(
        "SELECT range_no, after_key, until_key, last_key, listed, finished, inventory_file, rows_done
         FROM avatar_migration_ranges
         WHERE source_bucket = $1 AND source_prefix = $2 ORDER BY range_no",
    )
    .bind(bucket)
    .bind(prefix)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| KeyRange {
            no: r.get(0),
            after: r.get(1),
            until: r.get(2),
            last_key: r.get(3),
            listed: r.get(4),
            finished: r.get(5),
            inventory_file: r.get(6),
            rows_done: r.get(7),
        })
        .collect())
}

/// Replaces the saved ranges of a listing (none: listed as one range again).
pub async fn replace_ranges(pool: &PgPool, bucket: &str, prefix: &str, ranges: &[KeyRange]) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM avatar_migration_ranges WHERE source_bucket = $1 AND source_prefix = $2")
        .bind(bucket)
        .bind(prefix)
        .execute(&mut *tx)
        .await?;
    for r in ranges {
        save_range(&mut tx, bucket, prefix, r).await?;
    }
    tx.commit().await
}

async fn save_range(conn: &mut PgConnection, bucket: &str, prefix: &str, r: &KeyRange) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO avatar_migration_ranges
             (source_bucket, source_prefix, range_no, after_key, until_key, last_key, listed, finished,
              inventory_file, rows_done)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (source_bucket, source_prefix, range_no) DO UPDATE
         SET last_key = EXCLUDED.last_key, listed = EXCLUDED.listed, finished = EXCLUDED.finished,
             rows_done = EXCLUDED.rows_done",
    )
    .bind(bucket)
    .bind(prefix)
    .bind(r.no)
    .bind(&r.after)
    .bind(&r.until)
    .bind(&r.last_key)
    .bind(r.listed)
    .bind(r.finished)
    .bind(&r.inventory_file)
    .bind(r.rows_done)
    .execute(conn)
    .await?;
    Ok(())
}

/// Saves the listing's checkpoint and, when it is listed in ranges, the range's position, in
/// one transaction.
pub async fn save_progress(
    pool: &PgPool,
    bucket: &str,
    prefix: &str,
    cp: &Checkpoint,
    range: Option<&KeyRange>,
) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    if let Some(range) = range {
        save_range(&mut tx, bucket, prefix, range).await?;
    }
    save_checkpoint_on(&mut tx, bucket, prefix, cp).await?;
    tx.commit().await
}

/// One rewrite the journal recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    let rows = sqlx::query(
        "SELECT journal_id, row_id, old_path, new_path,
                to_char(rewritten_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                rolled_back_at IS NOT NULL
         FROM avatar_migration_journal
         WHERE journal_id > $1 AND (NOT $3 OR rolled_back_at IS NULL)
         ORDER BY journal_id LIMIT $2",
    )
    .bind(after_id)
    .bind(limit)
    .bind(pending_only)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| JournalEntry {
            journal_id: r.get(0),
            row_id: r.get(1),
            old_path: r.get(2),
            new_path: r.get(3),
            rewritten_at: r.get(4),
            rolled_back: r.get(5),
        })
        .collect())
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

/// Counts of the whole journal, for the report: (rewrites, rolled back, first, last).
pub async fn journal_totals(pool: &PgPool) -> sqlx::Result<(i64, i64, Option<String>, Option<String>)> {
    sqlx::query_as(
        "SELECT count(*), count(rolled_back_at),
                to_char(min(rewritten_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                to_char(max(rewritten_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
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

/// Where `feeder verify --objects` stands: (last key, objects, missing copies, conflicts,
/// unproven, finished).
pub type ObjectCheckRow = (Option<String>, i64, i64, i64, i64, bool);

pub async fn load_object_check_row(pool: &PgPool, bucket: &str, prefix: &str) -> sqlx::Result<Option<ObjectCheckRow>> {
    sqlx::query_as(
        "SELECT last_key, objects, missing_copy, conflicts, unproven, finished FROM avatar_migration_verify
         WHERE source_bucket = $1 AND source_prefix = $2",
    )
    .bind(bucket)
    .bind(prefix)
    .fetch_optional(pool)
    .await
}

pub async fn save_object_check_row(
    pool: &PgPool,
    bucket: &str,
    prefix: &str,
    row: &ObjectCheckRow,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO avatar_migration_verify
             (source_bucket, source_prefix, last_key, objects, missing_copy, conflicts, unproven, finished)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (source_bucket, source_prefix) DO UPDATE
         SET last_key = EXCLUDED.last_key, objects = EXCLUDED.objects, missing_copy = EXCLUDED.missing_copy,
             conflicts = EXCLUDED.conflicts, unproven = EXCLUDED.unproven, finished = EXCLUDED.finished",
    )
    .bind(bucket)
    .bind(prefix)
    .bind(&row.0)
    .bind(row.1)
    .bind(row.2)
    .bind(row.3)
    .bind(row.4)
    .bind(row.5)
    .execute(pool)
    .await?;
    Ok(())
}

/// Where `feeder cleanup` stands: (last key, objects, deleted, referenced, not copied,
/// failed, finished).
pub type CleanupRow = (Option<String>, i64, i64, i64, i64, i64, bool);

pub async fn load_cleanup_row(pool: &PgPool, bucket: &str, prefix: &str) -> sqlx::Result<Option<CleanupRow>> {
    sqlx::query_as(
        "SELECT last_key, objects, deleted, referenced, not_copied, failed, finished FROM avatar_migration_cleanup
         WHERE source_bucket = $1 AND source_prefix = $2",
    )
    .bind(bucket)
    .bind(prefix)
    .fetch_optional(pool)
    .await
}

pub async fn save_cleanup_row(pool: &PgPool, bucket: &str, prefix: &str, row: &CleanupRow) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO avatar_migration_cleanup
             (source_bucket, source_prefix, last_key, objects, deleted, referenced, not_copied, failed, finished)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (source_bucket, source_prefix) DO UPDATE
         SET last_key = EXCLUDED.last_key, objects = EXCLUDED.objects, deleted = EXCLUDED.deleted,
             referenced = EXCLUDED.referenced, not_copied = EXCLUDED.not_copied, failed = EXCLUDED.failed,
             finished = EXCLUDED.finished",
    )
    .bind(bucket)
    .bind(prefix)
    .bind(&row.0)
    .bind(row.1)
    .bind(row.2)
    .bind(row.3)
    .bind(row.4)
    .bind(row.5)
    .bind(row.6)
    .execute(pool)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names recorded in the database are the names `feeder failures --reason` takes.
    #[test]
    fn a_reasons_recorded_name_is_its_command_line_name() {
        for reason in <Reason as clap::ValueEnum>::value_variants() {
            let name = clap::ValueEnum::to_possible_value(reason).unwrap();
            assert_eq!(name.get_name(), reason.as_str());
            assert_eq!(Reason::parse(reason.as_str()), Some(*reason));
        }
        assert_eq!(Reason::parse("no_such_reason"), None);
    }
}
