//! Operating a migration: the rewrite journal, `feeder status --json`, `feeder report`,
//! `feeder rollback`, and the consumer's metrics and health endpoint, each on a prepared state
//! with exact counts.

use std::collections::BTreeMap;

use serde_json::json;
use testkit::{Env, wait_until};

use crate::helpers::{consumer, drain, feed, feed_with, feeder, last_json, stdout, wait_exit};

/// After a run with a conflict and a malformed message: every rewrite is in the journal, the
/// report counts them and the set-aside by reason (and lists each one in CSV), `failures`
/// streams them as JSON or CSV, one reason or all, and status says where things stand, with
/// the rate and an ETA of zero (nothing left).
#[tokio::test]
async fn status_and_report_tell_what_was_moved_and_set_aside() {
    let env = Env::new().await;
    let (_, ids) = env.seed_legacy(0..12).await;
    env.put(&env.source_bucket, "image/conflict.png", b"legacy").await;
    env.put(&env.destination_bucket, "avatar/conflict.png", b"a newer upload").await;
    env.insert_rows(&["image/conflict.png".into()]).await;
    feed(&env).await;
    env.send_raw("not a message").await;
    drain(&env, &[]).await;

    let journal: Vec<(String, String, String)> =
        sqlx::query_as("SELECT row_id, old_path, new_path FROM avatar_migration_journal ORDER BY journal_id")
            .fetch_all(&env.db)
            .await
            .unwrap();
    assert_eq!(journal.len(), 12, "one record per rewritten row");
    let by_id: BTreeMap<String, (String, String)> = journal.into_iter().map(|(id, o, n)| (id, (o, n))).collect();
    assert_eq!(
        by_id.get(&ids[3].to_string()),
        Some(&("image/avatar-3.png".to_owned(), "avatar/avatar-3.png".to_owned()))
    );

    let (code, out) = feeder(&env, &["report", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let report = last_json(&out);
    assert_eq!(report["rows_rewritten"], 12);
    assert_eq!(report["rows_rolled_back"], 0);
    assert_eq!(report["set_aside"], json!({"destination_conflict": 1, "malformed_message": 1}));

    let (code, csv) = feeder(&env, &["report", "--csv"]);
    assert_eq!(code, Some(0), "{csv}");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "kind,row_id,old_path,new_path,at,reason,detail,reference");
    assert_eq!(lines.iter().filter(|l| l.starts_with("moved,")).count(), 12);
    let set_aside: Vec<&&str> = lines.iter().filter(|l| l.starts_with("set_aside,")).collect();
    assert_eq!(set_aside.len(), 2);
    assert!(set_aside[0].contains("image/conflict.png") && set_aside[0].contains("destination_conflict"));

    let (code, out) = feeder(&env, &["failures", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let records: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let reasons: Vec<&str> = records.iter().map(|r| r["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["destination_conflict", "malformed_message"]);
    assert_eq!(records[0]["subject"], "image/conflict.png");
    let (code, out) = feeder(&env, &["failures", "--csv", "--reason", "malformed_message"]);
    assert_eq!(code, Some(0), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0], "reason,subject,occurrences,detail");
    assert!(lines[1].starts_with("malformed_message,message ") && lines[1].contains("not a message"), "{out}");

    let (code, out) = feeder(&env, &["status", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let status = last_json(&out);
    assert_eq!(status["rows_modern"], 12);
    assert_eq!(status["rows_legacy"], 1);
    assert_eq!(status["rows_left"], 0, "the legacy row left is set aside");
    assert_eq!((status["queue_visible"].clone(), status["queue_in_flight"].clone()), (json!(0), json!(0)));
    assert_eq!(status["dlq_visible"], 0);
    assert_eq!(status["failures"], json!({"destination_conflict": 1, "malformed_message": 1}));
    assert_eq!(status["listing_complete"], true);
    assert_eq!(status["feeder_running"], false, "no feeder is running");
    assert_eq!(status["objects_listed"], 13);
    assert_eq!(status["rewrites_recorded"], 12);
    assert!(status["objects_per_s"].as_f64().unwrap() > 0.0, "12 rewrites in the last five minutes");
    assert_eq!(status["eta_s"], 0.0);
}

/// Rollback points rewritten rows back at their legacy paths, compare-and-set: a row the live
/// service changed since is left alone, a row whose legacy object is gone is left alone, a
/// row whose copy the live service replaced by a new upload at the same key is left alone, a
/// row another transaction holds is skipped (and rolled back by the next run); a dry run
/// writes nothing; and it refuses while the queue holds messages.
#[tokio::test]
async fn rollback_points_rows_back_only_where_it_is_safe() {
    let env = Env::new().await;
    let (keys, ids) = env.seed_legacy(0..10).await;
    feed(&env).await;
    drain(&env, &[]).await;
    // The live service uploads a new avatar for row 0; row 1's legacy object is cleaned up.
    sqlx::query("UPDATE avatars SET path = 'avatar/new-upload.png' WHERE id = $1")
        .bind(ids[0])
        .execute(&env.db)
        .await
        .unwrap();
    env.s3.delete_object().bucket(&env.source_bucket).key(&keys[1]).send().await.unwrap();
    // The live service uploads a new avatar for row 3 at the same key, and keeps the path.
    env.put(&env.destination_bucket, &keys[3].replacen("image/", "avatar/", 1), b"new").await;

    let (code, out) = feeder(&env, &["rollback", "--dry-run", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        last_json(&out),
        json!({"dry_run": true, "entries": 10, "rows_rolled_back": 7, "rows_changed_since": 1, "rows_held": 0,
               "legacy_missing": 1, "copy_replaced": 1})
    );
    assert_eq!(env.count_rows_with_prefix("image/").await, 0, "a dry run writes nothing");

    // A message in the queue: consumers would migrate the rows again.
    env.send_raw("{\"v\":1,\"key\":\"image/avatar-5.png\",\"size\":3,\"etag\":\"\\\"x\\\"\"}").await;
    let (code, out) = feeder(&env, &["rollback"]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(env.count_rows_with_prefix("image/").await, 0);
    env.drain().await;

    // Row 2 is held by a live transaction.
    let mut live = env.db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM avatars WHERE id = $1 FOR UPDATE").bind(ids[2]).execute(&mut *live).await.unwrap();
    let (code, out) = feeder(&env, &["rollback", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        last_json(&out),
        json!({"dry_run": false, "entries": 10, "rows_rolled_back": 6, "rows_changed_since": 1, "rows_held": 1,
               "legacy_missing": 1, "copy_replaced": 1})
    );
    live.rollback().await.unwrap();
    for (i, id) in ids.iter().enumerate() {
        let expected = match i {
            0 => "avatar/new-upload.png".to_owned(),
            1..=3 => keys[i].replacen("image/", "avatar/", 1),
            _ => keys[i].clone(),
        };
        assert_eq!(env.path_of(*id).await, expected, "row {i}");
    }

    let (code, out) = feeder(&env, &["rollback", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let again = last_json(&out);
    assert_eq!((again["entries"].clone(), again["rows_rolled_back"].clone()), (json!(4), json!(1)), "{again}");
    assert_eq!(env.path_of(ids[2]).await, keys[2], "the held row, once free");
    let (_, out) = feeder(&env, &["report", "--json"]);
    assert_eq!(last_json(&out)["rows_rolled_back"], 7);
}

/// `GET path` on the consumer's endpoint: (status, body).
async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// The value of one sample (`name{labels} value`) in a scrape.
fn sample(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// During a run the consumer serves Prometheus metrics whose counters match the end state
/// (objects copied, set aside by reason, rows rewritten, messages deleted, latencies), a
/// readiness check that answers 200 while S3, SQS and PostgreSQL answer and 503 naming S3 once
/// S3 fails (counted as slow-downs, and in `dependency_up`), and liveness that stays 200 through
/// it, as `consumer --health-check` (the container's health check) does. The copies go the
/// direct way (`DIRECT_COPY`, the default), through the proxy.
#[tokio::test]
async fn metrics_liveness_and_readiness_are_served_during_a_run() {
    use testkit::proxy::{Fault, FaultProxy, Rule, When};
    let env = Env::new().await;
    let (keys, _) = env.seed_legacy(0..30).await;
    env.put(&env.source_bucket, "image/conflict.png", b"legacy").await;
    env.put(&env.destination_bucket, "avatar/conflict.png", b"a newer upload").await;
    env.insert_rows(&["image/conflict.png".into()]).await;
    feed_with(&env, &["--objects-per-message=1"]).await;
    let s3 = FaultProxy::start(&env.s3_endpoint).await.unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = consumer(&env, &[("METRICS_ADDR", &addr), ("AWS_ENDPOINT_URL_S3", &s3.url)]);
    cmd.env_remove("EXIT_WHEN_IDLE").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();

    let expected_deleted = keys.len() as f64 + 1.0;
    wait_until("every message deleted, as the metrics say", std::time::Duration::from_secs(60), || async {
        match tokio::net::TcpStream::connect(&addr).await {
            Ok(_) => sample(&http_get(&addr, "/metrics").await.1, "avatar_migration_messages_deleted_total")
                .is_some_and(|n| n >= expected_deleted),
            Err(_) => false,
        }
    })
    .await;
    let (status, scrape) = http_get(&addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(env.count_rows_with_prefix("avatar/").await, 30);
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
    let expect = |name: &str, value: f64| assert_eq!(sample(&scrape, name), Some(value), "{name}\n{scrape}");
    expect("avatar_migration_objects_copied_total", 30.0);
    expect("avatar_migration_objects_already_present_total", 0.0);
    expect("avatar_migration_objects_set_aside_total{reason=\"destination_conflict\"}", 1.0);
    expect("avatar_migration_rows_rewritten_total", 30.0);
    expect("avatar_migration_messages_received_total", expected_deleted);
    expect("avatar_migration_messages_deleted_total", expected_deleted);
    expect("avatar_migration_objects_acknowledged_total", expected_deleted);
    expect("avatar_migration_messages_in_flight", 0.0);
    expect("avatar_migration_s3_copy_seconds_count", expected_deleted);
    expect("avatar_migration_db_rewrite_seconds_count", 30.0);
    // Every statement counted, and the rows asked for in them add up to the rewrites.
    let statements = sample(&scrape, "avatar_migration_db_rewrite_statements_total").unwrap();
    assert!((1.0..=30.0).contains(&statements), "{statements} statements for 30 rows");
    expect("avatar_migration_db_rows_per_statement_count", statements);
    expect("avatar_migration_db_rows_per_statement_sum", 30.0);
    expect("avatar_migration_s3_slowdowns_total", 0.0);
    // DIRECT_COPY, the default: every copy decided by the direct path (and the start-up
    // probe's), none sent again, the path never off.
    expect("avatar_migration_s3_direct_copies_total", 31.0);
    expect("avatar_migration_s3_direct_handed_over_total", 0.0);
    expect("avatar_migration_s3_direct_copy_off", 0.0);

    assert_eq!(http_get(&addr, "/ready").await.0, 200);
    assert_eq!(http_get(&addr, "/live").await.0, 200);
    expect("avatar_migration_dependency_up{dependency=\"s3\"}", 1.0);
    // Without blocking the runtime: the fault proxy runs on it.
    let check = || {
        tokio::process::Command::from(env.command("consumer")).env("METRICS_ADDR", &addr).arg("--health-check").output()
    };
    let ok = check().await.unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    // S3 stops answering but with 503: readiness fails, naming S3, and so does the scrape's
    // dependency_up; liveness, and with it the container's health check, does not (a
    // dependency's outage must not get the fleet replaced).
    s3.add(Rule::always(
        When { method: Some("HEAD"), ..When::default() },
        Fault::Error { status: 503, code: "SlowDown" },
    ));
    let (status, body) = http_get(&addr, "/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("S3: ") && !body.contains("SQS") && !body.contains("PostgreSQL"), "{body}");
    assert_eq!(http_get(&addr, "/live").await.0, 200);
    let still = check().await.unwrap();
    assert!(
        still.status.success(),
        "the health check asks for liveness only: {}",
        String::from_utf8_lossy(&still.stderr)
    );
    let scrape = http_get(&addr, "/metrics").await.1;
    assert_eq!(sample(&scrape, "avatar_migration_dependency_up{dependency=\"s3\"}"), Some(0.0), "{scrape}");
    assert_eq!(sample(&scrape, "avatar_migration_dependency_up{dependency=\"postgres\"}"), Some(1.0), "{scrape}");
    assert!(sample(&scrape, "avatar_migration_s3_slowdowns_total").unwrap() > 0.0);

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(wait_exit(&mut child, std::time::Duration::from_secs(30)).await.success());
}

/// A dry run says what would happen to each object (copy with its rows, already present,
/// conflict) and changes nothing: no copy, no row, no failure record, no message deleted, no
/// probe object; it stops once the messages come round again.
#[tokio::test]
async fn a_consumer_dry_run_reports_and_changes_nothing() {
    let env = Env::new().await;
    let (keys, ids) = env.seed_legacy(0..3).await;
    env.put(&env.source_bucket, "image/conflict.png", b"legacy").await;
    env.put(&env.destination_bucket, "avatar/conflict.png", b"a newer upload").await;
    env.put(&env.source_bucket, "image/same.png", b"same").await;
    env.put(&env.destination_bucket, "avatar/same.png", b"same").await;
    env.insert_rows(&["image/conflict.png".into(), "image/same.png".into(), "image/same.png".into()]).await;
    feed_with(&env, &["--objects-per-message=1"]).await;
    let destination_before = env.keys(&env.destination_bucket).await;

    let out = drain(&env, &[("DRY_RUN", "true"), ("VISIBILITY_TIMEOUT", "2")]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    for key in &keys {
        let line = format!(
            "dry run: {key}: would copy to {} (3 bytes); would rewrite 1 row(s)",
            key.replacen("image/", "avatar/", 1)
        );
        assert!(stdout.contains(&line), "{line}\n{stdout}");
    }
    assert!(
        stdout.contains("dry run: image/same.png: already present at avatar/same.png; would rewrite 2 row(s)"),
        "{stdout}"
    );
    assert!(stdout.contains("dry run: image/conflict.png: would set aside (destination_conflict)"), "{stdout}");
    assert!(stdout.contains("every message was seen; stopping"), "{stdout}");
    assert!(stdout.contains("copied 3, already present 1; rows rewritten 5; set aside 1"), "{stdout}");

    assert_eq!(env.keys(&env.destination_bucket).await, destination_before, "nothing copied, no probe object");
    assert_eq!(env.count_rows_with_prefix("avatar/").await, 0, "no row rewritten");
    assert_eq!(env.path_of(ids[0]).await, keys[0]);
    assert_eq!(env.failures().await, vec![], "nothing recorded");
    let (visible, in_flight) = env.depth(&env.queue_url).await;
    assert_eq!(visible + in_flight, 5, "every message is still in the queue");
}

/// Cleanup deletes a legacy object only when its copy has the same bytes and no row
/// references it: a row pointing at the legacy path again, a copy with other bytes and an
/// object never copied are all kept; without --yes nothing is deleted.
#[tokio::test]
async fn cleanup_deletes_only_what_is_safely_moved() {
    let env = Env::new().await;
    let (keys, ids) = env.seed_legacy(0..6).await;
    feed(&env).await;
    drain(&env, &[]).await;
    // The live service points row 0 back at its legacy path; the copy of key 1 is replaced by
    // other bytes of the same size; an object arrives that was never copied.
    sqlx::query("UPDATE avatars SET path = $1 WHERE id = $2")
        .bind(&keys[0])
        .bind(ids[0])
        .execute(&env.db)
        .await
        .unwrap();
    env.put(&env.destination_bucket, &keys[1].replacen("image/", "avatar/", 1), b"PNG").await;
    env.put(&env.source_bucket, "image/never-copied.png", b"png").await;
    let source_before = env.keys(&env.source_bucket).await;
    feeder(&env, &["fence", "install"]);

    let (code, out) = feeder(&env, &["cleanup", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        last_json(&out),
        json!({"dry_run": true, "legacy_objects": 7, "deleted": 4, "kept_referenced": 1, "kept_not_copied": 2,
               "kept_delete_failed": 0, "complete": true})
    );
    assert!(out.contains(&format!("cleanup: would delete {}", keys[5])), "{out}");
    assert_eq!(env.keys(&env.source_bucket).await, source_before, "a dry run deletes nothing");

    let (code, out) = feeder(&env, &["cleanup", "--yes", "--rate", "1000", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(last_json(&out)["deleted"], 4, "{out}");
    let mut left = env.keys(&env.source_bucket).await;
    left.sort();
    assert_eq!(left, vec![keys[0].clone(), keys[1].clone(), "image/never-copied.png".to_owned()]);
    for key in &keys[2..] {
        let copy = key.replacen("image/", "avatar/", 1);
        assert_eq!(env.get(&env.destination_bucket, &copy).await.as_deref(), Some(&b"png"[..]), "{copy}");
    }
}

/// DELETE_SOURCE deletes each source once its copy holds its bytes (copied, or found already
/// present) and its rows moved; a source set aside (a conflict) is kept, and so is one a row
/// references again by the time of the delete (the live service writing the legacy path just
/// after the rewrite), and every copy.
#[tokio::test]
async fn delete_source_deletes_only_moved_sources() {
    let env = Env::new().await;
    let (keys, ids) = env.seed_legacy(0..4).await;
    env.prepare().await;
    sqlx::raw_sql(
        "CREATE FUNCTION readd() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO avatars (path) VALUES (OLD.path); RETURN NULL; END $$;
         CREATE TRIGGER readd AFTER UPDATE ON avatars FOR EACH ROW
           WHEN (OLD.path = 'image/avatar-0.png') EXECUTE FUNCTION readd();",
    )
    .execute(&env.db)
    .await
    .unwrap();
    env.put(&env.source_bucket, "image/same.png", b"same").await;
    env.put(&env.destination_bucket, "avatar/same.png", b"same").await;
    env.put(&env.source_bucket, "image/conflict.png", b"legacy").await;
    env.put(&env.destination_bucket, "avatar/conflict.png", b"a newer upload").await;
    env.insert_rows(&["image/same.png".into(), "image/conflict.png".into()]).await;
    feed(&env).await;
    feeder(&env, &["fence", "install"]);
    let out = drain(&env, &[("DELETE_SOURCE", "true")]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("sources deleted 4;"), "{stdout}");
    let mut kept = env.keys(&env.source_bucket).await;
    kept.sort();
    assert_eq!(kept, vec![keys[0].clone(), "image/conflict.png".to_owned()], "the referenced one and the conflict");
    for (id, key) in ids.iter().zip(&keys) {
        let copy = key.replacen("image/", "avatar/", 1);
        assert_eq!(env.path_of(*id).await, copy);
        assert_eq!(env.get(&env.destination_bucket, &copy).await.as_deref(), Some(&b"png"[..]));
    }
    assert_eq!(env.get(&env.destination_bucket, "avatar/same.png").await.as_deref(), Some(&b"same"[..]));
}

/// `feeder status --watch` without a terminal prints a reading at once (then one a minute)
/// and, on SIGTERM, a last one, and exits 0.
#[tokio::test]
async fn status_watch_prints_readings_until_stopped() {
    use std::io::BufRead;
    let env = Env::new().await;
    env.seed_legacy(0..3).await;
    feed(&env).await;
    let mut child = env
        .command("feeder")
        .args(["status", "--watch", "--json", "--interval", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!((first["rows_legacy"].clone(), first["queue_visible"].clone()), (json!(3), json!(1)), "{first}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(wait_exit(&mut child, std::time::Duration::from_secs(30)).await.success());
    let last: serde_json::Value = serde_json::from_str(&lines.last().unwrap().unwrap()).unwrap();
    assert_eq!(last["rows_legacy"], 3, "{last}");
}

/// `CONCURRENCY` unset: 128 messages at once where `auto` finds that the server refuses a
/// conditional copy onto an existing key (SeaweedFS: the copy goes first), 32 where it does not
/// (MiniStack: each destination is looked at first). Seen in the gauge of messages in flight
/// while every rewrite waits on a lock, so that nothing finishes.
#[tokio::test]
async fn unset_concurrency_follows_what_auto_finds() {
    // With the rewrites stalled, a consumer holds CONCURRENCY messages being copied (or done
    // copying and waiting for a finishing place) and FINISHING_PER_PERMIT x CONCURRENCY
    // finishing: five times CONCURRENCY in all.
    let in_all = |concurrency: f64| concurrency * (1 + consumer::FINISHING_PER_PERMIT) as f64;
    for (env, expected) in [(Env::on_seaweedfs().await, in_all(128.0)), (Env::new().await, in_all(32.0))] {
        env.seed_legacy(0..expected as usize + 60).await;
        feed_with(&env, &["--objects-per-message=1"]).await;
        let held = crate::helpers::stall_rewrites(&env).await;
        let addr = format!("127.0.0.1:{}", free_port());
        let vars = [("METRICS_ADDR", addr.as_str()), ("DB_LOCK_TIMEOUT", "120s"), ("DB_STATEMENT_TIMEOUT", "120s")];
        let mut cmd = consumer(&env, &vars);
        cmd.env_remove("EXIT_WHEN_IDLE").env_remove("CONCURRENCY");
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let in_flight = || async {
            match tokio::net::TcpStream::connect(&addr).await {
                Ok(_) => sample(&http_get(&addr, "/metrics").await.1, "avatar_migration_messages_in_flight"),
                Err(_) => None,
            }
        };
        wait_until(&format!("{expected} messages in flight"), std::time::Duration::from_secs(60), || async {
            in_flight().await == Some(expected)
        })
        .await;
        // Room for more (60 messages wait), and still no more than that.
        for _ in 0..5 {
            assert_eq!(in_flight().await, Some(expected));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        drop(held);
    }
}

/// A message delivered again after its objects were copied, their rows moved and their
/// sources deleted (`DELETE_SOURCE` or `feeder cleanup` deleted them; the message's delete
/// was lost) finds each object done: the copy is there under the listed ETag, so nothing is
/// recorded `source_missing`, whether the copy goes first (SeaweedFS) or each destination is
/// looked at first (MiniStack).
#[tokio::test]
async fn a_message_delivered_again_after_its_sources_were_deleted_finds_its_objects_done() {
    for env in [Env::on_seaweedfs().await, Env::new().await] {
        let (keys, ids) = env.seed_legacy(0..5).await;
        let mut bodies = Vec::new();
        for key in &keys {
            let etag = crate::helpers::etag(&env, &env.source_bucket, key).await;
            bodies.push(common::message::ObjectMessage::new(key.clone(), 3, etag).to_body());
        }
        for body in &bodies {
            env.send_raw(body).await;
        }
        let first = drain(&env, &[]).await;
        assert!(stdout(&first).contains("copied 5,"), "{}", stdout(&first));
        for key in &keys {
            env.s3.delete_object().bucket(&env.source_bucket).key(key).send().await.unwrap();
        }
        for body in &bodies {
            env.send_raw(body).await;
        }
        let again = drain(&env, &[("DELETE_SOURCE", "true"), ("LEGACY_WRITES_STOPPED", "true")]).await;
        assert!(stdout(&again).contains("already present 5"), "{}", stdout(&again));
        assert_eq!(env.failures().await, vec![], "no bogus source_missing");
        for (id, key) in ids.iter().zip(&keys) {
            assert_eq!(env.path_of(*id).await, key.replacen("image/", "avatar/", 1));
        }
        assert_eq!(env.depth(&env.queue_url).await, (0, 0));
    }
}

/// `feeder status` never holds production up: past `STATUS_EXACT_MAX_ROWS` (by the planner's
/// estimate) it estimates rows instead of scanning, touching no lock on `avatars`, so it
/// answers even while a DDL holds the table; `--exact` counts, and meeting that lock gives up
/// within the session's `lock_timeout` with an error instead of queueing. Legacy rows set
/// aside are those whose path has a failure record, never a subtraction of all records.
#[tokio::test]
async fn status_estimates_past_a_size_and_never_queues_behind_a_lock() {
    let env = Env::new().await;
    let (keys, _) = env.seed_legacy(0..4).await;
    env.prepare().await;
    common::db::record_failure(&env.db, &keys[0], common::db::Reason::AccessDenied, "denied").await.unwrap();
    common::db::record_failure(&env.db, "message 1", common::db::Reason::MalformedMessage, "bad").await.unwrap();
    common::db::record_failure(&env.db, "image/no-row.png", common::db::Reason::SourceMissing, "gone").await.unwrap();
    let (code, out) = feeder(&env, &["status", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let exact = last_json(&out);
    assert_eq!(
        (exact["rows_legacy"].clone(), exact["rows_legacy_set_aside"].clone(), exact["rows_left"].clone()),
        (json!(4), json!(1), json!(3)),
        "{exact}"
    );
    assert_eq!(exact["rows_estimated"], false);

    sqlx::raw_sql("ANALYZE avatars").execute(&env.db).await.unwrap();
    let mut ddl = env.db.begin().await.unwrap();
    sqlx::raw_sql("LOCK TABLE avatars IN ACCESS EXCLUSIVE MODE").execute(&mut *ddl).await.unwrap();
    let out = env.command("feeder").env("STATUS_EXACT_MAX_ROWS", "0").args(["status", "--json"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let estimated = last_json(&stdout);
    assert_eq!((estimated["rows_estimated"].clone(), estimated["rows_legacy"].clone()), (json!(true), json!(4)));
    let out = env.command("feeder").args(["status", "--exact"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("lock timeout"), "{stderr}");
    ddl.rollback().await.unwrap();
}

/// With `CLOUDWATCH_NAMESPACE`, the consumer's stdout carries CloudWatch's embedded metric
/// format: lines whose counts add up to what the run did (the last one written at the end).
#[tokio::test]
async fn cloudwatch_metrics_lines_add_up_to_the_run() {
    let env = Env::new().await;
    env.seed_legacy(0..3).await;
    env.put(&env.source_bucket, "image/conflict.png", b"legacy").await;
    env.put(&env.destination_bucket, "avatar/conflict.png", b"a newer upload").await;
    feed(&env).await;
    let out = drain(&env, &[("CLOUDWATCH_NAMESPACE", "AvatarMigration/test")]).await;
    let sums = testkit::emf_sums(&out.stdout, "AvatarMigration/test");
    let sum = |name: &str| sums[name];
    assert_eq!((sum("ObjectsMoved"), sum("RowsRewritten"), sum("ObjectsSetAside")), (3, 3, 1));
}
