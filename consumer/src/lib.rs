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

use common::exit::{Failure, SetupResult};
use tokio_util::sync::CancellationToken;

pub use common::setup::Clients;
pub use process::Stats;
pub use settings::Settings;

/// Connects to everything and checks it (see `common::setup::connect`); every problem here is a
/// setup failure (exit code 2).
pub async fn connect(settings: &Settings) -> Result<Clients, Failure> {
    common::setup::connect(&settings.storage, &settings.queue, &settings.database, settings.database_max_connections)
        .await
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
