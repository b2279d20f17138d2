//! The database's health, as the migration's brake reads it: replication lag (from each
//! replica the operator lists, by the consumers' own reports replayed there, and in bytes from
//! the primary), and optional limits on active backends, WAL written per second and a custom
//! probe. One reading per process at the control cadence (`crate::control::EVERY`), never one
//! per object; the consumer's controller holds the fleet while any limit is passed, through
//! the same switch as the operator's pause.
//!
//! Promises:
//! - a limit left unset is not read; with none set (and no replica listed) nothing is read;
//! - a replica is read by the consumers' reports (`avatar_migration_consumers.reported_at`,
//!   written on the primary every `EVERY` by each consumer, whatever else it does): the lag
//!   is how old the newest report is on the replica, less that cadence, so it keeps counting
//!   while the migration is held and writes nothing else, and falls when the replica replays
//!   again; it is read to within the cadence (2 s);
//! - a reading that fails (a replica unreachable, a probe that errs) holds the fleet too,
//!   naming what failed: a brake that cannot see is on;
//! - replica connection strings are secrets: only their host and port are ever printed.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;

/// The limits, as settings.
#[derive(Args, Debug, Clone, Default)]
pub struct HealthArgs {
    /// Replicas whose lag holds the migration: PostgreSQL connection strings, comma-separated
    /// (secrets: only host and port are printed). Each is asked how old the newest consumer
    /// report it has replayed is.
    #[arg(long, env = "REPLICA_URLS", hide_env_values = true, value_parser = crate::settings::parse_secret)]
    pub replica_urls: Option<SecretString>,

    /// Hold the fleet (take no messages; objects in flight finish) while a listed replica
    /// lags more than this, e.g. `30s`; it goes on by itself when the lag falls below.
    #[arg(long, env = "MAX_REPLICA_LAG", default_value = "30s", value_parser = humantime::parse_duration)]
    pub max_replica_lag: Duration,

    /// Hold the fleet while a replica connected to the primary has not replayed this many
    /// bytes of WAL (`pg_stat_replication`, read on the primary; needs pg_read_all_stats).
    /// Unset: not read.
    #[arg(long, env = "MAX_REPLICA_LAG_BYTES")]
    pub max_replica_lag_bytes: Option<u64>,

    /// Hold the fleet while more than this many client backends are active on the primary
    /// (`pg_stat_activity`, state `active`). Unset: not read.
    #[arg(long, env = "MAX_ACTIVE_BACKENDS")]
    pub max_active_backends: Option<u64>,

    /// Hold the fleet while the primary writes more than this many bytes of WAL a second
    /// (over the last reading's interval). Unset: not read.
    #[arg(long, env = "MAX_WAL_RATE")]
    pub max_wal_rate: Option<u64>,

    /// A query of your own returning one number (e.g. a lag your service measures), run on the
    /// primary at each reading; the fleet is held while it is above DB_HEALTH_PROBE_MAX.
    #[arg(long, env = "DB_HEALTH_PROBE", requires = "db_health_probe_max")]
    pub db_health_probe: Option<String>,

    /// The limit of DB_HEALTH_PROBE.
    #[arg(long, env = "DB_HEALTH_PROBE_MAX", requires = "db_health_probe")]
    pub db_health_probe_max: Option<f64>,
}

/// A listed replica: its pool and its printable name (host and port).
struct Replica {
    name: String,
    pool: PgPool,
}

/// The brake's eyes on the database.
pub struct Health {
    args: HealthArgs,
    replicas: Vec<Replica>,
    /// The last WAL position read and when, for the WAL rate.
    last_wal: Option<(i64, Instant)>,
}

impl Health {
    /// Connects to the listed replicas (one connection each); a malformed string or one that
    /// cannot connect is an error here, at start-up, not a brake on for good later.
    pub async fn connect(args: &HealthArgs) -> anyhow::Result<Health> {
        let mut replicas = Vec::new();
        let urls = args.replica_urls.as_ref().map(|u| u.expose_secret().to_owned()).unwrap_or_default();
        for (i, url) in urls.split(',').map(str::trim).filter(|u| !u.is_empty()).enumerate() {
            let options = PgConnectOptions::from_str(url)
                .map_err(|_| anyhow::anyhow!("REPLICA_URLS: entry {} is not a PostgreSQL connection string", i + 1))?;
            let name = format!("{}:{}", options.get_host(), options.get_port());
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options.options([("statement_timeout", "5000")]))
                .await
                .with_context(|| format!("cannot connect to the replica {name} (REPLICA_URLS entry {})", i + 1))?;
            replicas.push(Replica { name, pool });
        }
        Ok(Health { args: args.clone(), replicas, last_wal: None })
    }

    /// Whether anything is watched at all.
    pub fn watches(&self) -> bool {
        let a = &self.args;
        !self.replicas.is_empty()
            || a.max_replica_lag_bytes.is_some()
            || a.max_active_backends.is_some()
            || a.max_wal_rate.is_some()
            || a.db_health_probe.is_some()
    }

    /// Reads every indicator with a limit; `Some(why)` when the fleet must be held: the first
    /// limit passed, or the first reading that failed.
    pub async fn check(&mut self, primary: &PgPool) -> Option<String> {
        for replica in &self.replicas {
            match replica_lag(&replica.pool).await {
                Ok(Some(lag)) if lag > self.args.max_replica_lag => {
                    return Some(format!(
                        "replica {} lags {:.1}s (MAX_REPLICA_LAG {})",
                        replica.name,
                        lag.as_secs_f64(),
                        humantime::format_duration(self.args.max_replica_lag)
                    ));
                }
                Ok(_) => {}
                Err(err) => return Some(format!("cannot read the lag of replica {}: {err}", replica.name)),
            }
        }
        match self.primary(primary).await {
            Ok(held) => held,
            Err(err) => Some(format!("cannot read the primary's health: {err}")),
        }
    }

    /// For a command that writes rows outside the consumers (`feeder rollback`): waits while
    /// the database is unhealthy, reporting under `name` as a consumer does (the heartbeat the
    /// replicas are read by, and what `feeder status` shows), and says why once. Its report
    /// stays until [`Health::done`].
    pub async fn wait_healthy(&mut self, db: &PgPool, name: &str, stop: &CancellationToken) -> anyhow::Result<()> {
        if !self.watches() {
            return Ok(());
        }
        let mut told = false;
        loop {
            let held = self.check(db).await;
            let report = crate::control::Report {
                consumer: name.to_owned(),
                paused: false,
                copy_rate: None,
                copies: 0,
                slowed_down: 0,
                in_flight: 0,
                held: held.clone(),
            };
            crate::control::report(db, &report).await.context("reporting to avatar_migration_consumers")?;
            let Some(why) = held else {
                if told {
                    tracing::info!("the database is healthy again: {name} goes on");
                }
                return Ok(());
            };
            if !told {
                tracing::warn!(why, "the database is unhealthy: {name} waits until it recovers");
                told = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(crate::control::EVERY) => {}
                _ = stop.cancelled() => anyhow::bail!("stopped while waiting for the database to recover ({why})"),
            }
        }
    }

    /// Removes the report [`Health::wait_healthy`] wrote.
    pub async fn done(&self, db: &PgPool, name: &str) {
        if self.watches()
            && let Err(err) = crate::control::forget(db, name).await
        {
            tracing::warn!(error = %err, "cannot remove {name}'s report");
        }
    }

    async fn primary(&mut self, db: &PgPool) -> sqlx::Result<Option<String>> {
        let a = &self.args;
        if let Some(max) = a.max_replica_lag_bytes {
            let behind: Option<i64> = sqlx::query_scalar(
                "SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))::bigint FROM pg_stat_replication",
            )
            .fetch_one(db)
            .await?;
            if let Some(behind) = behind.filter(|&b| b as u64 > max) {
                return Ok(Some(format!("a replica is {behind} bytes of WAL behind (MAX_REPLICA_LAG_BYTES {max})")));
            }
        }
        if let Some(max) = a.max_active_backends {
            let active: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE state = 'active' AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            )
            .fetch_one(db)
            .await?;
            if active as u64 > max {
                return Ok(Some(format!("{active} active backends (MAX_ACTIVE_BACKENDS {max})")));
            }
        }
        if let Some(max) = a.max_wal_rate {
            let lsn: i64 =
                sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint").fetch_one(db).await?;
            let now = Instant::now();
            let rate = self
                .last_wal
                .replace((lsn, now))
                .map(|(before, at)| (lsn - before).max(0) as f64 / now.duration_since(at).as_secs_f64().max(0.001));
            if let Some(rate) = rate.filter(|&r| r > max as f64) {
                return Ok(Some(format!("the primary writes {rate:.0} bytes of WAL a second (MAX_WAL_RATE {max})")));
            }
        }
        if let (Some(probe), Some(max)) = (&a.db_health_probe, a.db_health_probe_max) {
            let value: f64 = sqlx::query_scalar(&format!("SELECT ({probe})::float8")).fetch_one(db).await?;
            if value > max {
                return Ok(Some(format!("DB_HEALTH_PROBE reads {value} (DB_HEALTH_PROBE_MAX {max})")));
            }
        }
        Ok(None)
    }
}

/// A replica's lag: how old the newest consumer report is there, less the report cadence
/// (on the primary the newest is at most that old while this consumer runs), so the lag is
/// read to within [`crate::control::EVERY`] (`None`: no report replayed yet).
async fn replica_lag(replica: &PgPool) -> sqlx::Result<Option<Duration>> {
    let secs: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM clock_timestamp() - max(reported_at))::float8 FROM avatar_migration_consumers",
    )
    .fetch_one(replica)
    .await?;
    let cadence = crate::control::EVERY.as_secs_f64();
    Ok(secs.map(|s| Duration::from_secs_f64((s - cadence).max(0.0))))
}
