//! Objects above `MULTIPART_THRESHOLD` (5 GiB in production, lowered here) are copied in
//! parts: the same bytes, content type, metadata and tags as a single copy, the source's ETag
//! when the source's parts are of one size, nothing left half-uploaded, and a destination with
//! other bytes never overwritten (I3).

use aws_sdk_s3::types::{Tag, Tagging};
use testkit::Env;

use common::message::{ObjectMessage, encode};

use crate::helpers::{drain, etag, feed, stdout};

const MIB: usize = 1024 * 1024;
/// Lowered thresholds: objects above 6 MiB are copied in parts of 6 MiB, unless the source's
/// own parts (5 MiB in `image/in-parts.png`) can be reused.
const SMALL_PARTS: &[(&str, &str)] =
    &[("MULTIPART_THRESHOLD", "6291456"), ("MULTIPART_PART_SIZE", "6291456"), ("MULTIPART_CONCURRENCY", "2")];

/// Bytes that differ from one MiB to the next, so a part copied from the wrong range shows.
fn body(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i / 4099) as u8 ^ (i as u8).wrapping_mul(31) ^ seed).collect()
}

async fn tags(env: &Env, bucket: &str, key: &str) -> Vec<(String, String)> {
    let out = env.s3.get_object_tagging().bucket(bucket).key(key).send().await.unwrap();
    let mut tags: Vec<_> = out.tag_set().iter().map(|t| (t.key().to_owned(), t.value().to_owned())).collect();
    tags.sort();
    tags
}

async fn seed(env: &Env) -> (Vec<u8>, Vec<u8>) {
    // Uploaded in three parts of 5 MiB (the last shorter), as an SDK uploader would.
    let in_parts = body(12 * MIB + 123, 1);
    env.put_in_parts(&env.source_bucket, "image/in-parts.png", &in_parts, 5 * MIB).await;
    // Uploaded whole, with headers, metadata and tags that the copy must carry.
    let whole = body(7 * MIB + 5, 2);
    env.put_with(&env.source_bucket, "image/whole.png", &whole, Some("image/png"), &[("owner", "user-42")]).await;
    let tagging = Tagging::builder()
        .tag_set(Tag::builder().key("team").value("avatars + co: 1/2").build().unwrap())
        .tag_set(Tag::builder().key("tier").value("gold").build().unwrap())
        .build()
        .unwrap();
    env.s3
        .put_object_tagging()
        .bucket(&env.source_bucket)
        .key("image/whole.png")
        .tagging(tagging)
        .send()
        .await
        .unwrap();
    env.put(&env.source_bucket, "image/small.png", b"small").await;
    (in_parts, whole)
}

/// Where servers differ from AWS.
struct Server {
    /// Whether the server keeps the tags given when an upload begins (AWS, SeaweedFS and moto
    /// do; MiniStack drops them).
    tags_kept: bool,
    /// Whether, as on AWS, a copy in the source's own part sizes gets the source's ETag: the
    /// server tells a part's size (`HEAD ?partNumber=1`; MiniStack ignores it) and a copied
    /// part's ETag is the MD5 of its bytes (SeaweedFS 4.48 gives copied parts other ETags).
    etag_kept: bool,
}

async fn run(env: &Env, server: Server) -> Vec<i32> {
    let (in_parts, whole) = seed(env).await;
    let ids = env.insert_rows(&["image/in-parts.png".into(), "image/whole.png".into(), "image/small.png".into()]).await;
    feed(env).await;
    let out = drain(env, &[SMALL_PARTS, &[("RUST_LOG", "info,aws=warn")]].concat()).await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(log.matches("copying in parts").count(), 2, "{log}");

    let dst = &env.destination_bucket;
    assert_eq!(env.get(dst, "avatar/in-parts.png").await.unwrap(), in_parts, "same bytes");
    assert_eq!(env.get(dst, "avatar/whole.png").await.unwrap(), whole, "same bytes");
    assert_eq!(env.get(dst, "avatar/small.png").await.as_deref(), Some(&b"small"[..]));
    if server.etag_kept {
        assert_eq!(
            etag(env, dst, "avatar/in-parts.png").await,
            etag(env, &env.source_bucket, "image/in-parts.png").await,
            "the source's part size was reused, so the ETags are equal"
        );
    }
    let (content_type, metadata) = env.head(dst, "avatar/whole.png").await;
    assert_eq!(content_type.as_deref(), Some("image/png"));
    assert_eq!(metadata.get("owner").map(String::as_str), Some("user-42"));
    let expected = if server.tags_kept { 2 } else { 0 };
    assert_eq!(
        tags(env, dst, "avatar/whole.png").await[..],
        vec![("team".to_owned(), "avatars + co: 1/2".to_owned()), ("tier".to_owned(), "gold".to_owned())][..expected]
    );
    for (id, path) in ids.iter().zip(["avatar/in-parts.png", "avatar/whole.png", "avatar/small.png"]) {
        assert_eq!(env.path_of(*id).await, path);
    }
    assert!(env.open_uploads(dst).await.is_empty(), "no upload left open");
    assert_eq!(env.failures().await, vec![]);
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
    ids
}

/// MiniStack: checks each destination first (it does not enforce `If-None-Match`); it drops
/// the tags an upload begins with, which AWS keeps.
#[tokio::test]
async fn large_objects_are_copied_in_parts_with_their_metadata() {
    run(&Env::new().await, Server { tags_kept: false, etag_kept: false }).await;
}

/// moto behaves as AWS here: the copy reuses the source's part size and so gets its ETag.
#[tokio::test]
async fn a_copy_in_the_sources_part_sizes_gets_its_etag_and_is_proven_done_by_it() {
    let env = Env::on_moto().await;
    let ids = run(&env, Server { tags_kept: true, etag_kept: true }).await;

    // A second delivery (the row written back as if the first consumer died before its
    // rewrite) proves the copy done from the equal ETags alone: comparing bytes is disallowed.
    sqlx::query("UPDATE avatars SET path = 'image/in-parts.png' WHERE id = $1")
        .bind(ids[0])
        .execute(&env.db)
        .await
        .unwrap();
    let source_etag = etag(&env, &env.source_bucket, "image/in-parts.png").await;
    let message = ObjectMessage::new("image/in-parts.png".into(), (12 * MIB + 123) as i64, source_etag);
    env.send_raw(&encode(&[message])).await;
    let out = drain(&env, &[SMALL_PARTS, &[("COMPARE_MAX_BYTES", "1")]].concat()).await;
    assert!(stdout(&out).contains("already present 1"), "{}", stdout(&out));
    assert_eq!(env.path_of(ids[0]).await, "avatar/in-parts.png");
    assert_eq!(env.failures().await, vec![]);
}

/// SeaweedFS: tags kept; copies first and relies on the server refusing to complete over an existing key.
#[tokio::test]
async fn large_objects_are_copied_in_parts_on_seaweedfs() {
    run(&Env::on_seaweedfs().await, Server { tags_kept: true, etag_kept: false }).await;
}

/// A large destination that already holds other bytes is never overwritten, whether it is
/// found before the copy or only when the server refuses to complete the upload, and the
/// abandoned upload is aborted.
#[tokio::test]
async fn a_large_conflict_is_recorded_and_never_overwritten() {
    for (env, check) in [(Env::new().await, "before-copy"), (Env::on_seaweedfs().await, "on-conflict")] {
        env.put(&env.source_bucket, "image/big.png", &body(7 * MIB, 3)).await;
        let theirs = body(7 * MIB, 4);
        env.put(&env.destination_bucket, "avatar/big.png", &theirs).await;
        let before = etag(&env, &env.destination_bucket, "avatar/big.png").await;
        let ids = env.insert_rows(&["image/big.png".into()]).await;
        feed(&env).await;
        drain(&env, &[SMALL_PARTS, &[("DESTINATION_CHECK", check)]].concat()).await;
        assert_eq!(env.path_of(ids[0]).await, "image/big.png", "{check}: the row stays");
        assert_eq!(
            env.failures().await,
            vec![("destination_conflict".to_owned(), "image/big.png".to_owned())],
            "{check}"
        );
        assert_eq!(etag(&env, &env.destination_bucket, "avatar/big.png").await, before, "{check}");
        assert_eq!(env.get(&env.destination_bucket, "avatar/big.png").await.unwrap(), theirs, "{check}");
        testkit::wait_until("the abandoned upload to be aborted", std::time::Duration::from_secs(10), || async {
            env.open_uploads(&env.destination_bucket).await.is_empty()
        })
        .await;
        assert_eq!(env.depth(&env.queue_url).await, (0, 0), "{check}");
    }
}

/// A copy in parts that S3 keeps asking to slow down (its start, every part, its completion:
/// more refusals than the SDK's retries would ride out) is paced and finished by the consumer
/// that holds it: the same bytes at the destination, nothing set aside, nothing left in the
/// queue.
#[tokio::test]
async fn a_copy_in_parts_rides_out_slow_downs() {
    use testkit::proxy::{Fault, FaultProxy, Rule, When};
    let env = Env::on_seaweedfs().await;
    let big = body(13 * MIB, 5);
    env.put(&env.source_bucket, "image/big.png", &big).await;
    let ids = env.insert_rows(&["image/big.png".into()]).await;
    feed(&env).await;
    let s3 = FaultProxy::start(&env.s3_endpoint).await.unwrap();
    for piece in ["uploads", "partNumber", "uploadId"] {
        let mut slow_down = Rule::always(
            When { contains: Some(piece.into()), ..When::default() },
            Fault::Error { status: 503, code: "SlowDown" },
        );
        slow_down.remaining = Some(10);
        s3.add(slow_down);
    }
    let out = drain(&env, &[SMALL_PARTS, &[("AWS_ENDPOINT_URL_S3", s3.url.as_str())]].concat()).await;
    assert_eq!(s3.injected(), 30, "{}", stdout(&out));
    assert!(stdout(&out).contains("copies S3 asked to slow down 30"), "{}", stdout(&out));
    assert!(stdout(&out).contains("received 1 messages"), "done on its first delivery: {}", stdout(&out));
    assert_eq!(env.get(&env.destination_bucket, "avatar/big.png").await.unwrap(), big);
    assert_eq!(env.path_of(ids[0]).await, "avatar/big.png");
    assert_eq!(env.failures().await, vec![]);
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
    assert_eq!(env.depth(&env.dlq_url).await, (0, 0));
}
