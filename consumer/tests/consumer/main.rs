//! The consumer against the real local services: what moves, what stays, and the invariants
//! I1-I5 of DESIGN.md.

mod helpers;

use std::collections::BTreeSet;
use std::time::Duration;

use helpers::{consumer, drain, feed, legacy_keys, modern, stdout, wait_exit};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use clap::Parser;
use sqlx::Row;
use testkit::{Env, wait_until};

const AWKWARD: &[&str] = &[
    "image/with space.png",
    "image/plus+sign.png",
    "image/percent%20literal.png",
    "image/amp&and=equals.png",
    "image/ünïcødé-日本.png",
    "image/nested/deeper/dir/avatar.png",
    "image/question?hash#.png",
    "image/zero-bytes.png",
];

#[tokio::test]
async fn moves_awkward_keys_and_keeps_bytes_content_type_and_metadata() {
    let env = Env::new().await;
    for (i, key) in AWKWARD.iter().enumerate() {
        let body: Vec<u8> = if key.contains("zero-bytes") { Vec::new() } else { format!("png-{i}").into_bytes() };
        env.put_with(&env.source_bucket, key, &body, Some("image/png"), &[("owner", "user-42"), ("crop", "a=b; c")])
            .await;
    }
    let paths: Vec<String> = AWKWARD.iter().map(|k| k.to_string()).collect();
    let ids = env.insert_rows(&paths).await;
    assert_eq!(feed(&env).await, AWKWARD.len() as u64);
    drain(&env, &[]);

    for (id, key) in ids.iter().zip(AWKWARD) {
        let dest = modern(key);
        assert_eq!(env.path_of(*id).await, dest, "row of {key:?} rewritten");
        assert_eq!(env.get(&env.destination_bucket, &dest).await, env.get(&env.source_bucket, key).await, "{key:?}");
        let (content_type, metadata) = env.head(&env.destination_bucket, &dest).await;
        assert_eq!(content_type.as_deref(), Some("image/png"), "{key:?}");
        assert_eq!(metadata.get("owner").map(String::as_str), Some("user-42"), "{key:?}");
        assert_eq!(metadata.get("crop").map(String::as_str), Some("a=b; c"), "{key:?}");
    }
    assert_eq!(env.get(&env.destination_bucket, "avatar/zero-bytes.png").await, Some(Vec::new()));
    assert_eq!(env.failures().await, vec![]);
    assert_eq!(env.depth(&env.queue_url).await, (0, 0), "every message deleted");
}

#[tokio::test]
async fn the_mixed_state_ends_with_legacy_rows_rewritten_and_the_rest_untouched() {
    let env = Env::new().await;
    // Legacy avatars with rows; one path shared by three rows.
    let legacy = legacy_keys(0..30);
    env.put_many(&env.source_bucket, &legacy, b"legacy").await;
    let mut rows = legacy.clone();
    rows.extend([legacy[0].clone(), legacy[0].clone()]);
    // Modern avatars already in production, with rows.
    let modern_keys: Vec<String> = (100..110).map(|i| format!("avatar/avatar-{i}.png")).collect();
    env.put_many(&env.destination_bucket, &modern_keys, b"modern").await;
    rows.extend(modern_keys.iter().cloned());
    // A row whose legacy object does not exist.
    rows.push("image/avatar-gone.png".into());
    let ids = env.insert_rows(&rows).await;
    // Objects without a row, and keys outside the prefix.
    env.put_many(&env.source_bucket, &legacy_keys(200..205), b"no-row").await;
    for outside in ["imagex/avatar-1.png", "Image/avatar-1.png"] {
        env.put(&env.source_bucket, outside, b"outside").await;
    }
    let source_before = env.keys(&env.source_bucket).await;

    feed(&env).await;
    drain(&env, &[("CONCURRENCY", "8")]);

    let after = env.rows().await;
    for ((id, path), before) in after.iter().zip(&rows) {
        let expected = if before == "image/avatar-gone.png" { before.clone() } else { modern(before) };
        assert_eq!(path, &expected, "row {id}");
    }
    assert_eq!(after.iter().map(|r| r.0).collect::<Vec<_>>(), ids);
    for key in &legacy {
        assert_eq!(env.get(&env.destination_bucket, &modern(key)).await.as_deref(), Some(&b"legacy"[..]), "{key}");
    }
    for key in &legacy_keys(200..205) {
        assert_eq!(env.get(&env.destination_bucket, &modern(key)).await.as_deref(), Some(&b"no-row"[..]), "{key}");
    }
    for key in &modern_keys {
        assert_eq!(env.get(&env.destination_bucket, key).await.as_deref(), Some(&b"modern"[..]), "{key}");
    }
    // Exactly the moved objects and the modern ones: nothing from imagex/ or Image/.
    let expected: BTreeSet<String> =
        legacy.iter().chain(&legacy_keys(200..205)).map(|k| modern(k)).chain(modern_keys.iter().cloned()).collect();
    let destination: BTreeSet<String> = env.keys(&env.destination_bucket).await.into_iter().collect();
    assert_eq!(destination, expected);
    assert_eq!(env.keys(&env.source_bucket).await, source_before, "the legacy bucket is unchanged");

    // The operator's check reports the row whose object never existed, and only it.
    let settings = feeder::Settings::try_parse_from(env.args("feeder")).unwrap();
    let clients = feeder::Clients { s3: env.s3.clone(), sqs: env.sqs.clone(), db: env.db.clone() };
    let args = feeder::settings::VerifyArgs { concurrency: 8.try_into().unwrap() };
    let verification = feeder::operator::verify(&settings, &args, &clients).await.unwrap();
    assert_eq!((verification.rows, verification.unresolved, verification.legacy_missing), (rows.len() as u64, 1, 1));
    assert_eq!(env.failures().await, vec![("row_object_missing".to_owned(), "image/avatar-gone.png".to_owned())]);
}
