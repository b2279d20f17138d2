//! Start-up shared by both binaries: build the clients and check every service before any work,
//! so that a problem is one line and exit code 2 with nothing half-done.
//!
//! Promises:
//! - a service that refuses for good (a wrong password, a missing database, bucket, queue or
//!   table, a refused grant) ends start-up at once, exit code 2, naming it;
//! - a service that is not there *yet* (connection refused or reset, no answer, a 5xx or a
//!   throttle, PostgreSQL starting up or shutting down) is asked again, with a warning each
//!   time, until the start-up wait is over (`STARTUP_WAIT`): a consumer that ECS starts while
//!   the database fails over or restarts waits for it instead of exiting.

use std::time::Duration;

use tokio::time::Instant;

use anyhow::Context;
use sqlx::PgPool;

use crate::aws::{S3, Sqs};
use crate::exit::{Failure, SetupResult};
use crate::settings::{DatabaseArgs, QueueArgs, StorageArgs};

/// The services the feeder and the consumers talk to.
pub struct Clients {
    pub s3: S3,
    /// What `s3` was built from (the consumer's direct copy signs and sends with it).
    pub s3_config: aws_config::SdkConfig,
    pub sqs: Sqs,
    pub db: PgPool,
    /// The references (`REFERENCES`), resolved in the catalog.
    pub targets: crate::db::Targets,
}

/// Validates the settings, connects, checks both buckets and the queue, then prepares the
/// database (bookkeeping tables; every reference looked up and checked, with its index, before
/// any row may be rewritten). Every problem is a setup failure; a service that
/// is not available yet is waited for, up to `wait` in all (see the module documentation).
pub async fn connect(
    storage: &StorageArgs,
    queue: &QueueArgs,
    database: &DatabaseArgs,
    max_connections: u32,
    wait: Duration,
) -> Result<Clients, Failure> {
    let mapping = storage.mapping().setup()?;
    let schema = database.schema().setup()?;
    schema.references.check(&mapping).map_err(anyhow::Error::msg).setup()?;
    let db_options = database.connect_options().setup()?;
    let config = crate::aws::sdk_config().await.setup()?;
    let s3 = crate::aws::s3_client(&config, storage.s3_force_path_style, storage.s3_request_timeout);
    let sqs = crate::aws::sqs_client(&config);
    let waiting = StartupWait::new(wait);
    let db = waiting.until_available(|| crate::db::connect(db_options.clone(), max_connections)).await.setup()?;
    waiting
        .until_available(|| crate::aws::check_bucket(&s3, "SOURCE_BUCKET_NAME", &storage.source_bucket_name))
        .await
        .setup()?;
    waiting
        .until_available(|| crate::aws::check_bucket(&s3, "DESTINATION_BUCKET_NAME", &storage.destination_bucket_name))
        .await
        .setup()?;
    waiting.until_available(|| crate::aws::check_queue(&sqs, &queue.queue_url)).await.setup()?;
    let targets = waiting
        .until_available(|| async { crate::db::prepare(&db, &schema).await.context("preparing the database") })
        .await
        .setup()?;
    Ok(Clients { s3, s3_config: config, sqs, db, targets })
}

/// The start-up wait: one deadline for every service, so the longest start-up is `wait` (plus
/// the last attempt's own time), whichever services come up late.
pub struct StartupWait {
    wait: Duration,
    deadline: Instant,
}

impl StartupWait {
    pub fn new(wait: Duration) -> Self {
        Self { wait, deadline: Instant::now() + wait }
    }

    /// Runs `attempt` until it succeeds, fails for good, or fails as unavailable past the
    /// deadline; waits between attempts grow from 0.5 s to 5 s.
    pub async fn until_available<T, F, Fut>(&self, mut attempt: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let mut pause = Duration::from_millis(500);
        loop {
            match attempt().await {
                Ok(value) => return Ok(value),
                Err(err) if !is_unavailable(&err) => return Err(err),
                Err(err) => {
                    let left = self.deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(if self.wait.is_zero() {
                            err
                        } else {
                            err.context(format!(
                                "still unavailable after the start-up wait ({}; STARTUP_WAIT)",
                                humantime::format_duration(self.wait)
                            ))
                        });
                    }
                    tracing::warn!(
                        error = format!("{err:#}"),
                        left_secs = left.as_secs(),
                        "not available yet: trying again (STARTUP_WAIT)"
                    );
                    tokio::time::sleep(pause.min(left)).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Whether an error means a service is not available *now* (worth asking again), rather than
/// refusing for good: a database error of that kind anywhere in its chain, or an AWS answer
/// marked [`crate::aws::Unavailable`].
pub fn is_unavailable(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.is::<crate::aws::Unavailable>()
            || cause.downcast_ref::<sqlx::Error>().is_some_and(crate::db::is_unavailable)
    })
}

/// The async runtime of a binary: a single-threaded one for `worker_threads == 1` (no
/// wake-ups across threads: the least CPU per request), a multi-threaded one with that many
/// workers otherwise.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(worker_threads);
        builder
    };
    builder.enable_all().build()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn refused() -> anyhow::Error {
        anyhow::Error::new(sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into())).context("connecting")
    }

    #[test]
    fn what_is_worth_asking_again() {
        assert!(is_unavailable(&refused()));
        assert!(is_unavailable(&anyhow::Error::new(sqlx::Error::PoolTimedOut)));
        assert!(is_unavailable(&anyhow::Error::new(crate::aws::Unavailable("503 SlowDown".into())).context("x")));
        assert!(!is_unavailable(&anyhow::anyhow!("table avatars does not exist")));
        assert!(!is_unavailable(&anyhow::Error::new(sqlx::Error::RowNotFound)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unavailable_service_is_asked_again_until_it_answers() {
        let tries = AtomicU32::new(0);
        let got = StartupWait::new(Duration::from_secs(60))
            .until_available(|| async { if tries.fetch_add(1, Ordering::SeqCst) < 3 { Err(refused()) } else { Ok(7) } })
            .await;
        assert_eq!(got.unwrap(), 7);
        assert_eq!(tries.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_for_good_is_not_asked_again() {
        let tries = AtomicU32::new(0);
        let got: anyhow::Result<()> = StartupWait::new(Duration::from_secs(60))
            .until_available(|| async {
                tries.fetch_add(1, Ordering::SeqCst);
                Err(anyhow::anyhow!("password authentication failed"))
            })
            .await;
        assert!(got.is_err());
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_ends_with_the_last_error_named() {
        let tries = AtomicU32::new(0);
        let begun = Instant::now();
        let got: anyhow::Result<()> = StartupWait::new(Duration::from_secs(10))
            .until_available(|| async {
                tries.fetch_add(1, Ordering::SeqCst);
                Err(refused())
            })
            .await;
        let err = format!("{:#}", got.unwrap_err());
        assert!(err.contains("STARTUP_WAIT") && err.contains("connecting"), "{err}");
        assert!(tries.load(Ordering::SeqCst) > 2);
        assert!(begun.elapsed() <= Duration::from_secs(11));
        // No wait at all: one attempt, its own error.
        let got: anyhow::Result<()> =
            StartupWait::new(Duration::ZERO).until_available(|| async { Err(refused()) }).await;
        assert!(!format!("{:#}", got.unwrap_err()).contains("STARTUP_WAIT"));
    }
}
