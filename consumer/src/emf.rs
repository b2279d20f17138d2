//! CloudWatch metrics from the logs (`CLOUDWATCH_NAMESPACE`): once a minute, and once at the
//! end, one line on stdout in CloudWatch's embedded metric format, which CloudWatch Logs turns
//! into metrics of that namespace with no API call and no grant: what this consumer did since
//! the last line. The stack's alarms (a failure spike, refusals) read them.
//!
//! Promises: each count is a difference of the counters the exit summary prints (one set of
//! counters, not two), so the lines of a run add up to its summary; a line is written whole
//! (one `println!`), never interleaved with another.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::metrics::Stats;

/// How often a line is written.
pub(crate) const EVERY: Duration = Duration::from_secs(60);

/// Reads one counter.
type Read = fn(&Stats) -> u64;

/// The metrics, each with the counter it is the difference of.
const METRICS: [(&str, Read); 5] = [
    ("ObjectsMoved", |s| s.copied.get() + s.already_present.get()),
    ("ObjectsSetAside", |s| s.set_aside.get()),
    ("Refusals", |s| s.refusals()),
    ("RowsRewritten", |s| s.rows_rewritten.get()),
    ("CopiesSlowedDown", |s| s.copies_slowed_down.get()),
];

/// The metrics' names, as the lines give them.
pub fn names() -> impl Iterator<Item = &'static str> {
    METRICS.iter().map(|(name, _)| *name)
}

/// Writes a line every [`EVERY`] until `stop`, then a last one.
pub(crate) async fn run(namespace: String, stats: Arc<Stats>, stop: CancellationToken) {
    let mut last = [0u64; METRICS.len()];
    let mut tick = tokio::time::interval(EVERY);
    tick.tick().await; // the first tick is immediate: nothing done yet
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.cancelled() => true,
        };
        println!("{}", line(&namespace, &stats, &mut last));
        if stopping {
            return;
        }
    }
}

/// One line of the embedded metric format: the counts since `last`, which it moves on.
pub(crate) fn line(namespace: &str, stats: &Stats, last: &mut [u64; METRICS.len()]) -> String {
    let millis = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut line = serde_json::json!({
        "_aws": {
            "Timestamp": millis,
            "CloudWatchMetrics": [{
                "Namespace": namespace,
                "Dimensions": [[]],
                "Metrics": names().map(|name| serde_json::json!({"Name": name, "Unit": "Count"})).collect::<Vec<_>>(),
            }],
        },
    });
    for ((name, read), previous) in METRICS.iter().zip(last.iter_mut()) {
        let now = read(stats);
        line[*name] = now.saturating_sub(*previous).into();
        *previous = now;
    }
    line.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_holds_what_was_done_since_the_last() {
        let stats = Stats::default();
        let mut last = [0; METRICS.len()];
        stats.copied.inc_by(3);
        stats.already_present.inc();
        stats.count_set_aside("access_denied");
        stats.count_set_aside("source_missing");
        let first: serde_json::Value = serde_json::from_str(&line("AvatarMigration/test", &stats, &mut last)).unwrap();
        assert_eq!(first["_aws"]["CloudWatchMetrics"][0]["Namespace"], "AvatarMigration/test");
        let names: Vec<&str> = first["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["ObjectsMoved", "ObjectsSetAside", "Refusals", "RowsRewritten", "CopiesSlowedDown"]);
        assert_eq!((first["ObjectsMoved"].as_u64(), first["ObjectsSetAside"].as_u64()), (Some(4), Some(2)));
        assert_eq!(first["Refusals"], 1);
        assert!(first["_aws"]["Timestamp"].as_u64().unwrap() > 1_700_000_000_000, "milliseconds since the epoch");
        stats.copied.inc();
        let second: serde_json::Value = serde_json::from_str(&line("n", &stats, &mut last)).unwrap();
        assert_eq!((second["ObjectsMoved"].as_u64(), second["ObjectsSetAside"].as_u64()), (Some(1), Some(0)));
    }
}
