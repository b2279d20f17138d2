//! The feeder against the real local services: pagination, the checkpoint, setup errors.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Parser;
use feeder::{Clients, RunArgs, Settings};
use testkit::{Env, binary, keys_of, wait_until};
use tokio_util::sync::CancellationToken;

async fn clients(env: &Env) -> Clients {
    common::db::prepare(&env.db).await.unwrap();
    env.clients()
}

fn settings(env: &Env) -> Settings {
    Settings::try_parse_from(env.args("feeder")).unwrap()
}

fn run_args(page_size: i32) -> RunArgs {
    RunArgs { page_size, ..RunArgs::default() }
}

#[tokio::test]
async fn lists_every_page_and_nothing_outside_the_source_prefix() {
    let env = Env::new().await;
    let keys: Vec<String> = (0..2345).map(|i| format!("image/avatar-{i}.png")).collect();
    env.put_many(&env.source_bucket, &keys, b"png").await;
    for outside in ["imagex/avatar-1.png", "Image/avatar-1.png", "avatar/avatar-1.png", "image"] {
        env.put(&env.source_bucket, outside, b"png").await;
    }
    let summary =
        feeder::feed(&settings(&env), &run_args(1000), &clients(&env).await, CancellationToken::new()).await.unwrap();
    assert_eq!((summary.listed, summary.enqueued, summary.finished), (2345, 2345, true));
    let bodies = env.drain().await;
    let enqueued = keys_of(&bodies);
    assert_eq!(enqueued.len(), 2345, "each object once");
    assert_eq!(bodies.len(), 235, "ten objects per message (OBJECTS_PER_MESSAGE's default), pages of 1,000");
    assert_eq!(enqueued.into_iter().collect::<BTreeSet<_>>(), keys.into_iter().collect::<BTreeSet<_>>());
    let first = &common::message::decode(&bodies[0]).unwrap()[0];
    assert_eq!(first.size, 3);
    assert!(first.etag.len() > 2, "the listed ETag travels with the message");
}

#[tokio::test]
async fn a_finished_listing_is_not_repeated_unless_restarted() {
    let env = Env::new().await;
    let keys: Vec<String> = (0..25).map(|i| format!("image/{i}.png")).collect();
    env.put_many(&env.source_bucket, &keys, b"x").await;
    let (settings, clients) = (settings(&env), clients(&env).await);
    let first = feeder::feed(&settings, &run_args(10), &clients, CancellationToken::new()).await.unwrap();
    assert_eq!(first.listed, 25);
    let again = feeder::feed(&settings, &run_args(10), &clients, CancellationToken::new()).await.unwrap();
    assert_eq!((again.listed, again.finished), (0, true));
    let restart = RunArgs { restart: true, ..run_args(10) };
    let restarted = feeder::feed(&settings, &restart, &clients, CancellationToken::new()).await.unwrap();
    assert_eq!(restarted.listed, 25);
    assert_eq!(keys_of(&env.drain().await).len(), 50);
}

/// Starts the feeder with pages of 50 and a backlog limit of 50: it enqueues two pages, then
/// waits for room that never comes (no consumer runs), surely mid-listing. Returns once those
/// two pages are checkpointed.
async fn feeder_held_mid_listing(env: &Env, stdout: Stdio) -> std::process::Child {
    let child = Command::new(binary("feeder"))
        .envs(env.vars())
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

    let output = Command::new(binary("feeder")).envs(env.vars()).env("PAGE_SIZE", "50").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(&format!("listed {remaining} objects")), "the restart lists only what remained: {stdout}");
    assert!(stdout.contains(&format!("resumed after {last:?}")), "{stdout}");
    let enqueued: BTreeSet<String> = keys_of(&env.drain().await).into_iter().collect();
    assert_eq!(enqueued, keys.into_iter().collect::<BTreeSet<_>>(), "every object enqueued");
    let listing = common::db::listing_state(&env.db, &env.source_bucket, "image/").await.unwrap();
    assert!(listing.finished && !listing.feeder_running, "a finished feeder ends its lease: {listing:?}");
}

/// Runs the feeder with these variables changed; returns (exit code, stderr).
fn feeder_with(env: &Env, changes: &[(&str, Option<&str>)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(binary("feeder"));
    cmd.envs(env.vars());
    for (k, v) in changes {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn setup_problems_exit_2_with_a_line_that_names_them() {
    let env = Env::new().await;
    let (code, err) = feeder_with(&env, &[("QUEUE_URL", None)]);
    assert_eq!(code, Some(2));
    assert!(err.contains("QUEUE_URL"), "{err}");

    let (code, err) = feeder_with(&env, &[("SOURCE_BUCKET_NAME", Some("no-such-bucket-here"))]);
    assert_eq!(code, Some(2));
    assert!(err.contains("SOURCE_BUCKET_NAME") && err.contains("does not exist"), "{err}");

    let missing_queue = format!("{}-missing", env.queue_url);
    let (code, err) = feeder_with(&env, &[("QUEUE_URL", Some(&missing_queue))]);
    assert_eq!(code, Some(2));
    assert!(err.contains("QUEUE_URL") && err.contains("does not exist"), "{err}");

    let (code, err) =
        feeder_with(&env, &[("DATABASE_URL", Some("postgres://migrator:s3cr3t-pw@127.0.0.1:1/proddatabase"))]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot connect to the database at 127.0.0.1:1/proddatabase"), "{err}");
    assert!(!err.contains("s3cr3t-pw"), "the password never reaches the output: {err}");

    let (code, err) = feeder_with(&env, &[("DATABASE_URL", Some("mysql://u:s3cr3t-pw@h/db"))]);
    assert_eq!(code, Some(2));
    assert!(err.contains("DATABASE_URL") && !err.contains("s3cr3t-pw"), "{err}");

    let same_bucket =
        [("DESTINATION_BUCKET_NAME", Some(env.source_bucket.as_str())), ("DESTINATION_PREFIX", Some("image/new/"))];
    let (code, err) = feeder_with(&env, &same_bucket);
    assert_eq!(code, Some(2));
    assert!(err.contains("overlap"), "{err}");

    let (code, err) = feeder_with(&env, &[("AWS_REGION", None), ("AWS_DEFAULT_REGION", None)]);
    assert_eq!(code, Some(2));
    assert!(err.contains("AWS_REGION"), "{err}");

    // Nothing was half-done: no message sent, no checkpoint written.
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn env_sample_documents_every_setting() {
    testkit::assert_env_sample_matches_help(
        "feeder",
        &["verify", "throttle", "status", "cleanup"],
        concat!(env!("CARGO_MANIFEST_DIR"), "/env.sample"),
    );
}

#[tokio::test]
async fn settings_come_from_a_dot_env_file_and_a_malformed_one_is_named() {
    let env = Env::new().await;
    env.put(&env.source_bucket, "image/from-dotenv.png", b"png").await;
    let dir = std::env::temp_dir().join(format!("feeder-dotenv-{}", env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let dotenv: String = env.vars().iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    std::fs::write(dir.join(".env"), dotenv).unwrap();
    let mut cmd = Command::new(binary("feeder"));
    for (k, _) in env.vars() {
        cmd.env_remove(k);
    }
    let out = cmd.current_dir(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("listed 1 objects"));

    std::fs::write(dir.join(".env"), "QUEUE_URL='unterminated\n").unwrap();
    let out = Command::new(binary("feeder")).current_dir(&dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(".env"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_explains_settings_and_never_shows_the_database_url() {
    let out = Command::new(binary("feeder"))
        .arg("--help")
        .env("DATABASE_URL", "postgres://migrator:s3cr3t-pw@db/proddatabase")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(help.contains("[env: SOURCE_BUCKET_NAME") && help.contains("status") && help.contains("verify"), "{help}");
    assert!(!help.contains("s3cr3t-pw"), "{help}");
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

/// Runs the feeder through a proxy in front of S3 whose listing answers are replaced; returns
/// (exit code, stderr) and the checkpoint afterwards.
async fn feed_through(env: &Env, answer: testkit::proxy::Fault) -> (Option<i32>, String, common::db::Checkpoint) {
    use testkit::proxy::{FaultProxy, Rule, When};
    let proxy = FaultProxy::start(&env.s3_endpoint).await.unwrap();
    proxy.add(Rule::always(
        When { method: Some("GET"), contains: Some("list-type=2".into()), ..When::default() },
        answer,
    ));
    let out = tokio::process::Command::new(binary("feeder"))
        .envs(env.vars())
        .env("AWS_ENDPOINT_URL_S3", &proxy.url)
        .output()
        .await
        .unwrap();
    let cp = common::db::load_checkpoint(&env.db, &env.source_bucket, "image/").await.unwrap_or_default();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned(), cp)
}

/// The end of the listing is what S3 says, never a guess: an answer without `IsTruncated`, a
/// truncated page without a continuation token, or a listing that keeps failing is an error
/// (exit 1, naming the listing), and the checkpoint is never marked finished.
#[tokio::test]
async fn a_listing_that_does_not_say_it_ended_is_never_taken_as_finished() {
    use testkit::proxy::Fault;
    const NO_IS_TRUNCATED: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult \
        xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>b</Name><Prefix>image/</Prefix><KeyCount>1</KeyCount>\
        <MaxKeys>1000</MaxKeys><EncodingType>url</EncodingType><Contents><Key>image/a.png</Key><Size>3</Size>\
        <ETag>&quot;x&quot;</ETag></Contents></ListBucketResult>";
    const NO_TOKEN: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult \
        xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>b</Name><Prefix>image/</Prefix><KeyCount>1</KeyCount>\
        <MaxKeys>1000</MaxKeys><EncodingType>url</EncodingType><IsTruncated>true</IsTruncated><Contents>\
        <Key>image/a.png</Key><Size>3</Size><ETag>&quot;x&quot;</ETag></Contents></ListBucketResult>";
    for (answer, expected) in [
        (Fault::Answer { status: 200, body: NO_IS_TRUNCATED }, "does not say whether the listing goes on"),
        (Fault::Answer { status: 200, body: NO_TOKEN }, "gave no continuation token"),
        (Fault::Error { status: 500, code: "InternalError" }, "InternalError"),
    ] {
        let env = Env::new().await;
        env.put(&env.source_bucket, "image/a.png", b"png").await;
        common::db::prepare(&env.db).await.unwrap();
        let (code, stderr, cp) = feed_through(&env, answer).await;
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains(expected) && stderr.contains("listing s3://"), "{stderr}");
        assert!(!cp.finished, "never marked finished: {cp:?}");
    }
}

/// Keys that are awkward for splitting: a long common part, keys that are prefixes of other
/// keys, control characters, spaces and `+`, non-ASCII, the highest code point, nested `/`,
/// and most keys under one first character.
fn awkward_uneven_keys() -> Vec<String> {
    let mut keys: Vec<String> = (0..240).map(|i| format!("image/avatar-{i}.png")).collect();
    keys.extend((0..40).map(|i| format!("image/{i:x}")));
    keys.extend(
        [
            "image/a",
            "image/a/b",
            "image/ab",
            "image/a b",
            "image/a+b",
            "image/\u{1}ctl",
            "image/\r",
            "image/ünïcødé",
            "image/日本/x.png",
            "image/\u{10FFFF}",
            "image/\u{10FFFF}\u{10FFFF}\u{10FFFF}\u{10FFFF}\u{10FFFF}z",
            "image/~",
            "image/ ",
        ]
        .map(String::from),
    );
    keys.sort();
    keys.dedup();
    keys
}

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
    let mut child = Command::new(binary("feeder"))
        .envs(env.vars())
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

    let output = Command::new(binary("feeder"))
        .envs(env.vars())
        .env("PAGE_SIZE", "5")
        .env("OBJECTS_PER_MESSAGE", "1")
        .output()
        .unwrap();
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

/// A row of an inventory report: key, size, ETag, IsLatest, IsDeleteMarker.
type InventoryRow = (String, i64, &'static str, bool, bool);

/// Writes an S3 Inventory report of the source bucket into the destination bucket: one
/// gzipped CSV file per entry of `files` (rows of Bucket, Key, Size, ETag, IsLatest,
/// IsDeleteMarker, keys URL-encoded as AWS writes them), and its manifest; returns the
/// manifest's location. `corrupt`: the manifest gives the last file a wrong MD5.
async fn write_inventory(env: &Env, files: &[Vec<InventoryRow>], corrupt: bool) -> String {
    use md5::Digest;
    use std::io::Write;
    const ENCODE: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b'/');
    let mut entries = Vec::new();
    for (i, rows) in files.iter().enumerate() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        for (key, size, etag, latest, delete_marker) in rows {
            let key = percent_encoding::utf8_percent_encode(key, ENCODE);
            writeln!(gz, "\"{}\",\"{key}\",\"{size}\",\"{etag}\",\"{latest}\",\"{delete_marker}\"", env.source_bucket)
                .unwrap();
        }
        let bytes = gz.finish().unwrap();
        let mut md5 = format!("{:x}", md5::Md5::digest(&bytes));
        if corrupt && i == files.len() - 1 {
            md5 = "0".repeat(32);
        }
        let key = format!("inventory/data/part-{i}.csv.gz");
        env.put(&env.destination_bucket, &key, &bytes).await;
        entries.push(serde_json::json!({"key": key, "size": bytes.len(), "MD5checksum": md5}));
    }
    let manifest = serde_json::json!({
        "sourceBucket": env.source_bucket,
        "destinationBucket": format!("arn:aws:s3:::{}", env.destination_bucket),
        "version": "2016-11-30",
        "fileFormat": "CSV",
        "fileSchema": "Bucket, Key, Size, ETag, IsLatest, IsDeleteMarker",
        "files": entries,
    });
    env.put(&env.destination_bucket, "inventory/manifest.json", manifest.to_string().as_bytes()).await;
    format!("s3://{}/inventory/manifest.json", env.destination_bucket)
}

/// The rows of an inventory of these keys (latest versions, no delete markers).
fn inventory_rows(keys: &[String]) -> Vec<InventoryRow> {
    keys.iter().map(|k| (k.clone(), 3, "bff139fa05ac583f685a523ab3d110a0", true, false)).collect()
}

/// An S3 Inventory report instead of listing: every object of the report under the prefix
/// is enqueued once with its size and ETag (keys URL-decoded), nothing outside the prefix,
/// no delete marker and no older version; each data file ends with its own checkpoint.
#[tokio::test]
async fn an_inventory_report_is_read_instead_of_listing() {
    let env = Env::new().await;
    let keys = awkward_uneven_keys();
    let (first, second) = keys.split_at(100);
    let mut file_a = inventory_rows(first);
    file_a.push(("imagex/outside.png".into(), 3, "e", true, false));
    file_a.push(("image/deleted.png".into(), 0, "d", true, true));
    let mut file_b = inventory_rows(second);
    file_b.push(("image/old-version.png".into(), 3, "o", false, false));
    let manifest = write_inventory(&env, &[file_a, file_b], false).await;
    // Not one of these objects exists: the feeder must not list.
    let args = RunArgs { inventory: Some(manifest), objects_per_message: 1, ..run_args(7) };
    let summary = feeder::feed(&settings(&env), &args, &clients(&env).await, CancellationToken::new()).await.unwrap();
    assert_eq!((summary.listed, summary.finished), (keys.len() as u64, true));
    let bodies = env.drain().await;
    let mut enqueued = keys_of(&bodies);
    enqueued.sort();
    assert_eq!(enqueued, keys, "each key of the report under the prefix, once");
    let object = &common::message::decode(&bodies[0]).unwrap()[0];
    assert_eq!((object.size, object.etag.as_str()), (3, "\"bff139fa05ac583f685a523ab3d110a0\""));
    let parts = feeder::store::ranges::load_ranges(&env.db, &env.source_bucket, "image/").await.unwrap();
    let done: Vec<_> = parts.iter().map(|p| (p.inventory_file.as_deref(), p.rows_done, p.listed, p.finished)).collect();
    assert_eq!(
        done,
        vec![
            (Some("inventory/data/part-0.csv.gz"), 102, 100, true),
            (Some("inventory/data/part-1.csv.gz"), second.len() as i64 + 1, second.len() as i64, true)
        ]
    );
}

/// A data file whose MD5 is not the manifest's is an error naming it, and the listing is
/// never marked finished; a report of another bucket is refused before anything is sent.
#[tokio::test]
async fn a_corrupt_or_foreign_inventory_report_is_an_error() {
    let env = Env::new().await;
    let manifest = write_inventory(&env, &[inventory_rows(&["image/a.png".into()])], true).await;
    let (settings, clients) = (settings(&env), clients(&env).await);
    let args = RunArgs { inventory: Some(manifest), ..run_args(7) };
    let err = format!("{:#}", feeder::feed(&settings, &args, &clients, CancellationToken::new()).await.unwrap_err());
    assert!(err.contains("part-0.csv.gz") && err.contains("the file is corrupt"), "{err}");
    let cp = common::db::load_checkpoint(&env.db, &env.source_bucket, "image/").await.unwrap();
    assert!(!cp.finished, "{cp:?}");

    let other = Env::new().await;
    let foreign = write_inventory(&other, &[inventory_rows(&["image/a.png".into()])], false).await;
    let args = RunArgs { inventory: Some(foreign), restart: true, ..run_args(7) };
    let err = format!("{:#}", feeder::feed(&settings, &args, &clients, CancellationToken::new()).await.unwrap_err());
    assert!(err.contains("not SOURCE_BUCKET_NAME"), "{err}");
    assert_eq!(env.drain().await.len(), 0, "nothing sent");
}

/// A dry run lists (here in key ranges) and counts objects and messages, but sends nothing
/// and saves no checkpoint or range: a real run afterwards starts from the beginning.
#[tokio::test]
async fn a_dry_run_counts_and_sends_or_saves_nothing() {
    let env = Env::new().await;
    let keys = awkward_uneven_keys();
    env.put_many(&env.source_bucket, &keys, b"png").await;
    let (settings, clients) = (settings(&env), clients(&env).await);
    let dry = RunArgs { dry_run: true, list_ranges: 4, ..run_args(7) };
    let summary = feeder::feed(&settings, &dry, &clients, CancellationToken::new()).await.unwrap();
    let n = keys.len() as u64;
    assert_eq!((summary.listed, summary.enqueued, summary.finished), (n, 0, true));
    assert!(summary.messages >= n.div_ceil(10), "{summary:?}");
    assert_eq!(env.depth(&env.queue_url).await, (0, 0), "nothing sent");
    assert_eq!(common::db::load_checkpoint(&env.db, &env.source_bucket, "image/").await.unwrap(), Default::default());
    assert!(feeder::store::ranges::load_ranges(&env.db, &env.source_bucket, "image/").await.unwrap().is_empty());
    let real = RunArgs { dry_run: false, ..dry };
    let real = feeder::feed(&settings, &real, &clients, CancellationToken::new()).await.unwrap();
    assert_eq!((real.listed, real.messages), (n, summary.messages), "the same count, for real");
}

/// A checkpoint table made before the feeder's lease existed gets its column when a binary
/// prepares the database, and the lease works on it.
#[tokio::test]
async fn preparing_adds_the_lease_to_an_older_checkpoint_table() {
    let env = Env::new().await;
    common::db::prepare(&env.db).await.unwrap();
    sqlx::raw_sql("ALTER TABLE avatar_migration_checkpoint DROP COLUMN feeder_alive_until")
        .execute(&env.db)
        .await
        .unwrap();
    assert!(common::db::listing_state(&env.db, &env.source_bucket, "image/").await.is_err(), "no column yet");
    common::db::prepare(&env.db).await.unwrap();
    let lease = common::db::FeederLease::hold(&env.db, &env.source_bucket, "image/").await.unwrap();
    let held = common::db::listing_state(&env.db, &env.source_bucket, "image/").await.unwrap();
    assert!(held.feeder_running && held.started && !held.finished, "{held:?}");
    lease.end().await;
    let ended = common::db::listing_state(&env.db, &env.source_bucket, "image/").await.unwrap();
    assert!(!ended.feeder_running, "{ended:?}");
}
