//! The run's end, as an operator runs it: `verify` (and the second pass), the cleanup with the
//! fence while a writer races it, and the checks that nothing was lost or overwritten.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::live::Live;
use super::processes::command;
use super::report::Report;
use super::report::say;
use super::seed::{Seeded, body_of, modern};
use crate::Env;

/// What the cleanup at the end did.
pub(super) struct CleanupRun {
    pub deleted: u64,
    /// Writes of the live writer during the cleanup.
    pub writes: u64,
    /// Of those, what the fence rewrote to the copy's path.
    pub rewritten: u64,
    /// Rows that named an object before the cleanup and name nothing after it.
    pub broken: Vec<String>,
    pub rollback_refused: bool,
}

/// Rows naming nothing: a legacy path missing from the source bucket, a modern one from the
/// destination bucket (other paths are not ours to judge).
async fn rows_naming_nothing(env: &Env) -> anyhow::Result<HashSet<String>> {
    let rows: Vec<(i32, Option<String>)> = sqlx::query_as("SELECT id, path FROM avatars").fetch_all(&env.db).await?;
    let mut broken = HashSet::new();
    for (id, path) in rows {
        let Some(path) = path else { continue };
        let bucket = if path.starts_with("avatar/") {
            &env.destination_bucket
        } else if path.starts_with("image/") {
            &env.source_bucket
        } else {
            continue;
        };
        if !env.exists(bucket, &path).await {
            broken.insert(format!("row {id} -> {path}"));
        }
    }
    Ok(broken)
}

/// The end of a migration, as an operator runs it while the live service writes: the fence,
/// then `cleanup --yes`, while a writer keeps pointing rows back at the legacy paths of the
/// objects being deleted (the one cleanup tombstoned last) and inserting rows with them; a
/// `rollback` started meanwhile must be refused by the lease. Every row that named an object
/// before must name one after.
pub(super) async fn cleanup_while_writing(
    env: &Env,
    vars: &[(String, String)],
    begun: Instant,
) -> anyhow::Result<CleanupRun> {
    say(begun, "cleanup --yes with the fence, while a live writer points rows back at what it deletes");
    let before = rows_naming_nothing(env).await?;
    let fence = command("feeder", vars, &[]).args(["fence", "install"]).status().await?;
    anyhow::ensure!(fence.success(), "feeder fence install failed");
    let stop = CancellationToken::new();
    let writer = {
        let (db, stop) = (env.db.clone(), stop.clone());
        tokio::spawn(async move {
            let mut writes = 0u64;
            while !stop.is_cancelled() {
                let chased: Option<(String, String)> = sqlx::query_as(
                    "SELECT legacy_path, new_path FROM avatar_migration_tombstones ORDER BY created_at DESC LIMIT 1",
                )
                .fetch_optional(&db)
                .await
                .ok()
                .flatten();
                let Some((legacy, modern)) = chased else {
                    tokio::task::yield_now().await;
                    continue;
                };
                let wrote = async {
                    let mut tx = db.begin().await?;
                    sqlx::query("UPDATE avatars SET path = $1 WHERE path = $2")
                        .bind(&legacy)
                        .bind(&modern)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("INSERT INTO avatars (path) VALUES ($1)").bind(&legacy).execute(&mut *tx).await?;
                    tx.commit().await
                };
                if wrote.await.is_ok() {
                    writes += 1;
                }
            }
            writes
        })
    };
    // A transaction open before cleanup's first tombstones holds cleanup in its wait (the
    // delete protocol's step 3) until the rollback below has tried: cleanup surely holds its
    // lease then, however fast it would otherwise finish.
    let mut open = env.db.begin().await?;
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut *open).await?;
    let cleanup = command("feeder", vars, &[])
        .args(["cleanup", "--yes", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting feeder cleanup")?;
    // Once cleanup holds the lease (its first tombstones), a rollback must not start.
    let tombstoned = || async {
        sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM avatar_migration_tombstones)")
            .fetch_one(&env.db)
            .await
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !tombstoned().await && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rollback = command("feeder", vars, &[])
        .args(["rollback", "--force"])
        .stderr(std::process::Stdio::piped())
        .output()
        .await?;
    let rollback_refused =
        rollback.status.code() == Some(1) && String::from_utf8_lossy(&rollback.stderr).contains("feeder cleanup on");
    if !rollback_refused {
        say(begun, format!("rollback during cleanup: {}", String::from_utf8_lossy(&rollback.stderr).trim()));
    }
    open.commit().await?;
    let out = cleanup.wait_with_output().await?;
    stop.cancel();
    let writes = writer.await?;
    anyhow::ensure!(out.status.success(), "feeder cleanup --yes failed: {}", String::from_utf8_lossy(&out.stdout));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("feeder cleanup --json printed {stdout:?}"))?;
    let status = command("feeder", vars, &[])
        .args(["fence", "status", "--json"])
        .stdout(std::process::Stdio::piped())
        .output()
        .await?;
    let status = String::from_utf8_lossy(&status.stdout);
    let status: serde_json::Value = serde_json::from_str(status.lines().last().unwrap_or_default())
        .with_context(|| format!("feeder fence status --json printed {status:?}"))?;
    let after = rows_naming_nothing(env).await?;
    let mut broken: Vec<String> = after.difference(&before).cloned().collect();
    broken.sort();
    say(begun, format!("cleanup: {result}; rows naming nothing before {}, after {}", before.len(), after.len()));
    Ok(CleanupRun {
        deleted: result["deleted"].as_u64().unwrap_or(0),
        writes,
        rewritten: status["writes_rewritten"].as_u64().unwrap_or(0),
        broken,
        rollback_refused,
    })
}

/// What `feeder verify` said at the end.
pub(super) struct Verified {
    /// Nothing left pending, and the only rows that do not resolve are the seeded ones whose
    /// legacy object never existed, reported (recorded) by verify.
    pub agrees: bool,
    pub verified: serde_json::Value,
    /// Rows naming a legacy object that never existed (the live writer may have repointed
    /// some of the seeded ones meanwhile).
    pub missing_rows: i64,
    /// What the second pass did, when one was needed.
    pub second_pass: Option<String>,
}

/// The plan's end: verify; if legacy rows are left, redrive the dead letters, reconcile,
/// drain, verify again.
pub(super) async fn verify_until_done(env: &Env, seeded: &Seeded, begun: Instant) -> anyhow::Result<Verified> {
    let direct = env.vars();
    say(begun, "feeder verify");
    let first = verify(&direct).await?;
    let mut second_pass = None;
    if first["rows_legacy_pending"].as_u64() != Some(0) {
        say(begun, "not done: redrive the dead letters, reconcile, drain, verify again");
        let redriven = redrive(env).await?;
        let reconcile = command("feeder", &direct, &[]).arg("reconcile").status().await?;
        anyhow::ensure!(reconcile.success(), "feeder reconcile failed");
        let drained =
            command("consumer", &direct, &[("EXIT_WHEN_IDLE", "2"), ("VISIBILITY_TIMEOUT", "2")]).status().await?;
        anyhow::ensure!(drained.success(), "the second pass's consumer failed");
        second_pass = Some(format!("{redriven} dead letters redriven, reconcile, one consumer"));
    }
    let verified = verify(&direct).await?;
    let missing_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM avatars WHERE path = ANY($1)")
        .bind(seeded.missing.iter().collect::<Vec<_>>())
        .fetch_one(&env.db)
        .await?;
    let agrees = verified["rows_legacy_pending"].as_u64() == Some(0)
        && verified["rows_unresolvable"].as_i64() == Some(missing_rows)
        && verified["rows_legacy_missing"].as_i64() == Some(missing_rows);
    Ok(Verified { agrees, verified, missing_rows, second_pass })
}

/// `feeder verify --json`, straight to the real servers; its JSON line.
async fn verify(vars: &[(String, String)]) -> anyhow::Result<serde_json::Value> {
    let out =
        command("feeder", vars, &[]).args(["verify", "--json"]).stdout(std::process::Stdio::piped()).output().await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("feeder verify --json printed {last:?}"))
}

/// Moves every message of the dead-letter queue back to the queue (the operator's redrive).
async fn redrive(env: &Env) -> anyhow::Result<u64> {
    let mut moved = 0;
    loop {
        let out = env.sqs.receive_message().queue_url(&env.dlq_url).max_number_of_messages(10).send().await?;
        let messages = out.messages.unwrap_or_default();
        if messages.is_empty() && common::aws::queue_depth(&env.sqs, &env.dlq_url).await?.total() == 0 {
            return Ok(moved);
        }
        for m in messages {
            env.sqs.send_message().queue_url(&env.queue_url).message_body(m.body().unwrap_or_default()).send().await?;
            env.sqs
                .delete_message()
                .queue_url(&env.dlq_url)
                .receipt_handle(m.receipt_handle().unwrap_or_default())
                .send()
                .await?;
            moved += 1;
        }
    }
}

/// Every seeded object is copied with its exact bytes or recorded with a reason; no
/// destination the live service or the seed put there was overwritten.
pub(super) async fn check_objects(
    env: &Env,
    seeded: &Seeded,
    deleted: &[String],
    live: &Live,
    report: &mut Report,
) -> anyhow::Result<()> {
    let recorded: HashSet<String> = common::db::list_failures(&env.db).await?.into_iter().map(|f| f.subject).collect();
    let uploads = live.uploads.lock().unwrap().clone();
    let deleted: HashSet<&String> = deleted.iter().collect();
    for key in &seeded.legacy {
        let dest = modern(key);
        let got = env.get(&env.destination_bucket, &dest).await;
        if let Some(expected) = seeded.conflicts.get(&dest).or(uploads.get(&dest)) {
            if got.as_ref() != Some(expected) {
                report.overwritten += 1;
                report.problems.push(format!("overwritten: s3://{}/{dest}", env.destination_bucket));
            }
            if !recorded.contains(key) {
                report.lost += 1;
                report.problems.push(format!("a conflict not recorded: {key}"));
            }
            continue;
        }
        if let Some(etag) = seeded.same_bytes.get(&dest) {
            let now = env.s3.head_object().bucket(&env.destination_bucket).key(&dest).send().await?;
            if now.e_tag() != Some(etag.as_str()) {
                report.overwritten += 1;
                report.problems.push(format!("a same-bytes destination was rewritten: {dest}"));
            }
        }
        let copied = got.as_deref() == Some(&body_of(key)[..]);
        if !copied && !recorded.contains(key) {
            report.lost += 1;
            report.problems.push(format!("lost: {key} (deleted mid-run: {})", deleted.contains(key)));
        }
    }
    Ok(())
}

/// Rows the live service wrote keep its value.
pub(super) async fn check_rows(env: &Env, live: &Live, report: &mut Report) -> anyhow::Result<()> {
    let now: HashMap<i32, String> = env.rows().await.into_iter().collect();
    for (id, path) in live.rows.lock().unwrap().iter() {
        if now.get(id) != Some(path) {
            report.overwritten += 1;
            report.problems.push(format!("row {id}: the live service wrote {path:?}, it now holds {:?}", now.get(id)));
        }
    }
    Ok(())
}
