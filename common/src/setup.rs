//! Start-up shared by both binaries: build the clients and check every service before any work,
//! so that a problem is one line and exit code 2 with nothing half-done.

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
}

/// Validates the settings, connects, checks both buckets and the queue, then prepares the
/// database (bookkeeping tables; a valid index on `avatars(path)`, built concurrently when
/// missing, before any row may be rewritten). Every problem is a setup failure.
pub async fn connect(
    storage: &StorageArgs,
    queue: &QueueArgs,
    database: &DatabaseArgs,
    max_connections: u32,
) -> Result<Clients, Failure> {
    storage.mapping().setup()?;
    let db_options = database.connect_options().setup()?;
    let config = crate::aws::sdk_config().await.setup()?;
    let s3 = crate::aws::s3_client(&config, storage.s3_force_path_style);
    let sqs = crate::aws::sqs_client(&config);
    let db = crate::db::connect(db_options, max_connections).await.setup()?;
    crate::aws::check_bucket(&s3, "SOURCE_BUCKET_NAME", &storage.source_bucket_name).await.setup()?;
    crate::aws::check_bucket(&s3, "DESTINATION_BUCKET_NAME", &storage.destination_bucket_name).await.setup()?;
    crate::aws::check_queue(&sqs, &queue.queue_url).await.setup()?;
    crate::db::prepare(&db).await.context("preparing the database").setup()?;
    Ok(Clients { s3, s3_config: config, sqs, db })
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
