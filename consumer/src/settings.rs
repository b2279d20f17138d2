//! The consumer's settings: flags and environment variables of the same name.

use std::num::NonZeroUsize;
use std::time::Duration;

use clap::Parser;
use common::settings::{DatabaseArgs, QueueArgs, StorageArgs};

use crate::copy::multipart::{MIN_PART, Multipart};
use crate::copy::{DestinationCheck, MAX_SINGLE_COPY};
use crate::process::WorkerConfig;
use crate::receive::ReceiveConfig;

/// Moves legacy avatars: receives one message per object from SQS, copies the object
/// server-side into the destination bucket (never overwriting different content), rewrites
/// the rows pointing at it (compare-and-set) and deletes the message. Run as many as the
/// backlog needs; SIGTERM finishes in-flight objects and exits 0.
///
/// Every option is also an environment variable (shown in brackets); a `.env` file in the
/// working directory is read first.
#[derive(Parser, Debug, Clone)]
#[command(name = "consumer", version)]
pub struct Settings {
    #[command(flatten)]
    pub storage: StorageArgs,

    #[command(flatten)]
    pub queue: QueueArgs,

    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub health: common::health::HealthArgs,

    /// Objects copied at once by this process (each a CopyObject; its message then gives its
    /// place to the next while its rows are rewritten, up to 4 x this many messages finishing
    /// so). Unset (the default): 128 where the copy goes first (`on-conflict`, what `auto` picks on
    /// AWS), 32 where each destination is looked at first (`before-copy`, where 128 measured
    /// slower; docs/performance.md). Raise it until S3 answers SlowDown or the database is
    /// busy.
    #[arg(long, env = "CONCURRENCY")]
    pub concurrency: Option<NonZeroUsize>,

    /// How long a received message stays invisible to other consumers (whole seconds, 1s to
    /// 12h; a bare number is seconds), e.g. `60s`. Extended every half of it while an object
    /// is still being worked on; after a crash, the message comes back this long after it was
    /// received.
    #[arg(long, env = "VISIBILITY_TIMEOUT", default_value = "60s", value_parser = parse_visibility)]
    pub visibility_timeout: Duration,

    /// Long-poll wait of each receive (whole seconds, 0s to 20s; a bare number is seconds).
    /// 20s keeps empty receives (and their cost) low. With EXIT_WHEN_IDLE, at most a quarter
    /// of it (and at least 1s), so that the exit is not late.
    #[arg(long, env = "WAIT_TIME_SECONDS", default_value = "20s", value_parser = parse_wait)]
    pub wait_time_seconds: Duration,

    /// Drain and exit once the queue is empty (e.g. `30s`; a bare number is seconds): nothing
    /// received for this long, nothing in flight here, and over that same time the queue's own
    /// counts (visible, in flight with any consumer, delayed) read 0 on every check (one every
    /// quarter of it, at most 5 s apart). The exit comes this long after the last object is
    /// finished, give or take one check and one receive (long polls last a quarter of it, at
    /// most WAIT_TIME_SECONDS). A crashed
    /// consumer's messages count as in flight until their visibility timeout brings them
    /// back, so they are waited for; so is a feeder that is sending for the listing (`feeder`,
    /// `reconcile`, `redrive` hold a lease in the database while they run, which outlives a
    /// killed feeder by 15 s). Every object received is finished first, however long that
    /// takes. When the listing is unfinished and no feeder runs, the exit code is 3 (work
    /// left: run the feeder to resume it), never 0. Unset (the default): run until SIGTERM,
    /// as an ECS service does.
    #[arg(long, env = "EXIT_WHEN_IDLE", value_parser = common::settings::duration_secs)]
    pub exit_when_idle: Option<Duration>,

    /// How long start-up waits, in all, for a service that is not available yet (PostgreSQL
    /// refusing connections, restarting or failing over; S3 or SQS not answering or answering
    /// 5xx), asking again with a warning each time; e.g. `60s`, `0s` (ask once). A refusal for
    /// good (a wrong password, a missing bucket, queue or table, a refused grant) exits 2 at
    /// once, whatever this says.
    #[arg(long, env = "STARTUP_WAIT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub startup_wait: std::time::Duration,

    /// How long in-flight objects get to finish after SIGTERM (e.g. `25s`; a bare number is
    /// seconds); what is still unfinished then is abandoned safely (its message comes back
    /// after its visibility timeout) and the process exits. A second SIGTERM or Ctrl-C exits
    /// at once. Keep it below ECS's stopTimeout (30 s by default).
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value = "25s", value_parser = common::settings::duration_secs)]
    pub shutdown_grace_seconds: Duration,

    /// Rows rewrites gathered into one UPDATE.
    #[arg(long, env = "DB_BATCH_SIZE", default_value = "100")]
    pub db_batch_size: NonZeroUsize,

    /// How long a rewrite lingers for others to share its UPDATE (e.g. `1s`; a bare number is
    /// milliseconds), as long as others keep coming: a quarter of it with none ends the
    /// linger. Each UPDATE is a commit, a WAL flush on the primary: at a trickle (a fleet of
    /// consumers at S3's rate) rows otherwise go a message at a time. A message's copy permit
    /// is not held meanwhile (the next message's copies go on), so lingering costs a row up to
    /// this long at its legacy path, not throughput. 0: no lingering (batches still grow while
    /// every connection is busy).
    #[arg(long, env = "DB_BATCH_MAX_WAIT_MS", default_value = "1s", value_parser = common::settings::duration_millis)]
    pub db_batch_max_wait_ms: Duration,

    /// How long one rewrite statement should take at most (e.g. `250ms`): a statement that
    /// takes longer halves the next ones (down to one row: fewer row locks held at once on a
    /// struggling database), one under half of it lets them grow back toward DB_BATCH_SIZE.
    #[arg(long, env = "DB_BATCH_TARGET", default_value = "250ms", value_parser = common::settings::duration_millis)]
    pub db_batch_target: Duration,

    /// Largest object, in bytes, read and compared byte by byte when a destination already
    /// exists and neither a common full-object checksum nor equal ETags prove it holds the
    /// source's bytes (AWS gives a copy a fresh ETag). Larger ones are recorded as
    /// `destination_unproven` and left as they are.
    #[arg(long, env = "COMPARE_MAX_BYTES", default_value_t = common::identity::COMPARE_MAX_BYTES)]
    pub compare_max_bytes: u64,

    /// When an existing destination is looked for. `before-copy`: a HEAD before every copy,
    /// right on every S3 implementation. `on-conflict`: copy first and look only when the
    /// server refuses the copy because the key exists (412): one request less per object, and
    /// only safe where the server enforces `If-None-Match: *` on CopyObject (AWS S3,
    /// SeaweedFS; not MiniStack or moto, where a copy would overwrite). `auto` (the default):
    /// asks the server at start-up, with two short-lived objects of its own under
    /// `DESTINATION_PREFIX/.avatar-migration-probe/`, and picks `on-conflict` only when the
    /// server refuses a conditional copy onto an existing key.
    #[arg(long, env = "DESTINATION_CHECK", value_enum, default_value = "auto")]
    pub destination_check: DestinationCheck,

    /// Objects larger than this many bytes are copied in parts (`UploadPartCopy`); at most
    /// 5 GiB, the largest object a single CopyObject copies.
    #[arg(long, env = "MULTIPART_THRESHOLD", default_value = "5368709120", value_parser = clap::value_parser!(i64).range(1..=MAX_SINGLE_COPY))]
    pub multipart_threshold: i64,

    /// Part size, in bytes, of a copy in parts when the source's own part size cannot be
    /// reused (the copy reuses it when the source's parts are of one size, so that both ETags
    /// are equal). Kept within 5 MiB - 5 GiB and raised to fit S3's 10,000 parts.
    #[arg(long, env = "MULTIPART_PART_SIZE", default_value = "536870912", value_parser = clap::value_parser!(i64).range(MIN_PART..=MAX_SINGLE_COPY))]
    pub multipart_part_size: i64,

    /// Parts of one object copied at once.
    #[arg(long, env = "MULTIPART_CONCURRENCY", default_value = "8")]
    pub multipart_concurrency: NonZeroUsize,

    /// Record every row rewrite (row id, old path, new path, when) in the table
    /// `avatar_migration_journal`, in the same statement as the rewrite: what `feeder report`
    /// lists and `feeder rollback` undoes. Measured: rewrites up to 10 % slower and 125 bytes a
    /// row on disk (37 GB at 300 M rows): see docs/operations.md, which also says when to
    /// drop it.
    #[arg(long, env = "REWRITE_JOURNAL", value_parser = clap::builder::BoolishValueParser::new(), default_value = "true", action = clap::ArgAction::Set)]
    pub rewrite_journal: bool,

    /// Serve Prometheus metrics on /metrics, liveness on /live and readiness on /ready at this
    /// address (e.g. 127.0.0.1:9090; the image sets 0.0.0.0:9090). /live answers 200 while the
    /// process serves; /ready only when S3, SQS and PostgreSQL all answer (each scrape of
    /// /metrics checks them too: dependency_up). Unset: no endpoint.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Publish CloudWatch metrics in this namespace through the logs: once a minute, one line
    /// on stdout in CloudWatch's embedded metric format (ObjectsMoved, ObjectsSetAside,
    /// Refusals, RowsRewritten, CopiesSlowedDown since the last line), which CloudWatch Logs
    /// turns into metrics with no API call. The stack sets AvatarMigration/<stack>. Unset: none.
    #[arg(long, env = "CLOUDWATCH_NAMESPACE")]
    pub cloudwatch_namespace: Option<String>,

    /// Ask the running consumer's /live (at METRICS_ADDR) and exit 0 when it answers 200, 1
    /// otherwise: the container's health check (the image has no curl). It does not ask the
    /// dependencies: a database failover must not get the fleet replaced.
    #[arg(long)]
    pub health_check: bool,

    /// Receive messages and report what would be done with each object (copy, already
    /// present, set aside with its reason, rows to rewrite), without copying, writing or
    /// deleting anything: the messages come back after VISIBILITY_TIMEOUT. Stops once a
    /// message comes back (every message was seen) or on SIGTERM.
    #[arg(long, env = "DRY_RUN", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false", action = clap::ArgAction::Set)]
    pub dry_run: bool,

    /// Delete each legacy object after its rows moved, when its copy holds its bytes and no
    /// row references the legacy path any more, by the delete protocol (tombstones, a wait for
    /// older transactions, a second check, a delete conditional on the listed ETag), in
    /// batches in the background. Needs the fence (`feeder fence install`) or
    /// LEGACY_WRITES_STOPPED, and s3:DeleteObject on the legacy prefix (the stack's
    /// ConsumerDeleteSource). Holds the lease on the legacy objects shared: no rollback or
    /// cleanup meanwhile. Off: the legacy objects stay for `feeder cleanup` after verification.
    #[arg(long, env = "DELETE_SOURCE", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false", action = clap::ArgAction::Set)]
    pub delete_source: bool,

    /// With DELETE_SOURCE: how long, at most, a batch of deletes waits after its tombstones
    /// are committed for the transactions open at that moment to end (e.g. `5m`); past it
    /// the batch is kept, for `feeder cleanup`.
    #[arg(long, env = "DELETE_WAIT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub delete_wait: std::time::Duration,

    /// With DELETE_SOURCE: delete without the fence. You state that the live service no longer
    /// writes legacy paths; without the fence, one it writes after its object's references
    /// were checked names a deleted object.
    #[arg(long, env = "LEGACY_WRITES_STOPPED", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false", action = clap::ArgAction::Set)]
    pub legacy_writes_stopped: bool,

    /// Send each copy (the conditional CopyObject, one per object) directly: signed by the
    /// SDK's own signer, to the SDK's endpoint for the bucket, over the SDK's HTTP transport,
    /// with the provider's credentials; without the SDK's per-request orchestration, which
    /// costs more CPU than the rest of a copy (docs/performance.md). Only a 200 with a
    /// CopyObjectResult and a 412 are taken from it; any other answer, or none, sends the same
    /// copy again through the SDK, with its retries and error classes. An answer asking to
    /// slow down (503, 429) is left to the consumer's pace, and the copy is tried again this
    /// way when the pace allows. Three failures in a row (a 400 or 403, or no answer) that the
    /// SDK's request then did not meet turn it off, with a warning, for 10 s, after which one
    /// copy tries it again (off again for twice as long if that fails, up to 5 minutes); a
    /// probe copy at start-up sent this way that fails where the SDK's succeeds turns it off
    /// for the run. Proxies as the SDK's: HTTPS_PROXY, HTTP_PROXY, NO_PROXY. Measured side
    /// by side: about half the consumer's CPU per object (docs/performance.md). `false`: every
    /// copy through the SDK.
    #[arg(long, env = "DIRECT_COPY", value_parser = clap::builder::BoolishValueParser::new(), default_value = "true", action = clap::ArgAction::Set)]
    pub direct_copy: bool,

    /// The longest one object may be worked on (its checks, its copy, its rows), plus one
    /// second per 25 MiB of it; past it the object is abandoned to its message's next delivery
    /// (its message's visibility is no longer extended, the rest of the message waits with
    /// it), so that a request that never ends holds no message for good. Each request has its
    /// own, shorter bound (S3_REQUEST_TIMEOUT).
    #[arg(long, env = "OBJECT_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub object_timeout: Duration,

    /// Threads this process runs on. 1 (the default): everything on one thread, which spends
    /// about a tenth less CPU per object than two (no wake-ups across threads; measured in
    /// docs/performance.md) and matches the stack's one-vCPU tasks: scale with more consumers,
    /// not more threads. More: a multi-threaded runtime with this many workers, for a host with
    /// cores to spare and one consumer on it.
    #[arg(long, env = "WORKER_THREADS", default_value = "1", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: u16,

    /// Database connections this process opens at most.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value = "4", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub database_max_connections: u32,
}

fn parse_visibility(s: &str) -> anyhow::Result<Duration> {
    common::settings::whole_seconds(common::settings::duration_secs(s)?, 1, 43_200)
}

fn parse_wait(s: &str) -> anyhow::Result<Duration> {
    common::settings::whole_seconds(common::settings::duration_secs(s)?, 0, 20)
}

impl Settings {
    pub fn visibility_timeout(&self) -> Duration {
        self.visibility_timeout
    }

    pub fn db_batch_max_wait(&self) -> Duration {
        self.db_batch_max_wait_ms
    }

    pub fn multipart(&self) -> Multipart {
        Multipart {
            threshold: self.multipart_threshold,
            part_size: self.multipart_part_size,
            concurrency: self.multipart_concurrency.get(),
        }
    }

    /// What each message's worker takes from the settings.
    pub(crate) fn worker_config(&self) -> WorkerConfig {
        WorkerConfig {
            queue_url: self.queue.queue_url.clone(),
            visibility: self.visibility_timeout(),
            dry_run: self.dry_run,
            object_timeout: self.object_timeout,
        }
    }

    /// How the receive loop runs, with `concurrency` objects at once.
    pub(crate) fn receive_config(&self, concurrency: usize) -> ReceiveConfig {
        // With an idle exit, the long poll is a quarter of the idle limit (at least 1 s): the
        // exit waits for the receives in flight, so a 20 s poll would make it that much late.
        let wait = self
            .exit_when_idle
            .map_or(self.wait_time_seconds, |idle| (idle / 4).max(Duration::from_secs(1)).min(self.wait_time_seconds));
        ReceiveConfig {
            queue_url: self.queue.queue_url.clone(),
            concurrency,
            // SQS takes whole seconds.
            wait: Duration::from_secs(wait.as_secs()),
            visibility: self.visibility_timeout(),
            exit_when_idle: self.exit_when_idle,
            grace: self.shutdown_grace_seconds,
        }
    }
}
