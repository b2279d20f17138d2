//! Listing one range: every page, nothing outside the prefix, the end as S3 says it, a finished listing not repeated, a dry run.

use super::*;

#[tokio::test]
async fn lists_every_page_and_nothing_outside_the_source_prefix() {
    let env = Env::new().await;
    let keys: Vec<String> = (0..2345).map(|i| format!("image/avatar-{i}.png")).collect();
    env.put_many(&env.source_bucket, &keys, b"png").await;
    for outside in ["imagex/avatar-1.png", "Image/avatar-1.png", "avatar/avatar-1.png", "image"] {
        env.put(&env.source_bucket, outside, b"png").await;
    }
    let summary =
        feeder::feed(&settings(&env), &run_args(1000), &clients(&env).await, CancellationToken::new()).await.unwrap();
    assert_eq!((summary.listed, summary.enqueued, summary.finished), (2345, 2345, true));
    let bodies = env.drain().await;
    let enqueued = keys_of(&bodies);
    assert_eq!(enqueued.len(), 2345, "each object once");
    assert_eq!(bodies.len(), 235, "ten objects per message (OBJECTS_PER_MESSAGE's default), pages of 1,000");
    assert_eq!(enqueued.into_iter().collect::<BTreeSet<_>>(), keys.into_iter().collect::<BTreeSet<_>>());
    let first = &common::message::decode(&bodies[0]).unwrap()[0];
    assert_eq!(first.size, 3);
    assert!(first.etag.len() > 2, "the listed ETag travels with the message");
}

#[tokio::test]
async fn a_finished_listing_is_not_repeated_unless_restarted() {
    let env = Env::new().await;
    let keys: Vec<String> = (0..25).map(|i| format!("image/{i}.png")).collect();
    env.put_many(&env.source_bucket, &keys, b"x").await;
    let (settings, clients) = (settings(&env), clients(&env).await);
    let first = feeder::feed(&settings, &run_args(10), &clients, CancellationToken::new()).await.unwrap();
    assert_eq!(first.listed, 25);
    let again = feeder::feed(&settings, &run_args(10), &clients, CancellationToken::new()).await.unwrap();
    assert_eq!((again.listed, again.finished), (0, true));
    let restart = RunArgs { restart: true, ..run_args(10) };
    let restarted = feeder::feed(&settings, &restart, &clients, CancellationToken::new()).await.unwrap();
    assert_eq!(restarted.listed, 25);
    assert_eq!(keys_of(&env.drain().await).len(), 50);
}

/// Runs the feeder through a proxy in front of S3 whose listing answers are replaced; returns
/// (exit code, stderr) and the checkpoint afterwards.
async fn feed_through(env: &Env, answer: testkit::proxy::Fault) -> (Option<i32>, String, common::db::Checkpoint) {
    use testkit::proxy::{FaultProxy, Rule, When};
    let proxy = FaultProxy::start(&env.s3_endpoint).await.unwrap();
    proxy.add(Rule::always(
        When { method: Some("GET"), contains: Some("list-type=2".into()), ..When::default() },
        answer,
    ));
    let out = tokio::process::Command::from(env.command("feeder"))
        .env("AWS_ENDPOINT_URL_S3", &proxy.url)
        .output()
        .await
        .unwrap();
    let cp = common::db::load_checkpoint(&env.db, &env.source_bucket, "image/").await.unwrap_or_default();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned(), cp)
}

/// The end of the listing is what S3 says, never a guess: an answer without `IsTruncated`, a
/// truncated page without a continuation token, or a listing that keeps failing is an error
/// (exit 1, naming the listing), and the checkpoint is never marked finished.
#[tokio::test]
async fn a_listing_that_does_not_say_it_ended_is_never_taken_as_finished() {
    use testkit::proxy::Fault;
    const NO_IS_TRUNCATED: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult \
        xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>b</Name><Prefix>image/</Prefix><KeyCount>1</KeyCount>\
        <MaxKeys>1000</MaxKeys><EncodingType>url</EncodingType><Contents><Key>image/a.png</Key><Size>3</Size>\
        <ETag>&quot;x&quot;</ETag></Contents></ListBucketResult>";
    const NO_TOKEN: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult \
        xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>b</Name><Prefix>image/</Prefix><KeyCount>1</KeyCount>\
        <MaxKeys>1000</MaxKeys><EncodingType>url</EncodingType><IsTruncated>true</IsTruncated><Contents>\
        <Key>image/a.png</Key><Size>3</Size><ETag>&quot;x&quot;</ETag></Contents></ListBucketResult>";
    for (answer, expected) in [
        (Fault::Answer { status: 200, body: NO_IS_TRUNCATED }, "does not say whether the listing goes on"),
        (Fault::Answer { status: 200, body: NO_TOKEN }, "gave no continuation token"),
        (Fault::Error { status: 500, code: "InternalError" }, "InternalError"),
    ] {
        let env = Env::new().await;
        env.put(&env.source_bucket, "image/a.png", b"png").await;
        env.prepare().await;
        let (code, stderr, cp) = feed_through(&env, answer).await;
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains(expected) && stderr.contains("listing s3://"), "{stderr}");
        assert!(!cp.finished, "never marked finished: {cp:?}");
    }
}

/// A dry run lists (here in key ranges) and counts objects and messages, but sends nothing
/// and saves no checkpoint or range: a real run afterwards starts from the beginning.
#[tokio::test]
async fn a_dry_run_counts_and_sends_or_saves_nothing() {
    let env = Env::new().await;
    let keys = awkward_uneven_keys();
    env.put_many(&env.source_bucket, &keys, b"png").await;
    let (settings, clients) = (settings(&env), clients(&env).await);
    let dry = RunArgs { dry_run: true, list_ranges: 4, ..run_args(7) };
    let summary = feeder::feed(&settings, &dry, &clients, CancellationToken::new()).await.unwrap();
    let n = keys.len() as u64;
    assert_eq!((summary.listed, summary.enqueued, summary.finished), (n, 0, true));
    assert!(summary.messages >= n.div_ceil(10), "{summary:?}");
    assert_eq!(env.depth(&env.queue_url).await, (0, 0), "nothing sent");
    assert_eq!(common::db::load_checkpoint(&env.db, &env.source_bucket, "image/").await.unwrap(), Default::default());
    assert!(feeder::store::ranges::load_ranges(&env.db, &env.source_bucket, "image/").await.unwrap().is_empty());
    let real = RunArgs { dry_run: false, ..dry };
    let real = feeder::feed(&settings, &real, &clients, CancellationToken::new()).await.unwrap();
    assert_eq!((real.listed, real.messages), (n, summary.messages), "the same count, for real");
}
