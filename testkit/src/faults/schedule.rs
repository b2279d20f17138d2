//! The faults the run injects as it goes, each when a share of the legacy rows has moved:
//! sources deleted, a row held by a live transaction, consumers SIGKILLed, PostgreSQL
//! restarted, SQS unreachable, copies throttled, S3 hanging on some requests, and every copy
//! refused until every consumer stops itself. The random faults (about 12 % of calls) run
//! throughout.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::live::Live;
use super::processes::{Consumer, spawn_consumer};
use super::report::{Config, say};
use super::seed::{Seeded, modern};
use crate::Env;
use crate::proxy::{Fault, FaultProxy, RateLimit, Rule, When};

/// The share of the run's rows moved when copies are throttled, at what rate, for how long.
pub(super) const THROTTLE_AT: f64 = 0.20;
pub(super) const THROTTLE_RATE: f64 = 15.0;
pub(super) const THROTTLE_FOR: Duration = Duration::from_secs(8);
/// The share moved when the destination starts refusing every copy.
const REFUSE_AT: f64 = 0.45;
/// More refusals than the phase can meet: the rule's count of what it has left tells how many.
const REFUSALS_AT_MOST: u64 = 1_000_000;
/// The share moved when S3 starts hanging on some requests, how many, for how long.
const HANG_AT: f64 = 0.70;
pub(super) const HANG_SHARE: f64 = 0.05;
pub(super) const HANG_FOR: Duration = Duration::from_secs(5);
/// Consumers SIGKILLed at these shares, and whether each is replaced.
const KILL_POINTS: [(f64, bool); 3] = [(0.15, true), (0.35, true), (0.60, false)];

/// Where a timed fault stands.
#[derive(Debug, Clone, Copy)]
pub(super) enum Phase {
    NotYet,
    Since(Instant),
    Over,
}

/// About 12 % of calls faulted: 500, 503 SlowDown, resets before and after the request took
/// effect, slow answers; the rules are tried in turn.
pub(super) fn add_random_faults(proxy: &FaultProxy) {
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
pub(super) fn copies() -> When {
    When { method: Some("PUT"), contains: Some("/image/".into()), ..When::default() }
}

/// What the faults act on.
pub(super) struct Targets<'a> {
    pub config: &'a Config,
    pub env: &'a Arc<Env>,
    pub live: &'a Arc<Live>,
    pub seeded: &'a Seeded,
    pub s3: &'a FaultProxy,
    pub sqs: &'a FaultProxy,
    /// The copies' rate limit, unlimited but while copies are throttled.
    pub throttle: &'a Arc<RateLimit>,
    /// The consumers' environment.
    pub vars: &'a [(String, String)],
    pub begun: Instant,
}

/// The faults injected so far, and the consumers running.
pub(super) struct Schedule {
    pub consumers: Vec<Consumer>,
    pub consumer_kills: u64,
    /// Sources deleted between listing and copy.
    pub deleted: Vec<String>,
    pub pg_restarts: u64,
    pub outages: u64,
    pub locks: u64,
    pub lock_task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    throttled: Phase,
    pub refusing: Phase,
    hanging: Phase,
    /// Requests S3 took and never answered.
    pub hung: u64,
    /// Copies refused while every copy was.
    pub refused: u64,
    /// The consumers that stopped during the systemic refusal: their exits and last words.
    pub stopped_by_refusals: Vec<(std::process::ExitStatus, String)>,
}

impl Schedule {
    pub fn start(consumers: Vec<Consumer>) -> Self {
        Schedule {
            consumers,
            consumer_kills: 0,
            deleted: Vec::new(),
            pg_restarts: 0,
            outages: 0,
            locks: 0,
            lock_task: None,
            throttled: Phase::NotYet,
            refusing: Phase::NotYet,
            hanging: Phase::NotYet,
            hung: 0,
            refused: 0,
            stopped_by_refusals: Vec::new(),
        }
    }

    /// Injects what is due once `progress` (a share of the legacy rows) has moved. `false`:
    /// this round is not one to look for the run's end in (PostgreSQL restarting, consumers
    /// stopping on a systemic refusal).
    pub async fn step(&mut self, t: &Targets<'_>, progress: f64) -> anyhow::Result<bool> {
        let percent = progress * 100.0;
        if self.deleted.is_empty() && progress >= 0.02 {
            // Sources deleted between listing and copy: listed (enqueued) but not copied yet.
            let env = t.env;
            let Ok(cp) = common::db::load_checkpoint(&env.db, &env.source_bucket, "image/").await else {
                return Ok(false);
            };
            let listed_up_to = cp.last_key.unwrap_or_default();
            for key in t.seeded.without_rows.iter().rev().filter(|k| **k <= listed_up_to).take(5) {
                if !env.exists(&env.destination_bucket, &modern(key)).await {
                    env.s3.delete_object().bucket(&env.source_bucket).key(key).send().await?;
                    self.deleted.push(key.clone());
                }
            }
        }
        if self.locks == 0 && progress >= 0.10 {
            self.locks = 1;
            say(t.begun, format!("{percent:.0} % moved: a live transaction holds a row for {:?}", t.config.row_lock));
            self.lock_task = Some(tokio::spawn(hold_a_row(t.env.clone(), t.live.clone(), t.config.row_lock)));
        }
        // SIGKILL a consumer at 15 %, 35 % and 60 %; the last one is not replaced.
        if let Some(&(at, replace)) = KILL_POINTS.get(self.consumer_kills as usize)
            && progress >= at
            && !self.consumers.is_empty()
        {
            say(t.begun, format!("{percent:.0} % moved: SIGKILL a consumer"));
            let victim = fastrand::usize(..self.consumers.len());
            let mut victim = self.consumers.swap_remove(victim);
            victim.child.start_kill()?;
            victim.wait().await?;
            self.consumer_kills += 1;
            if replace {
                self.consumers.push(spawn_consumer(t.vars)?);
            }
        }
        if self.pg_restarts == 0 && progress >= 0.30 {
            if let Some(script) = &t.config.restart_postgres {
                say(t.begun, format!("{percent:.0} % moved: restart PostgreSQL"));
                t.live.pg_restarting.store(true, Ordering::SeqCst);
                let status = Command::new(script).arg("restart-postgres").status().await?;
                anyhow::ensure!(status.success(), "restarting PostgreSQL failed");
                tokio::time::sleep(Duration::from_secs(1)).await; // pools reconnect
                t.live.pg_restarting.store(false, Ordering::SeqCst);
            }
            self.pg_restarts = 1;
        }
        if self.outages == 0 && progress >= 0.50 {
            say(t.begun, format!("{percent:.0} % moved: SQS unreachable for {:?}", t.config.sqs_outage));
            t.sqs.set_down(true);
            tokio::time::sleep(t.config.sqs_outage).await;
            t.sqs.set_down(false);
            self.outages = 1;
        }
        self.throttle(t, progress);
        self.hang(t, progress);
        self.refuse(t, progress).await
    }

    /// Sustained throttling: copies above THROTTLE_RATE per second refused with SlowDown.
    fn throttle(&mut self, t: &Targets<'_>, progress: f64) {
        if matches!(self.throttled, Phase::NotYet) && progress >= THROTTLE_AT {
            let percent = progress * 100.0;
            say(t.begun, format!("{percent:.0} % moved: copies throttled to {THROTTLE_RATE}/s for {THROTTLE_FOR:?}"));
            t.throttle.set_rate(THROTTLE_RATE);
            self.throttled = Phase::Since(Instant::now());
        }
        if let Phase::Since(since) = self.throttled
            && since.elapsed() >= THROTTLE_FOR
        {
            t.throttle.set_rate(f64::MAX);
            self.throttled = Phase::Over;
        }
    }

    /// A hung server: a share of S3's requests taken and never answered, for a while.
    fn hang(&mut self, t: &Targets<'_>, progress: f64) {
        if matches!(self.hanging, Phase::NotYet) && progress >= HANG_AT && !matches!(self.refusing, Phase::Since(_)) {
            let (percent, share) = (progress * 100.0, HANG_SHARE * 100.0);
            say(
                t.begun,
                format!("{percent:.0} % moved: S3 takes {share:.0} % of requests and never answers, for {HANG_FOR:?}"),
            );
            let mut hang = Rule::sometimes(When::default(), Fault::Hang, HANG_SHARE);
            hang.remaining = Some(REFUSALS_AT_MOST);
            faults_with(t, Some(hang));
            self.hanging = Phase::Since(Instant::now());
        }
        if let Phase::Since(since) = self.hanging
            && since.elapsed() >= HANG_FOR
        {
            self.hung = REFUSALS_AT_MOST - t.s3.remaining(0).unwrap_or(REFUSALS_AT_MOST);
            faults_with(t, None);
            self.hanging = Phase::Over;
        }
    }

    /// A systemic refusal: every copy refused, until every running consumer stops itself; then
    /// the grant is back, and consumers are started again.
    async fn refuse(&mut self, t: &Targets<'_>, progress: f64) -> anyhow::Result<bool> {
        if matches!(self.refusing, Phase::NotYet) && progress >= REFUSE_AT && !self.consumers.is_empty() {
            let percent = progress * 100.0;
            say(t.begun, format!("{percent:.0} % moved: the destination refuses every copy (403 AccessDenied)"));
            // First, so that no other rule answers a copy instead.
            let mut refuse = Rule::always(copies(), Fault::Error { status: 403, code: "AccessDenied" });
            refuse.remaining = Some(REFUSALS_AT_MOST);
            faults_with(t, Some(refuse));
            self.refusing = Phase::Since(Instant::now());
        }
        let Phase::Since(since) = self.refusing else { return Ok(true) };
        let running = self.running()?;
        anyhow::ensure!(
            since.elapsed() < Duration::from_secs(120),
            "{running} consumers still running 2 minutes into a systemic refusal"
        );
        if running == 0 {
            for mut c in self.consumers.drain(..) {
                self.stopped_by_refusals.push(c.wait().await?);
            }
            let secs = since.elapsed().as_secs_f64();
            say(
                t.begun,
                format!("every consumer stopped itself in {secs:.1} s: the grant is back, consumers started again"),
            );
            self.refused = REFUSALS_AT_MOST - t.s3.remaining(0).unwrap_or(REFUSALS_AT_MOST);
            faults_with(t, None);
            self.consumers = (0..t.config.consumers).map(|_| spawn_consumer(t.vars)).collect::<Result<_, _>>()?;
            self.refusing = Phase::Over;
        }
        Ok(false)
    }

    /// The consumers still running.
    pub fn running(&mut self) -> anyhow::Result<usize> {
        let mut running = 0;
        for c in &mut self.consumers {
            if c.child.try_wait()?.is_none() {
                running += 1;
            }
        }
        Ok(running)
    }
}

/// S3's rules again: `first` (a phase's own rule) ahead of the random faults and the copies'
/// rate limit.
fn faults_with(t: &Targets<'_>, first: Option<Rule>) {
    t.s3.clear();
    if let Some(rule) = first {
        t.s3.add(rule);
    }
    add_random_faults(t.s3);
    t.s3.add(Rule::always(copies(), Fault::RateLimited(t.throttle.clone())));
}

/// A live transaction holding one legacy row for `hold`.
async fn hold_a_row(env: Arc<Env>, live: Arc<Live>, hold: Duration) -> anyhow::Result<()> {
    let id: i32 = sqlx::query_scalar("SELECT id FROM avatars WHERE path LIKE 'image/avatar-%' LIMIT 1")
        .fetch_one(&env.db)
        .await?;
    live.held_row.store(i64::from(id), Ordering::SeqCst);
    let mut tx = env.db.begin().await?;
    sqlx::query("SELECT 1 FROM avatars WHERE id = $1 FOR UPDATE").bind(id).execute(&mut *tx).await?;
    tokio::time::sleep(hold).await;
    let _ = tx.commit().await; // a PostgreSQL restart may have ended it already
    live.held_row.store(-1, Ordering::SeqCst);
    Ok(())
}
