//! Error classes (README, "What each error means"): an error permanent for one object is
//! recorded with its reason and the others move on; an error that stops every object stops
//! the process with that error and loses nothing. The errors come from a fault-injecting proxy
//! in front of the real local server (a stand-in for what AWS answers, forwarded otherwise).

use std::process::Stdio;
use std::time::Duration;

use testkit::proxy::{Fault, FaultProxy, Rule, When};
use testkit::tcp::TcpForward;
use testkit::{Env, wait_until};

use crate::helpers::{capture_stderr, consumer, count_each, drain, feed, legacy_keys, wait_exit};

fn error(status: u16, code: &'static str) -> Fault {
    Fault::Error { status, code }
}

fn containing(piece: &str) -> When {
    When { contains: Some(piece.to_owned()), ..When::default() }
}

#[tokio::test]
async fn access_denied_and_archived_objects_are_recorded_and_the_rest_moves_on() {
    let env = Env::new().await;
    let mut keys = legacy_keys(0..20);
    keys.extend(["image/forbidden.png".to_owned(), "image/archived.png".to_owned()]);
    env.put_many(&env.source_bucket, &keys, b"png").await;
    let ids = env.insert_rows(&keys).await;
    feed(&env).await;
    let s3 = FaultProxy::start(&env.s3_endpoint).await.unwrap();
    s3.add(Rule::always(containing("forbidden.png"), error(403, "AccessDenied")));
    s3.add(Rule::always(When { method: Some("PUT"), ..containing("archived.png") }, error(403, "InvalidObjectState")));
    drain(&env, &[("AWS_ENDPOINT_URL_S3", &s3.url)]).await;

    assert_eq!(
        env.failures().await,
        vec![
            ("access_denied".to_owned(), "image/forbidden.png".to_owned()),
            ("object_archived".to_owned(), "image/archived.png".to_owned()),
        ]
    );
    assert_eq!(env.count_rows_with_prefix("avatar/").await, 20, "every other object moved");
    assert_eq!(env.path_of(ids[20]).await, "image/forbidden.png");
    assert_eq!(env.path_of(ids[21]).await, "image/archived.png");
    assert_eq!(env.depth(&env.queue_url).await, (0, 0), "recorded, then deleted");
    assert_eq!(env.depth(&env.dlq_url).await, (0, 0), "not retried into the dead-letter queue");
    assert!(s3.injected() >= 2);
}

/// The destination bucket disappears mid-run: the consumer stops with exit 1 and an error that
/// names it (no object is set aside for it); every row still resolves and every object not
/// finished is still in the queue. Once the bucket is back, a consumer finishes the job.
#[tokio::test]
async fn a_bucket_gone_mid_run_stops_the_consumer_and_loses_nothing() {
    let env = Env::new().await;
    env.seed_legacy(0..400).await;
    feed(&env).await;
    let s3 = FaultProxy::start(&env.s3_endpoint).await.unwrap();
    let vars = [
        ("AWS_ENDPOINT_URL_S3", s3.url.as_str()),
        ("CONCURRENCY", "4"),
        ("SHUTDOWN_GRACE_SECONDS", "5"),
        ("VISIBILITY_TIMEOUT", "3"),
    ];
    let mut child = consumer(&env, &vars).stdout(Stdio::null()).spawn().unwrap();
    let stderr = capture_stderr(&mut child);
    wait_until("some rows rewritten", Duration::from_secs(60), || async {
        env.count_rows_with_prefix("avatar/").await >= 20
    })
    .await;
    s3.add(Rule::always(containing(&format!("/{}", env.destination_bucket)), error(404, "NoSuchBucket")));
    let status = wait_exit(&mut child, Duration::from_secs(60)).await;
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("NoSuchBucket") && stderr.contains(&env.destination_bucket), "{stderr}");
    assert_eq!(env.failures().await, vec![], "nothing set aside for a fault of the whole run");
    let moved = env.count_rows_with_prefix("avatar/").await;
    assert!(moved < 400, "stopped mid-run ({moved} moved)");
    for (_, path) in env.rows().await.into_iter().filter(|(_, p)| p.starts_with("avatar/")) {
        assert!(env.exists(&env.destination_bucket, &path).await, "{path} resolves");
    }

    s3.clear();
    drain(&env, &[("AWS_ENDPOINT_URL_S3", &s3.url), ("VISIBILITY_TIMEOUT", "2")]).await;
    assert_eq!(env.count_rows_with_prefix("avatar/").await, 400, "nothing lost");
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
}

/// A receive refused for good (access denied to the queue) stops the consumer with exit 1 and
/// an error naming the queue, instead of retrying forever.
#[tokio::test]
async fn a_receive_refused_for_good_stops_the_consumer() {
    let env = Env::new().await;
    let sqs = FaultProxy::start(&env.sqs_endpoint).await.unwrap();
    sqs.add(Rule::always(When { sqs_action: Some("ReceiveMessage"), ..When::default() }, error(403, "AccessDenied")));
    let mut child = consumer(&env, &[("AWS_ENDPOINT_URL_SQS", &sqs.url)]).spawn().unwrap();
    let stderr = capture_stderr(&mut child);
    let status = wait_exit(&mut child, Duration::from_secs(60)).await;
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("AccessDenied") && stderr.contains(&env.queue_url), "{stderr}");
}

/// A consumer that ECS starts while PostgreSQL restarts and SQS does not answer waits for both
/// (STARTUP_WAIT), warning while it waits, then moves everything and exits 0; a refusal for
/// good (a wrong password) still exits 2 at once, and names the database, never the password.
#[tokio::test]
async fn a_consumer_started_while_its_services_restart_waits_for_them() {
    let env = Env::new().await;
    let (keys, _) = env.seed_legacy(0..30).await;
    feed(&env).await;
    let (_, after_at) = env.database_url.split_once('@').unwrap();
    let (upstream, database) = after_at.split_once('/').unwrap();
    let pg = TcpForward::start(upstream).await.unwrap();
    let sqs = FaultProxy::start(&env.sqs_endpoint).await.unwrap();
    pg.set_down(true);
    sqs.set_down(true);
    let url = env.database_url.replace(upstream, &format!("127.0.0.1:{}", pg.port));
    let vars = [("DATABASE_URL", url.as_str()), ("AWS_ENDPOINT_URL_SQS", &sqs.url), ("STARTUP_WAIT", "120s")];
    let mut child = consumer(&env, &vars).stdout(Stdio::null()).spawn().unwrap();
    let [db_waits, queue_waits] = count_each(&mut child, ["cannot connect to the database", "QUEUE_URL: cannot reach"]);
    let waited = |counter: &std::sync::Arc<std::sync::atomic::AtomicUsize>| {
        let counter = counter.clone();
        move || {
            let counter = counter.clone();
            async move { counter.load(std::sync::atomic::Ordering::SeqCst) >= 2 }
        }
    };
    wait_until("the consumer waiting for the database", Duration::from_secs(60), waited(&db_waits)).await;
    assert_eq!(env.count_rows_with_prefix("avatar/").await, 0);
    pg.set_down(false);
    wait_until("the consumer waiting for the queue", Duration::from_secs(60), waited(&queue_waits)).await;
    sqs.set_down(false);
    let status = wait_exit(&mut child, Duration::from_secs(120)).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(env.count_rows_with_prefix("avatar/").await, keys.len() as i64, "everything moved");
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));

    let wrong = format!("postgres://migrator:s3cr3t-pw@{upstream}/{database}");
    let begun = std::time::Instant::now();
    let out = tokio::process::Command::from(consumer(&env, &[("DATABASE_URL", &wrong), ("STARTUP_WAIT", "120s")]))
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(begun.elapsed() < Duration::from_secs(60), "a refusal for good is not waited on");
    assert!(stderr.contains("cannot connect to the database") && !stderr.contains("s3cr3t-pw"), "{stderr}");
}

/// Every request is bounded in time: a server that takes a request and never answers holds
/// neither an object nor its message. Every request about one object hangs for a while (HEADs
/// and copies alike, through the SDK): each attempt gives up after `S3_REQUEST_TIMEOUT`, the
/// object is abandoned after `OBJECT_TIMEOUT` (its message comes back, its visibility no
/// longer extended), and once the server answers again the run ends with every object moved.
#[tokio::test]
async fn a_hung_server_holds_no_object_and_no_message_for_good() {
    let env = Env::with_visibility(&std::env::var("AWS_ENDPOINT_URL").unwrap(), 2).await;
    let (keys, ids) = env.seed_legacy(0..6).await;
    feed(&env).await;
    let s3 = FaultProxy::start(&env.s3_endpoint).await.unwrap();
    let mut hang = Rule::always(containing("avatar-3"), Fault::Hang);
    hang.remaining = Some(8);
    s3.add(hang);
    let vars = [
        ("AWS_ENDPOINT_URL_S3", s3.url.as_str()),
        ("DIRECT_COPY", "false"),
        ("S3_REQUEST_TIMEOUT", "1s"),
        ("OBJECT_TIMEOUT", "2500ms"),
        ("VISIBILITY_TIMEOUT", "2"),
        ("RUST_LOG", "warn"),
    ];
    let out = tokio::time::timeout(Duration::from_secs(120), drain(&env, &vars))
        .await
        .expect("a hung server held the consumer");
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(s3.injected(), 8, "every hung request was given up");
    assert!(log.contains("abandoned"), "the object was abandoned to its next delivery: {log}");
    for (id, key) in ids.iter().zip(&keys) {
        assert_eq!(env.path_of(*id).await, key.replacen("image/", "avatar/", 1));
    }
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
}

/// A refusal record outlived by its object: recorded by a consumer stopped by a systemic
/// refusal (its message kept), while the same object moves through another message on its
/// first delivery (a page the feeder sent again), or is decided for another reason (its
/// source gone). While refusal records stand, every object decided removes its own, whatever
/// delivery decided it: none is left behind.
#[tokio::test]
async fn a_refusal_record_goes_when_its_object_moves_through_any_message() {
    let env = Env::new().await;
    let (keys, _) = env.seed_legacy(0..3).await;
    env.prepare().await;
    common::db::record_failure(&env.db, &keys[1], common::db::Reason::AccessDenied, "refused before").await.unwrap();
    // An object refused once, whose source is gone by its next delivery: decided
    // source_missing, and the refusal no longer stands either.
    common::db::record_failure(&env.db, &keys[2], common::db::Reason::AccessDenied, "refused before").await.unwrap();
    feed(&env).await;
    env.s3.delete_object().bucket(&env.source_bucket).key(&keys[2]).send().await.unwrap();
    drain(&env, &[]).await;
    assert_eq!(
        env.failures().await,
        vec![("source_missing".to_owned(), keys[2].clone())],
        "the refusal records went with their objects' decisions"
    );
}
