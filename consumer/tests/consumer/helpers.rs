//! Helpers for the consumer's tests: feeding the queue with the real feeder, and running the
//! real consumer binary until it drains.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use testkit::Env;
pub use testkit::{legacy_keys, modern};
use tokio_util::sync::CancellationToken;

/// Lists the source bucket and enqueues every object, with the feeder's own code.
pub async fn feed(env: &Env) -> u64 {
    feed_with(env, &[]).await
}

/// The feeder with further arguments, e.g. `--objects-per-message=1` where a test counts
/// messages as objects.
pub async fn feed_with(env: &Env, args: &[&str]) -> u64 {
    let mut all = env.args("feeder");
    all.extend(args.iter().map(|a| a.to_string()));
    let settings = feeder::Settings::try_parse_from(all).unwrap();
    let clients = env.clients().await;
    feeder::feed(&settings, &settings.run, &clients, CancellationToken::new()).await.unwrap().enqueued
}

/// Runs `feeder <args>`; returns (exit code, stdout).
pub fn feeder(env: &Env, args: &[&str]) -> (Option<i32>, String) {
    let out = env.command("feeder").args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last line of a command's stdout, as JSON.
pub fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The consumer binary, set up for this environment, draining and exiting when idle.
pub fn consumer(env: &Env, extra: &[(&str, &str)]) -> Command {
    let mut cmd = env.command("consumer");
    cmd.env("EXIT_WHEN_IDLE", "2").env("RUST_LOG", "warn");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Runs a consumer until it drains the queue; panics unless it exits 0. Waits without
/// blocking the runtime (a test's fault proxy runs on it).
pub async fn drain(env: &Env, extra: &[(&str, &str)]) -> Output {
    let out = tokio::process::Command::from(consumer(env, extra)).output().await.unwrap();
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

/// Counts the lines of a child's stderr that contain `needle`, on a thread of its own (the
/// pipe is drained, so the child never blocks on a full pipe).
pub fn count_lines(child: &mut Child, needle: &'static str) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let [count] = count_each(child, [needle]);
    count
}

/// [`count_lines`] for several needles at once: one counter each, in their order.
pub fn count_each<const N: usize>(
    child: &mut Child,
    needles: [&'static str; N],
) -> [std::sync::Arc<std::sync::atomic::AtomicUsize>; N] {
    use std::io::{BufRead, BufReader};
    let counts: [_; N] = std::array::from_fn(|_| std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)));
    let counters = counts.clone();
    let stderr = child.stderr.take().expect("stderr is piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            for (needle, counter) in needles.iter().zip(&counters) {
                if line.contains(needle) {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
    });
    counts
}

/// Receives `n` messages (waiting for them), hidden for `visibility` seconds (the queue's
/// default when `None`).
pub async fn receive(env: &Env, n: usize, visibility: Option<i32>) -> Vec<aws_sdk_sqs::types::Message> {
    let mut received = Vec::new();
    while received.len() < n {
        let out = env
            .sqs
            .receive_message()
            .queue_url(&env.queue_url)
            .max_number_of_messages((n - received.len()).min(10) as i32)
            .set_visibility_timeout(visibility)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        received.extend(out.messages.unwrap_or_default());
    }
    received
}

/// Receives `n` messages and keeps them, as a consumer that crashed right after its receive
/// would: they stay invisible for `visibility` seconds, then come back.
pub async fn hold_like_a_crashed_consumer(env: &Env, n: usize, visibility: i32) -> usize {
    receive(env, n, Some(visibility)).await.len()
}

/// Installs a trigger that makes every rewrite wait for advisory lock 4242, which the returned
/// connection holds until it is dropped or unlocks.
pub async fn stall_rewrites(env: &Env) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
    env.prepare().await;
    sqlx::raw_sql(
        "CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN NEW; END $$;
         CREATE TRIGGER stall BEFORE UPDATE ON avatars FOR EACH ROW EXECUTE FUNCTION stall();",
    )
    .execute(&env.db)
    .await
    .unwrap();
    let mut conn = env.db.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(4242)").execute(&mut *conn).await.unwrap();
    conn
}

/// Whether a rewrite statement is waiting for a lock.
pub async fn rewrite_waiting(env: &Env) -> bool {
    let database = env.database_url.rsplit('/').next().unwrap().to_owned();
    sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = $1
         AND wait_event_type = 'Lock' AND query LIKE 'WITH v AS%')",
    )
    .bind(&database)
    .fetch_one(&env.db)
    .await
    .unwrap()
}

pub async fn put_multipart(env: &Env, bucket: &str, key: &str, body: &[u8]) {
    env.put_multipart(bucket, key, body).await
}

pub async fn etag(env: &Env, bucket: &str, key: &str) -> String {
    env.s3.head_object().bucket(bucket).key(key).send().await.unwrap().e_tag().unwrap().to_owned()
}

/// Reads a child's whole stderr on a thread of its own (so the child never blocks on a full
/// pipe); join the handle once the child has exited.
pub fn capture_stderr(child: &mut Child) -> std::thread::JoinHandle<String> {
    let stderr = child.stderr.take().expect("stderr is piped");
    std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default())
}

/// Reads a child's whole stdout on a thread of its own; join the handle once it has exited.
pub fn capture_stdout(child: &mut Child) -> std::thread::JoinHandle<String> {
    let stdout = child.stdout.take().expect("stdout is piped");
    std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default())
}

/// The start-up probe removes its two objects.
pub async fn assert_no_probe_left(env: &Env) {
    let probes: Vec<String> =
        env.keys(&env.destination_bucket).await.into_iter().filter(|k| k.contains(".avatar-migration-probe")).collect();
    assert!(probes.is_empty(), "probe objects left behind: {probes:?}");
}
