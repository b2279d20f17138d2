//! The benchmark behind `scripts/bench`: our pipeline and the copy-only tools a user would pick
//! instead (rclone, s5cmd), side by side on the same S3 server, the same objects and in the
//! same run, so that their ratios mean something on a shared, noisy machine.
//!
//! Per server (MiniStack for S3 and SQS; SeaweedFS for S3 with SQS on MiniStack): N objects
//! (100-1,500 bytes, `image/png`) are seeded once under `image/` of a source bucket. Then, per
//! repetition, each tool copies all of them server-side into a fresh bucket:
//! - `pipeline` (or `pipeline+VAR=VALUE+…`, the same with further settings): a fresh database with a row per object, the feeder and the consumers started
//!   together; done when every row points at its copy (then the queue must be empty and nothing
//!   recorded as a failure);
//! - `rclone-nocheck`: rclone with destination checks and HEADs off (its fastest documented
//!   settings for a one-way copy into an empty bucket);
//! - `rclone`: rclone with its default checks, same parallelism;
//! - `s5cmd`: s5cmd `cp` with 256 workers.
//!
//! Repetition 0 goes through a counting proxy (requests per object) and is left out of the
//! medians; the others go straight to the servers. Measured per run: wall time, objects/s,
//! CPU seconds of the tool's processes (user + system, from `/usr/bin/time`), peak RSS per
//! process, and the CPU seconds the servers spent (their process groups, from `/proc`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use aws_sdk_s3::primitives::ByteStream;
use futures::StreamExt;
use serde_json::json;
use tokio::process::Command;

use std::sync::Arc;

use crate::proxy::{Fault, FaultProxy, RateLimit, Rule, When};
use crate::{Env, binary};

/// One S3 (+ SQS) server to measure on.
#[derive(Debug, Clone)]
pub struct Server {
    pub name: String,
    pub s3: String,
    pub sqs: String,
    /// Process groups whose CPU time is the server's (see `scripts/local-services`).
    pub groups: Vec<i32>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub objects: usize,
    /// Timed repetitions per tool (after the counting one).
    pub reps: usize,
    /// Whether a first, untimed repetition goes through the counting proxy (requests per
    /// object); off for long runs, where it would double the time.
    pub counting: bool,
    pub consumers: usize,
    pub concurrency: Option<usize>,
    /// Further settings for the pipeline's consumers and feeder (`VAR=VALUE`).
    pub pipeline_env: Vec<(String, String)>,
    pub servers: Vec<Server>,
    /// Tools to run: `pipeline`, `rclone-nocheck`, `rclone`, `s5cmd`.
    pub tools: Vec<String>,
    pub rclone: String,
    pub s5cmd: String,
    /// S3's limit, played by a proxy in front of the server (`--throttle`): PUTs (copies)
    /// above this rate are refused with 503 SlowDown.
    pub throttle: Option<Throttle>,
}

/// The throttled mode: PUTs above `per_second` refused with S3's 503 SlowDown (a token bucket
/// holding a tenth of a second's worth, `proxy::RateLimit`); the rate doubles `double_after`
/// the start of each run, when set.
#[derive(Debug, Clone, Copy)]
pub struct Throttle {
    pub per_second: f64,
    pub double_after: Option<Duration>,
}

/// What a run made of the limit.
#[derive(Debug, Clone, Copy, Default)]
struct Throttled {
    /// Copies let through per second, over the limit, from the first to the one that brought
    /// the run to 95 % (or to the doubling, when the limit doubled).
    goodput_of_limit: f64,
    /// Refused PUTs over all PUTs.
    refused_share: f64,
    /// Seconds from the doubling until five seconds in a row carried 0.95 of the new limit;
    /// `None` without a doubling, or when the run never got there.
    follow_s: Option<f64>,
}

impl Throttled {
    fn measure(limit: &RateLimit, throttle: &Throttle, started: Instant) -> Option<Throttled> {
        let (accepted, refused) = limit.counts();
        let (first, last) = (*accepted.first()?, *accepted.last()?);
        let doubled_at = throttle.double_after.map(|d| started + d).filter(|at| *at < last);
        // Up to the doubling, or to the copy that brought the run to 95 %: the last seconds,
        // when the work runs out whatever the pace, are left out (for every tool alike).
        let until = doubled_at.unwrap_or(accepted[accepted.len() * 95 / 100]);
        let before = accepted.iter().filter(|t| **t <= until).count();
        let span = until.duration_since(first).as_secs_f64();
        let goodput_of_limit = if span > 0.0 { (before - 1) as f64 / span / throttle.per_second } else { 0.0 };
        if std::env::var_os("BENCH_SERIES").is_some() {
            let mut series = vec![0u32; last.duration_since(first).as_secs() as usize + 1];
            for t in &accepted {
                series[t.duration_since(first).as_secs() as usize] += 1;
            }
            eprintln!("bench: accepted per second: {series:?}");
        }
        let follow_s = doubled_at.and_then(|at| {
            let window = Duration::from_secs(5);
            let needed = (0.95 * 2.0 * throttle.per_second * window.as_secs_f64()) as usize;
            let after: Vec<Instant> = accepted.iter().copied().filter(|t| *t >= at).collect();
            // The first accepted copy from which the next five seconds carried enough.
            after.iter().enumerate().find_map(|(i, t)| {
                let in_window = after[i..].iter().take_while(|u| u.duration_since(*t) < window).count();
                (in_window >= needed && *t + window <= last).then(|| t.duration_since(at).as_secs_f64())
            })
        });
        Some(Throttled {
            goodput_of_limit,
            refused_share: refused as f64 / (accepted.len() as f64 + refused as f64),
            follow_s,
        })
    }
}

/// One run of one tool.
#[derive(Debug, Clone, Default)]
struct Run {
    wall: f64,
    /// CPU seconds of each process (for us: the feeder, then each consumer).
    cpus: Vec<f64>,
    /// Peak RSS of each process, MiB.
    rss: Vec<f64>,
    server_cpu: f64,
    requests: Option<u64>,
    throttled: Option<Throttled>,
    /// Our consumers' row rewrite statements (each a commit), from their exit summaries.
    statements: Option<u64>,
}

impl Run {
    /// CPU seconds of the tool's processes together.
    fn cpu(&self) -> f64 {
        self.cpus.iter().sum()
    }
}

/// The medians of a tool's timed runs on one server.
#[derive(Debug, Clone)]
pub struct Summary {
    pub server: String,
    pub tool: String,
    pub objects_per_s: f64,
    pub cpu_s_per_10k: f64,
    pub peak_rss_mib: f64,
    pub server_cpu_s_per_10k: f64,
    pub requests_per_object: Option<f64>,
    /// Rewrite statements, each a commit, per 10,000 rows (ours only).
    pub commits_per_10k_rows: Option<f64>,
    pub runs: usize,
    /// In the throttled mode: the medians of [`Throttled`]'s measures.
    pub goodput_of_limit: Option<f64>,
    pub refused_share: Option<f64>,
    pub follow_s: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The median of a throttled measure over the runs that have it.
fn throttled_median(runs: &[Run], measure: impl Fn(&Throttled) -> Option<f64>) -> Option<f64> {
    let values: Vec<f64> = runs.iter().filter_map(|r| r.throttled.as_ref().and_then(&measure)).collect();
    (!values.is_empty()).then(|| median(values))
}

/// /proc counts CPU in USER_HZ, which Linux fixes at 100 for user space.
const TICKS_PER_SECOND: f64 = 100.0;

/// A process's group and its CPU ticks (user + system), from the text of `/proc/<pid>/stat`.
fn group_and_ticks(stat: &str) -> Option<(i32, u64)> {
    // pid (comm) state ppid pgrp ... utime(14) stime(15): fields after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((fields.get(2)?.parse().ok()?, ticks(11).unwrap_or(0) + ticks(12).unwrap_or(0)))
}

/// CPU seconds (user + system) of every process in these process groups, from `/proc`.
fn group_cpu(groups: &[i32]) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0.0 };
    let total: u64 = dir
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("stat")).ok())
        .filter_map(|stat| group_and_ticks(&stat))
        .filter(|(group, _)| groups.contains(group))
        .map(|(_, ticks)| ticks)
        .sum();
    total as f64 / TICKS_PER_SECOND
}

/// CPU seconds (user + system) this process has spent so far, from `/proc/self/stat`.
pub fn own_cpu() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let (_, ticks) = group_and_ticks(&stat).ok_or_else(|| anyhow::anyhow!("unreadable /proc/self/stat"))?;
    Ok(ticks as f64 / TICKS_PER_SECOND)
}

/// For the copy-cost examples (`sdk_copy_cpu`, and the consumer's `direct_copy_cpu`): a fresh bucket named
/// `<name>-<pid>` holding `n` objects of 700 bytes under `image/`, put `at_once` at a time.
/// Returns the bucket, the keys and their ETags.
pub async fn seed_copy_sources(
    s3: &common::aws::S3,
    name: &str,
    n: usize,
    at_once: usize,
) -> anyhow::Result<(String, Vec<String>, Vec<String>)> {
    let bucket = format!("{name}-{}", std::process::id());
    s3.create_bucket().bucket(&bucket).send().await?;
    let keys: Vec<String> = (0..n).map(|i| format!("image/{i:08}.png")).collect();
    let body = bytes::Bytes::from(vec![b'x'; 700]);
    let etags: Vec<String> = futures::stream::iter(&keys)
        .map(|key| {
            let put = s3.put_object().bucket(&bucket).key(key).body(ByteStream::from(body.clone())).send();
            async move { put.await.map(|out| out.e_tag().unwrap_or_default().to_owned()) }
        })
        .buffered(at_once)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    Ok((bucket, keys, etags))
}

/// Runs `copies` (which copies `n` objects, `at_once` at a time, and returns how many failed)
/// and prints this process's CPU per copy under `label`.
pub async fn report_copy_cpu(
    label: &str,
    n: usize,
    at_once: usize,
    copies: impl std::future::Future<Output = usize>,
) -> anyhow::Result<()> {
    let (cpu, started) = (own_cpu()?, Instant::now());
    let failed = copies.await;
    let (cpu, wall) = (own_cpu()? - cpu, started.elapsed().as_secs_f64());
    println!(
        "{label}: {n} copies, {at_once} at once, in {wall:.1} s ({:.0}/s); CPU {:.0} us a copy ({:.2} s/10k); {failed} \
         failed",
        n as f64 / wall,
        cpu / n as f64 * 1e6,
        cpu / n as f64 * 1e4
    );
    Ok(())
}

/// A process run under `/usr/bin/time`, which writes its CPU time and peak RSS to a file.
struct Timed {
    child: tokio::process::Child,
    report: tempfile_path::Path,
    what: String,
}

mod tempfile_path {
    /// A file path removed when dropped.
    pub struct Path(pub std::path::PathBuf);
    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl Timed {
    fn spawn(program: &Path, args: &[&str], env: &[(String, String)], what: &str) -> anyhow::Result<Timed> {
        let report = tempfile_path::Path(std::env::temp_dir().join(format!("bench-{}.time", crate::suffix())));
        let child = Command::new("/usr/bin/time")
            .args(["-f", "%U %S %M", "-o"])
            .arg(&report.0)
            .arg(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            // Every endpoint here is plain HTTP on loopback; rclone refuses to start when the
            // machine's AWS_CA_BUNDLE is set at all.
            .env_remove("AWS_CA_BUNDLE")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {what} ({})", program.display()))?;
        Ok(Timed { child, report, what: what.to_owned() })
    }

    /// Waits for the process; returns (CPU seconds, peak RSS MiB, what it printed on stdout).
    async fn finish(self) -> anyhow::Result<(f64, f64, String)> {
        let out = self.child.wait_with_output().await?;
        ensure!(
            out.status.success(),
            "{} failed ({}): {}",
            self.what,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&self.report.0)?;
        let last = text.lines().last().unwrap_or_default();
        let f: Vec<f64> = last.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        ensure!(f.len() == 3, "unexpected /usr/bin/time output for {}: {text:?}", self.what);
        Ok((f[0] + f[1], f[2] / 1024.0, String::from_utf8_lossy(&out.stdout).into_owned()))
    }
}

/// The body of a seeded object: 100 to 1,500 bytes, derived from its index.
fn body(i: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(i as u64);
    let len = rng.usize(100..=1500);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// Keys spread over a few hundred "directories", as avatars by user id are.
fn key(i: usize) -> String {
    format!("image/{:03}/{i:08}.png", (i * 7919) % 500)
}

async fn seed(env: &Env, n: usize) -> anyhow::Result<Vec<String>> {
    let keys: Vec<String> = (0..n).map(key).collect();
    let mut puts = futures::stream::iter(0..n)
        .map(|i| async move {
            // The servers answer a few 500s under this load: each put is tried a few times.
            let mut attempt = 0;
            loop {
                let put = env
                    .s3
                    .put_object()
                    .bucket(&env.source_bucket)
                    .key(key(i))
                    .content_type("image/png")
                    .body(ByteStream::from(body(i)))
                    .send()
                    .await;
                attempt += 1;
                match put {
                    Ok(_) => return Ok(()),
                    Err(e) if attempt >= 5 => return Err(e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100 * attempt)).await,
                }
            }
        })
        .buffer_unordered(64);
    while let Some(put) = puts.next().await {
        put.context("seeding")?;
    }
    Ok(keys)
}

async fn count_keys(env: &Env, bucket: &str) -> anyhow::Result<usize> {
    let mut pages = env.s3.list_objects_v2().bucket(bucket).into_paginator().send();
    let mut n = 0;
    while let Some(page) = pages.next().await {
        n += page?.contents().len();
    }
    Ok(n)
}

/// Endpoints for one run: straight to the server, or through proxies that count the requests
/// or play S3's limit.
struct Route {
    s3: String,
    sqs: String,
    proxies: Option<(FaultProxy, Option<FaultProxy>)>,
    /// The limit (throttled mode), its doubling task, and when the run started.
    limit: Option<(Arc<RateLimit>, Throttle, Option<tokio::task::JoinHandle<()>>)>,
    started: Instant,
}

impl Route {
    async fn new(server: &Server, counting: bool, throttle: Option<Throttle>) -> anyhow::Result<Route> {
        let started = Instant::now();
        if !counting && throttle.is_none() {
            return Ok(Route { s3: server.s3.clone(), sqs: server.sqs.clone(), proxies: None, limit: None, started });
        }
        let s3 = FaultProxy::start(&server.s3).await?;
        let limit = throttle.map(|throttle| {
            let limit = RateLimit::new(throttle.per_second);
            s3.add(Rule::always(When { method: Some("PUT"), ..When::default() }, Fault::RateLimited(limit.clone())));
            (limit, throttle, None)
        });
        let sqs = if server.sqs == server.s3 { None } else { Some(FaultProxy::start(&server.sqs).await?) };
        let (s3_url, sqs_url) = (s3.url.clone(), sqs.as_ref().map_or(s3.url.clone(), |p| p.url.clone()));
        Ok(Route { s3: s3_url, sqs: sqs_url, proxies: Some((s3, sqs)), limit, started })
    }

    /// The run starts now: the limit's doubling is timed from here.
    fn start(&mut self) {
        self.started = Instant::now();
        if let Some((limit, throttle, doubling)) = &mut self.limit
            && let Some(after) = throttle.double_after
        {
            let (limit, doubled) = (limit.clone(), 2.0 * throttle.per_second);
            *doubling = Some(tokio::spawn(async move {
                tokio::time::sleep(after).await;
                limit.set_rate(doubled);
            }));
        }
    }

    /// What the run made of the limit (throttled mode).
    fn throttled(&self) -> Option<Throttled> {
        let (limit, throttle, doubling) = self.limit.as_ref()?;
        if let Some(task) = doubling {
            task.abort();
        }
        Throttled::measure(limit, throttle, self.started)
    }

    fn requests(&self) -> Option<u64> {
        self.proxies.as_ref().map(|(s3, sqs)| s3.forwarded() + sqs.as_ref().map_or(0, |p| p.forwarded()))
    }

    /// Requests by kind, on stderr (where a tool's requests go).
    fn show_kinds(&self, what: &str) {
        if let Some((s3, sqs)) = &self.proxies {
            let mut kinds = s3.forwarded_by_kind();
            for (k, v) in sqs.as_ref().map(|p| p.forwarded_by_kind()).unwrap_or_default() {
                *kinds.entry(k).or_default() += v;
            }
            eprintln!("bench: {what} requests by kind (set-up included): {kinds:?}");
        }
    }
}

/// Our pipeline, feeder and consumers together, into a fresh database, bucket and queue.
async fn pipeline(
    config: &Config,
    server: &Server,
    source: &Env,
    keys: &[String],
    extra: &[(String, String)],
    counting: bool,
) -> anyhow::Result<Run> {
    let mut route = Route::new(server, counting, config.throttle).await?;
    let mut env = Env::with(&route.s3, &route.sqs, 60).await;
    env.source_bucket = source.source_bucket.clone();
    for chunk in keys.chunks(50_000) {
        env.insert_rows(chunk).await;
    }
    // Later settings win: the bench's own, then --set, then the variant's.
    let mut vars = env.vars();
    vars.push(("RUST_LOG".into(), "warn".into()));
    if let Some(concurrency) = config.concurrency {
        vars.push(("CONCURRENCY".into(), concurrency.to_string()));
    }
    vars.push(("EXIT_WHEN_IDLE".into(), "2".into()));
    vars.extend(config.pipeline_env.iter().cloned());
    vars.extend(extra.iter().cloned());
    let before_requests = route.requests();
    let before_cpu = group_cpu(&server.groups);
    let started = Instant::now();
    route.start();
    let mut procs = vec![Timed::spawn(&binary("feeder"), &[], &vars, "the feeder")?];
    for i in 0..config.consumers {
        procs.push(Timed::spawn(&binary("consumer"), &[], &vars, &format!("consumer {i}"))?);
    }
    let n = keys.len() as i64;
    let deadline = started + Duration::from_secs(120 + keys.len() as u64 / 20);
    while moved_at_least(&env, n).await < n {
        ensure!(Instant::now() < deadline, "the pipeline did not finish in time");
        for p in procs.iter_mut() {
            if p.child.try_wait()?.is_some_and(|s| !s.success()) {
                bail!("{} failed before every row moved", p.what);
            }
        }
        // Often enough to time a run of tens of seconds to within 1 %, seldom enough not to
        // take the machine's CPU from the run it times.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let server_cpu = group_cpu(&server.groups) - before_cpu;
    let mut run = Run { wall, server_cpu, ..Run::default() };
    for p in procs {
        let (cpu, rss, printed) = p.finish().await?;
        run.cpus.push(cpu);
        run.rss.push(rss);
        if let Some(n) = rewrite_statements(&printed) {
            *run.statements.get_or_insert(0) += n;
        }
    }
    run.requests = route.requests().zip(before_requests).map(|(a, b)| a - b);
    run.throttled = route.throttled();
    route.show_kinds(&format!("pipeline{}", extra.iter().map(|(k, v)| format!("+{k}={v}")).collect::<String>()));
    ensure!(env.depth(&env.queue_url).await == (0, 0), "the queue is not empty after the run");
    ensure!(env.depth(&env.dlq_url).await == (0, 0), "messages were dead-lettered");
    ensure!(env.failures().await.is_empty(), "objects were set aside in a clean run");
    ensure!(count_keys(&env, &env.destination_bucket).await? == keys.len(), "copies missing");
    Ok(run)
}

/// The rewrite statements a consumer's exit summary gives ("row rewrites in N statements").
fn rewrite_statements(printed: &str) -> Option<u64> {
    let line = printed.lines().find(|l| l.contains("row rewrites in "))?;
    line.split("row rewrites in ").nth(1)?.split(' ').next()?.parse().ok()
}

/// How many rows point at their copy, counted exactly only once the journal says every row
/// may have moved: counting a million rows five times a second took a core from the run it
/// timed. The journal's highest id is read through its primary key; it may run ahead of the
/// rows (a sequence has gaps), never behind, so the exact count has the last word. Before
/// the processes create the journal (the query fails) and without entries (an empty journal,
/// or a `REWRITE_JOURNAL=false` variant) every poll counts.
async fn moved_at_least(env: &Env, n: i64) -> i64 {
    let journaled: Option<i64> = sqlx::query_scalar("SELECT max(journal_id) FROM avatar_migration_journal")
        .fetch_one(&env.db)
        .await
        .ok()
        .flatten();
    match journaled {
        Some(ids) if ids < n => ids,
        _ => env.count_rows_with_prefix("avatar/").await,
    }
}

/// A copy-only tool, `image/` of the seeded bucket into a fresh bucket.
async fn peer(config: &Config, tool: &str, server: &Server, source: &Env, counting: bool) -> anyhow::Result<Run> {
    let mut route = Route::new(server, counting, config.throttle).await?;
    let destination = format!("bench-{}", crate::suffix());
    source.s3.create_bucket().bucket(&destination).send().await?;
    let creds = [
        ("AWS_ACCESS_KEY_ID".to_owned(), std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_else(|_| "test".into())),
        ("AWS_SECRET_ACCESS_KEY".to_owned(), std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|_| "test".into())),
        ("AWS_REGION".to_owned(), std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into())),
    ];
    let mut env: Vec<(String, String)> = creds.to_vec();
    let (program, args): (String, Vec<String>) = match tool {
        "rclone" | "rclone-nocheck" => {
            for (k, v) in [
                ("TYPE", "s3"),
                ("PROVIDER", "Other"),
                ("ENDPOINT", route.s3.as_str()),
                ("ACCESS_KEY_ID", creds[0].1.as_str()),
                ("SECRET_ACCESS_KEY", creds[1].1.as_str()),
                ("REGION", creds[2].1.as_str()),
                ("FORCE_PATH_STYLE", "true"),
            ] {
                env.push((format!("RCLONE_CONFIG_S_{k}"), v.to_owned()));
            }
            let mut args: Vec<String> = [
                "copy",
                &format!("s:{}/image", source.source_bucket),
                &format!("s:{destination}/avatar"),
                "--transfers",
                "64",
                "--checkers",
                "64",
                "--fast-list",
            ]
            .map(String::from)
            .to_vec();
            if tool == "rclone-nocheck" {
                args.extend(
                    [
                        "--no-check-dest",
                        "--s3-no-head",
                        "--s3-no-head-object",
                        "--s3-no-check-bucket",
                        "--ignore-size",
                        "--ignore-checksum",
                    ]
                    .map(String::from),
                );
            }
            (config.rclone.clone(), args)
        }
        "s5cmd" => (
            config.s5cmd.clone(),
            [
                "--endpoint-url",
                &route.s3,
                "--numworkers",
                "256",
                "cp",
                &format!("s3://{}/image/*", source.source_bucket),
                &format!("s3://{destination}/avatar/"),
            ]
            .map(String::from)
            .to_vec(),
        ),
        other => bail!("unknown tool {other}"),
    };
    let before_requests = route.requests();
    let before_cpu = group_cpu(&server.groups);
    let started = Instant::now();
    route.start();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (cpu, rss, _) = Timed::spawn(Path::new(&program), &args, &env, tool)?.finish().await?;
    let wall = started.elapsed().as_secs_f64();
    let server_cpu = group_cpu(&server.groups) - before_cpu;
    let requests = route.requests().zip(before_requests).map(|(a, b)| a - b);
    let throttled = route.throttled();
    route.show_kinds(tool);
    let copied = count_keys(source, &destination).await?;
    ensure!(copied == config.objects, "{tool} copied {copied} of {} objects", config.objects);
    Ok(Run { wall, cpus: vec![cpu], rss: vec![rss], server_cpu, requests, throttled, statements: None })
}

/// Runs everything; returns a summary per (server, tool).
pub async fn run(config: &Config) -> anyhow::Result<Vec<Summary>> {
    let mut summaries = Vec::new();
    for server in &config.servers {
        let source = Env::with(&server.s3, &server.sqs, 60).await;
        let t = Instant::now();
        let keys = seed(&source, config.objects).await?;
        eprintln!("bench: {}: seeded {} objects in {:.1}s", server.name, keys.len(), t.elapsed().as_secs_f64());
        let mut runs: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
        let first = if config.counting { 0 } else { 1 };
        for rep in first..=config.reps {
            let counting = rep == 0;
            // Every other repetition runs the tools in reverse order, so that no tool always
            // inherits the same predecessor's aftermath on the server (with two repetitions,
            // each tool runs once at each end of its pair of positions).
            let mut order: Vec<&String> = config.tools.iter().collect();
            if rep % 2 == 0 {
                order.reverse();
            }
            for tool in order {
                let run = match tool.split_once('+') {
                    _ if tool == "pipeline" => pipeline(config, server, &source, &keys, &[], counting).await,
                    Some(("pipeline", sets)) => {
                        let extra: Vec<(String, String)> = sets
                            .split('+')
                            .filter_map(|kv| kv.split_once('='))
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect();
                        pipeline(config, server, &source, &keys, &extra, counting).await
                    }
                    _ => peer(config, tool, server, &source, counting).await,
                }
                .with_context(|| format!("{tool} on {}", server.name))?;
                eprintln!(
                    "bench: {} rep {rep}{} {tool}: {:.0} objects/s, cpu {:.1}s {:?}, server cpu {:.1}s, rss {:?} MiB{}",
                    server.name,
                    if counting { " (counting)" } else { "" },
                    config.objects as f64 / run.wall,
                    run.cpu(),
                    run.cpus.iter().map(|c| (c * 10.0).round() / 10.0).collect::<Vec<_>>(),
                    run.server_cpu,
                    run.rss.iter().map(|r| r.round()).collect::<Vec<_>>(),
                    run.requests.map(|r| format!(", {r} requests")).unwrap_or_default(),
                );
                if let Some(t) = run.throttled {
                    eprintln!(
                        "bench: {} rep {rep} {tool}: {:.3} of the limit, {:.1} % of PUTs refused, followed a doubling in {}",
                        server.name,
                        t.goodput_of_limit,
                        t.refused_share * 100.0,
                        t.follow_s.map_or("-".into(), |s| format!("{s:.1} s")),
                    );
                }
                runs.entry(tool.as_str()).or_default().push(run);
            }
        }
        for tool in &config.tools {
            let all = &runs[tool.as_str()];
            let requests = all[0].requests.map(|r| r as f64 / config.objects as f64);
            // Without the counting repetition every run is a timed one.
            let timed = &all[usize::from(config.counting)..];
            let per_10k = 10_000.0 / config.objects as f64;
            summaries.push(Summary {
                server: server.name.clone(),
                tool: tool.clone(),
                objects_per_s: median(timed.iter().map(|r| config.objects as f64 / r.wall).collect()),
                cpu_s_per_10k: median(timed.iter().map(|r| r.cpu() * per_10k).collect()),
                peak_rss_mib: all.iter().flat_map(|r| r.rss.iter().copied()).fold(0.0, f64::max),
                server_cpu_s_per_10k: median(timed.iter().map(|r| r.server_cpu * per_10k).collect()),
                requests_per_object: requests,
                commits_per_10k_rows: all[0].statements.map(|n| n as f64 * per_10k),
                runs: timed.len(),
                goodput_of_limit: throttled_median(timed, |t| Some(t.goodput_of_limit)),
                refused_share: throttled_median(timed, |t| Some(t.refused_share)),
                follow_s: throttled_median(timed, |t| t.follow_s),
            });
        }
    }
    Ok(summaries)
}

/// The CDN URL form the rewrite benchmark measures beside bare keys.
pub const URL_FORM: &str = "https://cdn.example.com/{key}";

/// Row rewrites per second through the consumer's own statement (`common::db::rewrite_paths`):
/// `rows` rows in a fresh database with the index the binaries build, rewritten in batches of
/// `batch` by `parallel` connections at once (the consumer's defaults: 100 and 3), with or
/// without the rewrite journal; values are bare keys, or with `url` CDN URLs ([`URL_FORM`]).
/// Returns rows/s and, with the journal, its bytes on disk per row (table and index).
pub async fn rewrites(
    server: &Server,
    rows: usize,
    (batch, parallel): (usize, usize),
    journal: bool,
    url: bool,
) -> anyhow::Result<(f64, Option<f64>)> {
    let env = Env::with(&server.s3, &server.sqs, 60).await;
    let mut schema = common::db::Schema::building_indexes();
    let form: common::references::Form =
        if url { URL_FORM.parse().map_err(anyhow::Error::msg)? } else { common::references::Form::Key };
    if url {
        schema.references = format!("avatars.path={URL_FORM}").parse().map_err(anyhow::Error::msg)?;
    }
    let targets = common::db::prepare(&env.db, &schema).await?;
    let keys: Vec<String> = (0..rows).map(key).collect();
    let values: Vec<String> = keys.iter().map(|k| form.value(&env.source_bucket, k)).collect();
    for chunk in values.chunks(50_000) {
        env.insert_rows(chunk).await;
    }
    sqlx::raw_sql("VACUUM ANALYZE avatars").execute(&env.db).await?;
    let pairs: Vec<(String, String)> = keys.iter().map(|k| (k.clone(), k.replacen("image/", "avatar/", 1))).collect();
    let (target, mapping) = (targets.iter().next().expect("one reference"), env.mapping());
    let started = Instant::now();
    let mut done = futures::stream::iter(pairs.chunks(batch))
        .map(|chunk| common::db::rewrite_paths(&env.db, target, &mapping, chunk, journal))
        .buffer_unordered(parallel);
    let mut rewritten = 0;
    while let Some(result) = done.next().await {
        rewritten += result?.values().map(|r| r.rows).sum::<u64>();
    }
    let elapsed = started.elapsed().as_secs_f64();
    ensure!(rewritten as usize == rows, "{rewritten} of {rows} rows rewritten");
    let bytes: i64 =
        sqlx::query_scalar("SELECT pg_total_relation_size('avatar_migration_journal')").fetch_one(&env.db).await?;
    Ok((rows as f64 / elapsed, journal.then_some(bytes as f64 / rows as f64)))
}

/// The table, one line per (server, tool).
pub fn table(summaries: &[Summary]) -> String {
    let mut out = format!(
        "{:<10} {:<15} {:>10} {:>12} {:>14} {:>16} {:>14} {:>14} {:>10} {:>10}\n",
        "server",
        "tool",
        "objects/s",
        "CPU s/10k",
        "peak RSS MiB",
        "server CPU s/10k",
        "requests/obj",
        "of the limit",
        "refused %",
        "follow s"
    );
    let show =
        |v: Option<f64>, scale: f64, places: usize| v.map_or("-".into(), |v| format!("{:.*}", places, v * scale));
    for s in summaries {
        out += &format!(
            "{:<10} {:<15} {:>10.0} {:>12.2} {:>14.1} {:>16.2} {:>14} {:>14} {:>10} {:>10}\n",
            s.server,
            s.tool,
            s.objects_per_s,
            s.cpu_s_per_10k,
            s.peak_rss_mib,
            s.server_cpu_s_per_10k,
            s.requests_per_object.map_or("-".into(), |r| format!("{r:.3}")),
            show(s.goodput_of_limit, 1.0, 3),
            show(s.refused_share, 100.0, 1),
            show(s.follow_s, 1.0, 1),
        );
    }
    out
}

/// One JSON object: every summary, and our objects/s over each peer's on the same server.
/// Row rewrites measured: rows/s with the journal (the default), without it, and the
/// journal's bytes per row.
#[derive(Debug, Clone, Copy)]
pub struct Rewrites {
    pub journal_per_s: f64,
    /// With the journal, values as CDN URLs ([`URL_FORM`]).
    pub url_per_s: f64,
    pub plain_per_s: f64,
    pub journal_bytes_per_row: f64,
}

/// The server the headline fields are about: SeaweedFS (it enforces conditional copies, as
/// AWS does) when it ran, else the first.
fn headline_server(summaries: &[Summary]) -> Option<&str> {
    summaries
        .iter()
        .map(|s| s.server.as_str())
        .find(|s| *s == "seaweedfs")
        .or(summaries.first().map(|s| s.server.as_str()))
}

pub fn json(config: &Config, summaries: &[Summary], rewrites: Option<Rewrites>) -> String {
    let mut servers = serde_json::Map::new();
    for s in summaries {
        let entry = servers.entry(s.server.clone()).or_insert_with(|| json!({}));
        entry[s.tool.as_str()] = json!({
            "objects_per_s": (s.objects_per_s * 10.0).round() / 10.0,
            "cpu_s_per_10k": (s.cpu_s_per_10k * 1000.0).round() / 1000.0,
            "peak_rss_mib": (s.peak_rss_mib * 10.0).round() / 10.0,
            "server_cpu_s_per_10k": (s.server_cpu_s_per_10k * 1000.0).round() / 1000.0,
            "requests_per_object": s.requests_per_object.map(|r| (r * 1000.0).round() / 1000.0),
            "commits_per_10k_rows": s.commits_per_10k_rows.map(|r| r.round()),
            "runs": s.runs,
            "goodput_of_limit": s.goodput_of_limit.map(|r| (r * 1000.0).round() / 1000.0),
            "refused_share": s.refused_share.map(|r| (r * 10000.0).round() / 10000.0),
            "follow_s": s.follow_s.map(|r| (r * 10.0).round() / 10.0),
        });
    }
    let mut ratios = serde_json::Map::new();
    for ours in summaries.iter().filter(|s| s.tool.starts_with("pipeline")) {
        for peer in summaries.iter().filter(|s| s.server == ours.server && !s.tool.starts_with("pipeline")) {
            let ratio = ours.objects_per_s / peer.objects_per_s;
            let name = format!("{}_{}_vs_{}", ours.server, ours.tool, peer.tool);
            ratios.insert(name, json!((ratio * 1000.0).round() / 1000.0));
        }
    }
    let server = headline_server(summaries).unwrap_or_default();
    let ours = summaries.iter().find(|s| s.server == server && s.tool == "pipeline");
    let best = summaries
        .iter()
        .filter(|s| s.server == server && !s.tool.starts_with("pipeline"))
        .max_by(|a, b| a.objects_per_s.total_cmp(&b.objects_per_s));
    let round = |x: f64, places: i32| (x * 10f64.powi(places)).round() / 10f64.powi(places);
    json!({
        "objects": config.objects,
        "s3_server": server,
        "pipeline_objects_per_s": ours.map(|o| round(o.objects_per_s, 1)),
        "best_peer": best.map(|b| b.tool.clone()),
        "best_peer_objects_per_s": best.map(|b| round(b.objects_per_s, 1)),
        "ratio": ours.zip(best).map(|(o, b)| round(o.objects_per_s / b.objects_per_s, 3)),
        "cpu_s_per_10k": ours.map(|o| round(o.cpu_s_per_10k, 3)),
        "peer_cpu_s_per_10k": best.map(|b| round(b.cpu_s_per_10k, 3)),
        "peak_rss_mib": ours.map(|o| round(o.peak_rss_mib, 1)),
        "requests_per_object": ours.and_then(|o| o.requests_per_object).map(|r| round(r, 3)),
        "commits_per_10k_rows": ours.and_then(|o| o.commits_per_10k_rows).map(f64::round),
        "reps": config.reps,
        "consumers": config.consumers,
        "concurrency": config.concurrency,
        "servers": servers,
        "ratios": ratios,
        "throttle_per_s": config.throttle.map(|t| t.per_second),
        "double_after_s": config.throttle.and_then(|t| t.double_after).map(|d| d.as_secs_f64()),
        "pipeline_goodput_of_limit": ours.and_then(|o| o.goodput_of_limit).map(|r| round(r, 3)),
        "pipeline_refused_share": ours.and_then(|o| o.refused_share).map(|r| round(r, 4)),
        "pipeline_follow_s": ours.and_then(|o| o.follow_s).map(|r| round(r, 1)),
        "rewrites_per_s": rewrites.map(|r| r.journal_per_s.round()),
        "rewrites_url_per_s": rewrites.map(|r| r.url_per_s.round()),
        "rewrites_without_journal_per_s": rewrites.map(|r| r.plain_per_s.round()),
        "journal_bytes_per_row": rewrites.map(|r| r.journal_bytes_per_row.round()),
    })
    .to_string()
}
