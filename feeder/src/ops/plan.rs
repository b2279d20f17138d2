//! `feeder plan`: what the migration will take, before it runs: objects, bytes, sizes, the
//! requests the feeder and the consumers will make, their cost at list prices, the WAL the row
//! rewrites write, and the time; the same for the verify passes.
//!
//! Promises:
//! - it reads only: a sample of the source listing (runs of consecutive keys from up to 16
//!   points across the key space), or all of it (`--full`), or an inventory report; the row
//!   counts (or the planner's estimate) and the catalog. It writes nothing, anywhere;
//! - every figure says where it comes from: a sample scaled to the object count, a full
//!   listing, a report;
//! - the request counts are the ones the feeder and the consumers make for these objects with
//!   these settings (start-up probes, retries, empty receives and the idle checks aside), as
//!   [`crate::enqueue`] groups messages and the consumer copies: a test compares them with a
//!   run's requests;
//! - the WAL is a range, not a figure: from PostgreSQL's record sizes (no full-page images)
//!   to a full-page image for every page a rewrite touches.

use std::sync::Arc;

use anyhow::Context;
use common::message::ObjectMessage;
use tokio::sync::mpsc;

use super::Ops;
use crate::list::{Lister, Listing};
use crate::settings::{PlanArgs, PlannedCheck};

/// Size classes of the histogram, by their upper bound (exclusive).
const SIZE_CLASSES: [(u64, &str); 5] = [
    (64 << 10, "< 64 KiB"),
    (1 << 20, "64 KiB-1 MiB"),
    (16 << 20, "1-16 MiB"),
    (256 << 20, "16-256 MiB"),
    (u64::MAX, ">= 256 MiB"),
];
/// Points across the key space a sample is taken from.
const SAMPLE_POINTS: usize = 16;
/// S3's limits on a copy in parts (the consumer's `copy::multipart`).
const MIN_PART: i64 = 5 << 20;
const MAX_PART: i64 = 5 << 30;
const MAX_PARTS: i64 = 10_000;
/// A PostgreSQL page, written whole the first time it changes after a checkpoint.
const PAGE: u64 = 8192;

/// What was seen of the objects (a sample, or all of them).
#[derive(Debug, Default, Clone, PartialEq)]
struct Tally {
    objects: u64,
    bytes: u64,
    key_bytes: u64,
    classes: [u64; SIZE_CLASSES.len()],
    /// Objects above the multipart threshold, their parts, and those whose source is itself
    /// a multipart upload (the consumer asks for its first part's size).
    in_parts: u64,
    parts: u64,
    multipart_sources: u64,
    /// As the feeder sends them.
    messages: u64,
    shared_messages: u64,
    send_batches: u64,
}

impl Tally {
    fn add_page(&mut self, page: &[ObjectMessage], args: &PlanArgs, per_message: usize) {
        for object in page {
            let size = object.size.max(0) as u64;
            self.objects += 1;
            self.bytes += size;
            self.key_bytes += object.key.len() as u64;
            let class = SIZE_CLASSES.iter().position(|(below, _)| size < *below).unwrap_or(SIZE_CLASSES.len() - 1);
            self.classes[class] += 1;
            if object.size > args.multipart_threshold {
                self.in_parts += 1;
                self.parts += parts(object.size, args.multipart_part_size);
                self.multipart_sources += u64::from(object.etag.contains('-'));
            }
        }
        let shape = crate::enqueue::shape(page, per_message);
        self.messages += shape.messages;
        self.shared_messages += shape.shared;
        self.send_batches += shape.batches;
    }
}

/// Parts of a copy in parts: the configured size, raised to stay within S3's part count.
fn parts(size: i64, part_size: i64) -> u64 {
    let smallest = (size + MAX_PARTS - 1) / MAX_PARTS;
    let part = part_size.max(smallest).clamp(MIN_PART, MAX_PART);
    ((size + part - 1) / part) as u64
}

/// Requests by what they are billed as.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Requests {
    /// The feeder's `ListObjectsV2`.
    pub s3_list: u64,
    /// `ListObjectsV2` of each message's destinations (`before-copy`).
    pub s3_lookahead_list: u64,
    /// `CopyObject`.
    pub s3_copy: u64,
    /// `CreateMultipartUpload`, `UploadPartCopy`, `CompleteMultipartUpload`.
    pub s3_multipart: u64,
    /// `HeadObject` and `GetObjectTagging` of the sources copied in parts.
    pub s3_head: u64,
    /// `SendMessageBatch`.
    pub sqs_send: u64,
    /// `ReceiveMessage`, at least (ten messages each; empty long polls come on top).
    pub sqs_receive: u64,
    /// `DeleteMessageBatch`, at least (ten messages each).
    pub sqs_delete: u64,
    /// KMS requests S3 makes for SSE-KMS objects without Bucket Keys.
    pub kms: u64,
}

impl Requests {
    pub fn s3_write(&self) -> u64 {
        self.s3_list + self.s3_lookahead_list + self.s3_copy + self.s3_multipart
    }

    pub fn s3_read(&self) -> u64 {
        self.s3_head
    }

    pub fn sqs(&self) -> u64 {
        self.sqs_send + self.sqs_receive + self.sqs_delete
    }

    fn cost(&self, args: &PlanArgs) -> f64 {
        self.s3_write() as f64 * args.price_s3_write / 1e3
            + self.s3_read() as f64 * args.price_s3_read / 1e3
            + self.sqs() as f64 * args.price_sqs / 1e6
            + self.kms as f64 * args.price_kms / 1e4
    }
}

/// The plan, as `--json` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    /// `sample`, `full listing` or `inventory report`.
    pub source: String,
    /// Objects looked at.
    pub looked_at: u64,
    pub objects: u64,
    /// Where the object count comes from.
    pub objects_from: String,
    pub bytes: u64,
    pub sizes: Vec<(String, f64)>,
    pub in_parts_share: f64,
    pub requests: Requests,
    pub cost: f64,
    pub time_s: f64,
    pub rows: u64,
    pub wal_bytes_min: u64,
    pub wal_bytes_max: u64,
    pub verify_passes: u64,
    pub verify_requests: Requests,
    pub verify_cost: f64,
    pub verify_time_s: f64,
}

pub async fn plan(cx: &Ops<'_>, args: &PlanArgs) -> anyhow::Result<Plan> {
    let (tally, source) = look(cx, args).await?;
    anyhow::ensure!(
        tally.objects > 0,
        "no object under s3://{}/{}: nothing to plan",
        cx.mapping.source_bucket,
        cx.mapping.source_prefix
    );
    let counts = counts(cx, args, &tally, &source).await?;
    let plan = estimate(args, &tally, source, counts, cx.settings.run.page_size.max(1) as u64);
    print(&plan, cx);
    if args.json {
        println!("{}", serde_json::to_string(&plan).expect("a plan serializes"));
    }
    Ok(plan)
}

/// The object count, the rows and the indexes on the referencing tables, with where the count comes from.
struct Counts {
    objects: u64,
    objects_from: String,
    rows: u64,
    indexes: u64,
}

async fn counts(cx: &Ops<'_>, args: &PlanArgs, tally: &Tally, source: &str) -> anyhow::Result<Counts> {
    let Ops { settings, clients, mapping, .. } = cx;
    let db = &clients.db;
    // Rows are summed over the references; the objects are at least the legacy rows of any one
    // (two references may name the same objects); every rewrite writes to the indexes of its
    // table (the most indexed table stands for all).
    let (mut rows, mut legacy_rows, mut indexes, mut from) = (0, 0, 0, "the rows naming the source prefix");
    for target in clients.targets.iter() {
        let n = crate::store::rows::index_count(db, target)
            .await
            .with_context(|| format!("reading the indexes of {target}"))?;
        indexes = indexes.max(n as u64);
        let estimate =
            crate::store::rows::estimated_rows(db, target).await.with_context(|| format!("reading {target}'s size"))?;
        match estimate {
            // Past a million rows the planner's estimate (every row) stands in for a count.
            Some(n) if n > 1_000_000 => {
                rows += n as u64;
                legacy_rows = legacy_rows.max(n as u64);
                from = "the planner's estimate of the referencing tables' rows";
            }
            _ => {
                let timeout = settings.database.db_statement_timeout;
                let c = crate::store::rows::count_rows(db, target, mapping, timeout)
                    .await
                    .with_context(|| format!("counting the rows of {target}"))?;
                rows += (c.legacy + c.modern) as u64;
                legacy_rows = legacy_rows.max(c.legacy as u64);
            }
        }
    }
    let rows = (rows, legacy_rows, from);
    let (objects, objects_from) = match (source, args.objects) {
        ("sample", Some(n)) => (n, "--objects".to_owned()),
        ("sample", None) => (rows.1.max(tally.objects), rows.2.to_owned()),
        _ => (tally.objects, source.to_owned()),
    };
    Ok(Counts { objects, objects_from, rows: rows.0.max(objects), indexes })
}

fn estimate(args: &PlanArgs, tally: &Tally, source: String, counts: Counts, page_size: u64) -> Plan {
    let scale = counts.objects as f64 / tally.objects as f64;
    let scaled = |n: u64| (n as f64 * scale).round() as u64;
    let kms = args.sse_kms && !args.bucket_keys;
    let small = tally.objects - tally.in_parts;
    let requests = Requests {
        s3_list: counts.objects.div_ceil(page_size),
        s3_lookahead_list: if args.destination_check == PlannedCheck::BeforeCopy {
            scaled(tally.shared_messages)
        } else {
            0
        },
        s3_copy: scaled(small),
        s3_multipart: scaled(2 * tally.in_parts + tally.parts),
        s3_head: scaled(2 * tally.in_parts + tally.multipart_sources),
        sqs_send: scaled(tally.send_batches),
        sqs_receive: scaled(tally.messages).div_ceil(10),
        sqs_delete: scaled(tally.messages).div_ceil(10),
        kms: if kms { scaled(2 * small + tally.in_parts + tally.parts) } else { 0 },
    };
    let verify_requests = Requests {
        s3_head: counts.rows * args.verify_passes,
        kms: if kms { counts.rows * args.verify_passes } else { 0 },
        ..Requests::default()
    };
    let (wal_bytes_min, wal_bytes_max) = wal(args, tally, &counts);
    let share = |n: u64| n as f64 / tally.objects as f64;
    Plan {
        source,
        looked_at: tally.objects,
        objects: counts.objects,
        objects_from: counts.objects_from,
        bytes: scaled(tally.bytes),
        sizes: SIZE_CLASSES.iter().zip(tally.classes).map(|((_, name), n)| ((*name).to_owned(), share(n))).collect(),
        in_parts_share: share(tally.in_parts),
        cost: requests.cost(args),
        requests,
        time_s: counts.objects as f64 / args.rate.max(f64::MIN_POSITIVE),
        rows: counts.rows,
        wal_bytes_min,
        wal_bytes_max,
        verify_passes: args.verify_passes,
        verify_cost: verify_requests.cost(args),
        verify_requests,
        verify_time_s: (counts.rows * args.verify_passes) as f64 / args.verify_rate.max(f64::MIN_POSITIVE),
    }
}

/// The WAL of the row rewrites, from PostgreSQL's record layout: each rewrite is an update
/// that is never HOT (`path` is indexed), so a new row version and an entry in every index,
/// plus the journal's row and its key; the upper bound adds a full-page image of the heap
/// page and of one page per index, as when every rewrite is the first change of its pages
/// since a checkpoint (a table far larger than a checkpoint interval's writes).
fn wal(args: &PlanArgs, tally: &Tally, counts: &Counts) -> (u64, u64) {
    const RECORD: u64 = 24 + 20; // record header and block reference
    let path = tally.key_bytes / tally.objects.max(1);
    let heap = RECORD + 14 + 5 + 23 + 8 + path + 1;
    let path_index = RECORD + 2 + 8 + path;
    let other_indexes = counts.indexes.saturating_sub(1) * (RECORD + 2 + 8 + 8);
    let journal = if args.rewrite_journal { (RECORD + 3 + 5 + 23 + 16 + 2 * path + 16) + (RECORD + 2 + 16) } else { 0 };
    let per_row = heap + path_index + other_indexes + journal;
    let pages = 1 + counts.indexes.max(1);
    let rewrites = counts.objects;
    (rewrites * per_row, rewrites * (per_row + pages * PAGE))
}

/// Looks at the objects: a sample, all of them (`--full`), or an inventory report.
async fn look(cx: &Ops<'_>, args: &PlanArgs) -> anyhow::Result<(Tally, String)> {
    let Ops { settings, clients, mapping, .. } = cx;
    let run = &settings.run;
    let lister = Arc::new(Lister {
        s3: clients.s3.clone(),
        bucket: mapping.source_bucket.clone(),
        prefix: mapping.source_prefix.as_str().to_owned(),
        page_size: run.page_size,
    });
    let per_message = run.objects_per_message.into();
    let mut tally = Tally::default();
    if run.inventory.is_none() && !args.full {
        sample(&lister, args, per_message, &mut tally).await?;
        return Ok((tally, "sample".to_owned()));
    }
    let (tx, mut pages) = mpsc::channel(4);
    let tasks: Vec<_> = match &run.inventory {
        Some(location) => {
            let manifest = Arc::new(crate::inventory::read_manifest(&clients.s3, location, &lister.bucket).await?);
            (0..manifest.files.len())
                .map(|i| {
                    let (s3, prefix) = (clients.s3.clone(), lister.prefix.clone());
                    let page = run.page_size as usize;
                    crate::inventory::spawn(s3, manifest.clone(), i, prefix, 0, page, tx.clone(), cx.shutdown.clone())
                })
                .collect()
        }
        None => crate::ranges::plan(&lister, None, run.list_ranges.into())
            .await?
            .into_iter()
            .enumerate()
            .map(|(i, r)| lister.clone().spawn(i, (r.after, r.until), tx.clone(), cx.shutdown.clone()))
            .collect(),
    };
    drop(tx);
    let mut unfinished = tasks.len();
    while let Some((_, item)) = pages.recv().await {
        match item? {
            Listing::Page { objects, .. } => tally.add_page(&objects, args, per_message),
            Listing::Complete => unfinished -= 1,
        }
    }
    anyhow::ensure!(unfinished == 0, "the listing stopped before its end (interrupted)");
    let source = if run.inventory.is_some() { "inventory report" } else { "full listing" };
    Ok((tally, source.to_owned()))
}

/// Runs of consecutive keys from up to [`SAMPLE_POINTS`] points across the key space.
async fn sample(lister: &Arc<Lister>, args: &PlanArgs, per_message: usize, tally: &mut Tally) -> anyhow::Result<()> {
    let ranges = crate::ranges::plan(lister, None, SAMPLE_POINTS).await?;
    let per_range = args.sample.div_ceil(ranges.len() as u64);
    for range in ranges {
        let (mut after, mut token, mut taken) = (range.after, None::<String>, 0u64);
        while taken < per_range {
            let want = (per_range - taken).min(1000) as i32;
            let (mut objects, next) = common::listing::page(
                &lister.s3,
                &lister.bucket,
                &lister.prefix,
                token.as_deref(),
                after.as_deref(),
                want,
            )
            .await?;
            let past = range.until.as_deref().and_then(|until| objects.iter().position(|o| o.key.as_str() > until));
            if let Some(past) = past {
                objects.truncate(past);
            }
            taken += objects.len() as u64;
            tally.add_page(&objects, args, per_message);
            if past.is_some() || next.is_none() || objects.is_empty() {
                break;
            }
            (token, after) = (next, objects.last().map(|o| o.key.clone()));
        }
    }
    Ok(())
}

fn print(plan: &Plan, cx: &Ops<'_>) {
    let r = &plan.requests;
    let (bucket, prefix) = (&cx.mapping.source_bucket, cx.mapping.source_prefix.as_str());
    println!(
        "plan: s3://{bucket}/{prefix}, from a {} of {} objects; {} objects ({}), {}",
        plan.source,
        plan.looked_at,
        plan.objects,
        plan.objects_from,
        bytes(plan.bytes)
    );
    let sizes: Vec<String> = plan.sizes.iter().map(|(name, share)| format!("{name} {:.1} %", share * 100.0)).collect();
    println!("sizes:    {}; copied in parts {:.2} %", sizes.join(", "), plan.in_parts_share * 100.0);
    println!(
        "requests: S3 {} PUT/COPY/POST/LIST ({} listing, {} destination listings, {} copies, {} in parts) and {} \
         GET/HEAD; SQS at least {} ({} sends); KMS {}",
        r.s3_write(),
        r.s3_list,
        r.s3_lookahead_list,
        r.s3_copy,
        r.s3_multipart,
        r.s3_read(),
        r.sqs(),
        r.sqs_send,
        r.kms
    );
    println!("cost:     ${:.2} at the given prices (docs/planning.md)", plan.cost);
    println!(
        "WAL:      {} to {} for {} row rewrites (full-page images for every page touched at most)",
        bytes(plan.wal_bytes_min),
        bytes(plan.wal_bytes_max),
        plan.objects
    );
    println!("time:     {} at the given rate", duration(plan.time_s));
    println!(
        "verify:   {} passes over {} rows: {} HEADs, KMS {}, ${:.2}, {}",
        plan.verify_passes,
        plan.rows,
        plan.verify_requests.s3_head,
        plan.verify_requests.kms,
        plan.verify_cost,
        duration(plan.verify_time_s)
    );
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn duration(secs: f64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(secs.round() as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_in_parts_stays_within_s3s_part_limits() {
        assert_eq!(parts(6 << 30, 512 << 20), 12);
        assert_eq!(parts(6 << 20, 1 << 20), 2, "parts of at least 5 MiB");
        // 5 TiB in parts of 5 MiB would be a million parts: raised to stay within 10,000.
        assert!(parts(5 << 40, MIN_PART) <= MAX_PARTS as u64);
    }
}
