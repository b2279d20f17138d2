//! S3 asking to slow down (503 SlowDown): the consumer's pace (`consumer::pace`) answers it,
//! and a copy refused for rate is tried again by the consumer that holds it, never handed back
//! to the queue: throttling that outlasts `maxReceiveCount` x the visibility timeout
//! dead-letters nothing. The operator's pause and fleet cap (`feeder pause`, `throttle`)
//! hold across consumers.

use std::process::Stdio;
use std::time::{Duration, Instant};

use testkit::proxy::{Fault, FaultProxy, Rule, When};
use testkit::{Env, wait_until};

use crate::helpers::{consumer, feed, feeder, last_json, wait_exit};

/// Every copy request (the PUTs that carry a copy source), either path.
fn copies(env: &Env) -> When {
    When { method: Some("PUT"), contains: Some(format!("{}/", env.source_bucket)), ..When::default() }
}

async fn sustained_throttling(direct_copy: &str) {
    let env = Env::new().await; // maxReceiveCount 5
    let (keys, ids) = env.seed_legacy(0..60).await;
    feed(&env).await;
    let s3 = FaultProxy::start(&env.s3_endpoint).await.unwrap();
    s3.add(Rule::always(copies(&env), Fault::Error { status: 503, code: "SlowDown" }));
    let vars = [
        ("AWS_ENDPOINT_URL_S3", s3.url.as_str()),
        ("DESTINATION_CHECK", "before-copy"),
        ("DIRECT_COPY", direct_copy),
        ("VISIBILITY_TIMEOUT", "2"),
        ("CONCURRENCY", "16"),
    ];
    let mut child = consumer(&env, &vars).spawn().unwrap();
    let stdout = crate::helpers::capture_stdout(&mut child);
    let stderr = crate::helpers::capture_stderr(&mut child);
    // Throttled for longer than 5 receipts x 2 s could last.
    let begun = Instant::now();
    wait_until("throttling for longer than maxReceiveCount x VISIBILITY_TIMEOUT", Duration::from_secs(60), || async {
        begun.elapsed() > Duration::from_secs(14) && s3.injected() >= 10
    })
    .await;
    assert_eq!(env.count_rows_with_prefix("avatar/").await, 0, "nothing copied while throttled");
    s3.clear();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert!(status.success(), "{status:?}\n{stdout}\n{stderr}");
    assert_eq!(env.count_rows_with_prefix("avatar/").await, keys.len() as i64, "everything moved: {stdout}");
    for (id, key) in ids.iter().zip(&keys) {
        assert_eq!(env.path_of(*id).await, crate::helpers::modern(key));
    }
    assert_eq!(env.depth(&env.dlq_url).await, (0, 0), "nothing dead-lettered");
    assert_eq!(env.failures().await, vec![], "nothing set aside for throttling");
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
    assert!(stdout.contains("copies S3 asked to slow down"), "{stdout}");
}

#[tokio::test]
async fn sustained_throttling_dead_letters_nothing_through_the_sdk() {
    sustained_throttling("false").await;
}

#[tokio::test]
async fn sustained_throttling_dead_letters_nothing_on_the_direct_path() {
    sustained_throttling("true").await;
}

/// `feeder pause` before the consumers start: both read the control row before their first
/// receive, take no message and say so (`status`); `feeder resume` lets them finish the job.
#[tokio::test]
async fn a_paused_fleet_takes_no_message_until_resumed() {
    let env = Env::new().await;
    let (keys, _) = env.seed_legacy(0..100).await;
    feed(&env).await;
    let (code, said) = feeder(&env, &["pause"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.starts_with("paused"), "{said}");
    let mut fleet: Vec<_> =
        (0..2).map(|_| consumer(&env, &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()).collect();
    wait_until("both consumers reporting, paused", Duration::from_secs(60), || async {
        let reports = common::control::fleet(&env.db).await.unwrap_or_default();
        reports.len() == 2 && reports.iter().all(|r| r.paused)
    })
    .await;
    let (_, status) = feeder(&env, &["status", "--json"]);
    let status = last_json(&status);
    assert_eq!((status["paused"].as_bool(), status["consumers_reporting"].as_u64()), (Some(true), Some(2)), "{status}");
    assert_eq!(env.count_rows_with_prefix("avatar/").await, 0, "nothing moved while paused");
    assert_eq!(env.depth(&env.queue_url).await.1, 0, "no message received while paused");

    assert_eq!(feeder(&env, &["resume"]).0, Some(0));
    for child in &mut fleet {
        assert!(wait_exit(child, Duration::from_secs(120)).await.success());
    }
    assert_eq!(env.count_rows_with_prefix("avatar/").await, keys.len() as i64);
    assert!(common::control::fleet(&env.db).await.unwrap().is_empty(), "each consumer removed its report");
}

/// `feeder throttle --rate 20`: two consumers share the fleet's cap, and together copy within
/// 10 % of 20 objects a second (copies counted where they reach S3, between the 100th and the
/// 280th of 300: both have reported twice by then); `--clear` lifts it, and a cap of 0 is
/// refused.
#[tokio::test]
async fn two_consumers_share_the_fleet_cap() {
    let env = Env::new().await;
    env.seed_legacy(0..300).await;
    feed(&env).await;
    assert_eq!(feeder(&env, &["throttle", "--rate", "20"]).0, Some(0));
    let s3 = FaultProxy::start(&env.s3_endpoint).await.unwrap();
    let vars = [("AWS_ENDPOINT_URL_S3", s3.url.as_str()), ("DESTINATION_CHECK", "before-copy")];
    let mut fleet: Vec<_> = (0..2).map(|_| consumer(&env, &vars).stdout(Stdio::null()).spawn().unwrap()).collect();
    let copies = || s3.forwarded_by_kind().get("S3 copy").copied().unwrap_or(0);
    let mut samples = Vec::new();
    while fleet.iter_mut().any(|c| c.try_wait().unwrap().is_none()) {
        samples.push((Instant::now(), copies()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at = |n: u64| *samples.iter().find(|(_, c)| *c >= n).unwrap_or_else(|| panic!("{n} copies: {samples:?}"));
    let ((t1, c1), (t2, c2)) = (at(100), at(280));
    let rate = (c2 - c1) as f64 / t2.duration_since(t1).as_secs_f64();
    assert!((18.0..=22.0).contains(&rate), "{rate:.1} copies/s against a cap of 20");
    for child in &mut fleet {
        assert!(wait_exit(child, Duration::from_secs(10)).await.success());
    }
    assert_eq!(env.count_rows_with_prefix("avatar/").await, 300);

    let (code, said) = feeder(&env, &["throttle", "--clear"]);
    assert_eq!(code, Some(0), "{said}");
    assert_eq!(common::control::read(&env.db).await.unwrap().max_copies_per_second, None);
    let (code, _) = feeder(&env, &["throttle", "--rate", "0"]);
    assert_eq!(code, Some(2), "a cap of 0 is refused");
}
