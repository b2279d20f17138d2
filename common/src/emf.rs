//! CloudWatch metrics from the logs (`CLOUDWATCH_NAMESPACE`): once a minute, and once at the
//! end, one line on stdout in CloudWatch's embedded metric format, which CloudWatch Logs turns
//! into metrics of that namespace with no API call and no grant: what the process did since
//! the last line. The stack's alarms read them.
//!
//! Promises: each count is a difference of a counter the process keeps anyway (one set of
//! counters, not two), so the lines of a run add up to its summary; a line is written whole
//! (one `println!`), never interleaved with another.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

/// How often a line is written.
pub const EVERY: Duration = Duration::from_secs(60);

/// A metric: its name, and how to read the counter it is the difference of.
pub type Metric<T> = (&'static str, fn(&T) -> u64);

/// Writes a line every [`EVERY`] until `stop`, then a last one.
pub async fn run<T>(namespace: String, metrics: &'static [Metric<T>], counters: Arc<T>, stop: CancellationToken) {
    let mut last = vec![0u64; metrics.len()];
    let mut tick = tokio::time::interval(EVERY);
    tick.tick().await; // the first tick is immediate: nothing done yet
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.cancelled() => true,
        };
        println!("{}", line(&namespace, metrics, &counters, &mut last));
        if stopping {
            return;
        }
    }
}

/// One line of the embedded metric format: the counts since `last`, which it moves on.
pub fn line<T>(namespace: &str, metrics: &[Metric<T>], counters: &T, last: &mut [u64]) -> String {
    let millis = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut line = serde_json::json!({
        "_aws": {
            "Timestamp": millis,
            "CloudWatchMetrics": [{
                "Namespace": namespace,
                "Dimensions": [[]],
                "Metrics": metrics.iter().map(|(name, _)| serde_json::json!({"Name": name, "Unit": "Count"})).collect::<Vec<_>>(),
            }],
        },
    });
    for ((name, read), previous) in metrics.iter().zip(last.iter_mut()) {
        let now = read(counters);
        line[*name] = now.saturating_sub(*previous).into();
        *previous = now;
    }
    line.to_string()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    use super::*;

    #[derive(Default)]
    struct Counters {
        done: AtomicU64,
        failed: AtomicU64,
    }

    const METRICS: [Metric<Counters>; 2] = [("Done", |c| c.done.load(Relaxed)), ("Failed", |c| c.failed.load(Relaxed))];

    #[test]
    fn a_line_holds_what_was_done_since_the_last() {
        let counters = Counters::default();
        let mut last = [0; 2];
        counters.done.fetch_add(4, Relaxed);
        counters.failed.fetch_add(2, Relaxed);
        let first: serde_json::Value =
            serde_json::from_str(&line("AvatarMigration/test", &METRICS, &counters, &mut last)).unwrap();
        let metrics = &first["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(metrics["Namespace"], "AvatarMigration/test");
        let names: Vec<&str> =
            metrics["Metrics"].as_array().unwrap().iter().map(|m| m["Name"].as_str().unwrap()).collect();
        assert_eq!(names, ["Done", "Failed"]);
        assert_eq!((first["Done"].as_u64(), first["Failed"].as_u64()), (Some(4), Some(2)));
        assert!(first["_aws"]["Timestamp"].as_u64().unwrap() > 1_700_000_000_000, "milliseconds since the epoch");
        counters.done.fetch_add(1, Relaxed);
        let second: serde_json::Value = serde_json::from_str(&line("n", &METRICS, &counters, &mut last)).unwrap();
        assert_eq!((second["Done"].as_u64(), second["Failed"].as_u64()), (Some(1), Some(0)));
    }
}
