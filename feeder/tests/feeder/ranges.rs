//! Key ranges listed at once (LIST_RANGES): the key space covered exactly, each range resumed.

use super::*;

/// Listing in key ranges at once covers the key space exactly: every key once, none missed,
/// none outside the prefix, each range finished with its own count.
#[tokio::test]
async fn key_ranges_listed_at_once_cover_every_key_exactly_once() {
    let env = Env::new().await;
    let keys = awkward_uneven_keys();
    env.put_many(&env.source_bucket, &keys, b"png").await;
    for outside in ["imagf", "image", "imagE/x"] {
        env.put(&env.source_bucket, outside, b"png").await;
    }
    let args = RunArgs { list_ranges: 4, objects_per_message: 1, ..run_args(7) };
    let summary = feeder::feed(&settings(&env), &args, &clients(&env).await, CancellationToken::new()).await.unwrap();
    assert_eq!((summary.listed, summary.finished), (keys.len() as u64, true));
    let mut enqueued = keys_of(&env.drain().await);
    enqueued.sort();
    assert_eq!(enqueued, keys, "each key exactly once");
    let ranges = feeder::store::ranges::load_ranges(&env.db, &env.source_bucket, "image/").await.unwrap();
    assert_eq!(ranges.len(), 4, "{ranges:?}");
    assert!(ranges.iter().all(|r| r.finished && r.listed > 0), "{ranges:?}");
    assert_eq!(ranges.iter().map(|r| r.listed).sum::<i64>(), keys.len() as i64);
}

/// A feeder killed while listing in ranges resumes each range after its own last enqueued
/// page (the saved ranges win over LIST_RANGES): every key exactly once across both runs.
#[tokio::test]
async fn a_killed_feeder_resumes_each_key_range_from_its_checkpoint() {
    let env = Env::new().await;
    let keys = awkward_uneven_keys();
    env.put_many(&env.source_bucket, &keys, b"png").await;
    let mut child = env
        .command("feeder")
        .env("LIST_RANGES", "4")
        .env("PAGE_SIZE", "5")
        .env("OBJECTS_PER_MESSAGE", "1")
        .env("MAX_BACKLOG", "20")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("pages of several ranges checkpointed", Duration::from_secs(60), || async {
        let ranges =
            feeder::store::ranges::load_ranges(&env.db, &env.source_bucket, "image/").await.unwrap_or_default();
        // Once more than 20 messages are queued (one per object), the feeder waits for room
        // that never comes: held, with every page it sent checkpointed.
        ranges.iter().map(|r| r.listed).sum::<i64>() > 20
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let before = feeder::store::ranges::load_ranges(&env.db, &env.source_bucket, "image/").await.unwrap();
    let listed_before: i64 = before.iter().map(|r| r.listed).sum();
    assert!(before.len() == 4 && before.iter().any(|r| !r.finished), "{before:?}");

    let output = env.command("feeder").env("PAGE_SIZE", "5").env("OBJECTS_PER_MESSAGE", "1").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let remaining = keys.len() as i64 - listed_before;
    assert!(stdout.contains(&format!("listed {remaining} objects")), "only what remained: {stdout}");
    let mut enqueued = keys_of(&env.drain().await);
    enqueued.sort();
    assert_eq!(enqueued, keys, "each key exactly once across both runs");
    let after = feeder::store::ranges::load_ranges(&env.db, &env.source_bucket, "image/").await.unwrap();
    assert!(after.iter().all(|r| r.finished), "{after:?}");
    assert_eq!(
        after.iter().map(|r| (r.after.clone(), r.until.clone())).collect::<Vec<_>>(),
        before.iter().map(|r| (r.after.clone(), r.until.clone())).collect::<Vec<_>>(),
        "the same ranges"
    );
}
