//! The feeder's progress while it lists and enqueues: a bar (indicatif) with the count and
//! rate on a terminal; one line a minute otherwise (containers, CloudWatch).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

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
