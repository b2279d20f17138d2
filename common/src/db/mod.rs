//! Database access that both binaries run: connecting and preparing the schema online here;
//! one file per table or protocol below it: [`rewrite`] (the compare-and-set rewrite of
//! `avatars.path`), [`failures`] (the records operators list), [`listing`] (the feeder's
//! position and lease, read by consumers), [`lease`] (the lease on the legacy objects),
//! [`fence`] (the fence and the tombstones), and [`keyset`], how every table is read in pages.
//! The feeder's own bookkeeping is in
//! `feeder::store`; the tables' DDL in `tables.sql` and with each module.
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

pub mod failures;
pub mod fence;
pub mod keyset;
pub mod lease;
pub mod listing;
pub mod rewrite;

pub use crate::reason::Reason;
pub use failures::{
    FailureRecord, clear_failures, failure_counts, failures_after, list_failures, record_failure, recorded_reasons,
};
pub use listing::{
    Checkpoint, FEEDER_LEASE, FeederLease, ListingState, listing_state, load_checkpoint, save_checkpoint,
};
pub use rewrite::{REWRITE_STATEMENT, Rewritten, count_at_path, rewrite_paths};

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};

/// The bookkeeping tables (checkpoint, ranges, journal, the scans' positions, failures).
const TABLES: &str = include_str!("tables.sql");

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
            let check = if matches!(e, sqlx::Error::Tls(_)) || e.to_string().contains("certificate") {
                // sqlx trusts only the roots compiled into it: not RDS's CA, nor a CA of one's own.
                "the server's certificate is not trusted: give its CA in the URL, \
                 sslrootcert=/usr/share/avatar-migration/rds-global-bundle.pem on RDS (the image holds it) \
                 or sslrootcert=/path/to/ca.pem"
            } else {
                "check that PostgreSQL is running and the URL's host, port, user, password and database"
            };
            anyhow::Error::new(e)
                .context(format!("cannot connect to the database at {target} given by DATABASE_URL ({check})"))
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
    sqlx::raw_sql(TABLES).execute(&mut *conn).await.context("cannot create the migration's bookkeeping tables")?;
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
