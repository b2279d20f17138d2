//! The consumer's CloudWatch metrics (`CLOUDWATCH_NAMESPACE`, written by [`common::emf`]):
//! what it moved, set aside, was refused and rewrote since the last line. The stack's alarms
//! (a failure spike, refusals) read them.

use crate::metrics::Stats;

/// The metrics, each with the exit summary's counter it is the difference of.
pub(crate) const METRICS: [common::emf::Metric<Stats>; 5] = [
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lines_count_what_the_summary_counts() {
        let stats = Stats::default();
        let mut last = [0; METRICS.len()];
        stats.copied.inc_by(3);
        stats.already_present.inc();
        stats.count_set_aside("access_denied");
        stats.count_set_aside("source_missing");
        let line: serde_json::Value =
            serde_json::from_str(&common::emf::line("n", &METRICS, &stats, &mut last)).unwrap();
        assert_eq!((line["ObjectsMoved"].as_u64(), line["ObjectsSetAside"].as_u64()), (Some(4), Some(2)));
        assert_eq!(line["Refusals"], 1);
    }
}
