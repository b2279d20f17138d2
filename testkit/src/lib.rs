//! Test helpers. Each test gets a database, two buckets and a queue (with a dead-letter queue)
//! of its own, named with a random suffix, on the real local services that
//! `scripts/local-services up` starts (PostgreSQL and MiniStack, or moto). Nothing here fakes a
//! service.
//!
//! The environment comes from `scripts/local-services env` (`scripts/test` sets it):
//! `PG_ADMIN_URL`, `AWS_ENDPOINT_URL`, `MOTO_ENDPOINT_URL`, AWS credentials and region.

pub mod bench;
pub mod cli;
pub mod faults;
pub mod grants;
pub mod proxy;
pub mod stack;
pub mod tcp;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_config::BehaviorVersion;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_sqs::types::QueueAttributeName;
use sqlx::PgPool;

pub use common::aws::{S3, Sqs};

const SCHEMA: &str = include_str!("../../add-ons/sre-challenge-addon1.sql");

/// A variable `scripts/local-services env` sets; its absence names the command that sets it.
pub fn required(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run the tests with scripts/test (it starts the local services)"))
}

/// A short random suffix: time, process and a counter, so parallel tests never collide.
pub fn suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mixed = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("{:012x}", mixed & 0xffff_ffff_ffff)
}

/// The path of one of the workspace's binaries, built beside the test executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap(); // target/<profile>/deps (a test) or target/<profile>
    if dir.ends_with("deps") {
        dir = dir.parent().unwrap();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests with scripts/test (cargo builds every binary)",
        path.display()
    );
    path
}

/// Polls `cond` until it holds; panics naming `what` after `timeout`. A wait on a condition,
/// never a fixed sleep.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub struct Env {
    pub id: String,
    /// Where S3 requests go.
    pub s3_endpoint: String,
    /// Where SQS requests go.
    pub sqs_endpoint: String,
    pub database_url: String,
    pub db: PgPool,
    pub s3: S3,
    /// What `s3` was built from.
    pub s3_config: aws_config::SdkConfig,
    pub sqs: Sqs,
    pub source_bucket: String,
    pub destination_bucket: String,
    pub queue_url: String,
    pub dlq_url: String,
}

impl Env {
    /// A fresh environment on MiniStack.
    pub async fn new() -> Env {
        Env::on(&required("AWS_ENDPOINT_URL")).await
    }

    /// A fresh environment on moto's server mode.
    pub async fn on_moto() -> Env {
        Env::on(&required("MOTO_ENDPOINT_URL")).await
    }

    /// A fresh environment with S3 on SeaweedFS (which enforces conditional writes) and SQS on
    /// MiniStack.
    pub async fn on_seaweedfs() -> Env {
        Env::with(&required("SEAWEEDFS_ENDPOINT_URL"), &required("AWS_ENDPOINT_URL"), 30).await
    }

    pub async fn on(endpoint: &str) -> Env {
        Env::with_visibility(endpoint, 30).await
    }

    pub async fn with_visibility(endpoint: &str, visibility_timeout: u32) -> Env {
        Env::with(endpoint, endpoint, visibility_timeout).await
    }

    pub async fn with(s3_endpoint: &str, sqs_endpoint: &str, visibility_timeout: u32) -> Env {
        let id = suffix();
        let admin_url = required("PG_ADMIN_URL");
        let admin = PgPool::connect(&admin_url).await.expect("connect to PG_ADMIN_URL");
        let database = format!("t_{id}");
        sqlx::raw_sql(&format!("CREATE DATABASE {database}")).execute(&admin).await.unwrap();
        admin.close().await;
        let database_url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{database}"),
            None => panic!("PG_ADMIN_URL has no database part"),
        };
        let db = PgPool::connect(&database_url).await.unwrap();
        let table = &SCHEMA[SCHEMA.find("CREATE TABLE").unwrap()..];
        let table = &table[..=table.find(';').unwrap()];
        sqlx::raw_sql(table).execute(&db).await.unwrap();

        let config = |endpoint: &str| aws_config::defaults(BehaviorVersion::latest()).endpoint_url(endpoint).load();
        let s3_config = config(s3_endpoint).await;
        let s3 = common::aws::s3_client(&s3_config, true, std::time::Duration::from_secs(30));
        let sqs = common::aws::sqs_client(&config(sqs_endpoint).await);
        let (source_bucket, destination_bucket) = (format!("src-{id}"), format!("dst-{id}"));
        for b in [&source_bucket, &destination_bucket] {
            s3.create_bucket().bucket(b).send().await.unwrap();
        }
        let dlq_url = sqs.create_queue().queue_name(format!("q-{id}-dlq")).send().await.unwrap().queue_url.unwrap();
        let dlq_arn = sqs
            .get_queue_attributes()
            .queue_url(&dlq_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap()[&QueueAttributeName::QueueArn]
            .clone();
        let redrive = serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"}).to_string();
        let queue_url = sqs
            .create_queue()
            .queue_name(format!("q-{id}"))
            .attributes(QueueAttributeName::VisibilityTimeout, visibility_timeout.to_string())
            .attributes(QueueAttributeName::RedrivePolicy, redrive)
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        Env {
            id,
            s3_endpoint: s3_endpoint.to_owned(),
            sqs_endpoint: sqs_endpoint.to_owned(),
            database_url,
            db,
            s3,
            s3_config,
            sqs,
            source_bucket,
            destination_bucket,
            queue_url,
            dlq_url,
        }
    }

    /// Prepares the database as the binaries do with this environment's settings (the default
    /// reference, its index built when missing: `MISSING_INDEX=build`).
    pub async fn prepare(&self) -> common::db::Targets {
        common::db::prepare(&self.db, &common::db::Schema::building_indexes()).await.expect("prepare the database")
    }

    /// The clients the feeder and the consumer run with in-process, on this environment (the
    /// database prepared).
    pub async fn clients(&self) -> common::setup::Clients {
        common::setup::Clients {
            s3: self.s3.clone(),
            s3_config: self.s3_config.clone(),
            sqs: self.sqs.clone(),
            db: self.db.clone(),
            targets: self.prepare().await,
        }
    }

    /// The key mapping of this environment's buckets (`image/` to `avatar/`).
    pub fn mapping(&self) -> common::keys::KeyMapping {
        common::keys::KeyMapping::new(
            self.source_bucket.clone(),
            "image/".parse().unwrap(),
            self.destination_bucket.clone(),
            "avatar/".parse().unwrap(),
        )
        .unwrap()
    }

    /// Environment variables for the feeder and consumer binaries.
    pub fn vars(&self) -> Vec<(String, String)> {
        [
            ("SOURCE_BUCKET_NAME", self.source_bucket.as_str()),
            ("DESTINATION_BUCKET_NAME", self.destination_bucket.as_str()),
            ("QUEUE_URL", self.queue_url.as_str()),
            ("DATABASE_URL", self.database_url.as_str()),
            ("AWS_ENDPOINT_URL_S3", self.s3_endpoint.as_str()),
            ("AWS_ENDPOINT_URL_SQS", self.sqs_endpoint.as_str()),
            ("S3_FORCE_PATH_STYLE", "true"),
            ("SOURCE_PREFIX", "image/"),
            ("DESTINATION_PREFIX", "avatar/"),
            // The take-home's schema has no index on avatars(path): the binaries build it.
            ("MISSING_INDEX", "build"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// Command-line style arguments (program name first) for the binaries' settings parsers.
    pub fn args(&self, program: &str) -> Vec<String> {
        let mut args = vec![program.to_owned()];
        for (k, v) in self.vars() {
            if k.starts_with("AWS_") {
                continue;
            }
            args.push(format!("--{}={v}", k.to_lowercase().replace('_', "-")));
        }
        args
    }

    pub async fn put(&self, bucket: &str, key: &str, body: &[u8]) {
        self.put_with(bucket, key, body, None, &[]).await
    }

    pub async fn put_with(
        &self,
        bucket: &str,
        key: &str,
        body: &[u8],
        content_type: Option<&str>,
        metadata: &[(&str, &str)],
    ) {
        let mut req = self.s3.put_object().bucket(bucket).key(key).body(ByteStream::from(body.to_vec()));
        if let Some(ct) = content_type {
            req = req.content_type(ct);
        }
        for (k, v) in metadata {
            req = req.metadata(*k, *v);
        }
        req.send().await.unwrap_or_else(|e| panic!("put s3://{bucket}/{key}: {e:?}"));
    }

    /// Uploads `body` in one multipart part: the same bytes as a plain upload, another ETag
    /// (`md5-of-md5s-1`), as on AWS after a multipart upload or a copy.
    pub async fn put_multipart(&self, bucket: &str, key: &str, body: &[u8]) {
        self.put_in_parts(bucket, key, body, body.len().max(1)).await
    }

    /// Uploads `body` in parts of `part_size` bytes (the last one shorter), as SDK uploaders
    /// do: the ETag is `md5-of-md5s-<parts>`.
    pub async fn put_in_parts(&self, bucket: &str, key: &str, body: &[u8], part_size: usize) {
        let upload = self.s3.create_multipart_upload().bucket(bucket).key(key).send().await.unwrap();
        let id = upload.upload_id().unwrap();
        let mut parts = Vec::new();
        let chunks: Vec<&[u8]> = if body.is_empty() { vec![body] } else { body.chunks(part_size).collect() };
        for (i, chunk) in chunks.into_iter().enumerate() {
            let n = i as i32 + 1;
            let part = self
                .s3
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(id)
                .part_number(n)
                .body(ByteStream::from(chunk.to_vec()))
                .send()
                .await
                .unwrap();
            parts.push(
                aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(n)
                    .set_e_tag(part.e_tag().map(str::to_owned))
                    .build(),
            );
        }
        let parts = aws_sdk_s3::types::CompletedMultipartUpload::builder().set_parts(Some(parts)).build();
        self.s3
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(id)
            .multipart_upload(parts)
            .send()
            .await
            .unwrap();
    }

    /// Multipart uploads begun in `bucket` and neither completed nor aborted.
    pub async fn open_uploads(&self, bucket: &str) -> Vec<String> {
        let out = self.s3.list_multipart_uploads().bucket(bucket).send().await.unwrap();
        out.uploads().iter().filter_map(|u| u.key().map(str::to_owned)).collect()
    }

    /// Puts many objects with the same body, 64 at a time.
    pub async fn put_many(&self, bucket: &str, keys: &[String], body: &[u8]) {
        for chunk in keys.chunks(64) {
            let puts = chunk.iter().map(|k| self.put(bucket, k, body));
            futures::future::join_all(puts).await;
        }
    }

    pub async fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        use common::aws::Call;
        match self.s3.get_object().bucket(bucket).key(key).send().await.call(|| format!("GET s3://{bucket}/{key}")) {
            Ok(out) => Some(out.body.collect().await.unwrap().into_bytes().to_vec()),
            Err(e) if e.is_not_found() => None,
            Err(e) => panic!("{e}"),
        }
    }

    /// Content type and user metadata of an object.
    pub async fn head(&self, bucket: &str, key: &str) -> (Option<String>, HashMap<String, String>) {
        let out = self.s3.head_object().bucket(bucket).key(key).send().await.unwrap();
        (out.content_type().map(str::to_owned), out.metadata().cloned().unwrap_or_default())
    }

    pub async fn exists(&self, bucket: &str, key: &str) -> bool {
        common::identity::head_etag(&self.s3, bucket, key).await.unwrap_or_else(|e| panic!("{e}")).is_some()
    }

    pub async fn keys(&self, bucket: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut pages = self.s3.list_objects_v2().bucket(bucket).into_paginator().send();
        while let Some(page) = pages.next().await {
            keys.extend(page.unwrap().contents().iter().filter_map(|o| o.key().map(str::to_owned)));
        }
        keys
    }

    /// Seeds legacy avatars `image/avatar-<i>.png` for i in `range`, each with one row;
    /// returns their keys and the rows' ids.
    pub async fn seed_legacy(&self, range: std::ops::Range<usize>) -> (Vec<String>, Vec<i32>) {
        let keys = legacy_keys(range);
        self.put_many(&self.source_bucket, &keys, b"png").await;
        let ids = self.insert_rows(&keys).await;
        (keys, ids)
    }

    /// One of the binaries (`feeder`, `consumer`), with this environment's settings.
    pub fn command(&self, program: &str) -> std::process::Command {
        let mut command = std::process::Command::new(binary(program));
        command.envs(self.vars());
        command
    }

    /// Inserts rows with these paths; returns their ids in order.
    pub async fn insert_rows(&self, paths: &[String]) -> Vec<i32> {
        sqlx::query_scalar("INSERT INTO avatars (path) SELECT * FROM UNNEST($1::text[]) RETURNING id")
            .bind(paths)
            .fetch_all(&self.db)
            .await
            .unwrap()
    }

    pub async fn path_of(&self, id: i32) -> String {
        sqlx::query_scalar("SELECT path FROM avatars WHERE id = $1").bind(id).fetch_one(&self.db).await.unwrap()
    }

    /// Rows as (id, path), by id.
    pub async fn rows(&self) -> Vec<(i32, String)> {
        sqlx::query_as("SELECT id, path FROM avatars ORDER BY id").fetch_all(&self.db).await.unwrap()
    }

    pub async fn count_rows_with_prefix(&self, prefix: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM avatars WHERE left(path, length($1)) = $1")
            .bind(prefix)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// (reason, subject) of every recorded failure, sorted.
    pub async fn failures(&self) -> Vec<(String, String)> {
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass('avatar_migration_failures')::text")
            .fetch_one(&self.db)
            .await
            .unwrap();
        if exists.is_none() {
            return Vec::new();
        }
        common::db::list_failures(&self.db).await.unwrap().into_iter().map(|f| (f.reason, f.subject)).collect()
    }

    pub async fn send_raw(&self, body: &str) {
        self.sqs.send_message().queue_url(&self.queue_url).message_body(body).send().await.unwrap();
    }

    /// (visible, in flight) messages of a queue.
    pub async fn depth(&self, queue_url: &str) -> (u64, u64) {
        let d = common::aws::queue_depth(&self.sqs, queue_url).await.unwrap();
        (d.visible, d.in_flight)
    }

    /// Receives and deletes every visible message; returns their bodies.
    pub async fn drain(&self) -> Vec<String> {
        let mut bodies = Vec::new();
        loop {
            let out = self
                .sqs
                .receive_message()
                .queue_url(&self.queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(0)
                .send()
                .await
                .unwrap();
            let messages = out.messages.unwrap_or_default();
            if messages.is_empty() && self.depth(&self.queue_url).await.0 == 0 {
                return bodies;
            }
            for m in messages {
                bodies.push(m.body.clone().unwrap_or_default());
                self.sqs
                    .delete_message()
                    .queue_url(&self.queue_url)
                    .receipt_handle(m.receipt_handle.unwrap())
                    .send()
                    .await
                    .unwrap();
            }
        }
    }
}

/// Keys of the objects the messages among `bodies` carry (one or several each).
/// The keys `image/avatar-<i>.png` for i in `range`, as [`Env::seed_legacy`] seeds them.
pub fn legacy_keys(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("image/avatar-{i}.png")).collect()
}

/// A legacy key's destination key (`image/` -> `avatar/`, the tests' prefixes).
pub fn modern(key: &str) -> String {
    key.replacen("image/", "avatar/", 1)
}

pub fn keys_of(bodies: &[String]) -> Vec<String> {
    bodies.iter().flat_map(|b| common::message::decode(b).unwrap()).map(|o| o.key).collect()
}

/// The variables `env.sample` names (set or commented out) and those `--help` (of the program
/// and of its subcommands) documents are
/// the same set, except the SDK's own and the log settings, which `--help` does not list.
pub fn assert_env_sample_matches_help(program: &str, subcommands: &[&str], sample_path: &str) {
    let sample = std::fs::read_to_string(sample_path).unwrap();
    let in_sample: std::collections::BTreeSet<String> = sample
        .lines()
        .map(|l| l.trim_start_matches('#').trim())
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_owned()))
        .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .filter(|k| !k.starts_with("AWS_") && k != "LOG_FORMAT")
        .collect();
    let mut help = String::new();
    for sub in std::iter::once(None).chain(subcommands.iter().map(Some)) {
        let out = std::process::Command::new(binary(program)).args(sub).arg("--help").output().unwrap();
        help.push_str(&String::from_utf8(out.stdout).unwrap());
    }
    let in_help: std::collections::BTreeSet<String> =
        help.split("[env: ").skip(1).map(|s| s.split(['=', ']']).next().unwrap().to_owned()).collect();
    assert_eq!(in_sample, in_help, "{sample_path} and `{program} --help` disagree");
}

/// The sums, by metric name, of a process's CloudWatch metric lines (`common::emf`) on
/// `stdout`, after checking that there is at least one and that each is in `namespace`.
pub fn emf_sums(stdout: &[u8], namespace: &str) -> std::collections::BTreeMap<String, u64> {
    let text = String::from_utf8_lossy(stdout);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.starts_with('{') && l.contains("\"_aws\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty(), "no metric line: {text}");
    let mut sums = std::collections::BTreeMap::new();
    for line in &lines {
        let metrics = &line["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(metrics["Namespace"], namespace, "{line}");
        for name in metrics["Metrics"].as_array().unwrap().iter().filter_map(|m| m["Name"].as_str()) {
            *sums.entry(name.to_owned()).or_default() += line[name].as_u64().unwrap();
        }
    }
    sums
}
