//! The consumer: receives object messages, copies each object server-side, rewrites the rows
//! that point at it and deletes exactly the messages whose objects are done.
//!
//! Stages, one module each: [`receive`] -> [`process`] ([`copy`] -> [`record`]) -> [`ack`].

pub mod ack;
pub mod batch;
pub mod copy;
pub mod process;
pub mod receive;
pub mod record;
pub mod settings;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use common::aws::{S3, Sqs};
use common::exit::{Failure, SetupResult};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use process::Stats;
pub use settings::Settings;

/// The services a consumer talks to.
pub struct Clients {
    pub s3: S3,
    pub sqs: Sqs,
    pub db: PgPool,
}

/// Connects to everything and checks it before any message is touched; every problem here is
/// a setup failure (exit code 2).
pub async fn connect(settings: &Settings) -> Result<Clients, Failure> {
    settings.storage.mapping().setup()?;
    let db_options = settings.database.connect_options().setup()?;
    let config = common::aws::sdk_config().await.setup()?;
    let s3 = common::aws::s3_client(&config, settings.storage.s3_force_path_style);
    let sqs = common::aws::sqs_client(&config);
    let db = common::db::connect(db_options, settings.database_max_connections).await.setup()?;
    common::aws::check_bucket(&s3, "SOURCE_BUCKET_NAME", &settings.storage.source_bucket_name).await.setup()?;
    common::aws::check_bucket(&s3, "DESTINATION_BUCKET_NAME", &settings.storage.destination_bucket_name)
        .await
        .setup()?;
    common::aws::check_queue(&sqs, &settings.queue.queue_url).await.setup()?;
    // Never rewrite a row before the index on `path` is valid: prepare (idempotent, serialized
    // with any other consumer or feeder doing the same) returns only once it is.
    common::db::prepare(&db).await.context("preparing the database").setup()?;
    Ok(Clients { s3, sqs, db })
}

/// Runs until `shutdown` fires (or the queue stays idle, with `--exit-when-idle`), then lets
/// in-flight objects finish and returns what was done.
pub async fn run(settings: Settings, clients: Clients, shutdown: CancellationToken) -> Result<Arc<Stats>, Failure> {
    let started = Instant::now();
    let mapping = settings.storage.mapping().setup()?;
    let stats = Arc::new(Stats::default());
    let (rewriter, rewriter_task) = record::Rewriter::spawn(
        clients.db.clone(),
        settings.db_batch_size.get(),
        settings.db_batch_max_wait(),
        settings.database_max_connections.max(2) as usize - 1,
    );
    let (acker, acker_task) = ack::Acker::spawn(clients.sqs.clone(), settings.queue.queue_url.clone());
    let worker = Arc::new(process::Worker {
        s3: clients.s3.clone(),
        sqs: clients.sqs.clone(),
        db: clients.db.clone(),
        queue_url: settings.queue.queue_url.clone(),
        mapping,
        rewriter,
        acker,
        visibility: settings.visibility_timeout(),
        stats: stats.clone(),
    });
    let drained = receive::run(&settings, worker.clone(), shutdown).await;
    drop(worker); // the last handles on the batchers: they flush and stop
    let _ = rewriter_task.await;
    let _ = acker_task.await;
    if !drained {
        tracing::warn!("shutdown grace period over with objects still in flight: their messages come back later");
    }
    stats.print_summary(started.elapsed());
    Ok(stats)
}
