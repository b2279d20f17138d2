//! The mixed state the run starts from: legacy objects (a tenth without rows), destinations
//! already holding other bytes or the same bytes under another ETag, modern rows, and rows
//! whose legacy object never existed.

use std::collections::{HashMap, HashSet};

use crate::Env;

/// The bytes of a seeded legacy object: distinct per key, so a copy can be checked exactly.
pub(super) fn body_of(key: &str) -> Vec<u8> {
    format!("avatar bytes of {key}").into_bytes()
}

pub(super) fn modern(key: &str) -> String {
    key.replacen("image/", "avatar/", 1)
}

pub(super) struct Seeded {
    /// Every legacy object seeded (its key).
    pub legacy: Vec<String>,
    /// Legacy keys without a row (sources deleted mid-run are picked among them).
    pub without_rows: Vec<String>,
    /// Destinations seeded with other bytes: key -> bytes.
    pub conflicts: HashMap<String, Vec<u8>>,
    /// Destinations seeded with the same bytes under another ETag: key -> ETag.
    pub same_bytes: HashMap<String, String>,
    /// Legacy paths of rows whose object never existed.
    pub missing: HashSet<String>,
}

pub(super) async fn seed(env: &Env, n: usize) -> anyhow::Result<Seeded> {
    let legacy: Vec<String> = (0..n).map(|i| format!("image/avatar-{i:06}.png")).collect();
    for chunk in legacy.chunks(64) {
        futures::future::join_all(
            chunk.iter().map(|k| async move { env.put(&env.source_bucket, k, &body_of(k)).await }),
        )
        .await;
    }
    let without_rows: Vec<String> = legacy.iter().step_by(10).cloned().collect();
    let no_row: HashSet<&String> = without_rows.iter().collect();
    let mut rows: Vec<String> = legacy.iter().filter(|k| !no_row.contains(k)).cloned().collect();
    let mut conflicts = HashMap::new();
    let mut same_bytes = HashMap::new();
    for (i, key) in legacy.iter().enumerate().filter(|(i, _)| i % 10 != 0) {
        if i % 97 == 1 {
            let other = format!("a newer upload at {}", modern(key)).into_bytes();
            env.put(&env.destination_bucket, &modern(key), &other).await;
            conflicts.insert(modern(key), other);
        } else if i % 97 == 2 {
            env.put_multipart(&env.destination_bucket, &modern(key), &body_of(key)).await;
            let etag = env.s3.head_object().bucket(&env.destination_bucket).key(modern(key)).send().await?;
            same_bytes.insert(modern(key), etag.e_tag().unwrap_or_default().to_owned());
        }
    }
    // Modern rows already migrated, and rows whose legacy object never existed.
    let modern_keys: Vec<String> = (0..n / 5).map(|i| format!("avatar/modern-{i:06}.png")).collect();
    for chunk in modern_keys.chunks(64) {
        futures::future::join_all(chunk.iter().map(|k| env.put(&env.destination_bucket, k, b"modern"))).await;
    }
    rows.extend(modern_keys);
    let missing: HashSet<String> = (0..10).map(|i| format!("image/never-existed-{i}.png")).collect();
    rows.extend(missing.iter().cloned());
    fastrand::shuffle(&mut rows);
    env.insert_rows(&rows).await;
    Ok(Seeded { legacy, without_rows, conflicts, same_bytes, missing })
}
