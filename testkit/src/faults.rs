//! The fault matrix (`scripts/faults`): one migration in the mixed state, run with the real
//! feeder and consumer binaries against the real local services, while faults are injected,
//! a sampler checks I1 and a live writer plays the production service. Afterwards it checks
//! that nothing was lost, nothing overwritten, and that `feeder verify` agrees.
//!
//! Faults: consumers SIGKILLed (the last one not replaced); S3 and SQS answering 500, 503
//! SlowDown, connection resets (before and after the request took effect) and slow answers
//! on about 12 % of calls (`proxy`); copies throttled (503 SlowDown above a low rate) for a
//! while; the destination refusing every copy (403 AccessDenied, a grant gone) until every
//! consumer stops itself, then consumers started again once it is back; PostgreSQL
//! restarted; SQS unreachable for a while; the
//! feeder SIGKILLed twice mid-listing; a row held by a live transaction; poison messages;
//! sources deleted between listing and copy; destination conflicts (seeded and uploaded live);
//! destinations holding the same bytes under another ETag; S3 taking some requests and never
//! answering (a hung server) for a while. At the end, as an operator would: the fence and
//! `cleanup --yes` while a writer points rows back at the objects being deleted, and a
//! `rollback` started meanwhile (refused by the lease); every row that named an object before
//! must name one after.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::proxy::{Fault, FaultProxy, Rule, When};
use crate::{Env, binary};

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

/// The bytes of a seeded legacy object: distinct per key, so a copy can be checked exactly.
fn body_of(key: &str) -> Vec<u8> {
    format!("avatar bytes of {key}").into_bytes()
}

fn modern(key: &str) -> String {
    key.replacen("image/", "avatar/", 1)
}

struct Seeded {
    /// Every legacy object seeded (its key).
    legacy: Vec<String>,
    /// Legacy keys without a row (sources deleted mid-run are picked among them).
    without_rows: Vec<String>,
    /// Destinations seeded with other bytes: key -> bytes.
    conflicts: HashMap<String, Vec<u8>>,
    /// Destinations seeded with the same bytes under another ETag: key -> ETag.
    same_bytes: HashMap<String, String>,
    /// Legacy paths of rows whose object never existed.
    missing: HashSet<String>,
}

async fn seed(env: &Env, n: usize) -> anyhow::Result<Seeded> {
    let legacy: Vec<String> = (0..n).map(|i| format!("image/avatar-{i:06}.png")).collect();
    for chunk in legacy.chunks(64) {
        futures::future::join_all(
            chunk.iter().map(|k| async move { env.put(&env.source_bucket, k, &body_of(k)).await }),
        )
        .await;
    }
    let without_rows: Vec<String> = legacy.iter().step_by(10).cloned().collect();
    let no_row: HashSet<&String> = without_rows.iter().collect();
    let mut rows: Vec<String> = legacy.iter().filter(|k| !no_row.contains(k)).cloned().collect();
    let mut conflicts = HashMap::new();
    let mut same_bytes = HashMap::new();
    for (i, key) in legacy.iter().enumerate().filter(|(i, _)| i % 10 != 0) {
        if i % 97 == 1 {
            let other = format!("a newer upload at {}", modern(key)).into_bytes();
            env.put(&env.destination_bucket, &modern(key), &other).await;
            conflicts.insert(modern(key), other);
        } else if i % 97 == 2 {
            env.put_multipart(&env.destination_bucket, &modern(key), &body_of(key)).await;
            let etag = env.s3.head_object().bucket(&env.destination_bucket).key(modern(key)).send().await?;
            same_bytes.insert(modern(key), etag.e_tag().unwrap_or_default().to_owned());
        }
    }
    // Modern rows already migrated, and rows whose legacy object never existed.
    let modern_keys: Vec<String> = (0..n / 5).map(|i| format!("avatar/modern-{i:06}.png")).collect();
    for chunk in modern_keys.chunks(64) {
        futures::future::join_all(chunk.iter().map(|k| env.put(&env.destination_bucket, k, b"modern"))).await;
    }
    rows.extend(modern_keys);
    let missing: HashSet<String> = (0..10).map(|i| format!("image/never-existed-{i}.png")).collect();
    rows.extend(missing.iter().cloned());
    fastrand::shuffle(&mut rows);
    env.insert_rows(&rows).await;
    Ok(Seeded { legacy, without_rows, conflicts, same_bytes, missing })
}

/// The live service: uploads new avatars and repoints rows at them, uploads avatars at
/// destinations the migration has not reached yet, inserts rows; times every row write.
struct Live {
    /// Row id -> the path the live service last wrote.
    rows: Mutex<HashMap<i32, String>>,
    /// Destination key -> the bytes the live service uploaded there.
    uploads: Mutex<HashMap<String, Vec<u8>>>,
    /// Row-write latencies in microseconds (writes while PostgreSQL restarts are left out).
    latencies_us: Mutex<Vec<u64>>,
    /// The row the live transaction holds (never written by the writer meanwhile).
    held_row: AtomicI64,
    /// PostgreSQL is being restarted: writes fail or wait for reasons of their own.
    pg_restarting: AtomicBool,
}

/// `seeded_destinations` are the destinations seeded before the run (conflicts, same bytes):
/// a live upload never lands on one, or the check of what the migration left there would
/// expect the seeded bytes and find the live ones.
async fn live_writer(
    env: Arc<Env>,
    live: Arc<Live>,
    legacy_with_rows: Vec<String>,
    seeded_destinations: HashSet<String>,
    stop: CancellationToken,
) {
    let max_id: i32 = sqlx::query_scalar("SELECT max(id) FROM avatars").fetch_one(&env.db).await.unwrap_or(1);
    let mut n = 0u64;
    while !stop.is_cancelled() {
        n += 1;
        let key = format!("avatar/live-{n:06}.png");
        env.put(&env.destination_bucket, &key, format!("live upload {n}").as_bytes()).await;
        let id = fastrand::i32(1..=max_id);
        if i64::from(id) != live.held_row.load(Ordering::SeqCst) {
            let started = Instant::now();
            let written =
                sqlx::query("UPDATE avatars SET path = $1 WHERE id = $2").bind(&key).bind(id).execute(&env.db).await;
            if written.is_ok() {
                live.rows.lock().unwrap().insert(id, key.clone());
                if !live.pg_restarting.load(Ordering::SeqCst) {
                    live.latencies_us.lock().unwrap().push(started.elapsed().as_micros() as u64);
                }
            }
        }
        if n.is_multiple_of(10) {
            // A new avatar uploaded at a destination the migration has not reached: far enough
            // past the feeder's checkpoint that no message for it can exist yet.
            let cp = common::db::load_checkpoint(&env.db, &env.source_bucket, "image/").await.unwrap_or_default();
            let listed = cp.last_key.unwrap_or_default();
            let first = legacy_with_rows.partition_point(|k| *k <= listed) + 500;
            if !cp.finished && first < legacy_with_rows.len() {
                let target = modern(&legacy_with_rows[fastrand::usize(first..legacy_with_rows.len())]);
                let new = !seeded_destinations.contains(&target) && !live.uploads.lock().unwrap().contains_key(&target);
                if new {
                    let bytes = format!("a live upload at {target}").into_bytes();
                    env.put(&env.destination_bucket, &target, &bytes).await;
                    live.uploads.lock().unwrap().insert(target, bytes);
                }
            }
        }
        if n.is_multiple_of(25) {
            let _ = sqlx::query("INSERT INTO avatars (path) VALUES ($1)").bind(&key).execute(&env.db).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// I1: reads random rows and HEADs what they name; returns (samples, violations).
async fn sampler(env: Arc<Env>, missing: HashSet<String>, stop: CancellationToken) -> (u64, Vec<String>) {
    let (mut samples, mut violations) = (0u64, Vec::new());
    while !stop.is_cancelled() {
        let Ok(rows) = sqlx::query_scalar::<_, String>("SELECT path FROM avatars ORDER BY random() LIMIT 20")
            .fetch_all(&env.db)
            .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await; // PostgreSQL restarting
            continue;
        };
        let checks = rows.into_iter().filter(|p| !missing.contains(p)).map(|path| {
            let env = &env;
            async move {
                let bucket = if path.starts_with("avatar/") { &env.destination_bucket } else { &env.source_bucket };
                (common::identity::head_etag(&env.s3, bucket, &path).await, path)
            }
        });
        for (head, path) in futures::future::join_all(checks).await {
            match head {
                Ok(Some(_)) => samples += 1,
                Ok(None) => {
                    samples += 1;
                    violations.push(path);
                }
                Err(_) => {} // the check itself failed: no sample
            }
        }
    }
    (samples, violations)
}

fn command(name: &str, vars: &[(String, String)], extra: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(binary(name));
    cmd.envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .envs(extra.iter().copied())
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// A consumer of the run, with the file its stderr (errors only) goes to.
struct Consumer {
    child: Child,
    log: std::path::PathBuf,
}

impl Consumer {
    /// Waits for its exit; with a failed one, its last line on stderr says why.
    async fn wait(&mut self) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let status = self.child.wait().await?;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let _ = std::fs::remove_file(&self.log);
        Ok((status, log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default().to_owned()))
    }
}

fn spawn_consumer(vars: &[(String, String)]) -> anyhow::Result<Consumer> {
    let extra = [
        ("CONCURRENCY", "16"),
        ("VISIBILITY_TIMEOUT", "4"),
        ("EXIT_WHEN_IDLE", "3"),
        ("SHUTDOWN_GRACE_SECONDS", "5"),
        ("DB_BATCH_MAX_WAIT_MS", "20"),
    ];
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTED.fetch_add(1, Ordering::SeqCst);
    let log = std::env::temp_dir().join(format!("faults-consumer-{}-{n}.log", std::process::id()));
    let stderr = std::fs::File::create(&log).context("creating a consumer's log")?;
    let child = command("consumer", vars, &extra).stderr(stderr).spawn().context("starting a consumer")?;
    Ok(Consumer { child, log })
}

/// The feeder, SIGKILLed twice mid-listing (at 10 % and 30 % of the objects listed) and started
/// again each time until it finishes; a run that fails by itself (a fault outlasted its
/// retries) is started again too, as an operator would. Returns (kills, runs).
async fn feed_with_kills(env: &Env, vars: &[(String, String)], total: usize) -> anyhow::Result<(u64, u32)> {
    let extra = [("PAGE_SIZE", "50")];
    let kill_points = [total / 10, total * 3 / 10];
    let (mut kills, mut runs) = (0u64, 0u32);
    loop {
        runs += 1;
        anyhow::ensure!(runs <= 20, "the feeder did not finish in 20 runs");
        let mut feeder = command("feeder", vars, &extra).spawn()?;
        let status = loop {
            if let Some(status) = feeder.try_wait()? {
                break Some(status);
            }
            let cp = common::db::load_checkpoint(&env.db, &env.source_bucket, "image/").await.unwrap_or_default();
            if kill_points.get(kills as usize).is_some_and(|at| cp.listed as usize >= *at && !cp.finished) {
                feeder.start_kill()?;
                feeder.wait().await?;
                kills += 1;
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let cp = common::db::load_checkpoint(&env.db, &env.source_bucket, "image/").await.unwrap_or_default();
        if status.is_some_and(|s| s.success()) && cp.finished {
            return Ok((kills, runs));
        }
    }
}

/// What the run is doing, on stderr (stdout carries the table and the JSON line).
fn say(started: Instant, what: impl std::fmt::Display) {
    eprintln!("faults: {:>6.1}s {what}", started.elapsed().as_secs_f64());
}

/// Runs the whole matrix; see the module documentation.
pub async fn run(config: &Config) -> anyhow::Result<Report> {
    let begun = Instant::now();
    let env = Arc::new(Env::new().await);
    let seeded = seed(&env, config.objects).await?;
    say(begun, format!("seeded {} legacy objects in the mixed state", seeded.legacy.len()));
    common::db::prepare(&env.db).await?;
    let s3 = FaultProxy::start(&env.s3_endpoint).await?;
    let sqs = FaultProxy::start(&env.sqs_endpoint).await?;
    for proxy in [&s3, &sqs] {
        add_random_faults(proxy);
    }
    // Copies throttled for a while (from THROTTLE_AT), as an S3 partition does: unlimited until then.
    let throttle = crate::proxy::RateLimit::new(f64::MAX);
    s3.add(Rule::always(copies(), Fault::RateLimited(throttle.clone())));
    let mut vars = env.vars();
    vars.retain(|(k, _)| !k.starts_with("AWS_ENDPOINT_URL"));
    vars.push(("AWS_ENDPOINT_URL_S3".into(), s3.url.clone()));
    vars.push(("AWS_ENDPOINT_URL_SQS".into(), sqs.url.clone()));
    // A hung request is given up after 2 s an attempt, an object after 8 s.
    vars.push(("S3_REQUEST_TIMEOUT".into(), "2s".into()));
    vars.push(("OBJECT_TIMEOUT".into(), "8s".into()));

    // Poison messages, straight into the queue.
    let poison = ["not json at all", r#"{"v":7,"key":"image/x.png"}"#, r#"{"v":1,"key":"","size":1,"etag":"e"}"#];
    for body in poison {
        env.send_raw(body).await;
    }

    let stop = CancellationToken::new();
    let live = Arc::new(Live {
        rows: Mutex::new(HashMap::new()),
        uploads: Mutex::new(HashMap::new()),
        latencies_us: Mutex::new(Vec::new()),
        held_row: AtomicI64::new(-1),
        pg_restarting: AtomicBool::new(false),
    });
    let without_rows: HashSet<&String> = seeded.without_rows.iter().collect();
    let legacy_with_rows: Vec<String> = seeded.legacy.iter().filter(|k| !without_rows.contains(k)).cloned().collect();
    let seeded_destinations = seeded.conflicts.keys().chain(seeded.same_bytes.keys()).cloned().collect();
    let writer = tokio::spawn(live_writer(
        env.clone(),
        live.clone(),
        legacy_with_rows.clone(),
        seeded_destinations,
        stop.clone(),
    ));
    let sampling = tokio::spawn(sampler(env.clone(), seeded.missing.clone(), stop.clone()));

    let started = Instant::now();
    let mut consumers: Vec<Consumer> =
        (0..config.consumers).map(|_| spawn_consumer(&vars)).collect::<Result<_, _>>()?;
    let feeding = {
        let (env, vars, total) = (env.clone(), vars.clone(), config.objects);
        tokio::spawn(async move { feed_with_kills(&env, &vars, total).await })
    };

    // Faults triggered by progress: the share of legacy rows rewritten so far.
    let legacy_rows = legacy_with_rows.len() as f64;
    let (mut consumer_kills, mut deleted, mut pg_restarts, mut outages, mut locks) =
        (0u64, Vec::new(), 0u64, 0u64, 0u64);
    let mut lock_task = None;
    let (mut throttled, mut refusing, mut hanging) = (Phase::NotYet, Phase::NotYet, Phase::NotYet);
    let mut hung = 0u64;
    let mut stopped_by_refusals: Vec<(std::process::ExitStatus, String)> = Vec::new();
    let mut refused = 0;
    let deadline = started + Duration::from_secs(1800);
    let mut last_report = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        anyhow::ensure!(Instant::now() < deadline, "the run did not end within 30 minutes");
        let left: i64 = match sqlx::query_scalar("SELECT count(*) FROM avatars WHERE path LIKE 'image/avatar-%'")
            .fetch_one(&env.db)
            .await
        {
            Ok(n) => n,
            Err(_) => continue, // PostgreSQL restarting
        };
        let progress = 1.0 - left as f64 / legacy_rows;
        if deleted.is_empty() && progress >= 0.02 {
            // Sources deleted between listing and copy: listed (enqueued) but not copied yet.
            let Ok(cp) = common::db::load_checkpoint(&env.db, &env.source_bucket, "image/").await else { continue };
            let listed_up_to = cp.last_key.unwrap_or_default();
            for key in seeded.without_rows.iter().rev().filter(|k| **k <= listed_up_to).take(5) {
                if !env.exists(&env.destination_bucket, &modern(key)).await {
                    env.s3.delete_object().bucket(&env.source_bucket).key(key).send().await?;
                    deleted.push(key.clone());
                }
            }
        }
        if locks == 0 && progress >= 0.10 {
            locks = 1;
            say(
                begun,
                format!("{:.0} % moved: a live transaction holds a row for {:?}", progress * 100.0, config.row_lock),
            );
            let (env, live, hold) = (env.clone(), live.clone(), config.row_lock);
            lock_task = Some(tokio::spawn(async move {
                let id: i32 = sqlx::query_scalar("SELECT id FROM avatars WHERE path LIKE 'image/avatar-%' LIMIT 1")
                    .fetch_one(&env.db)
                    .await?;
                live.held_row.store(i64::from(id), Ordering::SeqCst);
                let mut tx = env.db.begin().await?;
                sqlx::query("SELECT 1 FROM avatars WHERE id = $1 FOR UPDATE").bind(id).execute(&mut *tx).await?;
                tokio::time::sleep(hold).await;
                let _ = tx.commit().await; // a PostgreSQL restart may have ended it already
                live.held_row.store(-1, Ordering::SeqCst);
                anyhow::Ok(())
            }));
        }
        // SIGKILL a consumer at 15 %, 35 % and 60 %; the last one is not replaced.
        let kill_points = [(0.15, true), (0.35, true), (0.60, false)];
        if let Some(&(at, replace)) = kill_points.get(consumer_kills as usize)
            && progress >= at
            && !consumers.is_empty()
        {
            say(begun, format!("{:.0} % moved: SIGKILL a consumer", progress * 100.0));
            let victim = fastrand::usize(..consumers.len());
            let mut victim = consumers.swap_remove(victim);
            victim.child.start_kill()?;
            victim.wait().await?;
            consumer_kills += 1;
            if replace {
                consumers.push(spawn_consumer(&vars)?);
            }
        }
        if pg_restarts == 0 && progress >= 0.30 {
            if let Some(script) = &config.restart_postgres {
                say(begun, format!("{:.0} % moved: restart PostgreSQL", progress * 100.0));
                live.pg_restarting.store(true, Ordering::SeqCst);
                let status = Command::new(script).arg("restart-postgres").status().await?;
                anyhow::ensure!(status.success(), "restarting PostgreSQL failed");
                tokio::time::sleep(Duration::from_secs(1)).await; // pools reconnect
                live.pg_restarting.store(false, Ordering::SeqCst);
            }
            pg_restarts = 1;
        }
        if outages == 0 && progress >= 0.50 {
            say(begun, format!("{:.0} % moved: SQS unreachable for {:?}", progress * 100.0, config.sqs_outage));
            sqs.set_down(true);
            tokio::time::sleep(config.sqs_outage).await;
            sqs.set_down(false);
            outages = 1;
        }
        // Sustained throttling: copies above THROTTLE_RATE per second refused with SlowDown.
        if matches!(throttled, Phase::NotYet) && progress >= THROTTLE_AT {
            say(
                begun,
                format!("{:.0} % moved: copies throttled to {THROTTLE_RATE}/s for {THROTTLE_FOR:?}", progress * 100.0),
            );
            throttle.set_rate(THROTTLE_RATE);
            throttled = Phase::Since(Instant::now());
        }
        if let Phase::Since(since) = throttled
            && since.elapsed() >= THROTTLE_FOR
        {
            throttle.set_rate(f64::MAX);
            throttled = Phase::Over;
        }
        // A hung server: a share of S3's requests taken and never answered, for a while.
        if matches!(hanging, Phase::NotYet) && progress >= HANG_AT && !matches!(refusing, Phase::Since(_)) {
            say(
                begun,
                format!(
                    "{:.0} % moved: S3 takes {:.0} % of requests and never answers, for {HANG_FOR:?}",
                    progress * 100.0,
                    HANG_SHARE * 100.0
                ),
            );
            s3.clear();
            let mut hang = Rule::sometimes(When::default(), Fault::Hang, HANG_SHARE);
            hang.remaining = Some(REFUSALS_AT_MOST);
            s3.add(hang);
            add_random_faults(&s3);
            s3.add(Rule::always(copies(), Fault::RateLimited(throttle.clone())));
            hanging = Phase::Since(Instant::now());
        }
        if let Phase::Since(since) = hanging
            && since.elapsed() >= HANG_FOR
        {
            hung = REFUSALS_AT_MOST - s3.remaining(0).unwrap_or(REFUSALS_AT_MOST);
            s3.clear();
            add_random_faults(&s3);
            s3.add(Rule::always(copies(), Fault::RateLimited(throttle.clone())));
            hanging = Phase::Over;
        }
        // A systemic refusal: every copy refused, until every running consumer stops itself;
        // then the grant is back, and consumers are started again.
        if matches!(refusing, Phase::NotYet) && progress >= REFUSE_AT && !consumers.is_empty() {
            say(
                begun,
                format!("{:.0} % moved: the destination refuses every copy (403 AccessDenied)", progress * 100.0),
            );
            // First, so that no other rule answers a copy instead.
            s3.clear();
            let mut refuse = Rule::always(copies(), Fault::Error { status: 403, code: "AccessDenied" });
            refuse.remaining = Some(REFUSALS_AT_MOST);
            s3.add(refuse);
            add_random_faults(&s3);
            s3.add(Rule::always(copies(), Fault::RateLimited(throttle.clone())));
            refusing = Phase::Since(Instant::now());
        }
        if let Phase::Since(since) = refusing {
            let mut running = 0;
            for c in &mut consumers {
                if c.child.try_wait()?.is_none() {
                    running += 1;
                }
            }
            anyhow::ensure!(
                since.elapsed() < Duration::from_secs(120),
                "{running} consumers still running 2 minutes into a systemic refusal"
            );
            if running == 0 {
                for mut c in consumers.drain(..) {
                    stopped_by_refusals.push(c.wait().await?);
                }
                say(
                    begun,
                    format!(
                        "every consumer stopped itself in {:.1} s: the grant is back, consumers started again",
                        since.elapsed().as_secs_f64()
                    ),
                );
                refused = REFUSALS_AT_MOST - s3.remaining(0).unwrap_or(REFUSALS_AT_MOST);
                s3.clear();
                add_random_faults(&s3);
                s3.add(Rule::always(copies(), Fault::RateLimited(throttle.clone())));
                consumers = (0..config.consumers).map(|_| spawn_consumer(&vars)).collect::<Result<_, _>>()?;
                refusing = Phase::Over;
            }
            continue;
        }
        // The end: every consumer exited by itself (the queue was empty) and the feeder is done.
        let mut running = 0;
        for c in &mut consumers {
            if c.child.try_wait()?.is_none() {
                running += 1;
            }
        }
        if running == 0 && feeding.is_finished() {
            say(begun, "every consumer exited by itself; the feeder is done");
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            say(
                begun,
                format!(
                    "{:.0} % moved, {running} consumers running, feeder done: {}",
                    progress * 100.0,
                    feeding.is_finished()
                ),
            );
        }
    }
    let (feeder_kills, feeder_runs) = feeding.await??;
    if let Some(task) = lock_task {
        task.await??;
    }
    let mut exits = Vec::new();
    for c in &mut consumers {
        exits.push(c.wait().await?);
    }
    let elapsed = started.elapsed();
    stop.cancel();
    writer.await?;
    let (samples, violations) = sampling.await?;
    let depth = common::aws::queue_depth(&env.sqs, &env.queue_url).await?;

    // The plan's end: verify; if legacy rows are left, redrive the dead letters, reconcile,
    // drain, verify again.
    let direct = env.vars();
    say(begun, "feeder verify");
    let first = verify(&direct).await?;
    let mut second_pass = String::from("not needed");
    let needed = first["rows_legacy_pending"].as_u64() != Some(0);
    if needed {
        say(begun, "not done: redrive the dead letters, reconcile, drain, verify again");
        let redriven = redrive(&env).await?;
        let reconcile = command("feeder", &direct, &[]).arg("reconcile").status().await?;
        anyhow::ensure!(reconcile.success(), "feeder reconcile failed");
        let drained =
            command("consumer", &direct, &[("EXIT_WHEN_IDLE", "2"), ("VISIBILITY_TIMEOUT", "2")]).status().await?;
        anyhow::ensure!(drained.success(), "the second pass's consumer failed");
        second_pass = format!("{redriven} dead letters redriven, reconcile, one consumer");
    }
    let verified = verify(&direct).await?;
    // Agrees: nothing left pending, and the only rows that do not resolve are the seeded ones
    // whose legacy object never existed, reported (recorded) by verify.
    // (The live writer may have repointed some of those rows meanwhile.)
    let missing_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM avatars WHERE path = ANY($1)")
        .bind(seeded.missing.iter().collect::<Vec<_>>())
        .fetch_one(&env.db)
        .await?;
    let agrees = verified["rows_legacy_pending"].as_u64() == Some(0)
        && verified["rows_unresolvable"].as_i64() == Some(missing_rows)
        && verified["rows_legacy_missing"].as_i64() == Some(missing_rows);

    say(begun, "checking every object and row");
    let mut report = Report { objects: seeded.legacy.len() as u64, samples, ..Report::default() };
    report.violations = violations.len() as u64;
    report.problems.extend(violations.iter().take(10).map(|p| format!("I1: a row pointed at nothing: {p}")));
    check_objects(&env, &seeded, &deleted, &live, &mut report).await?;
    check_rows(&env, &live, &mut report).await?;
    let mut latencies = live.latencies_us.lock().unwrap().clone();
    latencies.sort_unstable();
    report.live_write_max_ms = latencies.last().copied().unwrap_or(0).div_ceil(1000);
    report.live_write_p99_ms = latencies
        .get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0)
        .div_ceil(1000);
    if !agrees {
        report.problems.push(format!("feeder verify does not agree: {verified}"));
        report.lost += 1;
    }
    if depth.total() != 0 {
        report.problems.push(format!("the queue is not empty after the consumers exited: {depth:?}"));
    }
    for (exit, last_error) in &exits {
        if !exit.success() {
            report.problems.push(format!("a consumer exited with {exit}: {last_error}"));
        }
    }

    let cleanup = cleanup_while_writing(&env, &direct, begun).await?;
    report.violations += cleanup.broken.len() as u64;
    report
        .problems
        .extend(cleanup.broken.iter().take(10).map(|p| format!("I1 after cleanup: a row names nothing: {p}")));
    if !cleanup.rollback_refused {
        report.problems.push("a rollback started during cleanup --yes was not refused by the lease".into());
    }

    let failures: BTreeMap<String, i64> = common::db::failure_counts(&env.db).await?.into_iter().collect();
    let halted = stopped_by_refusals
        .iter()
        .filter(|(exit, last)| exit.code() == Some(1) && last.contains("this is not about one object"));
    let halted = halted.count();
    if matches!(refusing, Phase::Over) && (halted == 0 || halted < stopped_by_refusals.len()) {
        report.problems.push(format!(
            "on a systemic refusal, {halted} of {} consumers stopped themselves with exit 1: {stopped_by_refusals:?}",
            stopped_by_refusals.len()
        ));
    }
    let stale_refusals = failures.get("access_denied").copied().unwrap_or(0);
    if stale_refusals != 0 {
        report.problems.push(format!("{stale_refusals} access_denied records left standing after the grant came back"));
    }
    let (_, throttled_refusals) = throttle.counts();
    let dead_lettered = common::aws::queue_depth(&env.sqs, &env.dlq_url).await?.total();
    let line = |fault: &str, injected: u64, outcome: String| Line { fault: fault.to_owned(), injected, outcome };
    report.lines = vec![
        line(
            "S3: 500 / 503 SlowDown / resets / slow answers (~12 %)",
            s3.injected(),
            format!("{} requests forwarded", s3.forwarded()),
        ),
        line(
            "SQS: 500 / 503 / resets / slow answers (~12 %)",
            sqs.injected(),
            format!("{} requests forwarded", sqs.forwarded()),
        ),
        line(
            &format!("S3: copies throttled to {THROTTLE_RATE}/s for {THROTTLE_FOR:?} (503 SlowDown)"),
            throttled_refusals,
            format!("paced; the dead-letter queue holds {dead_lettered} at the end (any cause)"),
        ),
        line(
            "S3: every copy refused (403 AccessDenied) until consumers stop",
            refused,
            format!(
                "{halted} of {} consumers stopped themselves (exit 1); after the fix {stale_refusals} refusal \
                 records left",
                stopped_by_refusals.len()
            ),
        ),
        line(&format!("SQS unreachable for {:?}", config.sqs_outage), outages, "consumers and feeder retried".into()),
        line(
            "consumers SIGKILLed (the last one not replaced)",
            consumer_kills,
            format!("{} consumers exited 0 at the end", exits.iter().filter(|(e, _)| e.success()).count()),
        ),
        line(
            "feeder SIGKILLed mid-listing",
            feeder_kills,
            format!("resumed from its checkpoint; {feeder_runs} runs in all"),
        ),
        line("PostgreSQL restarted mid-run", pg_restarts, "connections re-established".into()),
        line(
            &format!("a row held by a live transaction for {:?}", config.row_lock),
            locks,
            format!(
                "live writes on other rows: max {} ms, p99 {} ms",
                report.live_write_max_ms, report.live_write_p99_ms
            ),
        ),
        line(
            "poison messages",
            poison.len() as u64,
            format!("{} recorded malformed_message", failures.get("malformed_message").unwrap_or(&0)),
        ),
        line(
            "sources deleted between listing and copy",
            deleted.len() as u64,
            format!("{} recorded source_missing", failures.get("source_missing").unwrap_or(&0)),
        ),
        line(
            "destination conflicts (seeded + uploaded live)",
            (seeded.conflicts.len() + live.uploads.lock().unwrap().len()) as u64,
            format!(
                "{} recorded destination_conflict, {} overwritten",
                failures.get("destination_conflict").unwrap_or(&0),
                report.problems.iter().filter(|p| p.starts_with("overwritten: s3://")).count()
            ),
        ),
        line(
            "same bytes at the destination under another ETag",
            seeded.same_bytes.len() as u64,
            "counted as done, left untouched".into(),
        ),
        line(
            "live row writes (repointing rows to new uploads)",
            live.rows.lock().unwrap().len() as u64,
            "every one kept".into(),
        ),
        line(
            &format!("S3: {:.0} % of requests hung for {HANG_FOR:?} (taken, never answered)", HANG_SHARE * 100.0),
            hung,
            "each attempt given up after S3_REQUEST_TIMEOUT (2 s), tried again; no message held".into(),
        ),
        line(
            "cleanup --yes while a live writer points rows back at objects being deleted",
            cleanup.writes,
            format!(
                "{} legacy objects deleted, {} writes rewritten by the fence, {} rows naming nothing",
                cleanup.deleted,
                cleanup.rewritten,
                cleanup.broken.len()
            ),
        ),
        line(
            "rollback started during cleanup --yes",
            1,
            if cleanup.rollback_refused { "refused by the lease (exit 1)".into() } else { "NOT refused".into() },
        ),
        line("second pass (verify -> reconcile -> verify)", u64::from(needed), second_pass),
    ];
    report.faults_injected = report.lines.iter().take(15).map(|l| l.injected).sum();
    report.lines.push(line(
        "end state",
        0,
        format!(
            "{} objects in {:.0} s; queue {}/{}/{}; verify {}; {} samples, {} I1 violations, {} rows \
             reported (no legacy object)",
            report.objects,
            elapsed.as_secs_f64(),
            depth.visible,
            depth.in_flight,
            depth.delayed,
            if agrees { "agrees" } else { "DISAGREES" },
            samples,
            report.violations,
            missing_rows
        ),
    ));
    Ok(report)
}

/// The share of the run's rows moved when S3 starts hanging on some requests, how many, for how long.
const HANG_AT: f64 = 0.70;
const HANG_SHARE: f64 = 0.05;
const HANG_FOR: Duration = Duration::from_secs(5);

/// What the cleanup at the end did.
struct CleanupRun {
    deleted: u64,
    /// Writes of the live writer during the cleanup.
    writes: u64,
    /// Of those, what the fence rewrote to the copy's path.
    rewritten: u64,
    /// Rows that named an object before the cleanup and name nothing after it.
    broken: Vec<String>,
    rollback_refused: bool,
}

/// Rows naming nothing: a legacy path missing from the source bucket, a modern one from the
/// destination bucket (other paths are not ours to judge).
async fn rows_naming_nothing(env: &Env) -> anyhow::Result<HashSet<String>> {
    let rows: Vec<(i32, Option<String>)> = sqlx::query_as("SELECT id, path FROM avatars").fetch_all(&env.db).await?;
    let mut broken = HashSet::new();
    for (id, path) in rows {
        let Some(path) = path else { continue };
        let bucket = if path.starts_with("avatar/") {
            &env.destination_bucket
        } else if path.starts_with("image/") {
            &env.source_bucket
        } else {
            continue;
        };
        if !env.exists(bucket, &path).await {
            broken.insert(format!("row {id} -> {path}"));
        }
    }
    Ok(broken)
}

/// The end of a migration, as an operator runs it while the live service writes: the fence,
/// then `cleanup --yes`, while a writer keeps pointing rows back at the legacy paths of the
/// objects being deleted (the one cleanup tombstoned last) and inserting rows with them; a
/// `rollback` started meanwhile must be refused by the lease. Every row that named an object
/// before must name one after.
async fn cleanup_while_writing(env: &Env, vars: &[(String, String)], begun: Instant) -> anyhow::Result<CleanupRun> {
    say(begun, "cleanup --yes with the fence, while a live writer points rows back at what it deletes");
    let before = rows_naming_nothing(env).await?;
    let fence = command("feeder", vars, &[]).args(["fence", "install"]).status().await?;
    anyhow::ensure!(fence.success(), "feeder fence install failed");
    let stop = CancellationToken::new();
    let writer = {
        let (db, stop) = (env.db.clone(), stop.clone());
        tokio::spawn(async move {
            let mut writes = 0u64;
            while !stop.is_cancelled() {
                let chased: Option<(String, String)> = sqlx::query_as(
                    "SELECT legacy_path, new_path FROM avatar_migration_tombstones ORDER BY created_at DESC LIMIT 1",
                )
                .fetch_optional(&db)
                .await
                .ok()
                .flatten();
                let Some((legacy, modern)) = chased else {
                    tokio::task::yield_now().await;
                    continue;
                };
                let wrote = async {
                    let mut tx = db.begin().await?;
                    sqlx::query("UPDATE avatars SET path = $1 WHERE path = $2")
                        .bind(&legacy)
                        .bind(&modern)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("INSERT INTO avatars (path) VALUES ($1)").bind(&legacy).execute(&mut *tx).await?;
                    tx.commit().await
                };
                if wrote.await.is_ok() {
                    writes += 1;
                }
            }
            writes
        })
    };
    // A transaction open before cleanup's first tombstones holds cleanup in its wait (the
    // delete protocol's step 3) until the rollback below has tried: cleanup surely holds its
    // lease then, however fast it would otherwise finish.
    let mut open = env.db.begin().await?;
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut *open).await?;
    let cleanup = command("feeder", vars, &[])
        .args(["cleanup", "--yes", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting feeder cleanup")?;
    // Once cleanup holds the lease (its first tombstones), a rollback must not start.
    let tombstoned = || async {
        sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM avatar_migration_tombstones)")
            .fetch_one(&env.db)
            .await
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !tombstoned().await && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rollback = command("feeder", vars, &[])
        .args(["rollback", "--force"])
        .stderr(std::process::Stdio::piped())
        .output()
        .await?;
    let rollback_refused =
        rollback.status.code() == Some(1) && String::from_utf8_lossy(&rollback.stderr).contains("feeder cleanup on");
    if !rollback_refused {
        say(begun, format!("rollback during cleanup: {}", String::from_utf8_lossy(&rollback.stderr).trim()));
    }
    open.commit().await?;
    let out = cleanup.wait_with_output().await?;
    stop.cancel();
    let writes = writer.await?;
    anyhow::ensure!(out.status.success(), "feeder cleanup --yes failed: {}", String::from_utf8_lossy(&out.stdout));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("feeder cleanup --json printed {stdout:?}"))?;
    let status = command("feeder", vars, &[])
        .args(["fence", "status", "--json"])
        .stdout(std::process::Stdio::piped())
        .output()
        .await?;
    let status = String::from_utf8_lossy(&status.stdout);
    let status: serde_json::Value = serde_json::from_str(status.lines().last().unwrap_or_default())
        .with_context(|| format!("feeder fence status --json printed {status:?}"))?;
    let after = rows_naming_nothing(env).await?;
    let mut broken: Vec<String> = after.difference(&before).cloned().collect();
    broken.sort();
    say(begun, format!("cleanup: {result}; rows naming nothing before {}, after {}", before.len(), after.len()));
    Ok(CleanupRun {
        deleted: result["deleted"].as_u64().unwrap_or(0),
        writes,
        rewritten: status["writes_rewritten"].as_u64().unwrap_or(0),
        broken,
        rollback_refused,
    })
}

/// The share of the run's rows moved when copies are throttled, at what rate, for how long.
const THROTTLE_AT: f64 = 0.20;
const THROTTLE_RATE: f64 = 15.0;
const THROTTLE_FOR: Duration = Duration::from_secs(8);
/// The share moved when the destination starts refusing every copy.
const REFUSE_AT: f64 = 0.45;
/// More refusals than the phase can meet: the rule's count of what it has left tells how many.
const REFUSALS_AT_MOST: u64 = 1_000_000;

/// Where a timed fault stands.
#[derive(Debug, Clone, Copy)]
enum Phase {
    NotYet,
    Since(Instant),
    Over,
}

/// About 12 % of calls faulted: 500, 503 SlowDown, resets before and after the request took
/// effect, slow answers; the rules are tried in turn.
fn add_random_faults(proxy: &FaultProxy) {
    for (fault, p) in [
        (Fault::Error { status: 500, code: "InternalError" }, 0.03),
        (Fault::Error { status: 503, code: "SlowDown" }, 0.03),
        (Fault::Reset, 0.02),
        (Fault::ResetAfter, 0.02),
        (Fault::Delay(Duration::from_millis(300)), 0.03),
    ] {
        proxy.add(Rule::sometimes(When::default(), fault, p));
    }
}

/// The run's copies (their source under `image/`), not the consumers' start-up probes.
fn copies() -> When {
    When { method: Some("PUT"), contains: Some("/image/".into()), ..When::default() }
}

/// `feeder verify --json`, straight to the real servers; its JSON line.
async fn verify(vars: &[(String, String)]) -> anyhow::Result<serde_json::Value> {
    let out =
        command("feeder", vars, &[]).args(["verify", "--json"]).stdout(std::process::Stdio::piped()).output().await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("feeder verify --json printed {last:?}"))
}

/// Moves every message of the dead-letter queue back to the queue (the operator's redrive).
async fn redrive(env: &Env) -> anyhow::Result<u64> {
    let mut moved = 0;
    loop {
        let out = env.sqs.receive_message().queue_url(&env.dlq_url).max_number_of_messages(10).send().await?;
        let messages = out.messages.unwrap_or_default();
        if messages.is_empty() && common::aws::queue_depth(&env.sqs, &env.dlq_url).await?.total() == 0 {
            return Ok(moved);
        }
        for m in messages {
            env.sqs.send_message().queue_url(&env.queue_url).message_body(m.body().unwrap_or_default()).send().await?;
            env.sqs
                .delete_message()
                .queue_url(&env.dlq_url)
                .receipt_handle(m.receipt_handle().unwrap_or_default())
                .send()
                .await?;
            moved += 1;
        }
    }
}

/// Every seeded object is copied with its exact bytes or recorded with a reason; no
/// destination the live service or the seed put there was overwritten.
async fn check_objects(
    env: &Env,
    seeded: &Seeded,
    deleted: &[String],
    live: &Live,
    report: &mut Report,
) -> anyhow::Result<()> {
    let recorded: HashSet<String> = common::db::list_failures(&env.db).await?.into_iter().map(|f| f.subject).collect();
    let uploads = live.uploads.lock().unwrap().clone();
    let deleted: HashSet<&String> = deleted.iter().collect();
    for key in &seeded.legacy {
        let dest = modern(key);
        let got = env.get(&env.destination_bucket, &dest).await;
        if let Some(expected) = seeded.conflicts.get(&dest).or(uploads.get(&dest)) {
            if got.as_ref() != Some(expected) {
                report.overwritten += 1;
                report.problems.push(format!("overwritten: s3://{}/{dest}", env.destination_bucket));
            }
            if !recorded.contains(key) {
                report.lost += 1;
                report.problems.push(format!("a conflict not recorded: {key}"));
            }
            continue;
        }
        if let Some(etag) = seeded.same_bytes.get(&dest) {
            let now = env.s3.head_object().bucket(&env.destination_bucket).key(&dest).send().await?;
            if now.e_tag() != Some(etag.as_str()) {
                report.overwritten += 1;
                report.problems.push(format!("a same-bytes destination was rewritten: {dest}"));
            }
        }
        let copied = got.as_deref() == Some(&body_of(key)[..]);
        if !copied && !recorded.contains(key) {
            report.lost += 1;
            report.problems.push(format!("lost: {key} (deleted mid-run: {})", deleted.contains(key)));
        }
    }
    Ok(())
}

/// Rows the live service wrote keep its value.
async fn check_rows(env: &Env, live: &Live, report: &mut Report) -> anyhow::Result<()> {
    let now: HashMap<i32, String> = env.rows().await.into_iter().collect();
    for (id, path) in live.rows.lock().unwrap().iter() {
        if now.get(id) != Some(path) {
            report.overwritten += 1;
            report.problems.push(format!("row {id}: the live service wrote {path:?}, it now holds {:?}", now.get(id)));
        }
    }
    Ok(())
}
