//! The fleet's control row and the consumers' reports: what the operator sets while a run goes
//! on (`feeder pause`, `resume`, `throttle`) and what each consumer says of itself, both in
//! the migration's database, the one place every process already reads.
//!
//! Promises:
//! - one control row (`avatar_migration_control`), created by `db::prepare`, changed only by
//!   the operator's commands; every consumer reads it every [`EVERY`], so a change is honoured
//!   within seconds;
//! - each consumer writes one report row (`avatar_migration_consumers`) at the same cadence
//!   and removes it when it exits; a consumer that stopped reporting for [`LIVE`] is not
//!   counted (a crash leaves its row behind, read as gone);
//! - the fleet's cap (`MAX_COPIES_PER_SECOND`) is shared between the consumers reporting work
//!   in flight: each paces itself at the cap over their number (an idle consumer holds no
//!   share, so the others get it).

use std::time::Duration;

use sqlx::PgPool;

/// How often a consumer reads the control row and reports.
pub const EVERY: Duration = Duration::from_secs(2);
/// A consumer that has not reported for this long is not counted.
pub const LIVE: Duration = Duration::from_secs(10);

/// The tables, created by `db::prepare`.
pub const TABLES: &str = "
    CREATE TABLE IF NOT EXISTS avatar_migration_control (
        id                    boolean PRIMARY KEY DEFAULT true CHECK (id),
        paused                boolean NOT NULL DEFAULT false,
        max_copies_per_second double precision CHECK (max_copies_per_second > 0),
        updated_at            timestamptz NOT NULL DEFAULT now()
    );
    INSERT INTO avatar_migration_control (id) VALUES (true) ON CONFLICT DO NOTHING;
    CREATE TABLE IF NOT EXISTS avatar_migration_consumers (
        consumer    text PRIMARY KEY,
        reported_at timestamptz NOT NULL DEFAULT now(),
        paused      boolean NOT NULL,
        copy_rate   double precision,
        copies      bigint NOT NULL,
        slowed_down bigint NOT NULL,
        in_flight   bigint NOT NULL DEFAULT 0
    );
    ALTER TABLE avatar_migration_consumers ADD COLUMN IF NOT EXISTS held text;";

/// What the operator set.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Control {
    pub paused: bool,
    /// Copies per second for the whole fleet; `None`: no cap.
    pub max_copies_per_second: Option<f64>,
}

pub async fn read(pool: &PgPool) -> sqlx::Result<Control> {
    let row: Option<(bool, Option<f64>)> =
        sqlx::query_as("SELECT paused, max_copies_per_second FROM avatar_migration_control WHERE id")
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(paused, max_copies_per_second)| Control { paused, max_copies_per_second }).unwrap_or_default())
}

pub async fn set_paused(pool: &PgPool, paused: bool) -> sqlx::Result<()> {
    sqlx::query("UPDATE avatar_migration_control SET paused = $1, updated_at = now() WHERE id")
        .bind(paused)
        .execute(pool)
        .await?;
    Ok(())
}

/// Sets (or with `None` clears) the fleet's cap.
pub async fn set_cap(pool: &PgPool, per_second: Option<f64>) -> sqlx::Result<()> {
    sqlx::query("UPDATE avatar_migration_control SET max_copies_per_second = $1, updated_at = now() WHERE id")
        .bind(per_second)
        .execute(pool)
        .await?;
    Ok(())
}

/// What a consumer says of itself.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Report {
    pub consumer: String,
    pub paused: bool,
    /// Copies per second its pace allows; `None` while not paced.
    pub copy_rate: Option<f64>,
    /// Copies made so far.
    pub copies: i64,
    /// Copies S3 asked to slow down so far.
    pub slowed_down: i64,
    /// Messages being worked on now.
    pub in_flight: i64,
    /// Why the database's health holds it (`crate::health`); `None`: not held.
    pub held: Option<String>,
}

/// Writes this consumer's report; returns how many consumers share the cap: those that
/// reported work in flight within [`LIVE`], this one counted whatever it reports.
pub async fn report(pool: &PgPool, r: &Report) -> sqlx::Result<u32> {
    let live: i64 = sqlx::query_scalar(
        "WITH mine AS (
             INSERT INTO avatar_migration_consumers (consumer, paused, copy_rate, copies, slowed_down, in_flight, held)
             VALUES ($1, $2, $3, $4, $5, $7, $8)
             ON CONFLICT (consumer) DO UPDATE SET reported_at = now(), paused = EXCLUDED.paused,
                 copy_rate = EXCLUDED.copy_rate, copies = EXCLUDED.copies, slowed_down = EXCLUDED.slowed_down,
                 in_flight = EXCLUDED.in_flight, held = EXCLUDED.held
         )
         SELECT count(*) + 1 FROM avatar_migration_consumers
         WHERE consumer <> $1 AND in_flight > 0 AND reported_at > now() - make_interval(secs => $6)",
    )
    .bind(&r.consumer)
    .bind(r.paused)
    .bind(r.copy_rate)
    .bind(r.copies)
    .bind(r.slowed_down)
    .bind(LIVE.as_secs_f64())
    .bind(r.in_flight)
    .bind(&r.held)
    .fetch_one(pool)
    .await?;
    Ok(live.max(1) as u32)
}

/// Removes this consumer's report (it is exiting).
pub async fn forget(pool: &PgPool, consumer: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM avatar_migration_consumers WHERE consumer = $1").bind(consumer).execute(pool).await?;
    Ok(())
}

/// The consumers that reported within [`LIVE`].
pub async fn fleet(pool: &PgPool) -> sqlx::Result<Vec<Report>> {
    sqlx::query_as(
        "SELECT consumer, paused, copy_rate, copies, slowed_down, in_flight, held FROM avatar_migration_consumers
         WHERE reported_at > now() - make_interval(secs => $1) ORDER BY consumer",
    )
    .bind(LIVE.as_secs_f64())
    .fetch_all(pool)
    .await
}
