//! The listing's row (`avatar_migration_checkpoint`): the feeder's position, and its lease
//! that consumers read before an idle exit.

use std::time::Duration;

use anyhow::Context;
use sqlx::{PgConnection, PgPool};

/// The feeder's position in the listing of one bucket and prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Checkpoint {
    /// The last key of the last fully enqueued page; listing resumes after it.
    pub last_key: Option<String>,
    pub listed: i64,
    pub pages: i64,
    pub finished: bool,
}

pub async fn load_checkpoint(pool: &PgPool, bucket: &str, prefix: &str) -> sqlx::Result<Checkpoint> {
    let saved: Option<Checkpoint> = sqlx::query_as(
        "SELECT last_key, listed, pages, finished FROM avatar_migration_checkpoint
         WHERE source_bucket = $1 AND source_prefix = $2",
    )
    .bind(bucket)
    .bind(prefix)
    .fetch_optional(pool)
    .await?;
    Ok(saved.unwrap_or_default())
}

pub async fn save_checkpoint(pool: &PgPool, bucket: &str, prefix: &str, cp: &Checkpoint) -> sqlx::Result<()> {
    save_checkpoint_on(&mut *pool.acquire().await?, bucket, prefix, cp).await
}

/// Saves the checkpoint on `conn` (inside a caller's transaction).
pub async fn save_checkpoint_on(
    conn: &mut PgConnection,
    bucket: &str,
    prefix: &str,
    cp: &Checkpoint,
) -> sqlx::Result<()> {
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
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
    let saved: Option<ListingState> = sqlx::query_as(
        "SELECT true AS started, finished, coalesce(feeder_alive_until > now(), false) AS feeder_running
         FROM avatar_migration_checkpoint
         WHERE source_bucket = $1 AND source_prefix = $2",
    )
    .bind(bucket)
    .bind(prefix)
    .fetch_optional(pool)
    .await?;
    Ok(saved.unwrap_or_default())
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
