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

mod end;
mod live;
mod processes;
mod report;
mod schedule;
mod seed;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::Env;
use crate::proxy::{Fault, FaultProxy, Rule};
use end::{Verified, check_objects, check_rows, cleanup_while_writing, verify_until_done};
use live::{Live, live_writer, sampler};
use processes::{feed_with_kills, spawn_consumer};
use report::say;
pub use report::{Config, Line, Report};
use schedule::{
    HANG_FOR, HANG_SHARE, Phase, Schedule, THROTTLE_FOR, THROTTLE_RATE, Targets, add_random_faults, copies,
};
use seed::seed;

/// Runs the whole matrix; see the module documentation.
pub async fn run(config: &Config) -> anyhow::Result<Report> {
    let begun = Instant::now();
    let env = Arc::new(Env::new().await);
    let seeded = seed(&env, config.objects).await?;
    say(begun, format!("seeded {} legacy objects in the mixed state", seeded.legacy.len()));
    common::db::prepare(&env.db, &common::db::Schema::building_indexes()).await?;
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
    let consumers = (0..config.consumers).map(|_| spawn_consumer(&vars)).collect::<Result<_, _>>()?;
    let feeding = {
        let (env, vars, total) = (env.clone(), vars.clone(), config.objects);
        tokio::spawn(async move { feed_with_kills(&env, &vars, total).await })
    };
    let targets = Targets {
        config,
        env: &env,
        live: &live,
        seeded: &seeded,
        s3: &s3,
        sqs: &sqs,
        throttle: &throttle,
        vars: &vars,
        begun,
    };
    let mut schedule = Schedule::start(consumers);
    // Faults triggered by progress: the share of legacy rows rewritten so far.
    let legacy_rows = legacy_with_rows.len() as f64;
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
        if !schedule.step(&targets, progress).await? {
            continue;
        }
        // The end: every consumer exited by itself (the queue was empty) and the feeder is done.
        let running = schedule.running()?;
        if running == 0 && feeding.is_finished() {
            say(begun, "every consumer exited by itself; the feeder is done");
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            let (percent, done) = (progress * 100.0, feeding.is_finished());
            say(begun, format!("{percent:.0} % moved, {running} consumers running, feeder done: {done}"));
        }
    }
    let (feeder_kills, feeder_runs) = feeding.await??;
    if let Some(task) = schedule.lock_task.take() {
        task.await??;
    }
    let mut exits = Vec::new();
    for c in &mut schedule.consumers {
        exits.push(c.wait().await?);
    }
    let elapsed = started.elapsed();
    stop.cancel();
    writer.await?;
    let (samples, violations) = sampling.await?;
    let depth = common::aws::queue_depth(&env.sqs, &env.queue_url).await?;
    let ran = Ran {
        config,
        begun,
        elapsed,
        env: &env,
        seeded: &seeded,
        live: &live,
        proxies: (&s3, &sqs),
        throttle: &throttle,
        schedule,
        exits,
        feeder: (feeder_kills, feeder_runs),
        poison: poison.len(),
        sampled: (samples, violations),
        depth,
    };
    finish(ran).await
}

/// What the run did, for its end.
struct Ran<'a> {
    config: &'a Config,
    begun: Instant,
    elapsed: Duration,
    env: &'a Env,
    seeded: &'a seed::Seeded,
    live: &'a Live,
    /// S3's and SQS's.
    proxies: (&'a FaultProxy, &'a FaultProxy),
    throttle: &'a crate::proxy::RateLimit,
    schedule: Schedule,
    /// Each consumer's exit and last words.
    exits: Vec<(std::process::ExitStatus, String)>,
    /// The feeder's kills and runs.
    feeder: (u64, u32),
    poison: usize,
    /// The sampler's samples and the rows it saw naming nothing.
    sampled: (u64, Vec<String>),
    depth: common::aws::QueueDepth,
}

/// The run's end, as an operator goes about it (verify, a second pass if needed, the cleanup),
/// and its report.
async fn finish(ran: Ran<'_>) -> anyhow::Result<Report> {
    let Ran { config, begun, elapsed, env, seeded, live, proxies: (s3, sqs), throttle, schedule, exits, .. } = ran;
    let ((feeder_kills, feeder_runs), (samples, violations), depth, poison) =
        (ran.feeder, ran.sampled, ran.depth, ran.poison);
    let direct = env.vars();
    let Verified { agrees, verified, missing_rows, second_pass } = verify_until_done(env, seeded, begun).await?;
    let needed = second_pass.is_some();
    let second_pass = second_pass.unwrap_or_else(|| "not needed".into());

    say(begun, "checking every object and row");
    let mut report = Report { objects: seeded.legacy.len() as u64, samples, ..Report::default() };
    report.violations = violations.len() as u64;
    report.problems.extend(violations.iter().take(10).map(|p| format!("I1: a row pointed at nothing: {p}")));
    check_objects(env, seeded, &schedule.deleted, live, &mut report).await?;
    check_rows(env, live, &mut report).await?;
    (report.live_write_max_ms, report.live_write_p99_ms) = live.write_latencies_ms();
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

    let cleanup = cleanup_while_writing(env, &direct, begun).await?;
    report.violations += cleanup.broken.len() as u64;
    report
        .problems
        .extend(cleanup.broken.iter().take(10).map(|p| format!("I1 after cleanup: a row names nothing: {p}")));
    if !cleanup.rollback_refused {
        report.problems.push("a rollback started during cleanup --yes was not refused by the lease".into());
    }

    let failures: BTreeMap<String, i64> = common::db::failure_counts(&env.db).await?.into_iter().collect();
    let stopped_by_refusals = &schedule.stopped_by_refusals;
    let halted = stopped_by_refusals
        .iter()
        .filter(|(exit, last)| exit.code() == Some(1) && last.contains("this is not about one object"));
    let halted = halted.count();
    if matches!(schedule.refusing, Phase::Over) && (halted == 0 || halted < stopped_by_refusals.len()) {
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
            schedule.refused,
            format!(
                "{halted} of {} consumers stopped themselves (exit 1); after the fix {stale_refusals} refusal \
                 records left",
                stopped_by_refusals.len()
            ),
        ),
        line(
            &format!("SQS unreachable for {:?}", config.sqs_outage),
            schedule.outages,
            "consumers and feeder retried".into(),
        ),
        line(
            "consumers SIGKILLed (the last one not replaced)",
            schedule.consumer_kills,
            format!("{} consumers exited 0 at the end", exits.iter().filter(|(e, _)| e.success()).count()),
        ),
        line(
            "feeder SIGKILLed mid-listing",
            feeder_kills,
            format!("resumed from its checkpoint; {feeder_runs} runs in all"),
        ),
        line("PostgreSQL restarted mid-run", schedule.pg_restarts, "connections re-established".into()),
        line(
            &format!("a row held by a live transaction for {:?}", config.row_lock),
            schedule.locks,
            format!(
                "live writes on other rows: max {} ms, p99 {} ms",
                report.live_write_max_ms, report.live_write_p99_ms
            ),
        ),
        line(
            "poison messages",
            poison as u64,
            format!("{} recorded malformed_message", failures.get("malformed_message").unwrap_or(&0)),
        ),
        line(
            "sources deleted between listing and copy",
            schedule.deleted.len() as u64,
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
            schedule.hung,
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
