//! The consumer's side of the fleet's control row (`common::control`): one reader per process,
//! every `common::control::EVERY`, that pauses receiving, sets this consumer's share of the
//! fleet's cap on its pace, and reports what it does. The one brake: the operator's pause and
//! the database's health (`common::health`: replica lag and the other limits set) act through
//! the same switch, and the report says which holds.
//!
//! Promises:
//! - read once before the first receive: a paused fleet receives nothing, a cap holds from the
//!   first copy, an unhealthy database holds it from the start;
//! - while paused or held, no message is received; objects already received finish (their
//!   leases end with them), and receiving resumes within seconds of `feeder resume` or of the
//!   database's recovery;
//! - a control row that cannot be read keeps the last known settings, with a warning;
//! - the report row is removed when the consumer exits.

use std::sync::Arc;

use common::control::{Control, Report};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Stats;
use crate::pace::Pace;

/// This process's name in the reports: host, process id, and when it started.
pub(crate) fn consumer_name() -> String {
    let host = common::host::name().unwrap_or_else(|| "consumer".to_owned());
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
    format!("{host}-{}-{started}", std::process::id())
}

/// Reads the control row and reports; the receivers watch `paused`. It holds no handle on the
/// work (the batchers stop when the workers are done, whatever it does).
pub(crate) struct Controller {
    name: String,
    db: sqlx::PgPool,
    stats: Arc<Stats>,
    pace: Arc<Pace>,
    paused: watch::Sender<bool>,
    last: Control,
    health: common::health::Health,
    /// Why the database's health holds the fleet, as last read.
    held: Option<String>,
    /// Whether the fleet has refusal records standing (`Reason::REFUSALS`): while it has, each
    /// object moved removes its own.
    refusal_records: Arc<std::sync::atomic::AtomicBool>,
}

impl Controller {
    /// Reads the control row once (before any receive); the receivers' `paused` follows it.
    pub(crate) async fn start(
        db: sqlx::PgPool,
        stats: Arc<Stats>,
        pace: Arc<Pace>,
        refusal_records: Arc<std::sync::atomic::AtomicBool>,
        health: common::health::Health,
    ) -> (Controller, watch::Receiver<bool>) {
        let (paused, watching) = watch::channel(false);
        let last = Control::default();
        let name = consumer_name();
        let mut controller = Controller { name, db, stats, pace, paused, last, refusal_records, health, held: None };
        controller.tick().await;
        (controller, watching)
    }

    /// Every `EVERY` until `end`, then removes this consumer's report.
    pub(crate) async fn run(mut self, end: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(common::control::EVERY) => self.tick().await,
                _ = end.cancelled() => break,
            }
        }
        if let Err(err) = common::control::forget(&self.db, &self.name).await {
            tracing::warn!(error = %err, "cannot remove this consumer's report");
        }
    }

    async fn tick(&mut self) {
        let db = &self.db;
        let control = match common::control::read(db).await {
            Ok(control) => control,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the control row: keeping the last settings");
                self.last
            }
        };
        if control.paused != self.last.paused {
            tracing::info!(
                paused = control.paused,
                "the operator {} the fleet",
                if control.paused { "paused" } else { "resumed" }
            );
        }
        self.last = control;
        let held = self.report_and_read_health(control).await;
        self.paused.send_replace(control.paused || held);
        match common::db::failures::refusals_recorded(&self.db).await {
            Ok(any) => self.refusal_records.store(any, std::sync::atomic::Ordering::Relaxed),
            Err(err) => tracing::warn!(error = %err, "cannot look for refusal records"),
        }
    }

    /// Reports (the report is also the heartbeat replicas are read by), then reads the
    /// database's health; whether it holds the fleet.
    async fn report_and_read_health(&mut self, control: Control) -> bool {
        let db = &self.db;
        let stats = &self.stats;
        stats.paused.set(i64::from(control.paused));
        let pace = &self.pace;
        let report = Report {
            consumer: self.name.clone(),
            paused: control.paused,
            copy_rate: pace.rate(),
            copies: stats.copied.get() as i64,
            slowed_down: stats.copies_slowed_down.get() as i64,
            in_flight: stats.in_flight.get().max(0),
            held: self.held.clone(),
        };
        match common::control::report(db, &report).await {
            Ok(live) => pace.set_cap(control.max_copies_per_second.map(|cap| cap / f64::from(live))),
            Err(err) => {
                tracing::warn!(error = %err, "cannot report to the control tables: the cap is shared as last known");
                if control.max_copies_per_second.is_none() {
                    pace.set_cap(None);
                }
            }
        }
        let held = if self.health.watches() { self.health.check(db).await } else { None };
        match (&self.held, &held) {
            (None, Some(why)) => tracing::warn!(why, "the database is unhealthy: taking no messages until it recovers"),
            (Some(_), None) => tracing::info!("the database is healthy again: receiving"),
            _ => {}
        }
        self.stats.database_held.set(i64::from(held.is_some()));
        self.held = held;
        self.held.is_some()
    }
}
