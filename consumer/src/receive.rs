//! Receive stage: long-polls the queue and hands each message to a worker task, never more
//! in flight than `CONCURRENCY`.
//!
//! Promises:
//! - the permits for a receive are taken *before* the receive, so a process never holds
//!   messages it has no room to work on (they would sit invisible); a message whose copies
//!   are done gives its permit back for a finishing place while its rows are rewritten (at
//!   most `FINISHING_PER_PERMIT` x CONCURRENCY such messages: slow rewrites hold the next
//!   copies back);
//! - an idle exit (`EXIT_WHEN_IDLE`) happens only when the *queue* is empty: nothing visible,
//!   in flight (held by any consumer, dead or alive) or delayed, on every check over the idle
//!   window; an empty receive alone proves nothing (a crashed consumer's messages are
//!   invisible until their visibility timeout);
//! - nor while a feeder is sending for the listing (its lease in the database,
//!   `common::db::FeederLease`): a queue emptied faster than the feeder fills it, or a feeder
//!   restarting after a crash, is not the end of the work;
//! - an idle exit finishes every object received, however long that takes: nothing is
//!   abandoned when no one asked the process to stop;
//! - on shutdown (SIGTERM, a fatal error) receiving stops first, then in-flight objects get
//!   `SHUTDOWN_GRACE_SECONDS` to finish; what is still unfinished then is abandoned (its lease
//!   ends, its message comes back), so shutdown is bounded;
//! - a receive error that no retry can cure (the queue is gone, access denied, bad
//!   credentials) stops the process with that error; anything else is retried with backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::Message;
use common::aws::{AwsError, Call, ErrorClass, Sqs, queue_depth};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::slot::Slot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::process::Worker;

/// SQS returns at most ten messages per receive.
const MAX_PER_RECEIVE: usize = 10;

/// How the receive loop runs; built once from the settings.
#[derive(Debug, Clone)]
pub(crate) struct ReceiveConfig {
    pub(crate) queue_url: String,
    /// Objects in flight at most.
    pub(crate) concurrency: usize,
    /// Long-poll wait of each receive.
    pub(crate) wait: Duration,
    /// How long a received message stays invisible (extended while worked on).
    pub(crate) visibility: Duration,
    /// Drain and exit once the queue has been empty this long.
    pub(crate) exit_when_idle: Option<Duration>,
    /// How long in-flight objects get after receiving stopped.
    pub(crate) grace: Duration,
}

/// What the idle exit reads: the queue's counts and the listing's state (the source bucket
/// and prefix).
pub(crate) struct IdleCheck {
    pub(crate) sqs: Sqs,
    pub(crate) db: sqlx::PgPool,
    pub(crate) source: (String, String),
}

/// How receiving ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Every object received was finished.
    Finished,
    /// An idle exit: every object received was finished, the queue is empty and no feeder
    /// runs, but the listing is unfinished (what it lacks, for the operator).
    ListingUnfinished(String),
    /// The grace period ran out: this many objects were abandoned; their messages come back.
    Abandoned(usize),
}

/// When the last thing happened (a message received, an object finished), for the idle exit.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self { epoch: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.last_ms.store(self.epoch.elapsed().as_millis() as u64, Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        Duration::from_millis((self.epoch.elapsed().as_millis() as u64).saturating_sub(self.last_ms.load(Relaxed)))
    }
}

/// Receives until `stop` fires (SIGTERM, or a fatal error through the worker's `halt`) or the queue stays
/// empty (with an idle exit), then gives in-flight objects the grace period.
pub(crate) async fn run(
    config: &ReceiveConfig,
    worker: Arc<Worker>,
    idle: IdleCheck,
    stop: CancellationToken,
    paused: watch::Receiver<bool>,
) -> Ended {
    let permits = Arc::new(Semaphore::new(config.concurrency));
    let finishing = Arc::new(Semaphore::new(config.concurrency * FINISHING_PER_PERMIT));
    let tracker = TaskTracker::new();
    let activity = Arc::new(Activity::new());
    // A drain (idle exit) lets receives already waiting finish and works on what they bring:
    // cutting a long poll short can leave its messages invisible until their visibility
    // timeout. `stop` (SIGTERM, a fatal error) does cut them short; those messages come back.
    let drain = stop.child_token();
    // Cancelled when the grace period is over: unfinished objects are dropped at their next
    // await, which is safe at any line (I5).
    let abandon = CancellationToken::new();

    let loops = TaskTracker::new();
    // Enough receivers to keep every permit busy when each receive brings ten messages; the
    // last asks for the remainder, so that all `concurrency` permits can be in use at once
    // (with ten each, 128 would stop at 120: no receiver could take ten of the last eight).
    for first in (0..config.concurrency).step_by(MAX_PER_RECEIVE) {
        let receiver = Receiver {
            per_receive: MAX_PER_RECEIVE.min(config.concurrency - first),
            config: config.clone(),
            worker: worker.clone(),
            permits: permits.clone(),
            finishing: finishing.clone(),
            tracker: tracker.clone(),
            activity: activity.clone(),
            abandon: abandon.clone(),
            paused: paused.clone(),
        };
        let (stop, drain) = (stop.clone(), drain.clone());
        loops.spawn(async move { receiver.run(stop, drain).await });
    }
    let listing_unfinished = Arc::new(std::sync::Mutex::new(None));
    if let Some(idle_for) = config.exit_when_idle {
        let watcher = IdleWatcher {
            listing_unfinished: listing_unfinished.clone(),
            sqs: idle.sqs,
            queue_url: config.queue_url.clone(),
            db: idle.db,
            source: idle.source,
            idle: idle_for,
            activity: activity.clone(),
            tracker: tracker.clone(),
        };
        loops.spawn(async move { watcher.run(drain).await });
    }
    loops.close();
    loops.wait().await;
    tracker.close();
    if !stop.is_cancelled() {
        // An idle exit: nobody asked to stop, so every object received is finished. A signal
        // arriving meanwhile starts the grace period.
        tokio::select! {
            _ = tracker.wait() => {
                return match listing_unfinished.lock().expect("not poisoned").take() {
                    Some(left) => Ended::ListingUnfinished(left),
                    None => Ended::Finished,
                };
            }
            _ = stop.cancelled() => {}
        }
    }
    grace(&tracker, config.grace, &abandon).await
}

/// Gives the objects in flight `grace` to finish, then abandons the rest.
async fn grace(tracker: &TaskTracker, grace: Duration, abandon: &CancellationToken) -> Ended {
    if tokio::time::timeout(grace, tracker.wait()).await.is_ok() {
        return Ended::Finished;
    }
    let unfinished = tracker.len();
    abandon.cancel();
    tracker.wait().await;
    Ended::Abandoned(unfinished)
}

/// Messages that may be finishing (their rows being rewritten, their delete handed over) per
/// CONCURRENCY permit: a bound, so that slow rewrites hold the next copies back rather than
/// pile up.
pub const FINISHING_PER_PERMIT: usize = 4;

/// One long-polling loop.
struct Receiver {
    config: ReceiveConfig,
    /// Messages asked for per receive (the permits taken before it).
    per_receive: usize,
    worker: Arc<Worker>,
    permits: Arc<Semaphore>,
    /// Places for messages whose copies are done and whose rows and delete are finishing.
    finishing: Arc<Semaphore>,
    tracker: TaskTracker,
    activity: Arc<Activity>,
    abandon: CancellationToken,
    /// The operator's pause (`crate::control`): nothing is received while it holds.
    paused: watch::Receiver<bool>,
}

impl Receiver {
    async fn run(mut self, stop: CancellationToken, drain: CancellationToken) {
        let per_receive = self.per_receive;
        // Receive errors back off from 1 s to 20 s: long enough not to hammer a struggling
        // queue, short enough to resume promptly after a network blip.
        let mut backoff = Duration::from_secs(1);
        while !drain.is_cancelled() {
            if *self.paused.borrow() {
                tokio::select! {
                    _ = self.paused.wait_for(|paused| !paused) => {}
                    _ = drain.cancelled() => break,
                }
            }
            let held = tokio::select! {
                p = self.permits.clone().acquire_many_owned(per_receive as u32) => p.expect("semaphore never closed"),
                _ = drain.cancelled() => break,
            };
            let received = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                r = self.receive(per_receive) => r,
            };
            let messages = match received {
                Ok(messages) => {
                    backoff = Duration::from_secs(1);
                    messages
                }
                Err(err) => match err.for_queue() {
                    ErrorClass::Fatal => {
                        self.worker.halt(
                            anyhow::Error::new(err)
                                .context("no retry can fix this (check QUEUE_URL, the queue and the credentials)"),
                        );
                        break;
                    }
                    _ => {
                        // The queue is unreachable or throttling: nothing is lost, messages wait.
                        tracing::warn!(error = %err, retry_in = ?backoff, "receive failed");
                        drop(held);
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = drain.cancelled() => break,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(20));
                        continue;
                    }
                },
            };
            if messages.is_empty() {
                continue;
            }
            self.activity.touch();
            self.dispatch(messages, held);
        }
    }

    /// Hands each message to the worker on a task of its own, with one of the permits `held`.
    fn dispatch(&self, messages: Vec<Message>, mut held: OwnedSemaphorePermit) {
        for message in messages {
            let Some(permit) = held.split(1) else {
                // More messages than asked for: leave the extra ones to come back.
                tracing::warn!("the queue returned more messages than asked for; the rest come back later");
                break;
            };
            let (worker, activity, abandon) = (self.worker.clone(), self.activity.clone(), self.abandon.clone());
            let slot = Slot::new(permit, self.finishing.clone());
            self.tracker.spawn(async move {
                tokio::select! {
                    _ = worker.handle(message, slot) => {}
                    _ = abandon.cancelled() => {}
                }
                activity.touch();
            });
        }
    }

    async fn receive(&self, max: usize) -> Result<Vec<Message>, AwsError> {
        let out = self
            .worker
            .sqs()
            .receive_message()
            .queue_url(&self.config.queue_url)
            .max_number_of_messages(max as i32)
            .wait_time_seconds(self.config.wait.as_secs() as i32)
            .visibility_timeout(self.config.visibility.as_secs().min(43_200) as i32)
            .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .call(|| format!("receiving from {}", self.config.queue_url))?;
        Ok(out.messages.unwrap_or_default())
    }
}

/// Decides the idle exit: nothing in flight here, nothing received for the idle window, no
/// feeder sending for the listing, and the queue read empty (visible, in flight, delayed) on
/// every check over that window.
struct IdleWatcher {
    sqs: Sqs,
    queue_url: String,
    db: sqlx::PgPool,
    /// The listing's bucket and prefix, whose feeder lease is looked at.
    source: (String, String),
    idle: Duration,
    activity: Arc<Activity>,
    tracker: TaskTracker,
    /// Set, with what is left, when it drains while the listing is unfinished.
    listing_unfinished: Arc<std::sync::Mutex<Option<String>>>,
}

/// What one check of the idle watcher found.
#[derive(Debug)]
enum Check {
    /// Work may still come: why (logged when it changes) and the particulars.
    Busy { why: &'static str, detail: String },
    /// The queue or the listing could not be read: not exiting (logged as a warning).
    Unknown { why: &'static str, detail: String },
    /// The queue is empty and no feeder is sending; whether the listing is unfinished.
    Empty { listing_unfinished: bool },
}

impl IdleWatcher {
    async fn run(self, drain: CancellationToken) {
        let every = (self.idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut empty_since: Option<Instant> = None;
        let mut told = "";
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = drain.cancelled() => return,
            }
            // The queue is read while the last receives age, not after: the idle window and
            // the empty window run together.
            if !self.tracker.is_empty() {
                empty_since = None;
                continue;
            }
            match self.check().await {
                Check::Empty { listing_unfinished } => {
                    let since = *empty_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.idle && self.activity.quiet_for() >= self.idle {
                        if listing_unfinished {
                            let left = format!(
                                "the queue is empty and no feeder is running, but the listing of s3://{}/{} is \
                                 unfinished: run the feeder to resume it, and consumers for what it sends",
                                self.source.0, self.source.1
                            );
                            *self.listing_unfinished.lock().expect("not poisoned") = Some(left);
                        }
                        tracing::info!(idle_secs = self.idle.as_secs_f64(), "queue empty: draining and exiting");
                        drain.cancel();
                        return;
                    }
                }
                Check::Busy { why, detail } => {
                    empty_since = None;
                    if why != told && self.activity.quiet_for() >= self.idle {
                        tracing::info!(detail, "nothing received, but not exiting: {why}");
                        told = why;
                    }
                }
                Check::Unknown { why, detail } => {
                    empty_since = None;
                    tracing::warn!(error = detail, "{why}; not exiting");
                }
            }
        }
    }

    /// The listing's state is read before the queue's depth: a feeder ends its lease only
    /// after its last message is sent, so a queue read empty after a lease read ended holds
    /// everything that feeder sent.
    async fn check(&self) -> Check {
        let (bucket, prefix) = &self.source;
        let listing = match common::db::listing_state(&self.db, bucket, prefix).await {
            Ok(listing) => listing,
            Err(err) => return Check::Unknown { why: "cannot read the listing's state", detail: err.to_string() },
        };
        if listing.feeder_running {
            return Check::Busy {
                why: "a feeder is sending messages for the listing",
                detail: format!("s3://{bucket}/{prefix}"),
            };
        }
        match queue_depth(&self.sqs, &self.queue_url).await {
            Ok(depth) if depth.total() == 0 => {
                Check::Empty { listing_unfinished: listing.started && !listing.finished }
            }
            Ok(depth) => Check::Busy {
                why: "the queue is not empty: waiting for those messages to come back or be deleted",
                detail: format!("{} visible, {} in flight, {} delayed", depth.visible, depth.in_flight, depth.delayed),
            },
            Err(err) => Check::Unknown { why: "cannot read the queue depth", detail: format!("{err:#}") },
        }
    }
}
