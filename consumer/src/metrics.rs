//! What the consumer counts, and the HTTP endpoint that serves it (`METRICS_ADDR`): Prometheus
//! metrics on `/metrics`, liveness on `/live` and the dependencies on `/ready`.
//!
//! Promises:
//! - every counter is the one the exit summary prints (one set of counters, not two);
//! - `/live` answers 200 while the process serves, whatever its dependencies do: the
//!   container's health check asks it (`consumer --health-check`), so a database failover or an
//!   S3 outage never gets a healthy fleet replaced (the consumers wait for it and go on);
//! - `/ready` answers 200 only when S3 (the destination bucket), SQS (the queue) and
//!   PostgreSQL (`SELECT 1`) each answered within [`CHECK_TIMEOUT`], else 503 naming what
//!   failed; each `/metrics` scrape runs the same checks into `dependency_up{dependency}`; it
//!   never prints a secret (the database is named by nothing but "PostgreSQL");
//! - the endpoint never stops the work: a failure to serve one request is logged and dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use common::aws::{Call, S3, Sqs};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// How long each dependency gets to answer a health check.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

type Labels = Vec<(String, String)>;

/// The consumer's counters, shared by the workers, the exit summary and `/metrics`.
#[derive(Debug)]
pub struct Stats {
    /// Messages received.
    pub received: Counter,
    /// Messages deleted (every object done or recorded).
    pub deleted: Counter,
    pub copied: Counter,
    pub already_present: Counter,
    pub rows_rewritten: Counter,
    pub set_aside: Counter,
    pub set_aside_by_reason: Family<Labels, Counter>,
    /// Of those, the refusals (access denied, a KMS key refused).
    refused: Counter,
    /// Objects left for a later delivery (their message comes back).
    pub retry_later: Counter,
    /// Objects whose message was deleted.
    pub acked: Counter,
    /// Sources deleted after their move (`DELETE_SOURCE`).
    pub sources_deleted: Counter,
    /// Messages being worked on now.
    pub in_flight: Gauge,
    /// Seconds to put one object at its destination (checks and copy).
    pub copy_seconds: Histogram,
    /// Seconds from asking for an object's row rewrite to its result (batching included).
    pub rewrite_seconds: Histogram,
    /// Rewrite statements run, each its own transaction (a commit, a WAL flush).
    pub rewrite_statements: Counter,
    /// Rows asked for per rewrite statement.
    pub rows_per_statement: Histogram,
    /// Copies decided by the direct path (`DIRECT_COPY`): copied, or refused with 412.
    pub direct_copies: Counter,
    /// Copies the direct path left to the SDK while it was on.
    pub direct_handed_over: Counter,
    /// 1 while the direct path is off (its breaker), 0 otherwise.
    pub direct_copy_off: Gauge,
    s3_slowdowns: Counter,
    /// Copies per second the pace allows now (`crate::pace`); 0 while not paced.
    pub copy_rate: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Copies S3 asked to slow down (either path), each tried again at the pace.
    pub copies_slowed_down: Counter,
    /// 1 while the operator has paused the fleet (`feeder pause`).
    pub paused: Gauge,
    /// 1 while the database's health holds the fleet (replica lag, or another limit passed).
    pub database_held: Gauge,
    /// 1 when the dependency answered the last check (a scrape runs one), 0 otherwise.
    dependency_up: Family<Labels, Gauge>,
}

impl Default for Stats {
    fn default() -> Self {
        let seconds = || Histogram::new(exponential_buckets(0.001, 2.0, 16));
        Self {
            received: Counter::default(),
            deleted: Counter::default(),
            copied: Counter::default(),
            already_present: Counter::default(),
            rows_rewritten: Counter::default(),
            set_aside: Counter::default(),
            set_aside_by_reason: Family::default(),
            refused: Counter::default(),
            retry_later: Counter::default(),
            acked: Counter::default(),
            sources_deleted: Counter::default(),
            in_flight: Gauge::default(),
            copy_seconds: seconds(),
            rewrite_seconds: seconds(),
            rewrite_statements: Counter::default(),
            rows_per_statement: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            direct_copies: Counter::default(),
            direct_handed_over: Counter::default(),
            direct_copy_off: Gauge::default(),
            s3_slowdowns: Counter::default(),
            copy_rate: Gauge::default(),
            copies_slowed_down: Counter::default(),
            paused: Gauge::default(),
            database_held: Gauge::default(),
            dependency_up: Family::default(),
        }
    }
}

impl Stats {
    /// Prints what was done (`dry_run`: what would have been).
    pub fn print_summary(&self, elapsed: Duration, dry_run: bool) {
        if dry_run {
            println!(
                "consumer: dry run: nothing was copied, written or deleted; the counts below are what would have \
                 been done (messages come back after their visibility timeout)"
            );
        }
        println!(
            "consumer: received {} messages; copied {}, already present {}; rows rewritten {}; \
             set aside {}; left for retry {}; acknowledged {}; sources deleted {}; in {:.1}s",
            self.received.get(),
            self.copied.get(),
            self.already_present.get(),
            self.rows_rewritten.get(),
            self.set_aside.get(),
            self.retry_later.get(),
            self.acked.get(),
            self.sources_deleted.get(),
            elapsed.as_secs_f64()
        );
        let statements = self.rewrite_statements.get();
        if statements > 0 {
            println!(
                "consumer: row rewrites in {statements} statements ({:.1} rows a statement, {:.0} commits per 10,000 \
                 rows)",
                self.rows_rewritten.get() as f64 / statements as f64,
                statements as f64 * 10_000.0 / self.rows_rewritten.get().max(1) as f64
            );
        }
        let (direct, handed_over) = (self.direct_copies.get(), self.direct_handed_over.get());
        if direct + handed_over > 0 {
            println!("consumer: direct copies {direct}; sent again through the SDK {handed_over}");
        }
        let slowed = self.copies_slowed_down.get();
        if slowed > 0 {
            println!(
                "consumer: copies S3 asked to slow down {slowed}, each tried again at the pace; last pace {:.0} copies/s",
                self.copy_rate.get()
            );
        }
    }

    /// Counts an object set aside with its reason.
    pub fn count_set_aside(&self, reason: &str) {
        self.set_aside.inc();
        if common::reason::Reason::parse(reason).is_some_and(common::reason::Reason::is_refusal) {
            self.refused.inc();
        }
        self.set_aside_by_reason.get_or_create(&vec![("reason".to_owned(), reason.to_owned())]).inc();
    }

    /// Objects set aside because access or a KMS key was refused (`Reason::REFUSALS`).
    pub fn refusals(&self) -> u64 {
        self.refused.get()
    }

    /// Every metric, registered under `avatar_migration_`.
    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("avatar_migration");
        // One line a metric: its name, its help, the field that holds it.
        macro_rules! register {
            ($($name:literal, $help:literal, $field:ident;)*) => { $( r.register($name, $help, self.$field.clone()); )* };
        }
        register! {
            "messages_received", "Messages received from the queue", received;
            "messages_deleted", "Messages deleted: every object done or recorded", deleted;
            "objects_copied", "Objects this process copied", copied;
            "objects_already_present", "Objects whose destination already held the same bytes", already_present;
            "objects_set_aside", "Objects recorded for the operator, by reason", set_aside_by_reason;
            "objects_retried", "Objects left for a later delivery", retry_later;
            "objects_acknowledged", "Objects whose message was deleted", acked;
            "rows_rewritten", "Rows pointed at their object's copy", rows_rewritten;
            "sources_deleted", "Legacy objects deleted after their move", sources_deleted;
            "messages_in_flight", "Messages being worked on", in_flight;
            "s3_copy_seconds", "Seconds to put one object at its destination", copy_seconds;
            "db_rewrite_seconds", "Seconds from asking an object's row rewrite to its result", rewrite_seconds;
            "db_rewrite_statements", "Rewrite statements run, each its own transaction (a commit)", rewrite_statements;
            "db_rows_per_statement", "Rows asked for per rewrite statement", rows_per_statement;
            "s3_direct_copies", "Copies decided by the direct path (DIRECT_COPY): copied, or refused because the destination exists", direct_copies;
            "s3_direct_handed_over", "Copies the direct path left to the SDK (any other answer, or none)", direct_handed_over;
            "s3_direct_copy_off", "1 while the direct path (DIRECT_COPY) is off after failing where the SDK succeeded, 0 otherwise", direct_copy_off;
            "copy_rate_limit", "Copies per second this consumer's pace allows now; 0 while not paced (no slow-down seen yet)", copy_rate;
            "copies_slowed_down", "Copies S3 asked to slow down (503, 429; either copy path), each tried again at the pace", copies_slowed_down;
            "paused", "1 while the operator has paused the fleet (feeder pause): nothing is received", paused;
            "database_held", "1 while the database's health (replica lag or another limit set) holds the fleet: nothing is received", database_held;
            "dependency_up", "1 when the dependency (s3, sqs, postgres) answered the check of this scrape, 0 otherwise", dependency_up;
            "s3_slowdowns", "S3 answers asking to slow down (503, 429), retried ones included", s3_slowdowns;
        }
        r
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        // The SDK's interceptor counts into a process-wide counter: catch up with it.
        let seen = common::aws::S3_SLOWDOWNS.load(std::sync::atomic::Ordering::Relaxed);
        self.s3_slowdowns.inc_by(seen.saturating_sub(self.s3_slowdowns.get()));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry()).expect("writing to a String");
        out
    }
}

/// Counts a message in flight until dropped.
pub struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    pub fn start(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What `/ready` and each scrape check.
#[derive(Clone)]
pub struct Health {
    pub s3: S3,
    pub sqs: Sqs,
    pub db: PgPool,
    pub bucket: String,
    pub queue_url: String,
}

impl Health {
    /// `Ok` when every dependency answered; otherwise what failed. Each dependency's answer
    /// also goes to `stats`' `dependency_up`.
    pub async fn check(&self, stats: &Stats) -> Result<(), Unhealthy> {
        let s3 = within("S3", async {
            let head = self.s3.head_bucket().bucket(&self.bucket).send().await;
            head.call(|| format!("HeadBucket {}", self.bucket)).map(|_| ()).map_err(anyhow::Error::from)
        });
        let sqs = within("SQS", async {
            self.sqs
                .get_queue_attributes()
                .queue_url(&self.queue_url)
                .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
                .send()
                .await
                .call(|| "GetQueueAttributes".to_owned())
                .map(|_| ())
                .map_err(anyhow::Error::from)
        });
        let db = within("PostgreSQL", async {
            sqlx::query("SELECT 1").execute(&self.db).await.map(|_| ()).map_err(|e| match e {
                sqlx::Error::Database(e) => anyhow::anyhow!("{}", e.message()),
                other => anyhow::Error::from(other),
            })
        });
        let (s3, sqs, db) = tokio::join!(s3, sqs, db);
        for (name, answer) in [("s3", &s3), ("sqs", &sqs), ("postgres", &db)] {
            let up = stats.dependency_up.get_or_create(&vec![("dependency".to_owned(), name.to_owned())]);
            up.set(i64::from(answer.is_ok()));
        }
        let failed: Vec<anyhow::Error> = [s3, sqs, db].into_iter().filter_map(Result::err).collect();
        if failed.is_empty() { Ok(()) } else { Err(Unhealthy(failed)) }
    }
}

/// The dependencies that did not answer a health check, one per line.
#[derive(Debug)]
pub struct Unhealthy(Vec<anyhow::Error>);

impl std::fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<String> = self.0.iter().map(|e| format!("{e:#}")).collect();
        f.write_str(&lines.join("\n"))
    }
}

/// Runs one check within [`CHECK_TIMEOUT`], naming `what` when it fails.
async fn within(what: &'static str, check: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(answered) => answered.context(what),
        Err(_) => Err(anyhow::anyhow!("{what}: no answer within {CHECK_TIMEOUT:?}")),
    }
}

/// Serves `/metrics`, `/live` and `/ready` on `addr` until `stop` fires; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    stats: Arc<Stats>,
    health: Health,
    stop: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("METRICS_ADDR: cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(address = %bound, "serving /metrics, /live and /ready");
    let task = tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let (stats, health) = (stats.clone(), health.clone());
            let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let (stats, health) = (stats.clone(), health.clone());
                async move { Ok::<_, std::convert::Infallible>(answer(request.uri().path(), &stats, &health).await) }
            });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                    tracing::debug!(error = %e, "metrics endpoint: connection ended");
                }
            });
        }
    });
    Ok((bound, task))
}

async fn answer(path: &str, stats: &Stats, health: &Health) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => {
            // A failed dependency is a value of the scrape, not a failed scrape.
            let _ = health.check(stats).await;
            (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", stats.encode())
        }
        "/live" => (StatusCode::OK, "text/plain", "live\n".to_owned()),
        "/ready" => {
            let started = Instant::now();
            match health.check(stats).await {
                Ok(()) => (StatusCode::OK, "text/plain", format!("ok ({:.0?})\n", started.elapsed())),
                Err(why) => {
                    tracing::warn!(failed = %why, "a dependency does not answer");
                    (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{why}\n"))
                }
            }
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", "/metrics, /live or /ready\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
}

/// `consumer --health-check`: asks the running consumer's `/live` on `addr` (the loopback when
/// it listens on every interface); `Ok` on 200. For the container's health check, which has
/// no curl: it tells whether the process serves, never whether its dependencies answer.
pub async fn probe(addr: SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = if addr.ip().is_unspecified() { SocketAddr::new([127, 0, 0, 1].into(), addr.port()) } else { addr };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(target).await?;
        stream.write_all(b"GET /live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        anyhow::Ok(answer)
    };
    let answer = tokio::time::timeout(CHECK_TIMEOUT * 2, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from http://{target}/live"))??;
    let status_line = answer.lines().next().unwrap_or_default();
    anyhow::ensure!(
        status_line.split_whitespace().nth(1) == Some("200"),
        "http://{target}/live: {status_line}: {}",
        answer.split("\r\n\r\n").nth(1).unwrap_or_default().trim()
    );
    Ok(())
}
