//! The real binaries the run starts: consumers (each with its own log of errors) and the
//! feeder, SIGKILLed mid-listing and started again.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

use crate::{Env, binary};

pub(super) fn command(name: &str, vars: &[(String, String)], extra: &[(&str, &str)]) -> Command {
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
pub(super) struct Consumer {
    pub child: Child,
    log: std::path::PathBuf,
}

impl Consumer {
    /// Waits for its exit; with a failed one, its last line on stderr says why.
    pub async fn wait(&mut self) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let status = self.child.wait().await?;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let _ = std::fs::remove_file(&self.log);
        Ok((status, log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default().to_owned()))
    }
}

pub(super) fn spawn_consumer(vars: &[(String, String)]) -> anyhow::Result<Consumer> {
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
pub(super) async fn feed_with_kills(env: &Env, vars: &[(String, String)], total: usize) -> anyhow::Result<(u64, u32)> {
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
