//! The pipeline on SeaweedFS, an object store that enforces conditional writes
//! (`If-None-Match: *` on CopyObject), with SQS on MiniStack: nothing here may depend on an
//! emulator's leniency.

use std::collections::BTreeSet;

use testkit::Env;

use crate::helpers::{assert_no_probe_left, drain, etag, feed, legacy_keys, modern, put_multipart, stdout};

/// What both SeaweedFS tests seed: 40 plain legacy avatars with rows, awkward keys, a conflict
/// (other bytes at the destination) and a destination with the same bytes under another ETag.
async fn seed(env: &Env) -> Vec<String> {
    let mut keys = legacy_keys(0..40);
    keys.extend(["image/with space+plus%.png", "image/ctl-\u{1}-cr-\r.png", "image/ünïcødé.png"].map(String::from));
    env.put_many(&env.source_bucket, &keys, b"png").await;
    env.put(&env.source_bucket, "image/conflict.png", b"legacy bytes").await;
    env.put(&env.destination_bucket, "avatar/conflict.png", b"a newer upload").await;
    env.put(&env.source_bucket, "image/same.png", b"same bytes").await;
    put_multipart(env, &env.destination_bucket, "avatar/same.png", b"same bytes").await;
    let mut rows = keys.clone();
    rows.extend(["image/conflict.png".into(), "image/same.png".into()]);
    env.insert_rows(&rows).await;
    keys
}

async fn assert_end_state(env: &Env, keys: &[String], conflict_etag: &str) {
    for key in keys {
        assert_eq!(env.get(&env.destination_bucket, &modern(key)).await.as_deref(), Some(&b"png"[..]), "{key:?}");
    }
    let legacy: BTreeSet<String> =
        env.rows().await.into_iter().map(|(_, p)| p).filter(|p| p.starts_with("image/")).collect();
    assert_eq!(legacy, BTreeSet::from(["image/conflict.png".to_owned()]), "only the conflicting row stays legacy");
    assert_eq!(etag(env, &env.destination_bucket, "avatar/conflict.png").await, conflict_etag, "never overwritten");
    assert_eq!(env.get(&env.destination_bucket, "avatar/conflict.png").await.as_deref(), Some(&b"a newer upload"[..]));
    assert_eq!(env.failures().await, vec![("destination_conflict".to_owned(), "image/conflict.png".to_owned())]);
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
}

/// With the default `DESTINATION_CHECK=auto` the consumer finds at start-up that SeaweedFS
/// refuses a conditional copy onto an existing key, so it copies first (no HEAD per object);
/// its probe objects are gone afterwards, and the conflict is still never overwritten.
#[tokio::test]
async fn the_pipeline_works_on_seaweedfs() {
    let env = Env::on_seaweedfs().await;
    let keys = seed(&env).await;
    let conflict_etag = etag(&env, &env.destination_bucket, "avatar/conflict.png").await;
    feed(&env).await;
    let out = drain(&env, &[("CONCURRENCY", "8"), ("RUST_LOG", "info,aws=warn")]).await;
    assert!(stdout(&out).contains("already present 1"), "{}", stdout(&out));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("DESTINATION_CHECK=auto: the server refuses a conditional copy"), "{log}");
    assert_end_state(&env, &keys, &conflict_etag).await;
    assert_no_probe_left(&env).await;
}

/// Copy first, look later (`DESTINATION_CHECK=on-conflict`): destinations that already exist
/// are met by the copy itself, and the server's 412 keeps them intact; the consumer then
/// compares (same bytes: done; other bytes: conflict), as when a live upload lands between a
/// check and the copy.
#[tokio::test]
async fn the_servers_412_keeps_a_destination_the_copy_meets() {
    let env = Env::on_seaweedfs().await;
    let keys = seed(&env).await;
    let conflict_etag = etag(&env, &env.destination_bucket, "avatar/conflict.png").await;
    feed(&env).await;
    let out = drain(&env, &[("DESTINATION_CHECK", "on-conflict")]).await;
    assert!(stdout(&out).contains(&format!("copied {}, already present 1", keys.len())), "{}", stdout(&out));
    assert_end_state(&env, &keys, &conflict_etag).await;
}

/// SeaweedFS checks signatures, as AWS does: a consumer whose secret is wrong stops at
/// start-up with exit code 2 and a line naming the refusal and what to check, never the
/// secret, and moves nothing.
#[tokio::test]
async fn a_wrong_secret_is_refused_before_anything_moves() {
    let env = Env::on_seaweedfs().await;
    seed(&env).await;
    feed(&env).await;
    let wrong = crate::helpers::consumer(&env, &[("AWS_SECRET_ACCESS_KEY", "not-the-secret-1234")]);
    let out = tokio::process::Command::from(wrong).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("denied: check the credentials"), "{stderr}");
    assert!(!stderr.contains("not-the-secret-1234"), "{stderr}");
    assert_eq!(env.count_rows_with_prefix("avatar/").await, 0, "nothing moved");
    assert!(
        env.keys(&env.destination_bucket).await.iter().all(|k| k == "avatar/conflict.png" || k == "avatar/same.png")
    );
}
