//! One message, start to end: read it, and for each of its objects copy the object and rewrite
//! its rows; then acknowledge.
//!
//! Promises: the message is deleted only after each of its objects is at its destination and
//! its rows are rewritten, or recorded (I1, I2); a permanent problem (source missing, destination conflict,
//! malformed message, key outside the prefix, too large) is recorded in
//! `avatar_migration_failures` first and only then deleted; anything else leaves the message
//! to come back after its visibility timeout, and after `maxReceiveCount` receipts SQS moves
//! it to the dead-letter queue.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::Message;
use common::aws::Sqs;
use common::db::fence::Tombstone;
use common::db::{Reason, Rewritten};
use common::message::ObjectMessage;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::ack::Acker;
use crate::copy::{Copied, Copier, CopyError, Lookahead};
use crate::lease::Lease;
use crate::metrics::{InFlight, Stats};
use crate::record::Rewriter;
use crate::refusals::{HALT_AFTER, QUIET, Refusal, Refusals, Verdict, WINDOW};
use crate::slot::Slot;

/// Works on one message at a time, each on a task of its own: built once, by [`Worker::new`].
pub(crate) struct Worker {
    sqs: Sqs,
    db: PgPool,
    /// The references, for a dry run's counts.
    targets: common::db::Targets,
    queue_url: String,
    copier: Copier,
    rewriter: Rewriter,
    acker: Acker,
    visibility: Duration,
    stats: std::sync::Arc<Stats>,
    halt: std::sync::Arc<Halt>,
    /// The queue's `maxReceiveCount`: on that delivery an object that fails again is recorded
    /// (`retries_exhausted`, with its last error) before its message goes to the dead-letter
    /// queue. `None`: no dead-letter queue.
    max_receive_count: Option<u32>,
    /// `DELETE_SOURCE`: each source, once its copy is proven and its rows moved, is handed
    /// over for deletion.
    sources: Option<crate::sources::SourceDeleter>,
    /// `--dry-run`: inspect and report, write nothing, delete no message; stop at the first
    /// message seen twice (the queue has come round).
    dry_run: Option<DryRun>,
    /// Access denied and KMS refusals: about one object, or about every object.
    refusals: Refusals,
    /// How long one object may be worked on (`OBJECT_TIMEOUT`, plus a second per 25 MiB).
    object_timeout: Duration,
    /// The fleet has refusal records standing (read every few seconds by the controller):
    /// each object moved meanwhile removes its own, whatever delivery moved it (a record
    /// written for one message may be outlived by a copy of that object moved through
    /// another, a feeder's resent page).
    refusal_records: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// What a worker takes from the settings (`Settings::worker_config`).
pub(crate) struct WorkerConfig {
    pub(crate) queue_url: String,
    /// How long a message stays invisible; its lease renews it while the message is worked on.
    pub(crate) visibility: Duration,
    /// `--dry-run`.
    pub(crate) dry_run: bool,
    /// `OBJECT_TIMEOUT`.
    pub(crate) object_timeout: Duration,
}

/// The stages a worker hands its objects' next steps to.
pub(crate) struct Stages {
    pub(crate) rewriter: Rewriter,
    pub(crate) acker: Acker,
    /// `DELETE_SOURCE`'s deleter.
    pub(crate) sources: Option<crate::sources::SourceDeleter>,
    pub(crate) stats: std::sync::Arc<Stats>,
}

impl Worker {
    /// `max_receive_count`: the queue's (`None`: no dead-letter queue); `refusal_records`:
    /// set by the controller while the fleet has refusal records standing.
    pub(crate) fn new(
        clients: &common::setup::Clients,
        config: WorkerConfig,
        copier: Copier,
        stages: Stages,
        halt: std::sync::Arc<Halt>,
        max_receive_count: Option<u32>,
        refusal_records: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        let Stages { rewriter, acker, sources, stats } = stages;
        Worker {
            sqs: clients.sqs.clone(),
            db: clients.db.clone(),
            targets: clients.targets.clone(),
            queue_url: config.queue_url,
            copier,
            rewriter,
            acker,
            visibility: config.visibility,
            stats,
            halt,
            max_receive_count,
            sources,
            dry_run: config.dry_run.then(DryRun::default),
            refusals: Refusals::default(),
            object_timeout: config.object_timeout,
            refusal_records,
        }
    }

    /// The queue's client (the receive loop receives with it).
    pub(crate) fn sqs(&self) -> &Sqs {
        &self.sqs
    }

    /// The copies' pace (the controller sets the operator's cap on it).
    pub(crate) fn pace(&self) -> std::sync::Arc<crate::pace::Pace> {
        self.copier.pace.clone()
    }

    /// Stops the whole process on an error no retry can fix.
    pub(crate) fn halt(&self, err: anyhow::Error) {
        self.halt.halt(err);
    }
}

/// The state of a dry run.
#[derive(Default)]
pub(crate) struct DryRun {
    seen: Mutex<std::collections::HashSet<String>>,
}

/// Stops the whole process on an error no retry can fix (a bucket gone, credentials refused,
/// the database role lacking a grant), keeping the first such error for the exit message.
pub(crate) struct Halt {
    stop: CancellationToken,
    error: Mutex<Option<anyhow::Error>>,
}

impl Halt {
    pub(crate) fn new(stop: CancellationToken) -> Self {
        Self { stop, error: Mutex::new(None) }
    }

    pub(crate) fn halt(&self, err: anyhow::Error) {
        tracing::error!(error = format!("{err:#}"), "stopping: this error stops every object, not just one");
        self.error.lock().expect("never poisoned").get_or_insert(err);
        self.stop.cancel();
    }

    /// Stops the process without an error (a dry run that has seen every message).
    pub(crate) fn finish(&self) {
        self.stop.cancel();
    }

    /// Whether an error stopped the process.
    pub(crate) fn halted(&self) -> bool {
        self.error.lock().expect("never poisoned").is_some()
    }

    /// The error that stopped the process, if one did.
    pub(crate) fn take(&self) -> Option<anyhow::Error> {
        self.error.lock().expect("never poisoned").take()
    }
}

enum Outcome {
    Done,
    SetAside {
        subject: String,
        reason: Reason,
        detail: String,
    },
    RetryLater(String),
    /// Worked on past `OBJECT_TIMEOUT`: given up; the message comes back, its other objects
    /// with it.
    Abandoned(String),
    /// Nothing can be moved: stop the process (the message comes back).
    Fatal(String),
}

impl Outcome {
    /// An access denied or KMS refusal: about this object, or about every object
    /// ([`crate::refusals`]).
    fn is_refusal(&self) -> bool {
        matches!(self, Outcome::SetAside { reason, .. } if reason.is_refusal())
    }
}

impl Worker {
    pub(crate) async fn handle(&self, message: Message, slot: Slot) {
        self.stats.received.inc();
        let _in_flight = InFlight::start(&self.stats.in_flight);
        let id = message.message_id().unwrap_or_default().to_owned();
        let Some(receipt) = message.receipt_handle().map(str::to_owned) else {
            tracing::warn!(message_id = id, "message without a receipt handle: ignored");
            return;
        };
        let body = message.body().unwrap_or_default();
        if let Some(dry) = &self.dry_run {
            return self.inspect(dry, &id, body).await;
        }
        // A slow message keeps itself invisible until it is done.
        let lease = Lease::start(self.sqs.clone(), self.queue_url.clone(), receipt.clone(), self.visibility);
        let (deletable, objects) = match common::message::decode(body) {
            Err(err) => {
                let outcome = Outcome::SetAside {
                    subject: format!("message {id}"),
                    reason: Reason::MalformedMessage,
                    detail: format!("{err}; body: {}", truncate(body, 2048)),
                };
                (self.settle(outcome).instrument(tracing::info_span!("message", message_id = %id)).await, 1)
            }
            Ok(objects) => {
                (self.move_objects(&id, &objects, receive_count(&message), slot).await, objects.len() as u64)
            }
        };
        drop(lease);
        if deletable {
            self.acker.ack(receipt, objects).await;
        }
    }

    /// Moves the objects of one message, received `receipts` times, one after the other:
    /// CONCURRENCY stays the number of objects in flight. Returns whether the message may go:
    /// every object is done or recorded; otherwise it comes back whole and those already done
    /// are found done.
    ///
    /// Each object's last steps (its rows, or the verdict on its refusal) run once the
    /// message's copies are done, all together: the rows of its copied objects share a batch
    /// (rather than a round trip per object between two copies), and all of it is awaited
    /// before the message may go. Meanwhile the message holds a finishing place, not its copy
    /// permit ([`Slot`]): the next message's copies go on while these rows linger for company.
    async fn move_objects(&self, id: &str, objects: &[ObjectMessage], receipts: u32, slot: Slot) -> bool {
        let mut deletable = true;
        let mut pending: Vec<futures::future::BoxFuture<'_, bool>> = Vec::new();
        let lookahead = self.copier.look_ahead(objects).await;
        for msg in objects {
            if self.halt.halted() {
                deletable = false; // stopped by an error of the whole run: the message stays
                break;
            }
            let span = tracing::info_span!("object", message_id = %id, key = %msg.key);
            match self.copy_object(msg, lookahead.as_ref()).instrument(span.clone()).await {
                Ok(destination) => {
                    pending.push(Box::pin(self.finish_copied(msg, destination, receipts).instrument(span)))
                }
                Err(outcome) if outcome.is_refusal() => {
                    let refusal = self.refused(&outcome);
                    let finish = async move {
                        let outcome = self.weigh_refusal(refusal, outcome).await;
                        self.note_exhausted(&outcome, &msg.key, receipts).await;
                        self.settle(outcome).await
                    };
                    pending.push(Box::pin(finish.instrument(span)));
                }
                Err(outcome) => {
                    let stop = matches!(outcome, Outcome::Fatal(_) | Outcome::Abandoned(_));
                    deletable &= self.finish_decided(msg, outcome, receipts).instrument(span).await;
                    if stop {
                        break;
                    }
                }
            }
        }
        // The copies are done: the permit goes to the next message while the rows are written.
        let _finishing = slot.copies_done().await;
        for settled in futures::future::join_all(pending).await {
            deletable &= settled;
        }
        deletable
    }

    /// The last steps of a copied object: its rows, a refusal record it outlives, its source
    /// handed over for deletion (`DELETE_SOURCE`). Returns whether it is settled.
    async fn finish_copied(&self, msg: &ObjectMessage, destination: String, receipts: u32) -> bool {
        let destination_key = destination.clone();
        let outcome = self.rewrite_rows(msg, destination).await;
        if self.refusal_may_stand(receipts) && matches!(outcome, Outcome::Done) {
            self.forget_refusals(&msg.key).await;
        }
        if let Some(sources) = &self.sources
            && matches!(outcome, Outcome::Done)
        {
            sources.delete(Tombstone { legacy: msg.key.clone(), new: destination_key, etag: msg.etag.clone() });
        }
        self.note_exhausted(&outcome, &msg.key, receipts).await;
        self.settle(outcome).await
    }

    /// The last steps of an object decided without a copy (its source gone, a conflict, an
    /// error): a refusal recorded by an earlier delivery no longer stands. Returns whether it
    /// is settled.
    async fn finish_decided(&self, msg: &ObjectMessage, outcome: Outcome, receipts: u32) -> bool {
        if self.refusal_may_stand(receipts) && matches!(outcome, Outcome::SetAside { .. }) {
            self.forget_refusals(&msg.key).await;
        }
        self.note_exhausted(&outcome, &msg.key, receipts).await;
        self.settle(outcome).await
    }

    /// Registers an access denied or KMS refusal ([`Outcome::is_refusal`]); the one that
    /// completes a streak, or half of the last objects decided, stops the process
    /// ([`crate::refusals`]).
    fn refused(&self, outcome: &Outcome) -> Refusal {
        let refusal = self.refusals.refused();
        if refusal.halts()
            && let Outcome::SetAside { reason, detail, .. } = outcome
        {
            let reason = reason.as_str();
            let how_many = if refusal.in_a_row >= HALT_AFTER {
                format!(
                    "{} objects in a row were refused ({reason}) with no copy succeeding in between",
                    refusal.in_a_row
                )
            } else {
                format!("{} of the last {WINDOW} objects were refused ({reason})", refusal.in_window)
            };
            self.halt.halt(systemic_refusal(&how_many, detail));
        }
        refusal
    }

    /// A refused object is set aside only once the objects after it prove the refusal is about
    /// it; otherwise (a halt) its message stays, and only the first few of the window are
    /// recorded.
    async fn weigh_refusal(&self, refusal: Refusal, outcome: Outcome) -> Outcome {
        let Outcome::SetAside { subject, reason, detail } = outcome else { return outcome };
        let verdict = self.refusals.verdict(&refusal, QUIET).await;
        if let Verdict::Halts { in_a_row } = verdict {
            let how_many = format!(
                "{in_a_row} objects in a row were refused ({}), no copy succeeding since and no other object left \
                 to try",
                reason.as_str()
            );
            self.halt.halt(systemic_refusal(&how_many, &detail));
        }
        match verdict {
            Verdict::OneObject => Outcome::SetAside { subject, reason, detail },
            Verdict::Unsettled => Outcome::RetryLater(format!(
                "kept in the queue: refused, and no object since tells whether the refusal is about this one \
                 (it comes back): {detail}"
            )),
            Verdict::Systemic | Verdict::Halts { .. } => {
                if refusal.recorded()
                    && let Err(err) = common::db::record_failure(&self.db, &subject, reason, &detail).await
                {
                    tracing::warn!(error = %err, "cannot record the refusal");
                }
                Outcome::RetryLater(format!("kept in the queue: refused like every object around it: {detail}"))
            }
        }
    }

    /// Whether an object of a message received `receipts` times may have a refusal record
    /// standing: an earlier delivery made one, or the fleet has some.
    fn refusal_may_stand(&self, receipts: u32) -> bool {
        receipts > 1 || self.refusal_records.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The object was decided (on a later delivery, or while refusal records stand): an access
    /// denied or KMS record an earlier delivery left (a run stopped by refusals in a row) no
    /// longer stands.
    async fn forget_refusals(&self, key: &str) {
        if let Err(err) = common::db::failures::clear_refusals(&self.db, key).await {
            tracing::warn!(error = %err, "cannot remove an earlier refusal's record of a moved object");
        }
    }

    /// A dry run's handling of one message: says what would happen to each object, changes
    /// nothing; the message comes back after its visibility timeout.
    async fn inspect(&self, dry: &DryRun, id: &str, body: &str) {
        if !dry.seen.lock().expect("never poisoned").insert(id.to_owned()) {
            println!("dry run: message {id} came back: every message was seen; stopping");
            self.halt.finish();
            return;
        }
        let objects = match common::message::decode(body) {
            Ok(objects) => objects,
            Err(err) => {
                self.stats.count_set_aside(Reason::MalformedMessage.as_str());
                println!("dry run: message {id}: would set aside (malformed_message): {err}");
                return;
            }
        };
        for msg in &objects {
            let Some(destination) = self.copier.mapping.destination_key(&msg.key) else {
                self.stats.count_set_aside(Reason::OutsidePrefix.as_str());
                println!("dry run: {}: would set aside (outside_prefix)", msg.key);
                continue;
            };
            let verdict = match self.copier.inspect(&msg.key, &msg.etag, &destination).await {
                Ok(Copied::Copied) => {
                    self.stats.copied.inc();
                    format!("would copy to {destination} ({} bytes)", msg.size)
                }
                Ok(Copied::AlreadyPresent) => {
                    self.stats.already_present.inc();
                    format!("already present at {destination}")
                }
                Err(CopyError::SetAside { reason, detail }) => {
                    self.stats.count_set_aside(reason.as_str());
                    println!("dry run: {}: would set aside ({}): {detail}", msg.key, reason.as_str());
                    continue;
                }
                Err(CopyError::Transient(why) | CopyError::Fatal(why)) => {
                    self.stats.retry_later.inc();
                    println!("dry run: {}: cannot tell now: {why}", msg.key);
                    continue;
                }
            };
            match common::db::count_all_naming(&self.db, &self.targets, &self.copier.mapping.source_bucket, &msg.key)
                .await
            {
                Ok(rows) => {
                    self.stats.rows_rewritten.inc_by(rows);
                    println!("dry run: {}: {verdict}; would rewrite {rows} row(s)", msg.key);
                }
                Err(err) => println!("dry run: {}: {verdict}; cannot count its rows: {err}", msg.key),
            }
        }
    }

    /// On the last delivery before the dead-letter queue, records why the object keeps
    /// failing, so that `feeder failures` shows a reason for every dead-lettered key.
    async fn note_exhausted(&self, outcome: &Outcome, key: &str, receipts: u32) {
        let (Outcome::RetryLater(why) | Outcome::Abandoned(why)) = outcome else { return };
        let Some(max) = self.max_receive_count.filter(|&max| max > 0 && receipts >= max) else { return };
        let detail = format!(
            "received {receipts} times (maxReceiveCount {max}): its message goes to the dead-letter queue \
             (feeder redrive retries it); last error: {why}"
        );
        if let Err(err) = common::db::record_failure(&self.db, key, Reason::RetriesExhausted, &detail).await {
            tracing::warn!(error = %err, "cannot record why the object keeps failing");
        }
    }

    /// Copies the object; on success returns the destination key its rows may now point at.
    async fn copy_object(&self, msg: &ObjectMessage, lookahead: Option<&Lookahead>) -> Result<String, Outcome> {
        let mapping = &self.copier.mapping;
        let Some(destination) = mapping.destination_key(&msg.key) else {
            return Err(Outcome::SetAside {
                subject: msg.key.clone(),
                reason: Reason::OutsidePrefix,
                detail: format!("key is not under SOURCE_PREFIX {:?}", mapping.source_prefix.as_str()),
            });
        };
        let started = Instant::now();
        let absent = lookahead.is_some_and(|l| l.proves_absent(&destination));
        let bound = common::aws::copy_timeout(self.object_timeout, msg.size.max(0) as u64);
        let copying = self.copier.ensure_copied(&msg.key, &msg.etag, msg.size, &destination, absent);
        let Ok(copied) = tokio::time::timeout(bound, copying).await else {
            return Err(Outcome::Abandoned(format!(
                "not copied within {} (OBJECT_TIMEOUT, plus a second per 25 MiB)",
                humantime::format_duration(bound)
            )));
        };
        self.stats.copy_seconds.observe(started.elapsed().as_secs_f64());
        match copied {
            Ok(Copied::Copied) => {
                self.stats.copied.inc();
                self.refusals.succeeded();
            }
            Ok(Copied::AlreadyPresent) => {
                self.stats.already_present.inc();
            }
            Err(CopyError::SetAside { reason, detail }) => {
                return Err(Outcome::SetAside { subject: msg.key.clone(), reason, detail });
            }
            Err(CopyError::Transient(why)) => return Err(Outcome::RetryLater(why)),
            Err(CopyError::Fatal(why)) => return Err(Outcome::Fatal(why)),
        };
        Ok(destination)
    }

    /// Points the object's rows at its destination, which exists (I1).
    async fn rewrite_rows(&self, msg: &ObjectMessage, destination: String) -> Outcome {
        let started = Instant::now();
        let rewritten = self.rewriter.rewrite(msg.key.clone(), destination).await;
        self.stats.rewrite_seconds.observe(started.elapsed().as_secs_f64());
        match rewritten {
            Ok(Rewritten { rows, held: 0 }) => {
                self.stats.rows_rewritten.inc_by(rows);
                tracing::debug!(rows, "object moved");
                Outcome::Done
            }
            Ok(Rewritten { rows, held }) => {
                self.stats.rows_rewritten.inc_by(rows);
                Outcome::RetryLater(format!(
                    "{held} row(s) at the old path are held by another transaction (skipped, not waited for)"
                ))
            }
            Err(err) if err.is_fatal() => Outcome::Fatal(err.to_string()),
            Err(err) => Outcome::RetryLater(err.to_string()),
        }
    }

    /// Settles one object's outcome; `true` when it lets its message be deleted.
    async fn settle(&self, outcome: Outcome) -> bool {
        match outcome {
            Outcome::Done => true,
            Outcome::SetAside { subject, reason, detail } => {
                tracing::warn!(reason = reason.as_str(), detail, "set aside for the operator");
                if let Err(err) = common::db::record_failure(&self.db, &subject, reason, &detail).await {
                    self.stats.retry_later.inc();
                    tracing::warn!(error = %err, "cannot record the failure: the message comes back later");
                    return false;
                }
                self.stats.count_set_aside(reason.as_str());
                true
            }
            Outcome::RetryLater(why) => {
                self.stats.retry_later.inc();
                tracing::warn!(error = why, "not done: the message comes back after its visibility timeout");
                false
            }
            Outcome::Abandoned(why) => {
                self.stats.retry_later.inc();
                tracing::warn!(
                    error = why,
                    "abandoned: the message comes back after its visibility timeout, its other objects with it"
                );
                false
            }
            Outcome::Fatal(why) => {
                self.stats.retry_later.inc();
                self.halt.halt(anyhow::anyhow!(why));
                false
            }
        }
    }
}

/// How many times SQS delivered this message (1 when it does not say).
fn receive_count(message: &Message) -> u32 {
    message
        .attributes()
        .and_then(|a| a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The error that stops the process on refusals that are not about one object: `how_many`
/// says which refusals, `detail` the last one.
fn systemic_refusal(how_many: &str, detail: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{how_many}: this is not about one object. The last: {detail}. Check the consumer role's grants \
         (s3:GetObject on the source prefix, s3:PutObject on the destination prefix, kms:Decrypt and \
         kms:GenerateDataKey on their keys), the buckets' policies and the keys' policies, then start the \
         consumers again: the refused objects' messages are still in the queue"
    )
}
