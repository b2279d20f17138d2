//! Receive stage: long-polls the queue and hands each message to a worker task, never more
//! in flight than `CONCURRENCY`.
//!
//! Promises: the permits for a receive are taken *before* the receive, so a process never
//! holds messages it has no room to work on (they would sit invisible); on shutdown (or idle
//! exit) receiving stops first, then in-flight objects get `SHUTDOWN_GRACE_SECONDS` to finish.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use common::aws::describe;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::process::Worker;
use crate::settings::Settings;

/// SQS returns at most ten messages per receive.
const MAX_PER_RECEIVE: usize = 10;

/// Receives until `shutdown` fires or the queue stays idle; returns whether every in-flight
/// object finished within the grace period.
pub async fn run(settings: &Settings, worker: Arc<Worker>, shutdown: CancellationToken) -> bool {
    let concurrency = settings.concurrency.get();
    let per_receive = MAX_PER_RECEIVE.min(concurrency);
    let permits = Arc::new(Semaphore::new(concurrency));
    let tracker = TaskTracker::new();
    // Receiving stops on shutdown, or when this process decides the queue is drained. A drain
    // lets receives already waiting finish (and works on what they bring): cutting a long poll
    // short can leave its messages invisible until their visibility timeout. SIGTERM does cut
    // them short, to stop promptly; those messages come back later, nothing is lost.
    let stop = shutdown.child_token();
    let epoch = Instant::now();
    let last_message_ms = Arc::new(AtomicU64::new(0));

    // Enough receivers to keep every permit busy when each receive brings ten messages.
    let receivers = concurrency.div_ceil(MAX_PER_RECEIVE);
    let loops = TaskTracker::new();
    for _ in 0..receivers {
        let (worker, permits, tracker, stop) = (worker.clone(), permits.clone(), tracker.clone(), stop.clone());
        let shutdown = shutdown.clone();
        let last_message_ms = last_message_ms.clone();
        let settings = settings.clone();
        loops.spawn(async move {
            while !stop.is_cancelled() {
                let mut held = tokio::select! {
                    p = permits.clone().acquire_many_owned(per_receive as u32) => p.expect("semaphore never closed"),
                    _ = stop.cancelled() => break,
                };
                let received = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    r = worker.sqs.receive_message()
                        .queue_url(&worker.queue_url)
                        .max_number_of_messages(per_receive as i32)
                        .wait_time_seconds(settings.wait_time() as i32)
                        .visibility_timeout(settings.visibility_timeout as i32)
                        .send() => r,
                };
                let messages = match received {
                    Ok(out) => out.messages.unwrap_or_default(),
                    Err(err) => {
                        // The queue is unreachable or throttling: wait a little and try again;
                        // nothing is lost, messages stay in the queue.
                        tracing::warn!(error = describe(&err), "receive failed; retrying in 1 s");
                        drop(held);
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = stop.cancelled() => break,
                        }
                        continue;
                    }
                };
                if messages.is_empty() {
                    drop(held);
                    if let Some(idle) = settings.exit_when_idle {
                        let quiet_ms =
                            (epoch.elapsed().as_millis() as u64).saturating_sub(last_message_ms.load(Relaxed));
                        let in_flight = !tracker.is_empty();
                        if !in_flight && quiet_ms >= idle * 1000 {
                            tracing::info!(idle_secs = idle, "queue idle: draining and exiting");
                            stop.cancel();
                        }
                    }
                    continue;
                }
                last_message_ms.store(epoch.elapsed().as_millis() as u64, Relaxed);
                for message in messages {
                    let Some(permit) = held.split(1) else {
                        // More messages than asked for: leave the extra ones to come back.
                        tracing::warn!("the queue returned more messages than asked for; the rest come back later");
                        break;
                    };
                    let worker = worker.clone();
                    tracker.spawn(async move {
                        worker.handle(message).await;
                        drop(permit);
                    });
                }
            }
        });
    }
    loops.close();
    loops.wait().await;
    tracker.close();
    let grace = Duration::from_secs(settings.shutdown_grace_seconds);
    tokio::time::timeout(grace, tracker.wait()).await.is_ok()
}
