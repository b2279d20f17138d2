//! The production service, played during the run: a writer that uploads avatars and repoints
//! rows at them (timing every row write), and a sampler that checks I1 on random rows.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::seed::modern;
use crate::Env;

/// The live service: uploads new avatars and repoints rows at them, uploads avatars at
/// destinations the migration has not reached yet, inserts rows; times every row write.
pub(super) struct Live {
    /// Row id -> the path the live service last wrote.
    pub rows: Mutex<HashMap<i32, String>>,
    /// Destination key -> the bytes the live service uploaded there.
    pub uploads: Mutex<HashMap<String, Vec<u8>>>,
    /// Row-write latencies in microseconds (writes while PostgreSQL restarts are left out).
    pub latencies_us: Mutex<Vec<u64>>,
    /// The row the live transaction holds (never written by the writer meanwhile).
    pub held_row: AtomicI64,
    /// PostgreSQL is being restarted: writes fail or wait for reasons of their own.
    pub pg_restarting: AtomicBool,
}

impl Live {
    /// The row writes' latency: (max, p99), in milliseconds.
    pub fn write_latencies_ms(&self) -> (u64, u64) {
        let mut latencies = self.latencies_us.lock().unwrap().clone();
        latencies.sort_unstable();
        let max = latencies.last().copied().unwrap_or(0).div_ceil(1000);
        let p99 = latencies.get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1)));
        (max, p99.copied().unwrap_or(0).div_ceil(1000))
    }
}

/// `seeded_destinations` are the destinations seeded before the run (conflicts, same bytes):
/// a live upload never lands on one, or the check of what the migration left there would
/// expect the seeded bytes and find the live ones.
pub(super) async fn live_writer(
    env: Arc<Env>,
    live: Arc<Live>,
    legacy_with_rows: Vec<String>,
    seeded_destinations: HashSet<String>,
    stop: CancellationToken,
) {
    let max_id: i32 = sqlx::query_scalar("SELECT max(id) FROM avatars").fetch_one(&env.db).await.unwrap_or(1);
    let mut n = 0u64;
    while !stop.is_cancelled() {
        n += 1;
        let key = format!("avatar/live-{n:06}.png");
        env.put(&env.destination_bucket, &key, format!("live upload {n}").as_bytes()).await;
        let id = fastrand::i32(1..=max_id);
        if i64::from(id) != live.held_row.load(Ordering::SeqCst) {
            let started = Instant::now();
            let written =
                sqlx::query("UPDATE avatars SET path = $1 WHERE id = $2").bind(&key).bind(id).execute(&env.db).await;
            if written.is_ok() {
                live.rows.lock().unwrap().insert(id, key.clone());
                if !live.pg_restarting.load(Ordering::SeqCst) {
                    live.latencies_us.lock().unwrap().push(started.elapsed().as_micros() as u64);
                }
            }
        }
        if n.is_multiple_of(10) {
            // A new avatar uploaded at a destination the migration has not reached: far enough
            // past the feeder's checkpoint that no message for it can exist yet.
            let cp = common::db::load_checkpoint(&env.db, &env.source_bucket, "image/").await.unwrap_or_default();
            let listed = cp.last_key.unwrap_or_default();
            let first = legacy_with_rows.partition_point(|k| *k <= listed) + 500;
            if !cp.finished && first < legacy_with_rows.len() {
                let target = modern(&legacy_with_rows[fastrand::usize(first..legacy_with_rows.len())]);
                let new = !seeded_destinations.contains(&target) && !live.uploads.lock().unwrap().contains_key(&target);
                if new {
                    let bytes = format!("a live upload at {target}").into_bytes();
                    env.put(&env.destination_bucket, &target, &bytes).await;
                    live.uploads.lock().unwrap().insert(target, bytes);
                }
            }
        }
        if n.is_multiple_of(25) {
            let _ = sqlx::query("INSERT INTO avatars (path) VALUES ($1)").bind(&key).execute(&env.db).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// I1: reads random rows and HEADs what they name; returns (samples, violations).
pub(super) async fn sampler(env: Arc<Env>, missing: HashSet<String>, stop: CancellationToken) -> (u64, Vec<String>) {
    let (mut samples, mut violations) = (0u64, Vec::new());
    while !stop.is_cancelled() {
        let Ok(rows) = sqlx::query_scalar::<_, String>("SELECT path FROM avatars ORDER BY random() LIMIT 20")
            .fetch_all(&env.db)
            .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await; // PostgreSQL restarting
            continue;
        };
        let checks = rows.into_iter().filter(|p| !missing.contains(p)).map(|path| {
            let env = &env;
            async move {
                let bucket = if path.starts_with("avatar/") { &env.destination_bucket } else { &env.source_bucket };
                (common::identity::head_etag(&env.s3, bucket, &path).await, path)
            }
        });
        for (head, path) in futures::future::join_all(checks).await {
            match head {
                Ok(Some(_)) => samples += 1,
                Ok(None) => {
                    samples += 1;
                    violations.push(path);
                }
                Err(_) => {} // the check itself failed: no sample
            }
        }
    }
    (samples, violations)
}
