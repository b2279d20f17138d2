//! The lease on the legacy objects: who may delete them, or point rows back at them, now.
//!
//! Promises:
//! - `feeder cleanup --yes` and `feeder rollback` hold it *exclusively*: while one runs, no
//!   other of them, and no consumer deleting sources, may start; consumers with
//!   `DELETE_SOURCE` hold it *shared* with one another;
//! - taking it is one short transaction, serialized between processes by a transaction-scoped
//!   advisory lock; a refusal names every holder (what, where, since when, until when);
//! - it is renewed in the background every [`RENEW`] and ends when the holder drops it; a
//!   holder that dies without ending it loses it [`TTL`] after its last renewal, by the
//!   database's clock (no two hosts' clocks are compared);
//! - [`Lease::valid`] is false once renewals have failed for longer than the lease could
//!   still be trusted, so a holder cut off from the database stops acting on it before another
//!   process may take it over.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;

/// How long a lease lasts after its last renewal.
pub const TTL: Duration = Duration::from_secs(30);
/// How often a lease is renewed.
pub const RENEW: Duration = Duration::from_secs(5);
/// The part of [`TTL`] a holder does not count on: renewals take time, and clocks run at
/// slightly different speeds.
const MARGIN: Duration = Duration::from_secs(10);
const TAKE_LOCK_KEY: i64 = 0x6176_6174_6c65_6173; // "avatleas"

/// The table, created by `db::prepare`.
pub const TABLES: &str = "
    CREATE TABLE IF NOT EXISTS avatar_migration_leases (
        holder_id   text PRIMARY KEY,
        exclusive   boolean NOT NULL,
        holder      text NOT NULL,
        acquired_at timestamptz NOT NULL DEFAULT now(),
        alive_until timestamptz NOT NULL
    );";

/// How a lease is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Alone: `cleanup --yes`, `rollback`.
    Exclusive,
    /// With other shared holders: consumers deleting sources.
    Shared,
}

/// The lease is held by someone else.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} cannot start: {}. Wait for it to finish; a process that died holds it at most {}s after its last renewal",
    holders.join("; "), TTL.as_secs()
)]
pub struct Held {
    pub what: String,
    /// Each holder in words.
    pub holders: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    #[error(transparent)]
    Held(#[from] Held),
    #[error("taking the lease on the legacy objects (avatar_migration_leases): {0}")]
    Database(#[from] sqlx::Error),
}

/// This process's name among holders: what it runs, its host and process id.
pub fn holder_name(what: &str) -> String {
    let host = crate::host::name().unwrap_or_else(|| "an unknown host".to_owned());
    format!("{what} on {host}, process {}", std::process::id())
}

/// A held lease; ends when dropped (or [`Lease::end`]).
pub struct Lease {
    id: String,
    last_renewed: Arc<Mutex<Instant>>,
    stop: Option<tokio_util::sync::DropGuard>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Lease {
    /// Takes the lease for `what` (e.g. `feeder cleanup`), or says who holds it.
    pub async fn take(pool: &PgPool, what: &str, mode: Mode) -> Result<Self, TakeError> {
        let id = format!("{}-{:016x}", holder_name(what), fastrand::u64(..));
        try_take(pool, &id, what, mode).await?;
        let last_renewed = Arc::new(Mutex::new(Instant::now()));
        let token = tokio_util::sync::CancellationToken::new();
        let task =
            tokio::spawn(keep(pool.clone(), id.clone(), what.to_owned(), mode, last_renewed.clone(), token.clone()));
        Ok(Self { id, last_renewed, stop: Some(token.drop_guard()), task: Some(task) })
    }

    /// This holder's id (tombstones name it).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the lease may still be counted on: renewed within [`TTL`] less a margin.
    pub fn valid(&self) -> bool {
        self.last_renewed.lock().expect("never poisoned").elapsed() < TTL - MARGIN
    }

    /// Ends the lease and waits until that is saved (or failed: then it runs out by itself).
    pub async fn end(mut self) {
        drop(self.stop.take());
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // The task ends the lease itself once stopped.
        drop(self.stop.take());
    }
}

async fn try_take(pool: &PgPool, id: &str, what: &str, mode: Mode) -> Result<(), TakeError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(TAKE_LOCK_KEY).execute(&mut *tx).await?;
    let holders: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT holder,
                to_char(acquired_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC',
                greatest(ceil(extract(epoch FROM alive_until - now())), 0)::bigint::text
         FROM avatar_migration_leases
         WHERE alive_until > now() AND holder_id <> $1 AND (exclusive OR $2)
         ORDER BY acquired_at LIMIT 5",
    )
    .bind(id)
    .bind(mode == Mode::Exclusive)
    .fetch_all(&mut *tx)
    .await?;
    if !holders.is_empty() {
        return Err(Held {
            what: what.to_owned(),
            holders: holders
                .into_iter()
                .map(|(holder, since, left)| format!("{holder} holds it (since {since}, runs out in {left}s)"))
                .collect(),
        }
        .into());
    }
    sqlx::query("DELETE FROM avatar_migration_leases WHERE alive_until <= now()").execute(&mut *tx).await?;
    sqlx::query(
        "INSERT INTO avatar_migration_leases (holder_id, exclusive, holder, alive_until)
         VALUES ($1, $2, $3, now() + make_interval(secs => $4))
         ON CONFLICT (holder_id) DO UPDATE SET alive_until = EXCLUDED.alive_until",
    )
    .bind(id)
    .bind(mode == Mode::Exclusive)
    .bind(holder_name(what))
    .bind(TTL.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Renews until stopped, then ends the lease. A lease found gone (it ran out while the
/// database was out of reach) is taken again only if nobody took it meanwhile.
async fn keep(
    pool: PgPool,
    id: String,
    what: String,
    mode: Mode,
    last_renewed: Arc<Mutex<Instant>>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RENEW) => {}
            _ = stop.cancelled() => break,
        }
        let asked = Instant::now();
        let renewed = sqlx::query(
            "UPDATE avatar_migration_leases SET alive_until = now() + make_interval(secs => $2)
             WHERE holder_id = $1 AND alive_until > now()",
        )
        .bind(&id)
        .bind(TTL.as_secs_f64())
        .execute(&pool)
        .await;
        let ok = match renewed {
            Ok(done) if done.rows_affected() == 1 => true,
            Ok(_) => match try_take(&pool, &id, &what, mode).await {
                Ok(()) => {
                    tracing::warn!("the lease on the legacy objects had run out; taken again");
                    true
                }
                Err(err) => {
                    tracing::warn!(error = %err, "the lease on the legacy objects ran out and cannot be taken again");
                    false
                }
            },
            Err(err) => {
                tracing::warn!(error = %err, "cannot renew the lease on the legacy objects; trying again");
                false
            }
        };
        if ok {
            *last_renewed.lock().expect("never poisoned") = asked;
        }
    }
    if let Err(err) =
        sqlx::query("DELETE FROM avatar_migration_leases WHERE holder_id = $1").bind(&id).execute(&pool).await
    {
        tracing::warn!(error = %err, "cannot end the lease on the legacy objects; it runs out by itself");
    }
}
