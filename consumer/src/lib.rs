//! The consumer: receives object messages, copies each object server-side, rewrites the rows
//! that point at it and deletes exactly the messages whose objects are done.
//!
//! Stages, one module each: [`receive`] -> [`process`] ([`copy`] -> [`record`]) -> [`ack`].

mod ack;
mod batch;
mod control;
pub mod copy;
pub mod emf;
mod lease;
pub mod metrics;
mod pace;
mod process;
mod receive;
mod record;
pub mod refusals;
pub mod settings;
mod slot;
mod sources;

use std::sync::Arc;
use std::time::Instant;

use common::exit::{Failure, SetupResult};
use tokio_util::sync::CancellationToken;

pub use common::setup::Clients;
pub use metrics::Stats;
pub use receive::FINISHING_PER_PERMIT;
pub use settings::Settings;

/// Connects to everything and checks it (see `common::setup::connect`); every problem here is a
/// setup failure (exit code 2).
pub async fn connect(settings: &Settings) -> Result<Clients, Failure> {
    common::setup::connect(
        &settings.storage,
        &settings.queue,
        &settings.database,
        settings.database_max_connections,
        settings.startup_wait,
    )
    .await
}

/// Runs until `shutdown` fires (or the queue is empty, with `--exit-when-idle`), then lets
/// in-flight objects finish within the grace period and returns what was done. An error that
/// stops every object (a bucket or the queue gone, credentials or a grant refused) ends the
/// run with that error, after the same grace period.
pub async fn run(settings: Settings, clients: Clients, shutdown: CancellationToken) -> Result<Arc<Stats>, Failure> {
    let started = Instant::now();
    let mapping = settings.storage.mapping().setup()?;
    let stats = Arc::new(Stats::default());
    // The endpoint outlives the work by nothing: it stops with the run.
    let endpoint = CancellationToken::new();
    let _stop_endpoint = endpoint.clone().drop_guard();
    if let Some(addr) = settings.metrics_addr {
        let health = metrics::Health {
            s3: clients.s3.clone(),
            sqs: clients.sqs.clone(),
            db: clients.db.clone(),
            bucket: mapping.destination_bucket.clone(),
            queue_url: settings.queue.queue_url.clone(),
        };
        metrics::serve(addr, stats.clone(), health, endpoint.clone()).await.setup()?;
    }
    let rewrites = record::Rewrites {
        targets: clients.targets.clone(),
        mapping: mapping.clone(),
        journal: settings.rewrite_journal,
    };
    let (rewriter, rewriter_task) = record::Rewriter::spawn(
        clients.db.clone(),
        rewrites,
        settings.db_batch_size.get(),
        settings.db_batch_max_wait(),
        settings.db_batch_target,
        settings.database_max_connections.max(2) as usize - 1,
        stats.clone(),
    );
    let (acker, acker_task) = ack::Acker::spawn(clients.sqs.clone(), settings.queue.queue_url.clone(), stats.clone());
    // SIGTERM, or an error that stops everything.
    let stop = shutdown.child_token();
    let halt = Arc::new(process::Halt::new(stop.clone()));
    let source = (mapping.source_bucket.clone(), mapping.source_prefix.as_str().to_owned());
    let copier = copier(&settings, &clients, mapping, &stats).await?;
    let concurrency = settings
        .concurrency
        .map_or_else(|| copy::default_concurrency(copier.destination_check), std::num::NonZeroUsize::get);
    tracing::info!(concurrency, "objects worked on at once");
    let (sources, sources_task) = source_deleter(&settings, &clients, &copier.mapping.source_bucket, &stats).await?;
    let refusal_records = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stages = process::Stages { rewriter, acker, sources, stats: stats.clone() };
    let max_receive_count = max_receive_count(&settings, &clients).await;
    let worker = process::Worker::new(
        &clients,
        settings.worker_config(),
        copier,
        stages,
        halt.clone(),
        max_receive_count,
        refusal_records.clone(),
    );
    let worker = Arc::new(worker);
    // The operator's pause and cap, read before the first receive.
    let health = common::health::Health::connect(&settings.health).await.setup()?;
    let (controller, paused) =
        control::Controller::start(clients.db.clone(), stats.clone(), worker.pace(), refusal_records, health).await;
    let controlling = tokio::spawn(controller.run(endpoint.clone()));
    let emitting = settings
        .cloudwatch_namespace
        .clone()
        .map(|ns| tokio::spawn(common::emf::run(ns, &emf::METRICS, stats.clone(), endpoint.clone())));
    let idle = receive::IdleCheck { sqs: clients.sqs.clone(), db: clients.db.clone(), source };
    let ended = receive::run(&settings.receive_config(concurrency), worker, idle, stop, paused).await;
    let left = wind_down(ended, [Some(rewriter_task), Some(acker_task), sources_task]).await;
    endpoint.cancel();
    let _ = controlling.await;
    if let Some(emitting) = emitting {
        let _ = emitting.await; // its last line, with what the wind-down finished
    }
    stats.print_summary(started.elapsed(), settings.dry_run);
    match (halt.take(), left) {
        (Some(err), _) => Err(Failure::Run(err)),
        (None, Some(left)) => Err(Failure::Unfinished(anyhow::anyhow!(left))),
        (None, None) => Ok(stats),
    }
}

/// `DELETE_SOURCE`'s deleter and its task (none on a dry run).
async fn source_deleter(
    settings: &Settings,
    clients: &Clients,
    source_bucket: &str,
    stats: &Arc<Stats>,
) -> Result<(Option<sources::SourceDeleter>, Option<tokio::task::JoinHandle<()>>), Failure> {
    if !settings.delete_source || settings.dry_run {
        return Ok((None, None));
    }
    let deleter = common::deletion::Deleter {
        db: clients.db.clone(),
        s3: clients.s3.clone(),
        bucket: source_bucket.to_owned(),
        targets: clients.targets.clone(),
        wait: settings.delete_wait,
    };
    let (sources, task) =
        sources::SourceDeleter::start(deleter, settings.legacy_writes_stopped, stats.clone()).await.setup()?;
    Ok((Some(sources), Some(task)))
}

/// The copier, its destination check resolved and its direct path tried at start-up (neither
/// on a dry run, which writes nothing, not even the probes' objects).
async fn copier(
    settings: &Settings,
    clients: &Clients,
    mapping: common::keys::KeyMapping,
    stats: &Stats,
) -> Result<copy::Copier, Failure> {
    let request_timeout = settings.storage.s3_request_timeout;
    let force_path_style = settings.storage.s3_force_path_style;
    let mut copier = copy::Copier {
        s3: clients.s3.clone(),
        mapping,
        compare_max_bytes: settings.compare_max_bytes,
        destination_check: settings.destination_check,
        multipart: settings.multipart(),
        direct: None,
        paced_s3: common::aws::s3_paced_client(&clients.s3_config, force_path_style, request_timeout),
        request_timeout,
        pace: Arc::new(pace::Pace::new(stats.copy_rate.clone(), stats.copies_slowed_down.clone())),
    };
    if settings.dry_run {
        return Ok(copier); // it looks at every destination
    }
    copier.destination_check = copier.resolve_destination_check().await.setup()?;
    if settings.direct_copy {
        let counters = copy::direct::DirectCounters {
            answered: stats.direct_copies.clone(),
            handed_over: stats.direct_handed_over.clone(),
            off: stats.direct_copy_off.clone(),
        };
        let bucket = &copier.mapping.destination_bucket;
        match copy::direct::DirectCopy::new(&clients.s3_config, bucket, force_path_style, request_timeout, counters) {
            Ok(direct) => copier.direct = Some(direct),
            Err(why) => tracing::warn!("DIRECT_COPY: every copy goes through the SDK: {why:#}"),
        }
        copier.check_direct_copy().await;
    }
    Ok(copier)
}

/// The queue's `maxReceiveCount` (`None` without a dead-letter queue, or when it cannot be
/// read: dead-lettered keys then get no reason).
async fn max_receive_count(settings: &Settings, clients: &Clients) -> Option<u32> {
    match common::aws::redrive_policy(&clients.sqs, &settings.queue.queue_url).await {
        Ok(policy) => policy.map(|(_, max)| max),
        Err(err) => {
            tracing::warn!(
                error = format!("{err:#}"),
                "cannot read the queue's redrive policy: dead-lettered keys get no reason"
            );
            None
        }
    }
}

/// Once receiving ended: the stages (rewrites, acknowledgements, source deletes) flush and stop
/// when every object was finished, or are stopped when the grace period ran out. What the
/// listing still lacks, on an idle exit with the listing unfinished.
async fn wind_down(ended: receive::Ended, stages: [Option<tokio::task::JoinHandle<()>>; 3]) -> Option<String> {
    match ended {
        receive::Ended::Finished | receive::Ended::ListingUnfinished(_) => {
            // Every worker is done and dropped its handles on the batchers: they flush and stop.
            for task in stages.into_iter().flatten() {
                let _ = task.await;
            }
            match ended {
                receive::Ended::ListingUnfinished(what) => Some(what),
                _ => None,
            }
        }
        receive::Ended::Abandoned(unfinished) => {
            // A flush may be stuck (a statement, a slow call): the grace period is over. The
            // sources not deleted stay for `feeder cleanup`.
            for task in stages.into_iter().flatten() {
                task.abort();
            }
            tracing::warn!(
                unfinished,
                "shutdown grace period over with objects still in flight: their messages come back later"
            );
            None
        }
    }
}
