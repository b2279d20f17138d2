//! "Done means done" (docs/design.md): a consumer's idle exit waits for the queue to be empty, not
//! for one empty receive; shutdown is bounded by the grace period; a second signal stops at
//! once.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testkit::{Env, wait_until};

use crate::helpers::{
    consumer, count_each, count_lines, drain, feed, feed_with, hold_like_a_crashed_consumer, rewrite_waiting,
    stall_rewrites, wait_exit,
};

/// A consumer that crashed holding messages (they are invisible, "in flight", until their
/// visibility timeout) does not make a survivor with a short idle window exit early: the
/// survivor waits for them to come back and finishes them.
#[tokio::test]
async fn an_idle_exit_waits_for_messages_a_crashed_consumer_held() {
    let env = Env::new().await;
    env.seed_legacy(0..60).await;
    feed_with(&env, &["--objects-per-message=1"]).await;
    // The crashed consumer: 30 messages received and never deleted, hidden for 6 s.
    assert_eq!(hold_like_a_crashed_consumer(&env, 30, 6).await, 30);

    let started = Instant::now();
    drain(&env, &[("EXIT_WHEN_IDLE", "1"), ("VISIBILITY_TIMEOUT", "5")]).await;
    assert_eq!(env.count_rows_with_prefix("avatar/").await, 60, "every row rewritten, the held ones too");
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
    assert!(started.elapsed() >= Duration::from_secs(5), "it waited for the held messages to come back");
}

/// A consumer with a short idle window does not exit while a feeder holds the listing's lease,
/// however long the queue stays empty (a feeder between pages, or restarting after a crash):
/// it works on what the feeder sends later, exits once the lease ends, and, the listing being
/// left unfinished, says so and exits 3 (work left), never 0.
#[tokio::test]
async fn an_idle_exit_waits_while_a_feeder_is_sending() {
    use std::sync::atomic::Ordering::SeqCst;
    let env = Env::new().await;
    env.prepare().await;
    let (keys, _) = env.seed_legacy(0..3).await;
    // The lease `feeder` holds while it runs; the queue is empty.
    let lease = common::db::FeederLease::hold(&env.db, &env.source_bucket, "image/").await.unwrap();
    let mut child = consumer(&env, &[("EXIT_WHEN_IDLE", "1"), ("RUST_LOG", "info")]).spawn().unwrap();
    let [waiting, unfinished] = count_each(&mut child, ["a feeder is sending messages", "consumer: work left: "]);
    wait_until("the consumer sees the feeder", Duration::from_secs(60), || async { waiting.load(SeqCst) > 0 }).await;
    // Three idle windows with the queue empty: without the lease it would have exited by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(child.try_wait().unwrap().is_none(), "the consumer exited while a feeder held the listing's lease");

    // The feeder sends, then stops before the listing's end.
    for key in &keys {
        let (etag, _) = env.head(&env.source_bucket, key).await;
        let size = env.get(&env.source_bucket, key).await.unwrap().len() as i64;
        env.send_raw(&common::message::ObjectMessage::new(key.clone(), size, etag.unwrap()).to_body()).await;
    }
    lease.end().await;
    let status = wait_exit(&mut child, Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(common::exit::UNFINISHED.into()), "{status:?}");
    assert_eq!(env.count_rows_with_prefix("avatar/").await, 3, "what the feeder sent was worked on");
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
    assert_eq!(unfinished.load(SeqCst), 1, "the consumer said the listing is unfinished");
}

/// SIGTERM with an object stuck in the database: the consumer exits once the grace period is
/// over, not when the stuck statement ends; the stuck object's message comes back later.
#[tokio::test]
async fn sigterm_exits_within_the_grace_period_even_with_an_object_stuck() {
    let env = Env::new().await;
    env.put(&env.source_bucket, "image/stuck.png", b"png").await;
    let ids = env.insert_rows(&["image/stuck.png".into()]).await;
    let _held = stall_rewrites(&env).await;
    feed(&env).await;
    let vars = [("SHUTDOWN_GRACE_SECONDS", "2"), ("DB_LOCK_TIMEOUT", "120s"), ("EXIT_WHEN_IDLE", "60")];
    let mut child = consumer(&env, &vars).spawn().unwrap();
    wait_until("the rewrite is stuck", Duration::from_secs(60), || rewrite_waiting(&env)).await;

    let signalled = Instant::now();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(60)).await;
    let took = signalled.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(10), "exit {took:?} after SIGTERM with a 2 s grace period");
    assert_eq!(env.path_of(ids[0]).await, "image/stuck.png", "nothing half-done");
    assert_eq!(env.depth(&env.queue_url).await.0 + env.depth(&env.queue_url).await.1, 1, "the message is still there");
}

/// A second SIGTERM stops at once, whatever the grace period.
#[tokio::test]
async fn a_second_signal_stops_at_once() {
    let env = Env::new().await;
    env.put(&env.source_bucket, "image/stuck.png", b"png").await;
    env.insert_rows(&["image/stuck.png".into()]).await;
    let _held = stall_rewrites(&env).await;
    feed(&env).await;
    let vars = [("SHUTDOWN_GRACE_SECONDS", "600"), ("DB_LOCK_TIMEOUT", "120s"), ("RUST_LOG", "info")];
    let mut child = consumer(&env, &vars).spawn().unwrap();
    let asked = count_lines(&mut child, "shutting down");
    wait_until("the rewrite is stuck", Duration::from_secs(60), || rewrite_waiting(&env)).await;
    let pid = Pid::from_raw(child.id() as i32);
    kill(pid, Signal::SIGTERM).unwrap();
    wait_until("the first signal is taken", Duration::from_secs(30), || {
        let asked = asked.clone();
        async move { asked.load(std::sync::atomic::Ordering::SeqCst) > 0 }
    })
    .await;
    kill(pid, Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(128 + 15), "{status:?}");
}
