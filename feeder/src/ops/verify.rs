//! `feeder verify`: is the migration done? Every row of every reference (`REFERENCES`) must
//! resolve (name an object that exists), and no row may still name a legacy object unless it
//! was set aside with a reason (`feeder failures`).
//!
//! Promises: rows are read reference by reference, in key order, in pages (no long
//! transaction, no lock), and objects are only HEADed. A pass is resumable: its position (the
//! reference and the last row key decided) and its counts are saved after each page, and a run
//! after an interrupted pass goes on from there; a run after a finished pass starts a new one.
//! An interrupted pass is never "done". Writes only failure records: every row whose legacy
//! object is missing is recorded (`row_object_missing`) so the operator can list it. The
//! answer is "done" only when nothing unresolved and nothing pending is left; a sample of
//! pending rows is printed. A value of another form, a NULL or another prefix is counted as
//! "another prefix", not checked.

use futures::{StreamExt, TryStreamExt};

use super::Ops;
use super::{ROWS_PAGE, Side, Unnamed, classify, unnamed};
use crate::settings::VerifyArgs;
use common::db::keyset::Keyset;
use common::db::{Reason, Target, Targets};
use common::identity::head_etag;

use crate::store::scans::{self, ScanKind, ScanPosition};

/// Pending rows printed at most.
const SAMPLE: usize = 10;

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Verification {
    pub rows: u64,
    pub modern: u64,
    pub legacy: u64,
    pub other_prefix: u64,
    /// Of those: NULL or empty values, and values not in the column's form (the rest are of
    /// its form, under neither prefix).
    pub other_empty: u64,
    pub other_form: u64,
    /// Rows with a legacy or modern path that names no existing object (rows with another
    /// prefix are counted in `other_prefix`, not checked).
    pub unresolved: u64,
    /// Of those, legacy rows whose object is missing (recorded for the operator).
    pub legacy_missing: u64,
    /// Legacy rows that resolve and were set aside with a reason (a conflict, access denied...).
    pub legacy_set_aside: u64,
    /// Legacy rows that resolve and were never set aside: the migration has not reached them
    /// (a lost or expired message, a row written after its key was processed). `feeder
    /// reconcile` enqueues them.
    pub legacy_pending: u64,
    /// Some of the pending rows: (reference and row key, value).
    pub pending_rows: Vec<(String, String)>,
    /// Rows whose object could not be looked at (a HEAD refused or failing: an SSE-KMS object
    /// without the grant, say): counted and sampled, not the end of the run; they are neither
    /// resolved nor unresolved, and the run is not done while any is left.
    pub errors: u64,
    /// Some of them: (reference and row key, value, error).
    pub error_rows: Vec<(String, String, String)>,
    /// With `--objects`: what the object check found.
    #[serde(skip)]
    pub objects: Option<super::objects::ObjectCheck>,
    /// The pass went through every row (not stopped by a signal).
    #[serde(skip)]
    pub complete: bool,
    /// The row this run resumed after (an interrupted pass), if it did: reference and key.
    #[serde(skip)]
    pub resumed_after: Option<String>,
}

impl Verification {
    pub fn all_resolve(&self) -> bool {
        self.unresolved == 0
    }

    /// Every row resolves and none is left legacy without a recorded reason; with `--objects`,
    /// also every legacy object checked has its copy with the same bytes, and the check went
    /// through the whole prefix (an interrupted check is not an answer; a sample answers for
    /// what it checked).
    pub fn is_done(&self) -> bool {
        self.complete
            && self.unresolved == 0
            && self.legacy_pending == 0
            && self.errors == 0
            && self.objects.as_ref().is_none_or(|o| o.all_copied() && (o.scan.finished || o.sample))
    }

    /// One JSON object, for programs (`--json`).
    pub fn json(&self) -> String {
        let mut json = serde_json::json!({
            "rows_checked": self.rows,
            "rows_modern": self.modern,
            "rows_legacy": self.legacy,
            "rows_other": self.other_prefix,
            "rows_other_empty": self.other_empty,
            "rows_other_form": self.other_form,
            "rows_unresolvable": self.unresolved,
            "rows_legacy_missing": self.legacy_missing,
            "rows_legacy_set_aside": self.legacy_set_aside,
            "rows_legacy_pending": self.legacy_pending,
            "rows_error": self.errors,
            "done": self.is_done(),
        });
        if let Some(o) = &self.objects {
            let c = &o.scan.counts;
            json["legacy_objects"] = c.objects.into();
            json["legacy_missing_copy"] = c.missing_copy.into();
            json["conflicts"] = c.conflicts.into();
            json["unproven"] = c.unproven.into();
            json["objects_complete"] = (o.scan.finished && !o.sample).into();
        }
        json.to_string()
    }
}

/// One row's check: where its value points, and whether that object exists (not looked up
/// for another prefix or form), or why that could not be told.
struct RowCheck {
    /// The row's key and reference, as printed: `row 42 of public.avatars.path`.
    row: String,
    value: String,
    /// The key the value names (legacy or modern side).
    key: Option<String>,
    side: Side,
    /// Why a value of another side names nothing of the migration's.
    unnamed: Option<Unnamed>,
    exists: Result<bool, String>,
}

/// Checks one row. An error about every object (a bucket gone, credentials refused) ends the
/// run; one about this object (refused, failing after the SDK's retries) is the row's answer.
async fn resolve(cx: &Ops<'_>, target: &Target, row_key: String, value: Option<String>) -> anyhow::Result<RowCheck> {
    let Ops { clients, mapping, .. } = cx;
    let (side, key) = classify(value.as_deref(), &target.reference.form, mapping);
    let row = format!("row {row_key} of {target}");
    let (bucket, object) = match (side, &key) {
        (Side::Modern, Some(key)) => (&mapping.destination_bucket, key),
        (Side::Legacy, Some(key)) => (&mapping.source_bucket, key),
        _ => {
            let unnamed = Some(unnamed(value.as_deref(), &target.reference.form, mapping));
            let value = value.unwrap_or_default();
            return Ok(RowCheck { row, value, key, side: Side::Other, unnamed, exists: Ok(false) });
        }
    };
    let value = value.unwrap_or_default();
    let exists = match head_etag(&clients.s3, bucket, object).await {
        Ok(etag) => Ok(etag.is_some()),
        Err(err) if err.for_object() == common::aws::ErrorClass::Fatal => return Err(err.into()),
        Err(err) => Err(err.to_string()),
    };
    Ok(RowCheck { row, value, key, side, unnamed: None, exists })
}

impl Verification {
    /// Counts one row's check; `recorded`: the legacy keys a failure record stands for. A
    /// legacy row whose object is missing is recorded (`row_object_missing`).
    async fn count(
        &mut self,
        cx: &Ops<'_>,
        check: &RowCheck,
        recorded: &std::collections::HashSet<String>,
    ) -> anyhow::Result<()> {
        let Ops { clients, mapping, .. } = cx;
        let RowCheck { row, value, key, side, unnamed, exists } = check;
        self.rows += 1;
        let exists = match exists {
            Ok(exists) => exists,
            Err(why) => {
                self.errors += 1;
                tracing::warn!(row, value, error = %why, "cannot look at the row's object");
                if self.error_rows.len() < SAMPLE {
                    self.error_rows.push((row.clone(), value.clone(), why.clone()));
                }
                return Ok(());
            }
        };
        let key = key.as_deref().unwrap_or_default();
        match side {
            Side::Modern => self.modern += 1,
            Side::Legacy => self.legacy += 1,
            Side::Other => {
                self.other_prefix += 1;
                match unnamed {
                    Some(Unnamed::Empty) => self.other_empty += 1,
                    Some(Unnamed::OtherForm) => self.other_form += 1,
                    _ => {}
                }
            }
        }
        match (side, exists) {
            (Side::Other, _) => {}
            (Side::Modern, true) => {}
            (Side::Modern, false) => {
                self.unresolved += 1;
                tracing::warn!(row, value, "row does not resolve to an object");
            }
            (Side::Legacy, false) => {
                self.unresolved += 1;
                self.legacy_missing += 1;
                tracing::warn!(row, value, "row does not resolve to an object");
                common::db::record_failure(
                    &clients.db,
                    key,
                    Reason::RowObjectMissing,
                    &format!("{row} points at s3://{}/{key}, which does not exist", mapping.source_bucket),
                )
                .await?;
            }
            (Side::Legacy, true) if recorded.contains(key) => self.legacy_set_aside += 1,
            (Side::Legacy, true) => {
                self.legacy_pending += 1;
                if self.pending_rows.len() < SAMPLE {
                    self.pending_rows.push((row.clone(), value.clone()));
                }
            }
        }
        Ok(())
    }
}

/// Starts requests at most `rate` a second, evenly, whatever the concurrency.
struct Spacing {
    gap: std::time::Duration,
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl Spacing {
    fn new(rate: std::num::NonZeroUsize) -> Self {
        let gap = std::time::Duration::from_secs_f64(1.0 / rate.get() as f64);
        Self { gap, next: tokio::sync::Mutex::new(tokio::time::Instant::now()) }
    }

    /// Waits for this request's turn.
    async fn wait(&self) {
        let turn = {
            let mut next = self.next.lock().await;
            let turn = (*next).max(tokio::time::Instant::now());
            *next = turn + self.gap;
            turn
        };
        tokio::time::sleep_until(turn).await;
    }
}

/// Where a pass stands, as saved: the reference and the last row key decided.
#[derive(serde::Serialize, serde::Deserialize)]
struct Position {
    reference: String,
    after: String,
}

/// The reference (its index) and row key a saved pass goes on after; an earlier version saved
/// the row id of `avatars.path` alone. A reference no longer named starts the pass over.
fn position(targets: &Targets, saved: Option<&str>) -> (usize, Option<String>) {
    let Some(saved) = saved else { return (0, None) };
    let (label, key) = match serde_json::from_str::<Position>(saved) {
        Ok(Position { reference, after }) => (Some(reference), after),
        Err(_) => (None, saved.to_owned()),
    };
    match targets.iter().position(|t| Some(t) == targets.by_label(label.as_deref())) {
        Some(i) => (i, Some(key)),
        None => (0, None),
    }
}

/// Checks every row of every reference; see the module documentation.
pub async fn verify(cx: &Ops<'_>, args: &VerifyArgs) -> anyhow::Result<Verification> {
    let Ops { clients, mapping, shutdown, .. } = cx;
    let (bucket, prefix) = (mapping.source_bucket.as_str(), mapping.source_prefix.as_str());
    let mut pass = match scans::load::<Verification>(&clients.db, ScanKind::VerifyRows, bucket, prefix).await? {
        Some(saved) if !saved.finished => saved,
        _ => ScanPosition::default(),
    };
    let (first, after) = position(&clients.targets, pass.last_key.as_deref());
    let mut result = if after.is_some() { std::mem::take(&mut pass.counts) } else { Verification::default() };
    let targets: Vec<&Target> = clients.targets.iter().collect();
    result.resumed_after = after.as_ref().map(|key| format!("row {key} of {}", targets[first]));
    result.complete = true;
    let spacing = args.rate.map(Spacing::new);
    let mut after = after;
    'targets: for target in &targets[first..] {
        let mut pages = Keyset::after(after.take());
        let table = |after| crate::store::rows::rows_after(&clients.db, target, after, ROWS_PAGE);
        while let Some(rows) = pages.next(table, |(key, _)| Some(key.clone())).await? {
            let last = rows.last().map(|(key, _)| key.clone());
            let spacing = spacing.as_ref();
            let checks = futures::stream::iter(rows.into_iter().map(|(key, value)| async move {
                if let Some(spacing) = spacing {
                    spacing.wait().await;
                }
                resolve(cx, target, key, value).await
            }))
            .buffer_unordered(args.concurrency.get())
            .try_collect::<Vec<_>>()
            .await?;
            let legacy_keys: Vec<&str> = checks
                .iter()
                .filter(|c| c.side == Side::Legacy && c.exists == Ok(true))
                .filter_map(|c| c.key.as_deref())
                .collect();
            let recorded = super::standing::standing(clients, mapping, &legacy_keys, args.concurrency.get()).await?;
            for check in &checks {
                result.count(cx, check, &recorded).await?;
            }
            pass.last_key = last.map(|after| {
                serde_json::to_string(&Position { reference: target.label(), after }).expect("strings serialize")
            });
            pass.counts = result.clone();
            scans::save(&clients.db, ScanKind::VerifyRows, bucket, prefix, &pass).await?;
            if shutdown.is_cancelled() {
                result.complete = false;
                break 'targets;
            }
        }
    }
    if result.complete {
        pass.finished = true;
        pass.counts = result.clone();
        scans::save(&clients.db, ScanKind::VerifyRows, bucket, prefix, &pass).await?;
    }
    if args.objects && result.complete {
        result.objects = Some(super::objects::check(cx, args).await?);
    }
    print_report(&result);
    if args.json {
        println!("{}", result.json());
    }
    Ok(result)
}

fn print_report(r: &Verification) {
    if let Some(row) = &r.resumed_after {
        println!("verify: went on after {row}, where an interrupted pass stopped (its counts included)");
    }
    println!(
        "verify: {} rows: {} modern, {} legacy, {} naming nothing of the migration's, not checked ({} NULL or \
         empty, {} not in the column's form, {} with another prefix); {} resolve, {} do not ({} legacy rows whose \
         object is missing, recorded as row_object_missing)",
        r.rows,
        r.modern,
        r.legacy,
        r.other_prefix,
        r.other_empty,
        r.other_form,
        r.other_prefix - r.other_empty - r.other_form,
        r.modern + r.legacy - r.unresolved,
        r.unresolved,
        r.legacy_missing,
    );
    println!(
        "verify: legacy rows: {} set aside with a reason (feeder failures), {} not migrated yet",
        r.legacy_set_aside, r.legacy_pending
    );
    for (row, value) in &r.pending_rows {
        println!("verify: not migrated yet: {row} {value:?}");
    }
    if r.errors > 0 {
        println!("verify: {} rows whose object could not be looked at (not counted above):", r.errors);
        for (row, value, why) in &r.error_rows {
            println!("verify: cannot look at {row} {value:?}: {why}");
        }
    }
    if !r.complete {
        println!("verify: interrupted: run verify again to go on from where it stopped");
    } else if r.is_done() {
        println!("verify: done: every row resolves and no legacy row is left without a reason");
    } else if r.legacy_pending > 0 {
        println!(
            "verify: not done: run `feeder reconcile` to enqueue the {} legacy rows not migrated yet, let the \
             consumers drain the queue, then verify again",
            r.legacy_pending
        );
    } else if r.unresolved > 0 {
        println!("verify: not done: rows that do not resolve need a person (feeder failures)");
    } else {
        println!(
            "verify: not done: rows whose object could not be looked at; fix what refused them, then verify again"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::Verification;
    use crate::ops::objects::{Counts, ObjectCheck};
    use crate::store::scans::ScanPosition;

    #[test]
    fn an_unfinished_object_check_is_not_done() {
        let rows_checked = Verification { complete: true, ..Verification::default() };
        let with = |objects| Verification { objects: Some(objects), ..rows_checked.clone() };
        let check =
            |counts, finished, sample| ObjectCheck { scan: ScanPosition { last_key: None, counts, finished }, sample };
        let objects = |objects| Counts { objects, ..Counts::default() };
        assert!(rows_checked.is_done());
        assert!(!Verification::default().is_done(), "a pass over the rows that did not finish");
        assert!(with(check(objects(10), true, false)).is_done());
        assert!(!with(check(objects(10), false, false)).is_done(), "interrupted");
        assert!(with(check(objects(5), false, true)).is_done());
        assert!(!with(check(Counts { missing_copy: 1, ..Counts::default() }, true, false)).is_done());
    }
}
