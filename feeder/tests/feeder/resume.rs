//! Stopping and resuming: a feeder killed or stopped mid-listing goes on from its checkpoint, and an older checkpoint table gains the lease.

use super::*;

/// Starts the feeder with pages of 50 and a backlog limit of 50: it enqueues two pages, then
/// waits for room that never comes (no consumer runs), surely mid-listing. Returns once those
/// two pages are checkpointed.
async fn feeder_held_mid_listing(env: &Env, stdout: Stdio) -> std::process::Child {
    let child = env
        .command("feeder")
        .env("PAGE_SIZE", "50")
        // One object per message, so that a backlog of 50 messages holds the feeder at 50
        // objects, mid-listing.
        .env("OBJECTS_PER_MESSAGE", "1")
        .env("MAX_BACKLOG", "50")
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("two pages checkpointed", Duration::from_secs(60), || async {
        common::db::load_checkpoint(&env.db, &env.source_bucket, "image/").await.is_ok_and(|cp| cp.listed >= 100)
    })
    .await;
    child
}

#[tokio::test]
async fn a_killed_feeder_resumes_from_its_checkpoint() {
    let env = Env::new().await;
    let keys: Vec<String> = (0..500).map(|i| format!("image/avatar-{i:04}.png")).collect();
    env.put_many(&env.source_bucket, &keys, b"png").await;
    let mut child = feeder_held_mid_listing(&env, Stdio::null()).await;
    let listing = common::db::listing_state(&env.db, &env.source_bucket, "image/").await.unwrap();
    assert!(listing.feeder_running && !listing.finished, "a running feeder holds the listing's lease: {listing:?}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let cp = common::db::load_checkpoint(&env.db, &env.source_bucket, "image/").await.unwrap();
    assert!(!cp.finished && cp.listed >= 100 && cp.listed < 500, "killed mid-listing: {cp:?}");
    let remaining = 500 - cp.listed;
    let last = &keys[cp.listed as usize - 1];

    let output = env.command("feeder").env("PAGE_SIZE", "50").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(&format!("listed {remaining} objects")), "the restart lists only what remained: {stdout}");
    assert!(stdout.contains(&format!("resumed after {last:?}")), "{stdout}");
    let enqueued: BTreeSet<String> = keys_of(&env.drain().await).into_iter().collect();
    assert_eq!(enqueued, keys.into_iter().collect::<BTreeSet<_>>(), "every object enqueued");
    let listing = common::db::listing_state(&env.db, &env.source_bucket, "image/").await.unwrap();
    assert!(listing.finished && !listing.feeder_running, "a finished feeder ends its lease: {listing:?}");
}

#[tokio::test]
async fn sigterm_stops_the_feeder_at_a_checkpoint_with_exit_0() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let env = Env::new().await;
    let keys: Vec<String> = (0..300).map(|i| format!("image/avatar-{i:04}.png")).collect();
    env.put_many(&env.source_bucket, &keys, b"png").await;
    let child = feeder_held_mid_listing(&env, Stdio::piped()).await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("interrupted: run again to resume"), "{stdout}");
    let cp = common::db::load_checkpoint(&env.db, &env.source_bucket, "image/").await.unwrap();
    assert!(!cp.finished, "{cp:?}");
    let listing = common::db::listing_state(&env.db, &env.source_bucket, "image/").await.unwrap();
    assert!(!listing.feeder_running, "a feeder stopped by SIGTERM ends its lease: {listing:?}");
    let enqueued = keys_of(&env.drain().await).len() as i64;
    assert_eq!(enqueued, cp.listed, "what the checkpoint says was enqueued, and nothing half-sent");
}

/// A checkpoint table made before the feeder's lease existed gets its column when a binary
/// prepares the database, and the lease works on it.
#[tokio::test]
async fn preparing_adds_the_lease_to_an_older_checkpoint_table() {
    let env = Env::new().await;
    env.prepare().await;
    sqlx::raw_sql("ALTER TABLE avatar_migration_checkpoint DROP COLUMN feeder_alive_until")
        .execute(&env.db)
        .await
        .unwrap();
    assert!(common::db::listing_state(&env.db, &env.source_bucket, "image/").await.is_err(), "no column yet");
    env.prepare().await;
    let lease = common::db::FeederLease::hold(&env.db, &env.source_bucket, "image/").await.unwrap();
    let held = common::db::listing_state(&env.db, &env.source_bucket, "image/").await.unwrap();
    assert!(held.feeder_running && held.started && !held.finished, "{held:?}");
    lease.end().await;
    let ended = common::db::listing_state(&env.db, &env.source_bucket, "image/").await.unwrap();
    assert!(!ended.feeder_running, "{ended:?}");
}
