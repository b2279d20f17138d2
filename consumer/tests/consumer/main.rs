//! The consumer against the real local services: what moves, what stays, and the invariants
//! I1-I5 of docs/design.md.

mod batches;
mod deletes;
mod docs;
mod done;
mod end;
mod errors;
mod grants;
mod health;
mod helpers;
mod identity;
mod multipart;
mod operations;
mod pace;
mod plan;
mod reference;
mod rows;
mod schemas;
mod seaweedfs;
mod secrets;
mod stack;

use std::collections::BTreeSet;
use std::time::Duration;

use clap::Parser;
use helpers::{consumer, count_lines, drain, feed, legacy_keys, modern, stdout, wait_exit};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sqlx::Row;
use testkit::{Env, wait_until};
use tokio_util::sync::CancellationToken;

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
    drain(&env, &[]).await;

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

/// Keys with control characters (S3 allows them) are listed, copied and rewritten byte for
/// byte: the listing asks for `EncodingType=url`, so the XML answer never carries them raw.
#[tokio::test]
async fn moves_keys_with_control_characters_byte_for_byte() {
    let env = Env::new().await;
    let keys: Vec<String> =
        ["image/ctl-\u{1}.png", "image/cr-\r.png", "image/tab-\t.png", "image/newline-\n.png", "image/trailing-space "]
            .iter()
            .map(|k| k.to_string())
            .collect();
    for (i, key) in keys.iter().enumerate() {
        env.put(&env.source_bucket, key, format!("png-{i}").as_bytes()).await;
    }
    let ids = env.insert_rows(&keys).await;
    assert_eq!(feed(&env).await, keys.len() as u64);
    drain(&env, &[]).await;
    for (id, key) in ids.iter().zip(&keys) {
        let dest = modern(key);
        assert_eq!(env.path_of(*id).await, dest, "row of {key:?} rewritten");
        assert_eq!(env.get(&env.destination_bucket, &dest).await, env.get(&env.source_bucket, key).await, "{key:?}");
    }
    assert_eq!(env.failures().await, vec![]);
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
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
    // A row with neither prefix: left alone, and not judged by verify.
    rows.push("uploads/elsewhere.png".into());
    let ids = env.insert_rows(&rows).await;
    // Objects without a row, and keys outside the prefix.
    env.put_many(&env.source_bucket, &legacy_keys(200..205), b"no-row").await;
    for outside in ["imagex/avatar-1.png", "Image/avatar-1.png"] {
        env.put(&env.source_bucket, outside, b"outside").await;
    }
    let source_before = env.keys(&env.source_bucket).await;

    feed(&env).await;
    drain(&env, &[("CONCURRENCY", "8")]).await;

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
    let args = feeder::settings::VerifyArgs {
        concurrency: 8.try_into().unwrap(),
        rate: None,
        json: false,
        objects: true,
        sample: None,
    };
    let clients = env.clients().await;
    let verify = |args: feeder::settings::VerifyArgs| {
        let (settings, clients) = (settings.clone(), &clients);
        async move {
            let cx = feeder::ops::Ops::new(&settings, clients, CancellationToken::new()).unwrap();
            feeder::ops::verify::verify(&cx, &args).await.unwrap()
        }
    };
    let verification = verify(args.clone()).await;
    assert_eq!(
        (verification.rows, verification.other_prefix, verification.unresolved, verification.legacy_missing),
        (rows.len() as u64, 1, 1, 1)
    );
    assert_eq!(env.failures().await, vec![("row_object_missing".to_owned(), "image/avatar-gone.png".to_owned())]);
    // The objects: every legacy object (with a row or not) has its copy with the same bytes.
    let objects = verification.objects.unwrap();
    let counts = &objects.scan.counts;
    assert_eq!((counts.objects, counts.missing_copy, counts.conflicts, objects.scan.finished), (35, 0, 0, true));

    // A copy replaced by other bytes of the same size, and one deleted: both found.
    env.put(&env.destination_bucket, &modern(&legacy[1]), b"LEGACY").await;
    env.s3.delete_object().bucket(&env.destination_bucket).key(modern(&legacy[2])).send().await.unwrap();
    let objects = verify(args.clone()).await.objects.unwrap().scan.counts;
    assert_eq!((objects.objects, objects.missing_copy, objects.conflicts, objects.unproven), (35, 1, 1, 0));
    // Resumable: an interrupted check goes on after its saved position, keeping its counts.
    let mut sorted = env.keys(&env.source_bucket).await;
    sorted.retain(|k| k.starts_with("image/"));
    sorted.sort();
    let saved = feeder::store::scans::ScanPosition {
        last_key: Some(sorted[9].clone()),
        counts: feeder::ops::objects::Counts { objects: 10, ..Default::default() },
        finished: false,
    };
    let kind = feeder::store::scans::ScanKind::VerifyObjects;
    feeder::store::scans::save(&env.db, kind, &env.source_bucket, "image/", &saved).await.unwrap();
    let resumed = verify(args.clone()).await.objects.unwrap().scan;
    let (missing_after, conflicts_after) = (
        sorted[10..].iter().filter(|k| **k == legacy[2]).count() as i64,
        sorted[10..].iter().filter(|k| **k == legacy[1]).count() as i64,
    );
    assert_eq!(
        (resumed.counts.objects, resumed.counts.missing_copy, resumed.counts.conflicts, resumed.finished),
        (35, missing_after, conflicts_after, true)
    );
    // A sample checks N consecutive objects from a random place (going round the end of the
    // prefix), saving nothing.
    let sample = verify(feeder::settings::VerifyArgs { sample: Some(5), ..args }).await.objects.unwrap();
    assert!(sample.scan.counts.objects == 5 && sample.sample, "{sample:?}");
}

/// I1: a sampler reads rows while the pipeline runs; every path it sees names an object.
#[tokio::test]
async fn every_row_resolves_at_every_instant_while_the_pipeline_runs() {
    let env = Env::new().await;
    env.seed_legacy(0..1500).await;
    feed(&env).await;
    let mut child = consumer(&env, &[("CONCURRENCY", "16"), ("DB_BATCH_SIZE", "20")]).spawn().unwrap();

    let (mut samples, mut violations, mut seen_legacy, mut seen_modern) = (0u64, Vec::new(), 0u64, 0u64);
    let mut exited = None;
    while exited.is_none() || samples < 400 {
        let rows =
            sqlx::query("SELECT id, path FROM avatars ORDER BY random() LIMIT 20").fetch_all(&env.db).await.unwrap();
        let checks = rows.iter().map(|r| {
            let path: String = r.get(1);
            let env = &env;
            async move {
                let bucket = if path.starts_with("avatar/") { &env.destination_bucket } else { &env.source_bucket };
                (env.exists(bucket, &path).await, path)
            }
        });
        for (exists, path) in futures::future::join_all(checks).await {
            samples += 1;
            if path.starts_with("avatar/") {
                seen_modern += 1
            } else {
                seen_legacy += 1
            }
            if !exists {
                violations.push(path);
            }
        }
        if exited.is_none() {
            exited = child.try_wait().unwrap();
        }
    }
    assert!(exited.unwrap().success());
    child.wait().unwrap();
    assert_eq!(violations, Vec::<String>::new(), "rows pointing at nothing");
    assert!(samples >= 400, "{samples} samples");
    assert!(seen_legacy > 0 && seen_modern > 0, "sampled during the move: {seen_legacy} legacy, {seen_modern} modern");
    assert_eq!(env.count_rows_with_prefix("avatar/").await, 1500);
}

/// I3: different content at the destination is never overwritten, and its row keeps the
/// legacy path; identical content counts as done.
#[tokio::test]
async fn never_overwrites_different_content_and_accepts_identical_content() {
    let env = Env::new().await;
    env.put(&env.source_bucket, "image/conflict.png", b"legacy bytes").await;
    env.put(&env.destination_bucket, "avatar/conflict.png", b"newer upload by the live service").await;
    env.put(&env.source_bucket, "image/same.png", b"same bytes").await;
    env.put(&env.destination_bucket, "avatar/same.png", b"same bytes").await;
    let ids = env.insert_rows(&["image/conflict.png".into(), "image/same.png".into()]).await;
    feed(&env).await;
    let out = drain(&env, &[]).await;

    assert_eq!(
        env.get(&env.destination_bucket, "avatar/conflict.png").await.as_deref(),
        Some(&b"newer upload by the live service"[..]),
        "the destination keeps its content"
    );
    assert_eq!(env.path_of(ids[0]).await, "image/conflict.png", "the conflicting row is not rewritten");
    assert_eq!(env.path_of(ids[1]).await, "avatar/same.png", "identical content counts as done");
    assert_eq!(env.failures().await, vec![("destination_conflict".to_owned(), "image/conflict.png".to_owned())]);
    assert!(stdout(&out).contains("already present 1"), "{}", stdout(&out));
    assert_eq!(env.depth(&env.queue_url).await, (0, 0), "both messages settled, not retried forever");
}

/// I4: a row the live service repoints while the consumer is rewriting keeps the live value.
/// The live transaction holds the row when the consumer's rewrite comes: the row is skipped
/// (never waited for), the message comes back, and by then the row is no longer legacy.
#[tokio::test]
async fn a_row_the_live_service_repoints_during_the_run_keeps_the_live_value() {
    let env = Env::new().await;
    env.put(&env.source_bucket, "image/avatar-7.png", b"old").await;
    env.put(&env.destination_bucket, "avatar/avatar-7-new-upload.png", b"new").await;
    let ids = env.insert_rows(&["image/avatar-7.png".into()]).await;
    feed(&env).await;

    let mut live = env.db.begin().await.unwrap();
    sqlx::query("UPDATE avatars SET path = 'avatar/avatar-7-new-upload.png' WHERE id = $1")
        .bind(ids[0])
        .execute(&mut *live)
        .await
        .unwrap();
    let mut child = consumer(&env, &[("VISIBILITY_TIMEOUT", "1"), ("RUST_LOG", "warn")]).spawn().unwrap();
    let skipped = count_lines(&mut child, "held by another transaction");
    wait_until("the consumer's rewrite meets the live row lock", Duration::from_secs(30), || {
        let skipped = skipped.clone();
        async move { skipped.load(std::sync::atomic::Ordering::SeqCst) > 0 }
    })
    .await;
    live.commit().await.unwrap();

    assert!(wait_exit(&mut child, Duration::from_secs(60)).await.success());
    assert_eq!(env.path_of(ids[0]).await, "avatar/avatar-7-new-upload.png", "the live write stands");
    assert!(env.exists(&env.destination_bucket, "avatar/avatar-7.png").await, "the object was still copied");
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
    assert_eq!(env.failures().await, vec![]);
}

/// I5: a consumer killed with SIGKILL mid-run, then a fresh one: everything completes.
#[tokio::test]
async fn a_consumer_killed_mid_run_and_a_fresh_one_lose_nothing() {
    let env = Env::with_visibility(&std::env::var("AWS_ENDPOINT_URL").unwrap(), 3).await;
    let (keys, _) = env.seed_legacy(0..2000).await;
    feed(&env).await;
    let mut first = consumer(&env, &[("VISIBILITY_TIMEOUT", "3"), ("CONCURRENCY", "8")]).spawn().unwrap();
    wait_until("some rows rewritten", Duration::from_secs(60), || async {
        env.count_rows_with_prefix("avatar/").await >= 200
    })
    .await;
    first.kill().unwrap(); // SIGKILL, at whatever line it was
    first.wait().unwrap();
    let done_at_kill = env.count_rows_with_prefix("avatar/").await;
    assert!(done_at_kill < 2000, "killed mid-run ({done_at_kill} done)");

    // An idle window shorter than the visibility timeout: the survivor still waits for the
    // messages the dead consumer held to come back. The first ran on one thread (the
    // default); the survivor runs on two, so both runtimes finish a run.
    drain(&env, &[("VISIBILITY_TIMEOUT", "3"), ("EXIT_WHEN_IDLE", "1"), ("WORKER_THREADS", "2")]).await;
    assert_eq!(env.count_rows_with_prefix("avatar/").await, 2000, "every row rewritten");
    let copied: BTreeSet<String> = env.keys(&env.destination_bucket).await.into_iter().collect();
    assert_eq!(copied, keys.iter().map(|k| modern(k)).collect::<BTreeSet<_>>());
    assert_eq!(env.failures().await, vec![]);
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
    assert_eq!(env.depth(&env.dlq_url).await, (0, 0));
}

/// I5: the same message delivered twice (and again after it was done) changes nothing more.
#[tokio::test]
async fn a_message_delivered_twice_is_harmless() {
    let env = Env::new().await;
    env.put(&env.source_bucket, "image/twice.png", b"png").await;
    let ids = env.insert_rows(&["image/twice.png".into(), "image/twice.png".into()]).await;
    feed(&env).await;
    let body = common::message::ObjectMessage::new("image/twice.png".into(), 3, String::new()).to_body();
    env.send_raw(&body).await;
    let first = drain(&env, &[]).await;
    env.send_raw(&body).await; // a late duplicate, after everything was done
    let second = drain(&env, &[]).await;

    for id in ids {
        assert_eq!(env.path_of(id).await, "avatar/twice.png");
    }
    assert_eq!(env.get(&env.destination_bucket, "avatar/twice.png").await.as_deref(), Some(&b"png"[..]));
    assert_eq!(env.failures().await, vec![]);
    assert!(stdout(&first).contains("rows rewritten 2;"), "{}", stdout(&first));
    assert!(stdout(&second).contains("already present 1; rows rewritten 0;"), "{}", stdout(&second));
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
}

/// A malformed message is set aside where the operator sees it; the work goes on.
#[tokio::test]
async fn a_malformed_message_is_set_aside_and_the_rest_moves_on() {
    let env = Env::new().await;
    let (_, ids) = env.seed_legacy(0..5).await;
    env.send_raw("this is not json").await;
    env.send_raw(r#"{"v":9,"key":"image/x.png","size":1,"etag":"e"}"#).await;
    env.send_raw(r#"{"v":1,"key":"elsewhere/x.png","size":1,"etag":"e"}"#).await;
    env.send_raw(r#"{"v":1,"key":"image/never-existed.png","size":1,"etag":"\"e\""}"#).await;
    feed(&env).await;
    drain(&env, &[]).await;

    for id in ids {
        assert!(env.path_of(id).await.starts_with("avatar/"));
    }
    let failures = env.failures().await;
    let reasons: Vec<&str> = failures.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(reasons, ["malformed_message", "malformed_message", "outside_prefix", "source_missing"], "{failures:?}");
    assert_eq!(failures[2].1, "elsewhere/x.png");
    assert_eq!(failures[3].1, "image/never-existed.png");
    assert_eq!(env.depth(&env.queue_url).await, (0, 0), "recorded, then deleted: not retried forever");
}

/// SIGTERM: receiving stops, in-flight objects finish, exit 0, nothing half-done.
#[tokio::test]
async fn sigterm_lets_in_flight_objects_finish_and_exits_0() {
    let env = Env::new().await;
    env.seed_legacy(0..1500).await;
    feed(&env).await;
    let mut child = consumer(&env, &[("CONCURRENCY", "32"), ("EXIT_WHEN_IDLE", "30")]).spawn().unwrap();
    wait_until("work under way", Duration::from_secs(60), || async {
        env.count_rows_with_prefix("avatar/").await >= 100
    })
    .await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(60)).await;
    assert!(status.success(), "{status:?}");
    let out = child.wait_with_output().unwrap();
    let summary = stdout(&out);

    // Every object copied has its row rewritten and its message deleted: nothing half-done.
    let copied = env.keys(&env.destination_bucket).await.len() as i64;
    let rewritten = env.count_rows_with_prefix("avatar/").await;
    assert_eq!(copied, rewritten, "{summary}");
    assert!(rewritten < 1500, "stopped early: {summary}");
    assert!(summary.contains(&format!("acknowledged {rewritten};")), "{summary}");
    assert!(summary.contains("left for retry 0;"), "{summary}");
}

/// Consumers starting together, before any feeder, prepare the database once, online.
#[tokio::test]
async fn processes_starting_together_prepare_the_database_once() {
    let env = Env::new().await;
    env.insert_rows(&legacy_keys(0..1000)).await;
    let schema = common::db::Schema::building_indexes();
    let prepares = (0..4).map(|_| common::db::prepare(&env.db, &schema));
    for result in futures::future::join_all(prepares).await {
        result.unwrap();
    }
    let indexes: Vec<(String, bool)> = sqlx::query(
        "SELECT c.relname::text, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid = 'avatars'::regclass AND NOT i.indisprimary",
    )
    .fetch_all(&env.db)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    assert_eq!(indexes, vec![("avatars_path_idx".to_owned(), true)]);

    // An index left invalid by an interrupted build is rebuilt.
    sqlx::query("UPDATE pg_index SET indisvalid = false WHERE indexrelid = $1::regclass")
        .bind("avatars_path_idx")
        .execute(&env.db)
        .await
        .unwrap();
    let targets = env.prepare().await;
    let mut conn = env.db.acquire().await.unwrap();
    let target = targets.iter().next().unwrap();
    assert!(common::db::references::index_valid(&mut conn, target).await.unwrap());
}

/// A table loaded and never analyzed gets planner statistics when the processes prepare:
/// without them PostgreSQL plans the batched rewrite as full scans of `avatars` (shown here by
/// removing them), with them as index lookups.
#[tokio::test]
async fn preparing_gives_the_planner_statistics_so_rewrites_use_the_index() {
    let env = Env::new().await;
    let keys = legacy_keys(0..20_000);
    env.insert_rows(&keys).await;
    let batch = &keys[5_000..5_100];
    let moved: Vec<String> = batch.iter().map(|k| modern(k)).collect();
    let target = env.prepare().await.iter().next().unwrap().clone();
    let plan = || async {
        let lines: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {}", common::db::rewrite_statement(&target)))
            .bind(batch)
            .bind(&moved)
            .bind(true)
            .bind(batch)
            .bind(target.label())
            .fetch_all(&env.db)
            .await
            .unwrap();
        lines.join("\n")
    };
    let statistics = || async {
        let mut conn = env.db.acquire().await.unwrap();
        common::db::references::has_statistics(&mut conn, &target).await.unwrap()
    };

    assert!(statistics().await);
    let analyzed = plan().await;
    assert!(!analyzed.contains("Seq Scan on avatars"), "{analyzed}");

    sqlx::query("DELETE FROM pg_statistic WHERE starelid = 'avatars'::regclass").execute(&env.db).await.unwrap();
    assert!(!statistics().await);
    let blind = plan().await;
    assert!(blind.contains("Seq Scan on avatars"), "without statistics the rewrite scans the table: {blind}");

    env.prepare().await;
    assert!(statistics().await, "preparing again analyzes the table");
    let analyzed = plan().await;
    assert!(!analyzed.contains("Seq Scan on avatars"), "{analyzed}");
}

/// The same pipeline on a second, independent implementation (moto), with two consumers at
/// once: moto delivers some messages twice under concurrent receivers.
#[tokio::test]
async fn the_pipeline_works_on_moto_with_two_consumers() {
    let env = Env::on_moto().await;
    let keys = legacy_keys(0..150);
    env.put_many(&env.source_bucket, &keys, b"png").await;
    let mut rows = keys.clone();
    rows.push("image/avatar-gone.png".into());
    env.insert_rows(&rows).await;
    env.put(&env.source_bucket, "image/with space+plus.png", b"awkward").await;
    env.put(&env.source_bucket, "imagex/outside.png", b"outside").await;
    assert_eq!(feed(&env).await, 151);
    let mut a = consumer(&env, &[("CONCURRENCY", "8")]).spawn().unwrap();
    let mut b = consumer(&env, &[("CONCURRENCY", "8")]).spawn().unwrap();
    assert!(wait_exit(&mut a, Duration::from_secs(120)).await.success());
    assert!(wait_exit(&mut b, Duration::from_secs(120)).await.success());

    assert_eq!(env.count_rows_with_prefix("avatar/").await, 150);
    assert_eq!(env.count_rows_with_prefix("image/").await, 1, "the row without an object stays");
    let copied: BTreeSet<String> = env.keys(&env.destination_bucket).await.into_iter().collect();
    let mut expected: BTreeSet<String> = keys.iter().map(|k| modern(k)).collect();
    expected.insert("avatar/with space+plus.png".into());
    assert_eq!(copied, expected);
    assert_eq!(env.failures().await, vec![]);
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
}

#[test]
fn env_sample_documents_every_setting() {
    testkit::assert_env_sample_matches_help("consumer", &[], concat!(env!("CARGO_MANIFEST_DIR"), "/env.sample"));
}

/// A transient failure (here the database refusing the rewrite) leaves the message to come
/// back; once the database accepts it, the object completes. A message that keeps failing
/// lands in the dead-letter queue after maxReceiveCount (5) receipts instead of looping forever,
/// its key recorded with the last error; `feeder redrive` moves it back once fixed.
#[tokio::test]
async fn transient_failures_come_back_later_and_end_in_the_dead_letter_queue() {
    let env = Env::with_visibility(&std::env::var("AWS_ENDPOINT_URL").unwrap(), 1).await;
    env.put(&env.source_bucket, "image/flaky.png", b"png").await;
    let ids = env.insert_rows(&["image/flaky.png".into()]).await;
    env.prepare().await;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'database refuses writes for now'; END $$;
         CREATE TRIGGER refuse BEFORE UPDATE ON avatars FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .execute(&env.db)
    .await
    .unwrap();
    feed(&env).await;
    let vis = [("VISIBILITY_TIMEOUT", "1"), ("EXIT_WHEN_IDLE", "4")];
    let out = drain(&env, &vis).await;
    assert!(!stdout(&out).contains("left for retry 0;"), "{}", stdout(&out));
    assert_eq!(env.path_of(ids[0]).await, "image/flaky.png", "not rewritten while the database refuses");
    assert_eq!(env.depth(&env.dlq_url).await.0, 1, "after 5 receipts the message is in the dead-letter queue");
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
    // On its last delivery the key was recorded with the last error, so the operator sees why.
    assert_eq!(env.failures().await, vec![("retries_exhausted".to_owned(), "image/flaky.png".to_owned())]);
    let detail: String =
        sqlx::query_scalar("SELECT detail FROM avatar_migration_failures").fetch_one(&env.db).await.unwrap();
    assert!(
        detail.contains("received 5 times (maxReceiveCount 5)") && detail.contains("database refuses writes"),
        "{detail}"
    );
    // The operator sees it: `feeder status` follows the redrive policy to the dead-letter queue.
    let status = env.command("feeder").arg("status").output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("1 messages in the dead-letter queue"), "{status}");
    assert!(status.contains("rows:     1 in all: 1 legacy (1 of them set aside), 0 modern"), "{status}");
    let feeder = |args: &[&str]| {
        let out = env.command("feeder").args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dry = feeder(&["redrive", "--dry-run"]);
    assert!(dry.contains("would move image/flaky.png"), "{dry}");
    assert_eq!(env.depth(&env.dlq_url).await.0, 1, "a dry run moves nothing");

    // The database accepts writes again; the dead letter is moved back and completes.
    sqlx::raw_sql("DROP TRIGGER refuse ON avatars").execute(&env.db).await.unwrap();
    assert!(feeder(&["redrive"]).contains("moved 1 messages"));
    assert_eq!(env.depth(&env.dlq_url).await, (0, 0));
    assert_eq!(env.failures().await, vec![], "retried: its record is forgotten");
    drain(&env, &vis).await;
    assert_eq!(env.path_of(ids[0]).await, "avatar/flaky.png");
}

/// A slow object keeps its message invisible: a second consumer polling all along never gets
/// it, although the work outlasts the visibility timeout several times.
#[tokio::test]
async fn a_slow_object_keeps_its_message_invisible_while_worked_on() {
    let env = Env::with_visibility(&std::env::var("AWS_ENDPOINT_URL").unwrap(), 2).await;
    env.put(&env.source_bucket, "image/slow.png", b"png").await;
    let ids = env.insert_rows(&["image/slow.png".into()]).await;
    // Every rewrite waits for an advisory lock this test holds: the object is as slow as the
    // test wants.
    let mut held = helpers::stall_rewrites(&env).await;
    feed(&env).await;

    let slow_vars =
        [("VISIBILITY_TIMEOUT", "2"), ("DB_LOCK_TIMEOUT", "120s"), ("RUST_LOG", "warn,consumer::lease=debug")];
    let mut slow = consumer(&env, &slow_vars).spawn().unwrap();
    let extensions = count_lines(&mut slow, "visibility extended");
    // The second consumer starts once the slow one holds the message.
    wait_until("the slow consumer holds the message", Duration::from_secs(60), || async {
        env.depth(&env.queue_url).await == (0, 1)
    })
    .await;
    let mut other = consumer(&env, &[("VISIBILITY_TIMEOUT", "2"), ("EXIT_WHEN_IDLE", "60")]).spawn().unwrap();
    // Four extensions of a 2 s timeout: the work has outlived it about twice over.
    wait_until("four visibility extensions", Duration::from_secs(60), || {
        let extensions = extensions.clone();
        async move { extensions.load(std::sync::atomic::Ordering::SeqCst) >= 4 }
    })
    .await;
    sqlx::query("SELECT pg_advisory_unlock(4242)").execute(&mut *held).await.unwrap();
    assert!(wait_exit(&mut slow, Duration::from_secs(60)).await.success());
    kill(Pid::from_raw(other.id() as i32), Signal::SIGTERM).unwrap();
    assert!(wait_exit(&mut other, Duration::from_secs(60)).await.success());
    let other_out = other.wait_with_output().unwrap();
    assert!(stdout(&other_out).contains("received 0 messages"), "{}", stdout(&other_out));
    assert_eq!(env.path_of(ids[0]).await, "avatar/slow.png");
}
