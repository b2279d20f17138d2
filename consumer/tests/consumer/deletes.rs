//! Deleting legacy objects while the live service writes: the fence, the delete protocol (the
//! wait for older transactions, the second check), and the lease that keeps `cleanup`,
//! `rollback` and `DELETE_SOURCE` apart (docs/design.md, "Deleting legacy objects").

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::db::lease::{Lease, Mode};
use testkit::{Env, binary, wait_until};

use crate::helpers::{drain, feed, feeder, last_json, modern};

/// Runs `feeder <args>`; returns (exit code, stdout, stderr).
fn feeder_all(env: &Env, args: &[&str]) -> (Option<i32>, String, String) {
    let out = env.command("feeder").args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `n` legacy objects with a row each, migrated: (keys, row ids).
async fn migrated(env: &Env, n: usize) -> (Vec<String>, Vec<i32>) {
    let seeded = env.seed_legacy(0..n).await;
    feed(env).await;
    drain(env, &[]).await;
    seeded
}

async fn tombstone_exists(env: &Env, key: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM avatar_migration_tombstones WHERE legacy_path = $1)")
        .bind(key)
        .fetch_one(&env.db)
        .await
        .unwrap()
}

/// Every row names an object that exists: a legacy path in the source bucket, a modern one in
/// the destination bucket. Returns the rows that do not.
async fn rows_naming_nothing(env: &Env) -> Vec<(i32, String)> {
    let mut broken = Vec::new();
    for (id, path) in env.rows().await {
        let bucket = if path.starts_with("avatar/") { &env.destination_bucket } else { &env.source_bucket };
        if !env.exists(bucket, &path).await {
            broken.push((id, path));
        }
    }
    broken
}

/// Without the fence, `cleanup --yes` and `DELETE_SOURCE` refuse to delete, saying why; with
/// `--legacy-writes-stopped` (`LEGACY_WRITES_STOPPED`) they delete. `fence install` and
/// `remove` are idempotent and `fence status` says what is installed.
#[tokio::test]
async fn deletes_need_the_fence_or_the_operators_word() {
    let env = Env::new().await;
    let (keys, _) = migrated(&env, 3).await;

    let (code, _, err) = feeder_all(&env, &["cleanup", "--yes"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("refuses to delete without the fence") && err.contains("feeder fence install"), "{err}");
    assert_eq!(env.keys(&env.source_bucket).await.len(), 3, "nothing deleted");
    let refused = crate::helpers::consumer(&env, &[("DELETE_SOURCE", "true")]).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("LEGACY_WRITES_STOPPED=true"));

    let (code, out) = feeder(&env, &["fence", "status", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(last_json(&out)["installed"], false);
    for _ in 0..2 {
        let (code, out) = feeder(&env, &["fence", "install", "--mode", "reject"]);
        assert_eq!(code, Some(0), "{out}");
    }
    let (_, out) = feeder(&env, &["fence", "status", "--json"]);
    assert_eq!((last_json(&out)["mode"].clone(), last_json(&out)["enabled"].clone()), ("reject".into(), true.into()));
    for _ in 0..2 {
        let (code, out) = feeder(&env, &["fence", "remove"]);
        assert_eq!(code, Some(0), "{out}");
    }
    let (_, out) = feeder(&env, &["fence", "status", "--json"]);
    assert_eq!(last_json(&out)["installed"], false);

    let (code, out, err) = feeder_all(&env, &["cleanup", "--yes", "--legacy-writes-stopped", "true", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(last_json(&out)["deleted"], 3, "{out}");
    for key in &keys {
        assert!(env.exists(&env.destination_bucket, &modern(key)).await);
    }
}

/// The fence turns a write of a legacy path being or already deleted into its copy's path
/// (`rewrite`), or refuses it (`reject`, SQLSTATE 23514); it counts what it rewrote, and
/// leaves every other write alone.
#[tokio::test]
async fn the_fence_rewrites_or_refuses_writes_of_deleted_legacy_paths() {
    let env = Env::new().await;
    let (keys, ids) = migrated(&env, 3).await;
    let (code, out) = feeder(&env, &["fence", "install"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = feeder(&env, &["cleanup", "--yes", "--json"]);
    assert_eq!((code, last_json(&out)["deleted"].clone()), (Some(0), 3.into()), "{out}");

    sqlx::query("UPDATE avatars SET path = $1 WHERE id = $2")
        .bind(&keys[0])
        .bind(ids[0])
        .execute(&env.db)
        .await
        .unwrap();
    assert_eq!(env.path_of(ids[0]).await, modern(&keys[0]), "rewritten to the copy");
    let id: i32 = sqlx::query_scalar("INSERT INTO avatars (path) VALUES ($1) RETURNING id")
        .bind(&keys[1])
        .fetch_one(&env.db)
        .await
        .unwrap();
    assert_eq!(env.path_of(id).await, modern(&keys[1]), "an insert too");
    sqlx::query("UPDATE avatars SET path = 'image/not-deleted.png' WHERE id = $1")
        .bind(ids[2])
        .execute(&env.db)
        .await
        .unwrap();
    assert_eq!(env.path_of(ids[2]).await, "image/not-deleted.png", "other paths are left alone");
    let (_, out) = feeder(&env, &["fence", "status", "--json"]);
    assert_eq!(last_json(&out)["writes_rewritten"], 2, "{out}");
    assert_eq!(last_json(&out)["tombstones_deleted"], 3, "{out}");

    let (code, out) = feeder(&env, &["fence", "install", "--mode", "reject"]);
    assert_eq!(code, Some(0), "{out}");
    let err = sqlx::query("UPDATE avatars SET path = $1 WHERE id = $2")
        .bind(&keys[0])
        .bind(ids[0])
        .execute(&env.db)
        .await
        .unwrap_err();
    let db = err.as_database_error().unwrap();
    assert_eq!(db.code().as_deref(), Some("23514"), "{db}");
    assert!(db.message().contains(&keys[0]), "{db}");
    assert_eq!(env.path_of(ids[0]).await, modern(&keys[0]));
}

/// A transaction that wrote a legacy path before its tombstone was committed, and commits
/// only after cleanup checked the references, is waited for: cleanup checks again after it
/// ended, finds the row, and keeps the object. (Check-then-delete alone would delete it.)
#[tokio::test]
async fn cleanup_waits_for_a_transaction_open_before_its_tombstones() {
    let env = Env::new().await;
    let (keys, ids) = migrated(&env, 3).await;
    feeder(&env, &["fence", "install"]);
    let mut writer = env.db.begin().await.unwrap();
    sqlx::query("UPDATE avatars SET path = $1 WHERE id = $2")
        .bind(&keys[1])
        .bind(ids[1])
        .execute(&mut *writer)
        .await
        .unwrap();

    let mut cleanup = env.command("feeder");
    cleanup.args(["cleanup", "--yes", "--json"]).stdout(std::process::Stdio::piped());
    let cleanup = tokio::process::Command::from(cleanup).spawn().unwrap();
    // The tombstones are committed and cleanup waits for this transaction.
    wait_until("cleanup's tombstones", Duration::from_secs(30), || tombstone_exists(&env, &keys[1])).await;
    assert!(env.exists(&env.source_bucket, &keys[1]).await, "nothing deleted while an older transaction is open");
    writer.commit().await.unwrap();
    let out = cleanup.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert_eq!(
        (last_json(&stdout)["deleted"].clone(), last_json(&stdout)["kept_referenced"].clone()),
        (2.into(), 1.into())
    );
    assert_eq!(env.path_of(ids[1]).await, keys[1]);
    assert!(env.exists(&env.source_bucket, &keys[1]).await, "the object its row names again is kept");
    assert!(!tombstone_exists(&env, &keys[1]).await, "its tombstone is withdrawn");
    assert_eq!(rows_naming_nothing(&env).await, vec![]);
}

/// The race, run: a live writer keeps pointing migrated rows back at their legacy paths (and
/// forth again) and inserting rows with legacy paths while `cleanup --yes` runs; at the end
/// every row names an object that exists, and the fence says how many writes it rewrote.
#[tokio::test]
async fn every_row_resolves_while_a_live_writer_races_cleanup() {
    let env = Env::new().await;
    let (keys, ids) = migrated(&env, 300).await;
    feeder(&env, &["fence", "install"]);
    let done = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (db, done, writes, keys, ids) = (env.db.clone(), done.clone(), writes.clone(), keys.clone(), ids.clone());
        tokio::spawn(async move {
            // Twenty rows go back and forth between their copy and their legacy path; rows
            // naming ten other legacy paths are inserted now and then.
            let mut i = 0usize;
            while !done.load(Ordering::Relaxed) {
                let k = (i * 7) % 20;
                let mut tx = db.begin().await.unwrap();
                // Half the time, the object cleanup tombstoned last: its row and a new one
                // point at its legacy path, just before or after its delete.
                let chased: Option<String> = sqlx::query_scalar(
                    "SELECT legacy_path FROM avatar_migration_tombstones ORDER BY created_at DESC, legacy_path LIMIT 1",
                )
                .fetch_optional(&mut *tx)
                .await
                .unwrap();
                if let Some(path) = chased.filter(|_| i.is_multiple_of(2)) {
                    let n = keys.iter().position(|k| *k == path).unwrap();
                    sqlx::query("UPDATE avatars SET path = $1 WHERE id = $2")
                        .bind(&path)
                        .bind(ids[n])
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    sqlx::query("INSERT INTO avatars (path) VALUES ($1)").bind(&path).execute(&mut *tx).await.unwrap();
                } else if i % 10 == 1 {
                    let k = 20 + (i / 10) % 10;
                    sqlx::query("INSERT INTO avatars (path) VALUES ($1)")
                        .bind(&keys[k])
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                } else {
                    let path = if (i / 20).is_multiple_of(2) { keys[k].clone() } else { modern(&keys[k]) };
                    sqlx::query("UPDATE avatars SET path = $1 WHERE id = $2")
                        .bind(path)
                        .bind(ids[k])
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                // A transaction that stays open a little, as a live request's does.
                tokio::task::yield_now().await;
                tx.commit().await.unwrap();
                writes.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };
    let (code, out, err) = tokio::task::spawn_blocking({
        let vars = env.vars();
        move || {
            let out = Command::new(binary("feeder")).envs(vars).args(["cleanup", "--yes", "--json"]).output().unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    })
    .await
    .unwrap();
    done.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let result = last_json(&out);
    assert!(writes.load(Ordering::Relaxed) > 0);
    assert_eq!(
        rows_naming_nothing(&env).await,
        vec![],
        "every row resolves after {} live writes",
        writes.load(Ordering::Relaxed)
    );
    let (_, status) = feeder(&env, &["fence", "status", "--json"]);
    let rewritten = last_json(&status)["writes_rewritten"].as_u64().unwrap();
    let deleted = result["deleted"].as_u64().unwrap();
    println!(
        "live writes {}, deleted {deleted}, kept referenced {}, rewritten by the fence {rewritten}",
        writes.load(Ordering::Relaxed),
        result["kept_referenced"]
    );
    assert!(deleted > 0, "{out}");
    assert!(rewritten > 0, "the writer chased tombstoned paths: the fence rewrote some of its writes");
}

/// `cleanup --yes` and `rollback` run alone: while one holds the lease on the legacy objects
/// (here, this test, as a cleanup would), the other and a consumer deleting sources refuse to
/// start, naming the holder; once it ends, they run. A holder that died is waited for only
/// until its lease runs out.
#[tokio::test]
async fn cleanup_rollback_and_delete_source_exclude_one_another() {
    let env = Env::new().await;
    migrated(&env, 3).await;
    feeder(&env, &["fence", "install"]);
    let held = Lease::take(&env.db, "feeder cleanup", Mode::Exclusive).await.unwrap();
    for args in [&["rollback", "--force"][..], &["cleanup", "--yes"][..]] {
        let (code, _, err) = feeder_all(&env, args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains("cannot start") && err.contains("feeder cleanup on"), "{args:?}: {err}");
    }
    let refused = crate::helpers::consumer(&env, &[("DELETE_SOURCE", "true")]).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("feeder cleanup on"));
    assert_eq!(env.keys(&env.source_bucket).await.len(), 3, "nothing deleted");
    held.end().await;

    // A shared holder (a consumer deleting sources) keeps cleanup and rollback out, not
    // another consumer.
    let shared = Lease::take(&env.db, "consumer (DELETE_SOURCE)", Mode::Shared).await.unwrap();
    let other = Lease::take(&env.db, "consumer (DELETE_SOURCE)", Mode::Shared).await.unwrap();
    let (code, _, err) = feeder_all(&env, &["rollback", "--force"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("consumer (DELETE_SOURCE) on"), "{err}");
    shared.end().await;
    other.end().await;

    // A holder that died: its row runs out.
    sqlx::query(
        "INSERT INTO avatar_migration_leases (holder_id, exclusive, holder, alive_until)
         VALUES ('dead', true, 'feeder cleanup on a host that died', now() - interval '1 second')",
    )
    .execute(&env.db)
    .await
    .unwrap();
    let (code, out, err) = feeder_all(&env, &["cleanup", "--yes", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(last_json(&out)["deleted"], 3);
    let (code, _, err) = feeder_all(&env, &["rollback", "--force"]);
    assert_eq!(code, Some(0), "{err}");
    let leases: i64 =
        sqlx::query_scalar("SELECT count(*) FROM avatar_migration_leases").fetch_one(&env.db).await.unwrap();
    assert_eq!(leases, 0, "every lease ended, the dead one cleared");
}

/// Rollback never points a row at a legacy path with a tombstone, even while its object is
/// still there (a delete that crashed half-way): the object may be gone any moment, or gone.
#[tokio::test]
async fn rollback_never_points_a_row_at_a_tombstoned_path() {
    let env = Env::new().await;
    let (keys, ids) = migrated(&env, 3).await;
    sqlx::query(
        "INSERT INTO avatar_migration_tombstones (legacy_path, new_path, holder_id) VALUES ($1, $2, 'crashed')",
    )
    .bind(&keys[0])
    .bind(modern(&keys[0]))
    .execute(&env.db)
    .await
    .unwrap();
    let (code, out, err) = feeder_all(&env, &["rollback", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        (last_json(&out)["rows_rolled_back"].clone(), last_json(&out)["legacy_missing"].clone()),
        (2.into(), 1.into())
    );
    assert_eq!(env.path_of(ids[0]).await, modern(&keys[0]));
    assert_eq!(env.path_of(ids[1]).await, keys[1]);
}

/// Keys XML 1.0 cannot carry (a control character, U+FFFE) cannot go in a `DeleteObjects`
/// body (AWS refuses the whole batch; the local servers happen to accept it, so the requests
/// are counted): cleanup deletes them one by one (conditional `DeleteObject`), the others in a
/// batch, and its position moves past all of them.
#[tokio::test]
async fn cleanup_deletes_keys_xml_cannot_carry_one_by_one() {
    let env = Env::new().await;
    let keys: Vec<String> =
        ["image/plain.png", "image/ctrl-\u{1}.png", "image/tab\there.png", "image/nonchar-\u{FFFE}.png"]
            .iter()
            .map(|k| k.to_string())
            .collect();
    env.put_many(&env.source_bucket, &keys, b"png").await;
    let ids = env.insert_rows(&keys).await;
    feed(&env).await;
    drain(&env, &[]).await;
    for (id, key) in ids.iter().zip(&keys) {
        assert_eq!(env.path_of(*id).await, modern(key), "{key:?} moved");
    }
    feeder(&env, &["fence", "install"]);
    // Through a proxy that counts the requests by kind (and forwards every one).
    let s3 = testkit::proxy::FaultProxy::start(&env.s3_endpoint).await.unwrap();
    let out = tokio::process::Command::from(env.command("feeder"))
        .env("AWS_ENDPOINT_URL_S3", &s3.url)
        .args(["cleanup", "--yes", "--json"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = String::from_utf8_lossy(&out.stdout);
    let result = last_json(&out);
    assert_eq!((result["deleted"].clone(), result["complete"].clone()), (4.into(), true.into()), "{out}");
    let kinds = s3.forwarded_by_kind();
    assert_eq!(kinds.get("S3 POST"), Some(&1), "one DeleteObjects for the key XML carries: {kinds:?}");
    assert_eq!(kinds.get("S3 DELETE"), Some(&3), "one DeleteObject each for the others: {kinds:?}");
    assert_eq!(env.keys(&env.source_bucket).await, Vec::<String>::new());
    assert_eq!(rows_naming_nothing(&env).await, vec![]);
}

/// A key with characters SQS cannot carry (U+FFFE, U+FFFF) travels as an ASCII body through
/// the real queue and arrives byte for byte: the object is copied to the same key under the
/// destination prefix and its row follows.
#[tokio::test]
async fn keys_sqs_cannot_carry_travel_escaped_and_arrive_whole() {
    let env = Env::new().await;
    let key = "image/nonchar-\u{FFFE}\u{FFFF}-\u{1}.png".to_owned();
    env.put(&env.source_bucket, &key, b"png").await;
    let ids = env.insert_rows(std::slice::from_ref(&key)).await;
    feed(&env).await;
    let bodies = env.drain().await;
    assert_eq!(bodies.len(), 1);
    assert!(bodies[0].is_ascii() && bodies[0].contains(r"\ufffe\uffff"), "{}", bodies[0]);
    for body in &bodies {
        env.send_raw(body).await;
    }
    drain(&env, &[]).await;
    assert_eq!(env.path_of(ids[0]).await, modern(&key));
    assert_eq!(env.get(&env.destination_bucket, &modern(&key)).await.as_deref(), Some(&b"png"[..]));
}
