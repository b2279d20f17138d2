//! The feeder's progress while it lists and enqueues: a bar (indicatif) with the count and
//! rate on a terminal; one line a minute otherwise (containers, CloudWatch); and its counts as
//! CloudWatch metrics (`CLOUDWATCH_NAMESPACE`, written by [`common::emf`]).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// What the feeder did, as its CloudWatch metrics count it.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    /// Objects enqueued.
    pub(crate) enqueued: AtomicU64,
    /// Seconds spent waiting for the queue's backlog to fall under `MAX_BACKLOG`, counted as
    /// they pass: a feeder held back is not stalled.
    pub(crate) held_back_secs: AtomicU64,
}

/// The feeder's metrics, each with the counter it is the difference of.
pub(crate) const METRICS: [common::emf::Metric<Counts>; 2] =
    [("ObjectsEnqueued", |c| c.enqueued.load(Relaxed)), ("SecondsHeldBack", |c| c.held_back_secs.load(Relaxed))];

/// The metrics' names, as the lines give them.
pub fn names() -> impl Iterator<Item = &'static str> {
    METRICS.iter().map(|(name, _)| *name)
}

/// Without a terminal, one line this often.
const EVERY: Duration = Duration::from_secs(60);

pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    last_line: Instant,
    before: u64,
}

impl Progress {
    /// `before`: objects listed by earlier runs (the checkpoint's count).
    pub(crate) fn start(before: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {pos} objects enqueued ({per_sec}) {msg}")
                    .expect("a valid template"),
            );
            bar.set_position(before);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self { bar, started: Instant::now(), last_line: Instant::now(), before }
    }

    /// `listed`: objects listed in all so far.
    pub(crate) fn update(&mut self, listed: u64, last_key: Option<&str>) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(listed);
                bar.set_message(last_key.map(|k| format!("last key {k:?}")).unwrap_or_default());
            }
            None if self.last_line.elapsed() >= EVERY => {
                self.last_line = Instant::now();
                let rate = (listed - self.before.min(listed)) as f64 / self.started.elapsed().as_secs_f64().max(1.0);
                println!("feeder: progress: {listed} objects enqueued in all, {rate:.0} objects/s in this run");
            }
            None => {}
        }
    }

    pub(crate) fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
