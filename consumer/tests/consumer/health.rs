//! The database health brake against a real streaming replica (`scripts/local-services up
//! --with-replica`): its replay paused holds the fleet, resumed lets it go on.

use std::process::Stdio;

use super::*;

/// The test's database on the replica.
fn replica_url(env: &Env) -> String {
    let admin = std::env::var("PG_REPLICA_URL").expect("PG_REPLICA_URL (scripts/local-services up --with-replica)");
    let (server, _) = admin.rsplit_once('/').unwrap();
    let (_, database) = env.database_url.rsplit_once('/').unwrap();
    format!("{server}/{database}")
}

/// Pauses the replica's replay; resumes it when dropped, whatever happened in between.
struct ReplayPaused(sqlx::PgPool);

impl ReplayPaused {
    async fn start(replica: &sqlx::PgPool) -> ReplayPaused {
        sqlx::query("SELECT pg_wal_replay_pause()").execute(replica).await.unwrap();
        ReplayPaused(replica.clone())
    }

    async fn resume(self) {
        sqlx::query("SELECT pg_wal_replay_resume()").execute(&self.0).await.unwrap();
    }
}

impl Drop for ReplayPaused {
    fn drop(&mut self) {
        let url = std::env::var("PG_REPLICA_URL").unwrap();
        let psql = std::env::var("PSQL").unwrap_or_else(|_| "psql".into());
        let _ = std::process::Command::new(psql).args([&url, "-qc", "SELECT pg_wal_replay_resume()"]).output();
    }
}

async fn rewrites(env: &Env) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM avatar_migration_journal").fetch_one(&env.db).await.unwrap()
}

/// With the replica's replay paused mid-run, its lag passes MAX_REPLICA_LAG and the consumer
/// takes no more messages: once what was in flight is done, no row is rewritten while the
/// replica stays behind. Replay resumed, the consumer goes on by itself and finishes: every
/// row moved, the queue empty, nothing set aside. A live writer updating its own row of
/// `avatars` all along is never kept waiting.
#[tokio::test]
async fn a_lagging_replica_holds_the_rewrites_until_it_catches_up() {
    let env = Env::new().await;
    // The replica has the test's database once it has replayed its creation.
    wait_until("the replica has the test's database", Duration::from_secs(30), || async {
        sqlx::PgPool::connect(&replica_url(&env)).await.is_ok()
    })
    .await;
    let replica = sqlx::PgPool::connect(&replica_url(&env)).await.unwrap();
    let (keys, _) = env.seed_legacy(0..400).await;
    feed(&env).await;
    // Slow enough that the run is far from done when the replica stops.
    helpers::feeder(&env, &["throttle", "--rate", "40"]);
    let live = LiveWriter::start(&env).await;
    let url = replica_url(&env);
    let vars = [("REPLICA_URLS", url.as_str()), ("MAX_REPLICA_LAG", "1s"), ("CONCURRENCY", "4"), ("RUST_LOG", "info")];
    let mut child = consumer(&env, &vars).stdout(Stdio::null()).spawn().unwrap();
    let [held_log, healthy_log] = helpers::count_each(
        &mut child,
        ["the database is unhealthy: taking no messages", "the database is healthy again: receiving"],
    );
    wait_until("some rows rewritten", Duration::from_secs(60), || async { rewrites(&env).await >= 40 }).await;

    let paused = ReplayPaused::start(&replica).await;
    wait_until("the consumer holds", Duration::from_secs(30), || async {
        held_log.load(std::sync::atomic::Ordering::Relaxed) > 0
    })
    .await;
    // Held, and what was in flight finished: its report says so.
    wait_until("nothing in flight", Duration::from_secs(30), || async {
        let (in_flight, held): (i64, Option<String>) =
            sqlx::query_as("SELECT in_flight, held FROM avatar_migration_consumers").fetch_one(&env.db).await.unwrap();
        in_flight == 0 && held.is_some_and(|h| h.contains("MAX_REPLICA_LAG"))
    })
    .await;
    let held_at = rewrites(&env).await;
    assert!(held_at < keys.len() as i64, "the run was not over when the replica stopped: {held_at}");
    // The replica falls further behind (its newest report ages); nothing is rewritten meanwhile.
    wait_until("the replica 4 s behind", Duration::from_secs(30), || async {
        let lag: f64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM now() - max(reported_at))::float8 FROM avatar_migration_consumers",
        )
        .fetch_one(&replica)
        .await
        .unwrap();
        lag >= 4.0
    })
    .await;
    assert_eq!(rewrites(&env).await, held_at, "no row rewritten while the replica lags");

    paused.resume().await;
    let status = wait_exit(&mut child, Duration::from_secs(120)).await;
    assert!(status.success(), "{status:?}");
    assert!(healthy_log.load(std::sync::atomic::Ordering::Relaxed) > 0, "it said it went on");
    let legacy: i64 =
        sqlx::query_scalar("SELECT count(*) FROM avatars WHERE path LIKE 'image/%'").fetch_one(&env.db).await.unwrap();
    assert_eq!(legacy, 0, "every row moved");
    assert_eq!(env.depth(&env.queue_url).await, (0, 0), "the queue is empty");
    assert_eq!(rewrites(&env).await, keys.len() as i64);
    let (writes, slowest) = live.stop().await;
    assert!(writes > 50 && slowest < Duration::from_secs(2), "{writes} live writes, the slowest {slowest:?}");
}

/// The live service: one row of `avatars` of its own, updated every 20 ms, each write timed.
struct LiveWriter {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<(u64, Duration)>,
}

impl LiveWriter {
    async fn start(env: &Env) -> LiveWriter {
        let id: i32 = sqlx::query_scalar("INSERT INTO avatars (path) VALUES ('other/live.png') RETURNING id")
            .fetch_one(&env.db)
            .await
            .unwrap();
        let (db, stop) = (env.db.clone(), CancellationToken::new());
        let until = stop.clone();
        let task = tokio::spawn(async move {
            let (mut writes, mut slowest) = (0, Duration::ZERO);
            let mut every = tokio::time::interval(Duration::from_millis(20));
            while !until.is_cancelled() {
                every.tick().await;
                let started = std::time::Instant::now();
                sqlx::query("UPDATE avatars SET path = path WHERE id = $1").bind(id).execute(&db).await.unwrap();
                (writes, slowest) = (writes + 1, slowest.max(started.elapsed()));
            }
            (writes, slowest)
        });
        LiveWriter { stop, task }
    }

    /// Its writes, and the slowest.
    async fn stop(self) -> (u64, Duration) {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

/// A limit of the operator's own (DB_HEALTH_PROBE) passed at start-up holds the fleet before
/// its first message, and `feeder status` says what holds it; once the probe reads under its
/// limit, the consumer goes on by itself and finishes.
#[tokio::test]
async fn a_probe_over_its_limit_holds_the_fleet_from_the_start_and_status_says_why() {
    let env = Env::new().await;
    let (keys, _) = env.seed_legacy(0..50).await;
    feed(&env).await;
    sqlx::query("CREATE TABLE health_probe AS SELECT 10::float8 AS v").execute(&env.db).await.unwrap();
    let vars = [("DB_HEALTH_PROBE", "SELECT v FROM health_probe"), ("DB_HEALTH_PROBE_MAX", "5"), ("RUST_LOG", "info")];
    let mut child = consumer(&env, &vars).stdout(Stdio::null()).spawn().unwrap();
    let [held_log, healthy_log] = helpers::count_each(
        &mut child,
        ["the database is unhealthy: taking no messages", "the database is healthy again: receiving"],
    );
    wait_until("the fleet held and its report saying why", Duration::from_secs(30), || async {
        let held: Option<Option<String>> =
            sqlx::query_scalar("SELECT held FROM avatar_migration_consumers").fetch_optional(&env.db).await.unwrap();
        held_log.load(std::sync::atomic::Ordering::Relaxed) > 0 && held.flatten().is_some()
    })
    .await;
    assert_eq!(rewrites(&env).await, 0, "held before its first message");
    let (_, status) = helpers::feeder(&env, &["status"]);
    assert!(status.contains("HELD by the database's health on 1 consumers: DB_HEALTH_PROBE reads 10"), "{status}");

    sqlx::query("UPDATE health_probe SET v = 0").execute(&env.db).await.unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(60)).await;
    assert!(status.success(), "{status:?}");
    assert!(healthy_log.load(std::sync::atomic::Ordering::Relaxed) > 0);
    assert_eq!(rewrites(&env).await, keys.len() as i64, "every row moved once the probe read under its limit");
}

/// Runs `feeder <args>` with a probe over its limit until it says it waits, checks that
/// `feeder status` shows why, lets `before` check that nothing was done meanwhile, then brings
/// the probe under its limit and waits for the command to finish.
async fn held_then_released(env: &Env, args: &[&str], waiting_for: &'static str, before: impl AsyncFnOnce()) {
    sqlx::query("CREATE TABLE IF NOT EXISTS health_probe AS SELECT 10::float8 AS v").execute(&env.db).await.unwrap();
    sqlx::query("UPDATE health_probe SET v = 10").execute(&env.db).await.unwrap();
    let mut command = env
        .command("feeder")
        .args(args)
        .env("DB_HEALTH_PROBE", "SELECT v FROM health_probe")
        .env("DB_HEALTH_PROBE_MAX", "5")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let [waiting] = helpers::count_each(&mut command, [waiting_for]);
    wait_until("the command waiting", Duration::from_secs(30), || async {
        waiting.load(std::sync::atomic::Ordering::Relaxed) > 0
    })
    .await;
    let (_, status) = helpers::feeder(env, &["status"]);
    assert!(status.contains("HELD by the database's health on 1 consumers: DB_HEALTH_PROBE reads 10"), "{status}");
    before().await;
    sqlx::query("UPDATE health_probe SET v = 0").execute(&env.db).await.unwrap();
    let status = wait_exit(&mut command, Duration::from_secs(60)).await;
    assert!(status.success(), "{status:?}");
    let reports: i64 =
        sqlx::query_scalar("SELECT count(*) FROM avatar_migration_consumers").fetch_one(&env.db).await.unwrap();
    assert_eq!(reports, 0, "its report is removed at the end");
}

/// `feeder rollback` waits on the same limits before each page of rows it points back, and
/// says so in `feeder status`; once the probe reads under its limit, it goes on and finishes.
#[tokio::test]
async fn rollback_waits_while_the_database_is_unhealthy() {
    let env = Env::new().await;
    let (keys, _) = env.seed_legacy(0..30).await;
    feed(&env).await;
    drain(&env, &[]).await;
    let nothing_back = async || {
        let back: i64 = sqlx::query_scalar("SELECT count(rolled_back_at) FROM avatar_migration_journal")
            .fetch_one(&env.db)
            .await
            .unwrap();
        assert_eq!(back, 0, "nothing pointed back while the database is unhealthy");
    };
    held_then_released(&env, &["rollback"], "the database is unhealthy: feeder rollback", nothing_back).await;
    let legacy: i64 =
        sqlx::query_scalar("SELECT count(*) FROM avatars WHERE path LIKE 'image/%'").fetch_one(&env.db).await.unwrap();
    assert_eq!(legacy, keys.len() as i64, "every row pointed back once the database recovered");
}

/// `feeder cleanup --yes` waits on the same limits before each batch of tombstones and
/// deletes; once the probe reads under its limit, it deletes what is safely moved.
#[tokio::test]
async fn cleanup_waits_while_the_database_is_unhealthy() {
    let env = Env::new().await;
    let (keys, _) = env.seed_legacy(0..30).await;
    feed(&env).await;
    drain(&env, &[]).await;
    let (code, out) = helpers::feeder(&env, &["fence", "install"]);
    assert_eq!(code, Some(0), "{out}");
    let nothing_deleted = async || {
        assert_eq!(env.keys(&env.source_bucket).await.len(), keys.len(), "nothing deleted meanwhile");
    };
    held_then_released(&env, &["cleanup", "--yes"], "the database is unhealthy: feeder cleanup", nothing_deleted).await;
    assert_eq!(env.keys(&env.source_bucket).await, Vec::<String>::new(), "every moved legacy object deleted");
}
