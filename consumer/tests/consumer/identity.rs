//! Exact identity (I3, I5): an existing destination counts as done only when it holds the
//! source's bytes, whatever its ETag says; otherwise it is left as it is and recorded.

use std::time::Duration;

use testkit::Env;
use testkit::proxy::{Fault, FaultProxy, Rule, When};

use crate::helpers::{assert_no_probe_left, drain, etag, feed, put_multipart, stdout};

/// A destination with the source's bytes under another ETag (an earlier delivery's copy on
/// AWS, or the same avatar uploaded differently) is done, not a conflict; the same size with
/// other bytes is a conflict; both are left untouched. On MiniStack, which copies over an
/// existing key despite `If-None-Match: *`, the default `DESTINATION_CHECK=auto` finds that out
/// at start-up and checks each destination before its copy (or both would be overwritten).
#[tokio::test]
async fn same_bytes_under_another_etag_count_as_done_and_other_bytes_as_a_conflict() {
    let env = Env::new().await;
    env.put(&env.source_bucket, "image/same.png", b"the very same bytes").await;
    put_multipart(&env, &env.destination_bucket, "avatar/same.png", b"the very same bytes").await;
    env.put(&env.source_bucket, "image/other.png", b"legacy bytes, 25 of them").await;
    put_multipart(&env, &env.destination_bucket, "avatar/other.png", b"NEWER bytes, 25 of them!").await;
    let (same_before, other_before) = (
        etag(&env, &env.destination_bucket, "avatar/same.png").await,
        etag(&env, &env.destination_bucket, "avatar/other.png").await,
    );
    assert_ne!(same_before, etag(&env, &env.source_bucket, "image/same.png").await, "the ETags differ");
    let ids = env.insert_rows(&["image/same.png".into(), "image/other.png".into()]).await;
    feed(&env).await;
    let out = drain(&env, &[("RUST_LOG", "info,aws=warn")]).await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("DESTINATION_CHECK=auto: the server copies over an existing key"), "{log}");
    assert_no_probe_left(&env).await;

    assert_eq!(env.path_of(ids[0]).await, "avatar/same.png", "same bytes: the row moves");
    assert_eq!(env.path_of(ids[1]).await, "image/other.png", "other bytes: the row stays");
    assert!(stdout(&out).contains("already present 1"), "{}", stdout(&out));
    assert_eq!(env.failures().await, vec![("destination_conflict".to_owned(), "image/other.png".to_owned())]);
    assert_eq!(etag(&env, &env.destination_bucket, "avatar/same.png").await, same_before, "not overwritten");
    assert_eq!(etag(&env, &env.destination_bucket, "avatar/other.png").await, other_before, "not overwritten");
    assert_eq!(
        env.get(&env.destination_bucket, "avatar/other.png").await.as_deref(),
        Some(&b"NEWER bytes, 25 of them!"[..])
    );
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
}

/// Above COMPARE_MAX_BYTES the bytes are not read: the destination is recorded as unproven and
/// left as it is, never guessed to be the same.
#[tokio::test]
async fn a_destination_too_large_to_compare_is_recorded_as_unproven() {
    let env = Env::new().await;
    env.put(&env.source_bucket, "image/big.png", b"0123456789").await;
    put_multipart(&env, &env.destination_bucket, "avatar/big.png", b"0123456789").await;
    let ids = env.insert_rows(&["image/big.png".into()]).await;
    feed(&env).await;
    drain(&env, &[("COMPARE_MAX_BYTES", "4")]).await;
    assert_eq!(env.path_of(ids[0]).await, "image/big.png");
    assert_eq!(env.failures().await, vec![("destination_unproven".to_owned(), "image/big.png".to_owned())]);
}

/// Where each copy needs a look at its destination first (MiniStack ignores `If-None-Match` on
/// CopyObject), one listing per message looks at all of its destinations: only those it lists
/// (and the ones past its page) are HEADed. Here three messages of ten: in the first, two
/// destinations exist (the same bytes, and other bytes); in the third, forty live uploads sort
/// between two of its keys, so the listing's page ends there and the eight keys past it are
/// HEADed. Both existing destinations are still found (one done, one a conflict, neither
/// overwritten) and every other object moves.
#[tokio::test]
async fn one_listing_per_message_replaces_the_heads_of_destinations_it_proves_absent() {
    let env = Env::new().await;
    let keys: Vec<String> = (0..30).map(|i| format!("image/item-{i:02} é.png")).collect();
    env.put_many(&env.source_bucket, &keys, b"png").await;
    let modern = |i: usize| format!("avatar/item-{i:02} é.png");
    env.put(&env.destination_bucket, &modern(3), b"png").await;
    env.put(&env.destination_bucket, &modern(5), b"newer bytes").await;
    let live: Vec<String> = (0..40).map(|j| format!("{}-live-{j:02}", modern(21))).collect();
    env.put_many(&env.destination_bucket, &live, b"a live upload").await;
    let ids = env.insert_rows(&keys).await;
    assert_eq!(feed(&env).await, 30);
    assert_eq!(env.depth(&env.queue_url).await, (3, 0), "ten objects per message");

    let s3 = FaultProxy::start(&env.s3_endpoint).await.unwrap();
    // Counts the HEADs of objects (the start-up checks HEAD buckets): forwarded, untouched.
    s3.add(Rule::always(
        When { method: Some("HEAD"), contains: Some("item-".into()), ..When::default() },
        Fault::Delay(Duration::ZERO),
    ));
    drain(&env, &[("AWS_ENDPOINT_URL_S3", &s3.url), ("DESTINATION_CHECK", "before-copy")]).await;

    let requests = s3.forwarded_by_kind();
    assert_eq!(requests.get("S3 GET"), Some(&3), "one listing per message: {requests:?}");
    // 28 objects, and the start-up probe's copy sent directly.
    assert_eq!(requests.get("S3 copy"), Some(&29), "{requests:?}");
    // Two for each existing destination (it, then its source to compare with), and one for
    // each of the eight keys past the third listing's page; without the listings: 32.
    assert_eq!(s3.injected(), 2 * 2 + 8, "{requests:?}");

    assert_eq!(env.failures().await, vec![("destination_conflict".to_owned(), keys[5].clone())]);
    assert_eq!(env.get(&env.destination_bucket, &modern(5)).await.as_deref(), Some(&b"newer bytes"[..]));
    for (i, id) in ids.iter().enumerate() {
        let expected = if i == 5 { keys[5].clone() } else { modern(i) };
        assert_eq!(env.path_of(*id).await, expected);
    }
    for key in &live {
        assert_eq!(env.get(&env.destination_bucket, key).await.as_deref(), Some(&b"a live upload"[..]));
    }
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
}
