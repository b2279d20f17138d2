//! The feeder's settings: flags and environment variables of the same name.

use std::num::NonZeroUsize;

use clap::{Parser, Subcommand};
use common::settings::{DatabaseArgs, QueueArgs, StorageArgs};

/// Feeds the migration: lists every object under SOURCE_PREFIX and enqueues one message per
/// object for the consumers, checkpointing in PostgreSQL so that a restart resumes where it
/// stopped. Also the operator's entry point: `status`, `verify`, `reconcile`, `failures`.
///
/// Every option is also an environment variable (shown in brackets); a `.env` file in the
/// working directory is read first.
#[derive(Parser, Debug, Clone)]
#[command(name = "feeder", version)]
pub struct Settings {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub storage: StorageArgs,

    #[command(flatten)]
    pub queue: QueueArgs,

    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub run: RunArgs,

    /// The database's health, which `rollback` and `cleanup` wait on between pages.
    #[command(flatten)]
    pub health: common::health::HealthArgs,

    /// How long start-up waits, in all, for a service that is not available yet (PostgreSQL
    /// refusing connections, restarting or failing over; S3 or SQS not answering or answering
    /// 5xx), asking again with a warning each time; e.g. `60s`. 0 (the default, for commands
    /// run by hand): ask once and say what is wrong. A refusal for good (a wrong password, a
    /// missing bucket, queue or table, a refused grant) exits 2 at once, whatever this says.
    #[arg(long, env = "STARTUP_WAIT", default_value = "0s", value_parser = humantime::parse_duration, global = true)]
    pub startup_wait: std::time::Duration,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// List the source prefix and enqueue every object (the default). Exits 0 with a summary.
    Run,
    /// Show the listing checkpoint, the queue and dead-letter queue depths, how many rows are
    /// legacy or modern, the failures recorded so far, rows rewritten per second over the last
    /// five minutes (from the rewrite journal) and an ETA. Rows are counted (one scan, also
    /// with --watch) up to --exact-max-rows, estimated past it unless --exact.
    Status(StatusArgs),
    /// Estimate the migration before it runs, from a sample of the source prefix (or the whole
    /// listing with --full, or INVENTORY_MANIFEST's report): objects, bytes, sizes (the share
    /// copied in parts), requests by type, their cost at list prices, the WAL the row rewrites
    /// write, and the time at a given rate; the same for the verify passes. Reads S3 and the
    /// database's catalog; writes nothing.
    Plan(PlanArgs),
    /// Check that the migration is done: every row's path names an existing object, and no
    /// row still points at the legacy prefix unless it was set aside with a reason. Rows
    /// pointing at a missing legacy object are recorded (reason row_object_missing); a row whose
    /// object cannot be looked at is counted and the pass goes on. Resumable: the position is
    /// saved after each page of rows, and a run after an interrupted pass goes on from there.
    /// Exit 0 when done, 3 when not (a sample of the rows left is printed).
    Verify(VerifyArgs),
    /// Enqueue every legacy row not migrated yet (and not set aside with a reason), so that
    /// the consumers finish the job: the second pass after a lost or expired message or a row
    /// written late. The plan ends with verify -> reconcile -> (consumers drain) -> verify.
    Reconcile(ReconcileArgs),
    /// List what was set aside for the operator: source missing, destination conflict,
    /// malformed message, rows whose object is missing, ... Streamed, one per line.
    Failures(FailuresArgs),
    /// What was moved (from the rewrite journal: row id, old path, new path, when) and what
    /// was set aside, with reasons: totals, or every record with --csv.
    Report(ReportArgs),
    /// Point the rows the migration rewrote back at their legacy paths (from the rewrite
    /// journal), compare-and-set: only rows whose path is still the one the migration wrote,
    /// only while their legacy object exists and is not being deleted (no tombstone), and only
    /// while the copy they name still holds the legacy bytes (a new upload at the same key is
    /// kept). Refuses while the queue holds messages (stop the consumers and purge it first);
    /// runs alone (a lease: no cleanup and no consumer deleting sources meanwhile).
    /// Destination objects are left in place.
    Rollback(RollbackArgs),
    /// Delete legacy objects that are safely moved: only when their copy has the same bytes and
    /// no row references the legacy path, by the delete protocol (tombstones, a wait for older
    /// transactions, a second check, a delete conditional on the ETag). Needs the fence (`fence
    /// install`) or --legacy-writes-stopped; runs alone (a lease: no rollback, no other cleanup
    /// and no consumer deleting sources meanwhile). Without --yes, a dry run that lists and
    /// counts.
    Cleanup(CleanupArgs),
    /// The fence that keeps deletes safe while the live service writes the references
    /// (REFERENCES): install, remove, status.
    #[command(subcommand)]
    Fence(FenceCommand),
    /// Stop every consumer taking messages, within seconds (objects in flight finish; their
    /// messages wait in the queue), until `resume`. Shown by `status` and the consumers'
    /// metrics.
    Pause,
    /// Let the consumers take messages again after `pause`.
    Resume,
    /// Cap the copies per second of the whole fleet, shared between the consumers running
    /// (each paces itself at the cap over their number), or lift the cap (`--clear`). Takes
    /// effect within seconds, whatever the service scales to.
    Throttle(ThrottleArgs),
    /// Move the dead-letter queue's messages back to the queue, once what made them fail is
    /// fixed (their keys' retries_exhausted records are forgotten as they are retried).
    Redrive(RedriveArgs),
    /// Print, for each reference (REFERENCES), the SQL that gives the migration's role what it
    /// needs: the index on the column where there is none, planner statistics, and the grants
    /// (the schema, reading the column and the key, updating the column, the fence's trigger).
    /// Run it with psql as the tables' owner, after deploy/database-role.sql has made the role.
    /// Reads the catalog and writes nothing; connects to the database only (no bucket or queue
    /// is looked at).
    Grants(GrantsArgs),
}

/// Options of `grants`.
#[derive(clap::Args, Debug, Clone)]
pub struct GrantsArgs {
    /// The role the feeder and the consumers log in as.
    #[arg(long, default_value = "avatar_migrator")]
    pub role: String,
}

/// Options of `throttle`.
#[derive(clap::Args, Debug, Clone)]
pub struct ThrottleArgs {
    /// Copies per second for the whole fleet.
    #[arg(long, env = "MAX_COPIES_PER_SECOND", required_unless_present = "clear", conflicts_with = "clear", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Lift the cap: each consumer goes as fast as S3 lets it.
    #[arg(long)]
    pub clear: bool,
}

fn parse_rate(s: &str) -> anyhow::Result<f64> {
    match s.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => anyhow::bail!("{s:?} is not a number of copies per second above 0"),
    }
}

/// Options of `run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Keys per ListObjectsV2 page (1-1000). The checkpoint is saved after each fully enqueued
    /// page, so a restart repeats at most one page.
    #[arg(long, env = "PAGE_SIZE", default_value = "1000", value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub page_size: i32,

    /// Objects per queue message (1-100; a message also stays within 64 KiB). More objects per
    /// message mean fewer SQS requests and a shallower queue; a message comes back whole when
    /// one of its objects must be retried, and its other objects are then found done.
    #[arg(long, env = "OBJECTS_PER_MESSAGE", default_value = "10", value_parser = clap::value_parser!(u16).range(1..=100))]
    pub objects_per_message: u16,

    /// Key ranges listed at once (1-256). The first run with more than one splits the source
    /// prefix at prefixes it finds by asking S3 (a few hundred one-key listings at most) and
    /// saves the ranges; each range keeps its own checkpoint, and a later run resumes the
    /// saved ranges whatever this says (`RESTART` plans them again). Listing is one request per
    /// PAGE_SIZE keys, one after the other within a range: at 300 M keys, use 16 or more.
    #[arg(long, env = "LIST_RANGES", default_value = "1", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub list_ranges: u16,

    /// Read the objects from this S3 Inventory report instead of listing the prefix:
    /// `s3://bucket/path/manifest.json` of a CSV report of SOURCE_BUCKET_NAME with the Key,
    /// Size and ETag fields. Each data file keeps its own checkpoint. A report is a snapshot:
    /// objects written after it are found by `verify` and enqueued by `reconcile`.
    #[arg(long, env = "INVENTORY_MANIFEST")]
    pub inventory: Option<String>,

    /// SendMessageBatch calls (of ten messages each) in flight at once.
    #[arg(long, env = "SEND_CONCURRENCY", default_value = "16")]
    pub send_concurrency: NonZeroUsize,

    /// Pause listing (and `reconcile`) while the queue holds more than this many messages
    /// (visible, in flight and delayed). The default, 12,000 messages (120,000 objects at ten a
    /// message), is the deployed stack's `FeederMaxBacklog`: deep enough for its 40 consumer
    /// tasks at 300 messages each (scaling on backlog per task settles at backlog / 300 tasks,
    /// so less caps the fleet), and shallow enough that a message waits minutes, not days
    /// (none outlives the queue's retention; one that still does is found by `verify` and
    /// enqueued again by `reconcile`). A shallow queue also keeps MiniStack's SQS fast: it slows
    /// as its queue deepens. Size it at least consumers x CONCURRENCY / OBJECTS_PER_MESSAGE, so
    /// that no consumer starves. 0: no limit.
    #[arg(long, env = "MAX_BACKLOG", default_value = "12000")]
    pub max_backlog: u64,

    /// List (or read the inventory report) and count what would be enqueued, in how many
    /// messages; send nothing and save no checkpoint.
    #[arg(long, env = "DRY_RUN", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false", action = clap::ArgAction::Set)]
    pub dry_run: bool,

    /// Ignore the checkpoint and list from the start (messages for objects already moved are
    /// harmless: consumers find them done).
    #[arg(long, env = "RESTART", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false", action = clap::ArgAction::Set)]
    pub restart: bool,

    /// Publish CloudWatch metrics in this namespace through the logs while listing: once a
    /// minute, one line on stdout in CloudWatch's embedded metric format (ObjectsEnqueued, and
    /// SecondsHeldBack: time spent waiting on MAX_BACKLOG, since the last line), which
    /// CloudWatch Logs turns into metrics with no API call. The stack sets
    /// AvatarMigration/<stack>; its FeederStalled alarm fires when a feeder that writes these
    /// lines neither enqueues nor waits on the backlog for 15 minutes. Unset: none.
    #[arg(long, env = "CLOUDWATCH_NAMESPACE")]
    pub cloudwatch_namespace: Option<String>,
}

impl Default for RunArgs {
    fn default() -> Self {
        Self {
            page_size: 1000,
            objects_per_message: 10,
            list_ranges: 1,
            inventory: None,
            dry_run: false,
            send_concurrency: NonZeroUsize::new(16).unwrap(),
            max_backlog: 12_000,
            restart: false,
            cloudwatch_namespace: None,
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct VerifyArgs {
    /// Also check the objects: stream the source prefix and check that each legacy object has
    /// its copy with the same bytes. Resumable: the position is saved after each page, and a
    /// run that was interrupted goes on from there.
    #[arg(long)]
    pub objects: bool,

    /// With --objects: check N consecutive objects from a random point instead (a quick look;
    /// nothing saved).
    #[arg(long, requires = "objects")]
    pub sample: Option<u64>,

    /// HEAD requests in flight at once while verifying.
    #[arg(long, env = "VERIFY_CONCURRENCY", default_value = "32")]
    pub concurrency: NonZeroUsize,

    /// At most this many rows checked a second (each a HEAD, and with SSE-KMS a KMS request
    /// from the account's quota the live service shares); unset: as fast as --concurrency goes.
    #[arg(long, env = "VERIFY_RATE")]
    pub rate: Option<NonZeroUsize>,

    /// Also print the result as one JSON object, as the last line of stdout: rows_checked,
    /// rows_modern, rows_legacy, rows_other, rows_unresolvable, rows_legacy_missing,
    /// rows_legacy_set_aside, rows_legacy_pending, rows_error (rows whose object could not be
    /// looked at: counted, the run goes on, not done), done; with --objects also
    /// legacy_objects, legacy_missing_copy, conflicts, unproven, objects_complete.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ReconcileArgs {
    /// HEAD requests in flight at once while reconciling.
    #[arg(long, env = "VERIFY_CONCURRENCY", default_value = "32")]
    pub concurrency: NonZeroUsize,

    /// Also enqueue legacy rows whose path was set aside with a reason (after fixing what
    /// caused it: a grant, a restored archive, a resolved conflict).
    #[arg(long)]
    pub include_set_aside: bool,
}

/// How consumers look at a destination before copying, as `feeder plan` counts it.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlannedCheck {
    /// A conditional copy alone (AWS): one request per object.
    OnConflict,
    /// A listing of each message's destinations first (servers that copy over existing keys).
    BeforeCopy,
}

#[derive(clap::Args, Debug, Clone)]
pub struct PlanArgs {
    /// List the whole prefix (one LIST request per PAGE_SIZE keys, LIST_RANGES at once) for
    /// exact counts and sizes, instead of a sample.
    #[arg(long)]
    pub full: bool,

    /// Without --full or INVENTORY_MANIFEST: look at this many objects, in runs of consecutive
    /// keys from up to 16 points across the key space.
    #[arg(long, default_value = "16000", value_parser = clap::value_parser!(u64).range(1..))]
    pub sample: u64,

    /// With a sample: the number of objects under the prefix, when known (S3 Storage Lens,
    /// an Inventory report's count). Default: the rows pointing at the source prefix (counted,
    /// or the planner's estimate on a large table), which misses objects no row names.
    #[arg(long)]
    pub objects: Option<u64>,

    /// Objects moved per second, for the time (the stack's S3CopiesPerSecond).
    #[arg(long, default_value = "3500")]
    pub rate: f64,

    /// Verify passes to count (the runbook: verify, reconcile, verify, and one after cleanup).
    #[arg(long, default_value = "3")]
    pub verify_passes: u64,

    /// Rows verify checks per second, for its time (VERIFY_RATE).
    #[arg(long, env = "VERIFY_RATE", default_value = "1000")]
    pub verify_rate: f64,

    /// How the consumers look at destinations (the consumer's DESTINATION_CHECK: on AWS,
    /// `auto` comes to on-conflict).
    #[arg(long, value_enum, default_value = "on-conflict")]
    pub destination_check: PlannedCheck,

    /// The consumer's MULTIPART_THRESHOLD: larger objects are copied in parts.
    #[arg(long, env = "MULTIPART_THRESHOLD", default_value = "5368709120")]
    pub multipart_threshold: i64,

    /// The consumer's MULTIPART_PART_SIZE.
    #[arg(long, env = "MULTIPART_PART_SIZE", default_value = "536870912")]
    pub multipart_part_size: i64,

    /// The consumer's REWRITE_JOURNAL: a journal row written with each rewrite (in the WAL).
    #[arg(long, env = "REWRITE_JOURNAL", value_parser = clap::builder::BoolishValueParser::new(), default_value = "true", action = clap::ArgAction::Set)]
    pub rewrite_journal: bool,

    /// The objects are encrypted with SSE-KMS: count the KMS requests S3 makes for them (a
    /// copy decrypts its source and generates a data key; a HEAD in checksum mode decrypts).
    #[arg(long)]
    pub sse_kms: bool,

    /// With --sse-kms: the buckets use S3 Bucket Keys, which cut those KMS requests by up to
    /// 99 %; they are then not counted.
    #[arg(long, requires = "sse_kms")]
    pub bucket_keys: bool,

    /// Price of 1,000 S3 PUT, COPY, POST or LIST requests, in dollars (default: us-east-1's
    /// list price, docs/planning.md).
    #[arg(long, default_value = "0.005")]
    pub price_s3_write: f64,

    /// Price of 1,000 S3 GET, HEAD and other requests, in dollars.
    #[arg(long, default_value = "0.0004")]
    pub price_s3_read: f64,

    /// Price of 1,000,000 SQS requests (standard queue), in dollars.
    #[arg(long, default_value = "0.40")]
    pub price_sqs: f64,

    /// Price of 10,000 KMS requests, in dollars.
    #[arg(long, default_value = "0.03")]
    pub price_kms: f64,

    /// Also print the plan as one JSON object, as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    /// Also print the reading as one JSON object, as the last line of stdout: rows_legacy,
    /// rows_modern, rows_other, rows_left, rows_legacy_set_aside, rows_estimated, objects_listed, listing_complete, feeder_running, queue_visible,
    /// queue_in_flight, queue_delayed, dlq_visible, failures (by reason), rewrites_recorded,
    /// objects_per_s (rows rewritten per second over the last five minutes), eta_s.
    #[arg(long)]
    pub json: bool,

    /// Keep watching until interrupted: a progress bar with rate and ETA on a terminal, one
    /// line a minute otherwise (containers, CloudWatch). Rows are counted once, then followed
    /// through the journal.
    #[arg(long)]
    pub watch: bool,

    /// Time between readings with --watch (at least 1s; a bare number is seconds).
    #[arg(long, default_value = "5s", value_parser = common::settings::duration_secs)]
    pub interval: std::time::Duration,

    /// Count the rows exactly whatever the table's size: one scan of avatars, bounded by
    /// --exact-timeout. A DDL on avatars queues behind the scan, and the live service's
    /// queries behind the DDL: prefer a quiet hour on a large table.
    #[arg(long)]
    pub exact: bool,

    /// The longest an exact count may take (its statement_timeout), with --exact.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub exact_timeout: std::time::Duration,

    /// Past this many rows (the planner's estimate), rows are estimated rather than counted,
    /// unless --exact. Below it, the count runs under DB_STATEMENT_TIMEOUT.
    #[arg(long, env = "STATUS_EXACT_MAX_ROWS", default_value = "1000000")]
    pub exact_max_rows: u64,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct ReportArgs {
    /// Print the totals as one JSON object, as the last line of stdout: rows_rewritten,
    /// rows_rolled_back, first_rewrite, last_rewrite, set_aside (by reason).
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,

    /// Print every record as CSV (kind, row_id, old_path, new_path, at, reason, detail): each
    /// rewrite (kind moved or rolled_back), then each object set aside (kind set_aside).
    #[arg(long)]
    pub csv: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RollbackArgs {
    /// Count what would be pointed back, changed since, held or without its legacy object;
    /// write nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Roll back even though the queue holds messages (consumers would migrate those rows
    /// again).
    #[arg(long)]
    pub force: bool,

    /// HEAD requests (legacy objects) in flight at once.
    #[arg(long, env = "VERIFY_CONCURRENCY", default_value = "32")]
    pub concurrency: NonZeroUsize,

    /// Also print the result as one JSON object, as the last line of stdout: dry_run, entries,
    /// rows_rolled_back, rows_changed_since, rows_held, legacy_missing, copy_replaced.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct FailuresArgs {
    /// Only this reason.
    #[arg(long, value_enum)]
    pub reason: Option<common::db::Reason>,

    /// One JSON object per line: reason, subject, occurrences, detail.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,

    /// CSV with a header: reason, subject, occurrences, detail.
    #[arg(long)]
    pub csv: bool,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct RedriveArgs {
    /// Show how many messages wait and some of their keys; move nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct CleanupArgs {
    /// Delete for real; without it, list and count what would be deleted.
    #[arg(long)]
    pub yes: bool,

    /// Deletes per second at most.
    #[arg(long)]
    pub rate: Option<NonZeroUsize>,

    /// Checks (HEADs, row counts) in flight at once.
    #[arg(long, env = "VERIFY_CONCURRENCY", default_value = "32")]
    pub concurrency: NonZeroUsize,

    /// How long, at most, each batch waits after its tombstones are committed for the
    /// transactions open at that moment to end (e.g. `5m`); past it, cleanup stops with an
    /// error naming them, and nothing of that batch is deleted.
    #[arg(long, env = "DELETE_WAIT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub delete_wait: std::time::Duration,

    /// Delete without the fence (`feeder fence install`): you state that the live service no
    /// longer writes legacy paths. Without the fence, a row the live service writes with a
    /// legacy path after its object's references were checked names a deleted object.
    #[arg(long, env = "LEGACY_WRITES_STOPPED", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false", action = clap::ArgAction::Set)]
    pub legacy_writes_stopped: bool,

    /// Also print the result as one JSON object, as the last line of stdout: dry_run,
    /// legacy_objects, deleted, kept_referenced, kept_not_copied, kept_delete_failed, complete.
    #[arg(long)]
    pub json: bool,
}

/// `fence`'s subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum FenceCommand {
    /// Install the fence on avatars (or change its mode): a trigger that, for a row written
    /// with the path of a legacy object being or already deleted, writes its copy's path
    /// instead (`rewrite`), or refuses the write (`reject`). Idempotent; takes a brief lock on
    /// avatars, with a short lock timeout, retried.
    Install {
        #[arg(long, value_enum, default_value = "rewrite")]
        mode: common::db::fence::Mode,
    },
    /// Remove the fence. Do it only once the live service no longer writes legacy paths:
    /// without it, such a write names a deleted object.
    Remove,
    /// Show whether the fence is installed, its mode, the tombstones (pending and deleted) and
    /// how many writes it rewrote.
    Status {
        /// Also print the status as one JSON object, as the last line of stdout: installed,
        /// mode, enabled, tombstones_pending, tombstones_deleted, writes_rewritten.
        #[arg(long)]
        json: bool,
    },
}
