//! `feeder status`: where the migration stands: the listing checkpoint, the queue and
//! dead-letter queue depths, rows by prefix, failures by reason, and (from the rewrite
//! journal) rows rewritten per second over the last minutes and an ETA. Writes nothing.
//!
//! Promises: every query runs under the session's `lock_timeout` and a bounded
//! `statement_timeout`; rows are counted (one scan, which holds a lock a DDL would queue
//! behind) only on a table of at most `--exact-max-rows` rows by the planner's estimate, or
//! with `--exact`; past that they are estimated from the planner's statistics and the
//! journal's counter, and said to be. `--watch` counts once and then follows the journal's
//! counter, which is cheap. Failure records are never subtracted from row counts: the legacy
//! rows set aside are those whose path has a record, counted in the same scan.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use crate::store::journal::JournalSummary;
use crate::store::rows::RowCounts;
use common::aws::{QueueDepth, dead_letter_queue, queue_depth};
use common::db::Checkpoint;

use super::Ops;
use crate::settings::StatusArgs;

/// The window over which the rate is measured.
pub const RATE_WINDOW: Duration = Duration::from_secs(300);
/// Without a terminal, `--watch` prints one line this often.
const PLAIN_EVERY: Duration = Duration::from_secs(60);

/// One reading.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub listing: Checkpoint,
    /// A feeder (a run, a reconcile, a redrive) holds the listing's lease now.
    pub feeder_running: bool,
    /// (ranges, complete) when listed in key ranges or from an inventory report.
    pub parts: Option<(usize, usize)>,
    pub queue: QueueDepth,
    pub dlq: Option<QueueDepth>,
    pub rows: RowCounts,
    pub failures: Vec<(String, i64)>,
    pub journal: JournalSummary,
    /// The operator's pause and cap (`common::control`).
    pub control: common::control::Control,
    /// The consumers reporting now: their paces, copies and slow-downs.
    pub fleet: Vec<common::control::Report>,
}

impl Status {
    /// Rows rewritten per second over the last [`RATE_WINDOW`] (from the journal).
    pub fn objects_per_s(&self) -> f64 {
        self.journal.recent as f64 / self.journal.window_s.max(1.0)
    }

    /// Legacy rows not set aside: what is left to do (estimated: every legacy row).
    pub fn rows_left(&self) -> i64 {
        (self.rows.legacy - self.rows.legacy_set_aside).max(0)
    }

    /// Seconds until the rows left are rewritten at the current rate; `None` when nothing
    /// moves.
    pub fn eta_s(&self) -> Option<f64> {
        let rate = self.objects_per_s();
        (self.rows_left() == 0).then_some(0.0).or((rate > 0.0).then(|| self.rows_left() as f64 / rate))
    }

    pub fn json(&self) -> String {
        let failures: serde_json::Map<String, serde_json::Value> =
            self.failures.iter().map(|(r, n)| (r.clone(), (*n).into())).collect();
        serde_json::json!({
            "rows_legacy": self.rows.legacy,
            "rows_modern": self.rows.modern,
            "rows_other": self.rows.all - self.rows.legacy - self.rows.modern,
            "rows_left": self.rows_left(),
            "rows_legacy_set_aside": self.rows.legacy_set_aside,
            "rows_estimated": self.rows.estimated,
            "objects_listed": self.listing.listed,
            "listing_complete": self.listing.finished,
            "feeder_running": self.feeder_running,
            "queue_visible": self.queue.visible,
            "queue_in_flight": self.queue.in_flight,
            "queue_delayed": self.queue.delayed,
            "dlq_visible": self.dlq.map(|d| d.visible),
            "failures": failures,
            "rewrites_recorded": self.journal.last_id,
            "objects_per_s": (self.objects_per_s() * 1000.0).round() / 1000.0,
            "eta_s": self.eta_s().map(f64::round),
            "paused": self.control.paused,
            "max_copies_per_second": self.control.max_copies_per_second,
            "consumers_reporting": self.fleet.len(),
            "copy_rate_limits": self.fleet.iter().map(|c| c.copy_rate.map(|r| r.round())).collect::<Vec<_>>(),
            "copies_slowed_down": self.fleet.iter().map(|c| c.slowed_down).sum::<i64>(),
            "held_by_database": self.fleet.iter().filter_map(|c| c.held.clone()).collect::<Vec<_>>(),
        })
        .to_string()
    }

    fn print(&self) {
        let cp = &self.listing;
        println!(
            "listing:  {} objects in {} pages enqueued{}{}; {}",
            cp.listed,
            cp.pages,
            if cp.finished { ", complete" } else { ", not complete" },
            cp.last_key.as_ref().map(|k| format!(", last key {k:?}")).unwrap_or_default(),
            if self.feeder_running { "a feeder is sending" } else { "no feeder running" }
        );
        if let Some((all, done)) = self.parts {
            println!("ranges:   {all} key ranges or inventory files, {done} complete");
        }
        let dlq = match self.dlq {
            Some(d) => format!("{} messages in the dead-letter queue", d.total()),
            None => "no dead-letter queue configured".to_owned(),
        };
        let q = self.queue;
        println!("queue:    {} waiting, {} in flight, {} delayed; {dlq}", q.visible, q.in_flight, q.delayed);
        let r = self.rows;
        if r.estimated {
            println!(
                "rows:     about {} in all: about {} legacy, {} modern (estimated from the planner's statistics and \
                 the journal; --exact counts them, one scan of the table)",
                r.all, r.legacy, r.modern
            );
        } else {
            println!(
                "rows:     {} in all: {} legacy ({} of them set aside), {} modern, {} other",
                r.all,
                r.legacy,
                r.legacy_set_aside,
                r.modern,
                r.all - r.legacy - r.modern
            );
        }
        let failures = self.failures.iter().map(|(r, n)| format!("{n} {r}")).collect::<Vec<_>>().join(", ");
        println!("set aside: {}", if failures.is_empty() { "none".to_owned() } else { failures });
        println!("progress: {}", self.progress_line());
        println!("copies:   {}", self.copies_line());
    }

    /// Who limits the copies: the operator (pause, cap), the database's health, or S3 (the
    /// consumers' paces).
    fn copies_line(&self) -> String {
        let mut control = match (self.control.paused, self.control.max_copies_per_second) {
            (true, _) => "PAUSED by the operator (feeder resume)".to_owned(),
            (false, Some(cap)) => format!("capped at {cap} a second for the fleet (feeder throttle --clear)"),
            (false, None) => "no cap".to_owned(),
        };
        let held: Vec<&str> = self.fleet.iter().filter_map(|c| c.held.as_deref()).collect();
        if let Some(why) = held.first() {
            control = format!("HELD by the database's health on {} consumers: {why}; {control}", held.len());
        }
        let paced: Vec<String> = self.fleet.iter().filter_map(|c| c.copy_rate).map(|r| format!("{r:.0}")).collect();
        let slowed: i64 = self.fleet.iter().map(|c| c.slowed_down).sum();
        let paces =
            if paced.is_empty() { "none paced".to_owned() } else { format!("paced at {} copies/s", paced.join(", ")) };
        format!("{control}; {} consumers reporting, {paces}; {slowed} copies S3 asked to slow down", self.fleet.len())
    }

    fn progress_line(&self) -> String {
        let eta = match self.eta_s() {
            Some(s) => format!("ETA {}", humantime::format_duration(Duration::from_secs(s as u64))),
            None => "no rewrites in the last 5 minutes: no ETA".to_owned(),
        };
        format!("{:.1} rows/s over the last 5 minutes, {} rows left, {eta}", self.objects_per_s(), self.rows_left())
    }
}

/// Reads everything once.
pub async fn read(cx: &Ops<'_>, args: &StatusArgs) -> anyhow::Result<Status> {
    let Ops { settings, clients, mapping, .. } = cx;
    let mut status = Status::default();
    refresh(cx, &mut status).await?;
    let mut estimate = Some(0);
    for target in clients.targets.iter() {
        let rows = crate::store::rows::estimated_rows(&clients.db, target).await?;
        estimate = estimate.zip(rows).map(|(sum, n)| sum + n);
    }
    status.rows = match estimate {
        Some(n) if n > args.exact_max_rows as i64 && !args.exact => {
            // The journal's counter: about the rows rewritten (the live service's own writes
            // of modern values are not in it).
            let modern = status.journal.last_id.min(n);
            RowCounts { all: n, legacy: n - modern, modern, legacy_set_aside: 0, estimated: true }
        }
        _ => {
            let timeout = if args.exact { args.exact_timeout } else { settings.database.db_statement_timeout };
            let mut counts = RowCounts::default();
            for target in clients.targets.iter() {
                counts +=
                    crate::store::rows::count_rows(&clients.db, target, mapping, timeout).await.map_err(|err| {
                        anyhow::Error::new(err).context(format!(
                            "counting the rows of {target} (bounded by {}; --exact-timeout sets it with --exact)",
                            humantime::format_duration(timeout)
                        ))
                    })?;
            }
            counts
        }
    };
    Ok(status)
}

/// Everything but the row counts, which follow the journal's counter instead.
async fn refresh(cx: &Ops<'_>, status: &mut Status) -> anyhow::Result<()> {
    let Ops { settings, clients, mapping, .. } = cx;
    let (bucket, prefix) = (&mapping.source_bucket, mapping.source_prefix.as_str());
    status.listing = common::db::load_checkpoint(&clients.db, bucket, prefix).await?;
    status.feeder_running = common::db::listing_state(&clients.db, bucket, prefix).await?.feeder_running;
    let ranges = crate::store::ranges::load_ranges(&clients.db, bucket, prefix).await?;
    status.parts = (!ranges.is_empty()).then(|| (ranges.len(), ranges.iter().filter(|r| r.finished).count()));
    status.queue = queue_depth(&clients.sqs, &settings.queue.queue_url).await?;
    status.dlq = match dead_letter_queue(&clients.sqs, &settings.queue.queue_url).await? {
        Some((url, _)) => Some(queue_depth(&clients.sqs, &url).await?),
        None => None,
    };
    status.failures = common::db::failure_counts(&clients.db).await?;
    status.control = common::control::read(&clients.db).await?;
    status.fleet = common::control::fleet(&clients.db).await?;
    let journal = crate::store::journal::journal_summary(&clients.db, RATE_WINDOW).await?;
    // After the first reading: rows rewritten since the last one moved from legacy to modern.
    if status.journal.window_s > 0.0 {
        let moved = (journal.last_id - status.journal.last_id).max(0);
        status.rows.legacy = (status.rows.legacy - moved).max(0);
        status.rows.modern += moved;
    }
    status.journal = journal;
    Ok(())
}

/// `feeder status [--json] [--watch]`.
pub async fn status(cx: &Ops<'_>, args: &StatusArgs) -> anyhow::Result<()> {
    let mut status = read(cx, args).await?;
    if !args.watch {
        status.print();
        if args.json {
            println!("{}", status.json());
        }
        return Ok(());
    }
    let every = args.interval.max(Duration::from_secs(1));
    let bar = std::io::stderr().is_terminal().then(|| progress_bar(&status));
    let mut last_plain: Option<Instant> = None;
    loop {
        match &bar {
            Some(bar) => {
                bar.set_length((status.rows_left() + status.rows.modern) as u64);
                bar.set_position(status.rows.modern as u64);
                let q = status.queue;
                bar.set_message(format!(
                    "{:.0} rows/s, queue {} waiting / {} in flight, {} set aside",
                    status.objects_per_s(),
                    q.visible,
                    q.in_flight,
                    status.failures.iter().map(|(_, n)| n).sum::<i64>()
                ));
            }
            None if last_plain.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) => {
                last_plain = Some(Instant::now());
                if args.json {
                    println!("{}", status.json());
                } else {
                    println!("status: {} modern, {}", status.rows.modern, status.progress_line());
                }
            }
            None => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = cx.shutdown.cancelled() => break,
        }
        refresh(cx, &mut status).await?;
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    if args.json {
        println!("{}", status.json());
    }
    Ok(())
}

fn progress_bar(status: &Status) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new((status.rows_left() + status.rows.modern) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} rows modern ({percent}%), ETA {eta}: {msg}")
            .expect("a valid template"),
    );
    bar
}
