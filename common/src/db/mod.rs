//! Database access that both binaries run: connecting and preparing the schema online here;
//! one file per table or protocol below it: [`references`] (the columns naming objects, looked
//! up in the catalog), [`rewrite`] (their compare-and-set rewrite), [`failures`] (the records
//! operators list), [`listing`] (the feeder's position and lease, read by consumers), [`lease`]
//! (the lease on the legacy objects), [`fence`] (the fence and the tombstones), and [`keyset`],
//! how every table is read in pages. The feeder's own bookkeeping is in `feeder::store`; the
//! tables' DDL in `tables.sql` and with each module.
//!
//! Promises:
//! - preparing never takes a table lock on a referencing table: a missing index is built with
//!   `CREATE INDEX CONCURRENTLY` (only with `MISSING_INDEX=build`), and preparation is
//!   serialized between processes with a *polled* advisory lock (a blocked
//!   `pg_advisory_lock` would hold a snapshot that the concurrent index build waits for, a
//!   deadlock);
//! - `prepare` returns only once every reference resolves, with an index serving lookups by
//!   value (unless `MISSING_INDEX=scan`) and planner statistics on its column, so no rewrite
//!   ever runs as a full scan; nothing is created in a database where a reference does not
//!   resolve;
//! - the rewrite is `UPDATE ... WHERE column = old` (I4): a row the live service changed is
//!   left alone.

pub mod failures;
pub mod fence;
pub mod keyset;
pub mod lease;
pub mod listing;
pub mod references;
pub mod rewrite;

pub use crate::reason::Reason;
pub use failures::{
    FailureRecord, clear_failures, failure_counts, failures_after, list_failures, record_failure, recorded_reasons,
};
pub use listing::{
    Checkpoint, FEEDER_LEASE, FeederLease, ListingState, listing_state, load_checkpoint, save_checkpoint,
};
pub use references::{MissingIndex, Schema, Target, Targets};
pub use rewrite::{Rewritten, count_all_naming, count_naming, rewrite_paths, rewrite_statement};

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};

/// The bookkeeping tables (checkpoint, ranges, journal, the scans' positions, failures).
const TABLES: &str = include_str!("tables.sql");

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

/// Prepares the database idempotently: the bookkeeping tables, and every reference
/// (`REFERENCES`) looked up and checked, its index found, built or refused as
/// `MISSING_INDEX` says ([`references::resolve`]). Safe to call from every process at once.
pub async fn prepare(pool: &PgPool, schema: &Schema) -> anyhow::Result<Targets> {
    let mut conn = pool.acquire().await.context("cannot get a database connection")?;
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
    let result = prepare_locked(&mut conn, schema).await;
    let unlock = sqlx::query("SELECT pg_advisory_unlock($1)").bind(PREPARE_LOCK_KEY).execute(&mut *conn).await;
    // Back to the session's timeouts (DB_LOCK_TIMEOUT, DB_STATEMENT_TIMEOUT) before the
    // connection returns to the pool; a connection that cannot be reset is not returned.
    if sqlx::raw_sql("RESET lock_timeout; RESET statement_timeout").execute(&mut *conn).await.is_err() {
        conn.detach();
    }
    let targets = result?;
    unlock?;
    Ok(targets)
}

async fn prepare_locked(conn: &mut PgConnection, schema: &Schema) -> anyhow::Result<Targets> {
    let targets = references::resolve(conn, schema).await?;
    sqlx::raw_sql(TABLES).execute(&mut *conn).await.context("cannot create the migration's bookkeeping tables")?;
    sqlx::raw_sql(crate::control::TABLES)
        .execute(&mut *conn)
        .await
        .context("cannot create the migration's control tables")?;
    sqlx::raw_sql(lease::TABLES).execute(&mut *conn).await.context("cannot create the migration's lease table")?;
    sqlx::raw_sql(fence::TABLES).execute(&mut *conn).await.context("cannot create the migration's tombstones")?;
    sqlx::raw_sql(references::FUNCTIONS)
        .execute(&mut *conn)
        .await
        .context("cannot create the migration's URL-encoding functions")?;
    // Tables made by earlier versions lack columns: the feeder's lease; the journal's
    // reference and legacy key (`NULL`: `avatars.path`, whose value was the key).
    for (table, column, kind) in [
        ("avatar_migration_checkpoint", "feeder_alive_until", "timestamptz"),
        ("avatar_migration_journal", "reference", "text"),
        ("avatar_migration_journal", "legacy_key", "text"),
    ] {
        add_missing_column(conn, table, column, kind).await?;
    }
    Ok(targets)
}

/// Adds a column to a bookkeeping table made by an earlier version. `ALTER TABLE` takes an
/// exclusive lock even when the column exists, so it runs only when the column is missing.
async fn add_missing_column(conn: &mut PgConnection, table: &str, column: &str, kind: &str) -> anyhow::Result<()> {
    let has: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = $2
                        AND NOT attisdropped)",
    )
    .bind(table)
    .bind(column)
    .fetch_one(&mut *conn)
    .await?;
    if !has {
        sqlx::raw_sql(&format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}"))
            .execute(&mut *conn)
            .await
            .with_context(|| format!("cannot add {column} to {table}"))?;
    }
    Ok(())
}
