//! Helpers for the consumer's tests: feeding the queue with the real feeder, and running the
//! real consumer binary until it drains.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use testkit::{Env, binary};
use tokio_util::sync::CancellationToken;

/// Lists the source bucket and enqueues every object, with the feeder's own code.
pub async fn feed(env: &Env) -> u64 {
    common::db::prepare(&env.db).await.unwrap();
    let settings = feeder::Settings::try_parse_from(env.args("feeder")).unwrap();
    let clients = feeder::Clients { s3: env.s3.clone(), sqs: env.sqs.clone(), db: env.db.clone() };
    feeder::feed(&settings, &settings.run, &clients, CancellationToken::new()).await.unwrap().enqueued
}

/// The consumer binary, set up for this environment, draining and exiting when idle.
pub fn consumer(env: &Env, extra: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(binary("consumer"));
    cmd.envs(env.vars()).env("EXIT_WHEN_IDLE", "2").env("RUST_LOG", "warn");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Runs a consumer until it drains the queue; panics unless it exits 0.
pub fn drain(env: &Env, extra: &[(&str, &str)]) -> Output {
    let out = consumer(env, extra).output().unwrap();
    assert!(out.status.success(), "consumer failed: {:?}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

/// Waits for a child to exit, without blocking the runtime; panics after `timeout`.
pub async fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "process still running after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Legacy keys `image/avatar-<i>.png` for i in `range`.
pub fn legacy_keys(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("image/avatar-{i}.png")).collect()
}

pub fn modern(key: &str) -> String {
    key.replacen("image/", "avatar/", 1)
}
