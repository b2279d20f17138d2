//! What a run of the fault matrix is given (its size and harshness) and gives back (the table
//! and the JSON line), and how it says what it is doing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How big and how harsh a run is.
#[derive(Debug, Clone)]
pub struct Config {
    /// Legacy objects seeded (the mixed state adds modern rows and rows without objects).
    pub objects: usize,
    /// Consumers running at once at the start.
    pub consumers: usize,
    /// How long SQS is unreachable.
    pub sqs_outage: Duration,
    /// How long the live transaction holds one row.
    pub row_lock: Duration,
    /// Restart PostgreSQL mid-run (needs `scripts/local-services restart-postgres`; nothing
    /// else may be using the cluster).
    pub restart_postgres: Option<PathBuf>,
}

/// One line of the table: a fault, how often it was injected, what came of it.
#[derive(Debug, Clone)]
pub struct Line {
    pub fault: String,
    pub injected: u64,
    pub outcome: String,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub lines: Vec<Line>,
    pub objects: u64,
    pub faults_injected: u64,
    pub lost: u64,
    pub violations: u64,
    pub overwritten: u64,
    pub samples: u64,
    pub live_write_max_ms: u64,
    pub live_write_p99_ms: u64,
    /// What went wrong, for a person (keys lost, rows overwritten...).
    pub problems: Vec<String>,
}

impl Report {
    /// Nothing lost, overwritten or pointing at nothing, and no other problem: a queue left
    /// with messages after every consumer exited by itself, or a consumer that exited non-zero,
    /// fails the run even when the second pass finished the work.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.violations == 0
            && self.overwritten == 0
            && self.faults_injected > 0
            && self.problems.is_empty()
    }

    /// The last line of `scripts/faults`: one JSON object, read by a program.
    pub fn json(&self) -> String {
        serde_json::json!({
            "objects": self.objects,
            "faults_injected": self.faults_injected,
            "lost": self.lost,
            "violations": self.violations,
            "overwritten": self.overwritten,
            "samples": self.samples,
            "live_write_max_ms": self.live_write_max_ms,
            "problems": self.problems.len(),
        })
        .to_string()
    }

    pub fn table(&self) -> String {
        let mut out = format!("{:<58} {:>9}  {}\n", "fault", "injected", "outcome");
        for l in &self.lines {
            out.push_str(&format!("{:<58} {:>9}  {}\n", l.fault, l.injected, l.outcome));
        }
        out
    }
}

/// What the run is doing, on stderr (stdout carries the table and the JSON line).
pub(super) fn say(started: Instant, what: impl std::fmt::Display) {
    eprintln!("faults: {:>6.1}s {what}", started.elapsed().as_secs_f64());
}
