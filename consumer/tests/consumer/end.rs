//! A provable end: `feeder verify` finds rows the first pass missed and says the migration is
//! not done; `feeder reconcile` enqueues them; after the consumers drain, verify says done.

use testkit::Env;

use crate::helpers::{drain, feed_with, feeder, legacy_keys, receive};

/// Receives and deletes `n` messages, as if they had expired after the queue's retention.
async fn lose_messages(env: &Env, n: usize) {
    for m in receive(env, n, None).await {
        let handle = m.receipt_handle.unwrap();
        env.sqs.delete_message().queue_url(&env.queue_url).receipt_handle(handle).send().await.unwrap();
    }
}

#[tokio::test]
async fn verify_finds_what_the_first_pass_missed_and_reconcile_finishes_it() {
    let env = Env::new().await;
    let keys = legacy_keys(0..30);
    env.put_many(&env.source_bucket, &keys, b"png").await;
    env.put(&env.source_bucket, "image/conflict.png", b"legacy").await;
    env.put(&env.destination_bucket, "avatar/conflict.png", b"a newer upload").await;
    let mut rows = keys.clone();
    rows.push("image/conflict.png".into());
    env.insert_rows(&rows).await;
    // One object per message, so that losing five messages loses five objects.
    feed_with(&env, &["--objects-per-message=1"]).await;
    lose_messages(&env, 5).await;
    drain(&env, &[]).await;
    // A row written with a legacy path after its key was processed.
    let (_, moved) = env.rows().await.into_iter().find(|(_, p)| p.starts_with("avatar/")).unwrap();
    env.insert_rows(&[moved.replacen("avatar/", "image/", 1)]).await;

    let (code, out) = feeder(&env, &["verify"]);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("1 set aside with a reason (feeder failures), 6 not migrated yet"), "{out}");
    assert_eq!(out.matches("verify: not migrated yet: row").count(), 6, "{out}");

    let (code, out) = feeder(&env, &["reconcile"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("7 legacy: 6 messages enqueued, 1 left alone"), "{out}");
    drain(&env, &[]).await;

    let (code, out) = feeder(&env, &["verify"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("verify: done"), "{out}");
    let legacy: Vec<String> =
        env.rows().await.into_iter().map(|(_, p)| p).filter(|p| p.starts_with("image/")).collect();
    assert_eq!(legacy, ["image/conflict.png"], "only the row set aside stays legacy");
}

/// Applies `deploy/database-role.sql` to this test's database (as its owner) with this
/// password and these further psql arguments; returns the `DATABASE_URL` of the
/// least-privilege role.
pub(crate) fn least_privilege_url(env: &Env, password: &str, extra: &[&str]) -> String {
    let psql = std::env::var("PSQL").expect("PSQL is set by scripts/local-services env");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/database-role.sql");
    let out = std::process::Command::new(psql)
        .arg(&env.database_url)
        .args(["-q", "-v", &format!("password={password}")])
        .args(extra)
        .args(["-f", script])
        .output()
        .unwrap();
    assert!(out.status.success(), "database-role.sql: {}", String::from_utf8_lossy(&out.stderr));
    let (_, rest) = env.database_url.split_once('@').unwrap();
    format!("postgres://avatar_migrator:{password}@{rest}")
}

/// `deploy/database-role.sql` is safe to run again (and repairs an invalid index), sets the
/// role's connection budget (170 unless told), and the whole plan (feed, consume, verify,
/// reconcile, status, fence, cleanup, rollback) runs logged in as the role it creates, not as
/// the superuser: its grants are enough.
#[tokio::test]
async fn the_pipeline_runs_as_the_least_privilege_database_role() {
    let env = Env::new().await;
    env.seed_legacy(0..40).await;
    // The script is safe to run again, and repairs an index an interrupted build left invalid.
    let connection_limit = || async {
        sqlx::query_scalar::<_, i32>("SELECT rolconnlimit FROM pg_roles WHERE rolname = 'avatar_migrator'")
            .fetch_one(&env.db)
            .await
            .unwrap()
    };
    let url = least_privilege_url(&env, "least-privilege pw 'with' quotes", &[]);
    assert_eq!(connection_limit().await, 170, "the default budget");
    assert_eq!(least_privilege_url(&env, "least-privilege pw 'with' quotes", &[]), url);
    sqlx::query("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'avatars_path_idx'::regclass")
        .execute(&env.db)
        .await
        .unwrap();
    least_privilege_url(&env, "least-privilege pw 'with' quotes", &["-v", "connection_limit=30"]);
    assert_eq!(connection_limit().await, 30, "the budget given");
    let valid: bool =
        sqlx::query_scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = 'avatars_path_idx'::regclass")
            .fetch_one(&env.db)
            .await
            .unwrap();
    assert!(valid, "the invalid index was dropped and built again");
    let run = |args: &[&str], extra: &[(&str, &str)]| {
        let mut cmd = env.command("feeder");
        cmd.env("DATABASE_URL", &url).envs(extra.iter().copied()).args(args);
        let out = cmd.output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, out) = run(&[], &[]);
    assert_eq!(code, Some(0), "{out}");
    drain(&env, &[("DATABASE_URL", &url)]).await;
    let (code, out) = run(&["verify"], &[]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = run(&["reconcile"], &[]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = run(&["status"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("40 modern"), "{out}");
    // Deleting: the fence (TRIGGER on avatars), the protocol, the lease.
    let (code, out) = run(&["fence", "install"], &[]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = run(&["cleanup", "--yes"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("deleted 40;"), "{out}");
    let (code, out) = run(&["rollback", "--dry-run"], &[]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = run(&["fence", "remove"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("fence: off") && out.contains("DROP TRIGGER"), "only the owner may drop it: {out}");
    let owner: String =
        sqlx::query_scalar("SELECT tableowner::text FROM pg_tables WHERE tablename = 'avatar_migration_failures'")
            .fetch_one(&env.db)
            .await
            .unwrap();
    assert_eq!(owner, "avatar_migrator", "the bookkeeping tables were created by the role itself");
}

/// A failure record counts only while what it says still holds: a `source_missing` record of
/// a legacy object re-created since, and a `destination_conflict` record whose conflicting
/// copy was removed since, no longer set their rows aside; `verify` says not done (and
/// removes them), and `reconcile` enqueues those rows. A record that holds still counts.
#[tokio::test]
async fn a_failure_record_counts_only_while_it_still_holds() {
    let env = Env::new().await;
    let (keys, _) = env.seed_legacy(0..3).await;
    env.prepare().await;
    let record = |key: String, reason| {
        let db = env.db.clone();
        async move { common::db::record_failure(&db, &key, reason, "recorded earlier").await.unwrap() }
    };
    // Recorded while true, no longer true: the source is there, the conflicting copy gone.
    record(keys[0].clone(), common::db::Reason::SourceMissing).await;
    record(keys[1].clone(), common::db::Reason::DestinationConflict).await;
    // Still true: the copy's key holds other bytes.
    env.put(&env.destination_bucket, &keys[2].replacen("image/", "avatar/", 1), b"new").await;
    record(keys[2].clone(), common::db::Reason::DestinationConflict).await;

    let (code, out) = feeder(&env, &["verify"]);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("1 set aside with a reason (feeder failures), 2 not migrated yet"), "{out}");
    let left: Vec<String> = env.failures().await.into_iter().map(|(_, key)| key).collect();
    assert_eq!(left, [keys[2].clone()], "the stale records are removed");

    let (code, out) = feeder(&env, &["reconcile"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("3 legacy: 2 messages enqueued, 1 left alone"), "{out}");
}

/// A row whose object cannot be looked at (its HEAD refused, as an SSE-KMS object is without
/// the KMS grant) is counted and named, not the end of `verify`: the other rows are checked,
/// the run is not done (exit 3) and says why.
#[tokio::test]
async fn verify_counts_a_refused_head_and_checks_the_other_rows() {
    use testkit::proxy::{Fault, FaultProxy, Rule, When};
    let env = Env::new().await;
    env.seed_legacy(0..5).await;
    let s3 = FaultProxy::start(&env.s3_endpoint).await.unwrap();
    let refused = When { method: Some("HEAD"), contains: Some("avatar-3.png".into()), ..When::default() };
    s3.add(Rule::always(refused, Fault::Error { status: 403, code: "AccessDenied" }));
    let out = tokio::process::Command::from(env.command("feeder"))
        .args(["verify", "--json"])
        .env("AWS_ENDPOINT_URL_S3", &s3.url)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("cannot look at row") && stdout.contains("avatar-3.png"), "{stdout}");
    let json = crate::helpers::last_json(&stdout);
    assert_eq!((json["rows_checked"].as_u64(), json["rows_error"].as_u64()), (Some(5), Some(1)), "{json}");
    assert_eq!((json["rows_legacy_pending"].as_u64(), json["done"].as_bool()), (Some(4), Some(false)), "{json}");
}

/// `verify` stopped by SIGTERM mid-pass saves where it stood and is not done (exit 3); the next
/// run goes on from there, its counts adding up to the whole table, and answers done.
#[tokio::test]
async fn an_interrupted_verify_goes_on_from_where_it_stopped() {
    use testkit::proxy::{Fault, FaultProxy, Rule, When};
    let env = Env::new().await;
    let keys = legacy_keys(0..2500);
    let modern: Vec<String> = keys.iter().map(|k| crate::helpers::modern(k)).collect();
    env.put_many(&env.destination_bucket, &modern, b"png").await;
    env.insert_rows(&modern).await;
    // The second page (rows 1001 to 2000) holds one slow HEAD: the first page is saved
    // meanwhile, and the signal comes before the third.
    let s3 = FaultProxy::start(&env.s3_endpoint).await.unwrap();
    let slow = When { method: Some("HEAD"), contains: Some("avatar-1200.png".into()), ..When::default() };
    s3.add(Rule::always(slow, Fault::Delay(std::time::Duration::from_secs(2))));
    let mut first = env
        .command("feeder")
        .args(["verify", "--json"])
        .env("AWS_ENDPOINT_URL_S3", &s3.url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let printed = crate::helpers::capture_stdout(&mut first);
    testkit::wait_until("the first page saved", std::time::Duration::from_secs(60), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM avatar_migration_scans WHERE kind = 'verify_rows'")
            .fetch_one(&env.db)
            .await
            .is_ok_and(|n| n == 1)
    })
    .await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = crate::helpers::wait_exit(&mut first, std::time::Duration::from_secs(60)).await;
    let out = printed.join().unwrap();
    assert_eq!(status.code(), Some(3), "{out}");
    let stopped = crate::helpers::last_json(&out);
    assert_eq!(stopped["done"], false, "{out}");
    assert!(stopped["rows_checked"].as_u64().unwrap() < 2500, "{out}");

    let (code, out) = feeder(&env, &["verify", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("went on after row "), "{out}");
    let whole = crate::helpers::last_json(&out);
    assert_eq!((whole["rows_checked"].as_u64(), whole["rows_modern"].as_u64()), (Some(2500), Some(2500)), "{out}");
    // A finished pass is not resumed: the next run checks every row again.
    let (_, again) = feeder(&env, &["verify"]);
    assert!(!again.contains("went on after"), "{again}");
}

/// `verify --rate N` starts at most N row checks a second, evenly, whatever the concurrency: 30
/// rows at 20 a second cannot take less than 29 gaps of 50 ms (a lower bound: a slow machine
/// only adds to it).
#[tokio::test]
async fn verify_keeps_to_its_rate() {
    let env = Env::new().await;
    env.seed_legacy(0..30).await;
    let started = std::time::Instant::now();
    let (code, out) = feeder(&env, &["verify", "--rate", "20", "--concurrency", "32", "--json"]);
    let took = started.elapsed();
    assert_eq!(code, Some(3), "30 legacy rows are not done: {out}");
    assert_eq!(crate::helpers::last_json(&out)["rows_checked"], 30, "{out}");
    assert!(took >= std::time::Duration::from_millis(1450), "30 checks at 20 a second took {took:?}");
}
