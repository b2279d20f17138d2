//! S3 asking to slow down (503 SlowDown): the consumer's pace (`consumer::pace`) answers it,
//! and a copy refused for rate is tried again by the consumer that holds it, never handed back
//! to the queue: throttling that outlasts `maxReceiveCount` x the visibility timeout
//! dead-letters nothing.

use std::time::{Duration, Instant};

use testkit::proxy::{Fault, FaultProxy, Rule, When};
use testkit::{Env, wait_until};

use crate::helpers::{consumer, feed, seed_legacy, wait_exit};

/// Every copy request (the PUTs that carry a copy source), either path.
fn copies(env: &Env) -> When {
    When { method: Some("PUT"), contains: Some(format!("{}/", env.source_bucket)), ..When::default() }
}

async fn sustained_throttling(direct_copy: &str) {
    let env = Env::new().await; // maxReceiveCount 5
    let (keys, ids) = seed_legacy(&env, 0..60).await;
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
    // Throttled for longer than 5 receipts x 2 s could last.
    let begun = Instant::now();
    wait_until("throttling for longer than maxReceiveCount x VISIBILITY_TIMEOUT", Duration::from_secs(60), || async {
        begun.elapsed() > Duration::from_secs(14) && s3.injected() >= 10
    })
    .await;
    assert_eq!(env.count_rows_with_prefix("avatar/").await, 0, "nothing copied while throttled");
    s3.clear();
    let status = wait_exit(&mut child, Duration::from_secs(120)).await;
    let stdout = stdout.join().unwrap();
    assert!(status.success(), "{status:?}\n{stdout}");
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
