//! The pipeline on SeaweedFS, an object store that enforces conditional writes
//! (`If-None-Match: *` on CopyObject), with SQS on MiniStack: nothing here may depend on an
//! emulator's leniency.

use std::collections::BTreeSet;

use testkit::Env;
use testkit::proxy::{Fault, FaultProxy, Rule, When};

use crate::helpers::{assert_no_probe_left, drain, etag, feed, legacy_keys, modern, put_multipart, stdout};

/// What both SeaweedFS tests seed: 40 plain legacy avatars with rows, awkward keys, a conflict
/// (other bytes at the destination) and a destination with the same bytes under another ETag.
async fn seed(env: &Env) -> Vec<String> {
    let mut keys = legacy_keys(0..40);
    keys.extend(["image/with space+plus%.png", "image/ctl-\u{1}-cr-\r.png", "image/ünïcødé.png"].map(String::from));
    env.put_many(&env.source_bucket, &keys, b"png").await;
    env.put(&env.source_bucket, "image/conflict.png", b"legacy bytes").await;
    env.put(&env.destination_bucket, "avatar/conflict.png", b"a newer upload").await;
    env.put(&env.source_bucket, "image/same.png", b"same bytes").await;
    put_multipart(env, &env.destination_bucket, "avatar/same.png", b"same bytes").await;
    let mut rows = keys.clone();
    rows.extend(["image/conflict.png".into(), "image/same.png".into()]);
    env.insert_rows(&rows).await;
    keys
}

/// A fresh environment on SeaweedFS, seeded ([`seed`]) and fed: the environment, the plain
/// keys, and the ETag of the conflicting destination.
async fn seeded_and_fed() -> (Env, Vec<String>, String) {
    let env = Env::on_seaweedfs().await;
    let keys = seed(&env).await;
    let conflict_etag = etag(&env, &env.destination_bucket, "avatar/conflict.png").await;
    feed(&env).await;
    (env, keys, conflict_etag)
}

/// The direct copy's requests (its user agent), not the SDK's.
fn direct_only() -> When {
    When { header: Some(("user-agent", "direct-copy")), ..When::default() }
}

async fn assert_end_state(env: &Env, keys: &[String], conflict_etag: &str) {
    for key in keys {
        assert_eq!(env.get(&env.destination_bucket, &modern(key)).await.as_deref(), Some(&b"png"[..]), "{key:?}");
    }
    let legacy: BTreeSet<String> =
        env.rows().await.into_iter().map(|(_, p)| p).filter(|p| p.starts_with("image/")).collect();
    assert_eq!(legacy, BTreeSet::from(["image/conflict.png".to_owned()]), "only the conflicting row stays legacy");
    assert_eq!(etag(env, &env.destination_bucket, "avatar/conflict.png").await, conflict_etag, "never overwritten");
    assert_eq!(env.get(&env.destination_bucket, "avatar/conflict.png").await.as_deref(), Some(&b"a newer upload"[..]));
    assert_eq!(env.failures().await, vec![("destination_conflict".to_owned(), "image/conflict.png".to_owned())]);
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
}

/// With the default `DESTINATION_CHECK=auto` the consumer finds at start-up that SeaweedFS
/// refuses a conditional copy onto an existing key, so it copies first (no HEAD per object);
/// its probe objects are gone afterwards, and the conflict is still never overwritten.
#[tokio::test]
async fn the_pipeline_works_on_seaweedfs() {
    let (env, keys, conflict_etag) = seeded_and_fed().await;
    let out = drain(&env, &[("CONCURRENCY", "8"), ("RUST_LOG", "info,aws=warn")]).await;
    assert!(stdout(&out).contains("already present 1"), "{}", stdout(&out));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("DESTINATION_CHECK=auto: the server refuses a conditional copy"), "{log}");
    assert_end_state(&env, &keys, &conflict_etag).await;
    assert_no_probe_left(&env).await;
}

/// Copy first, look later (`DESTINATION_CHECK=on-conflict`): destinations that already exist
/// are met by the copy itself, and the server's 412 keeps them intact; the consumer then
/// compares (same bytes: done; other bytes: conflict), as when a live upload lands between a
/// check and the copy. Every copy through the SDK here (`DIRECT_COPY=false`).
#[tokio::test]
async fn the_servers_412_keeps_a_destination_the_copy_meets() {
    let (env, keys, conflict_etag) = seeded_and_fed().await;
    let out = drain(&env, &[("DESTINATION_CHECK", "on-conflict"), ("DIRECT_COPY", "false")]).await;
    assert!(stdout(&out).contains(&format!("copied {}, already present 1", keys.len())), "{}", stdout(&out));
    assert!(!stdout(&out).contains("direct copies"), "{}", stdout(&out));
    assert_end_state(&env, &keys, &conflict_etag).await;
}

/// SeaweedFS checks signatures, as AWS does: a consumer whose secret is wrong stops at
/// start-up with exit code 2 and a line naming the refusal and what to check, never the
/// secret, and moves nothing.
#[tokio::test]
async fn a_wrong_secret_is_refused_before_anything_moves() {
    let env = Env::on_seaweedfs().await;
    seed(&env).await;
    feed(&env).await;
    let wrong = crate::helpers::consumer(&env, &[("AWS_SECRET_ACCESS_KEY", "not-the-secret-1234")]);
    let out = tokio::process::Command::from(wrong).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("denied: check the credentials"), "{stderr}");
    assert!(!stderr.contains("not-the-secret-1234"), "{stderr}");
    assert_eq!(env.count_rows_with_prefix("avatar/").await, 0, "nothing moved");
    assert!(
        env.keys(&env.destination_bucket).await.iter().all(|k| k == "avatar/conflict.png" || k == "avatar/same.png")
    );
}

/// The summary's count of copies the direct path decided and of those it sent again through
/// the SDK.
fn direct_counts(out: &std::process::Output) -> (u64, u64) {
    let text = stdout(out);
    let line = text.lines().find(|l| l.starts_with("consumer: direct copies ")).unwrap_or_else(|| panic!("{text}"));
    let numbers: Vec<u64> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
    (numbers[0], numbers[1])
}

/// `DIRECT_COPY`: every copy, awkward keys included, and every 412 (the conflict, the
/// destination with the same bytes) is decided by the direct path, whose signatures SeaweedFS
/// checks; none needs the SDK, and the end state is the SDK's.
#[tokio::test]
async fn direct_copies_are_signed_as_s3_checks_them() {
    let (env, keys, conflict_etag) = seeded_and_fed().await;
    let out = drain(&env, &[("DIRECT_COPY", "true"), ("DESTINATION_CHECK", "on-conflict")]).await;
    assert!(stdout(&out).contains(&format!("copied {}, already present 1", keys.len())), "{}", stdout(&out));
    assert_eq!(direct_counts(&out), (keys.len() as u64 + 3, 0), "{}", stdout(&out));
    assert_end_state(&env, &keys, &conflict_etag).await;
}

/// A direct path that fails where the SDK succeeds (S3 refusing a signature this path got
/// wrong; no answer at all, as with a TLS set-up or a proxy it cannot use) is found at
/// start-up by one probe copy sent both ways: every copy of the run then goes through the
/// SDK, everything moves, nothing is set aside, no secret is logged.
#[tokio::test]
async fn a_direct_path_failing_at_start_up_is_off_for_the_run() {
    for fault in [Fault::Error { status: 403, code: "SignatureDoesNotMatch" }, Fault::Reset] {
        let (env, keys, conflict_etag) = seeded_and_fed().await;
        let s3 = FaultProxy::start(&env.s3_endpoint).await.unwrap();
        s3.add(Rule::always(direct_only(), fault.clone()));
        let vars = [("AWS_ENDPOINT_URL_S3", s3.url.as_str()), ("RUST_LOG", "warn,consumer=debug")];
        let out = drain(&env, &vars).await;
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains("DIRECT_COPY off for this run"), "{fault:?}: {log}");
        assert!(!log.contains("Signature=") && !log.contains("Credential="), "{log}");
        assert_eq!(direct_counts(&out), (0, 1), "{fault:?}: only the probe went that way");
        assert_eq!(s3.injected(), 1);
        assert!(stdout(&out).contains(&format!("copied {}, already present 1", keys.len())), "{}", stdout(&out));
        assert_end_state(&env, &keys, &conflict_etag).await;
        assert_no_probe_left(&env).await;
    }
}

/// A burst of dropped connections on direct copies mid-run, where the SDK's copies succeed:
/// after three in a row the path turns itself off, with a warning; after its cool-down one
/// copy tries it again, is answered, and the path is back on for the rest of the run.
#[tokio::test]
async fn a_direct_path_turned_off_by_a_burst_of_resets_comes_back() {
    let (env, keys, conflict_etag) = seeded_and_fed().await;
    let s3 = FaultProxy::start(&env.s3_endpoint).await.unwrap();
    // The run's own copies (their source is under image/), not the start-up probe's.
    let mut burst = Rule::always(When { contains: Some("image".into()), ..direct_only() }, Fault::Reset);
    burst.remaining = Some(consumer::copy::direct::BREAKER.into());
    s3.add(burst);
    // Copies through the SDK take a while, so that the cool-down ends before the work does.
    let sdk = When { contains: Some("image".into()), header: Some(("user-agent", "aws-sdk-rust")), ..When::default() };
    s3.add(Rule::always(sdk, Fault::Delay(std::time::Duration::from_millis(400))));
    let vars = [
        ("AWS_ENDPOINT_URL_S3", s3.url.as_str()),
        ("DESTINATION_CHECK", "on-conflict"),
        ("CONCURRENCY", "1"),
        ("RUST_LOG", "warn,consumer=info"),
    ];
    let out = drain(&env, &vars).await;
    let log = String::from_utf8_lossy(&out.stderr);
    let (off, on) = (log.find("DIRECT_COPY turned off for 10s"), log.find("DIRECT_COPY back on"));
    assert!(off.is_some() && on > off, "{log}");
    let (decided, handed_over) = direct_counts(&out);
    assert_eq!(
        handed_over,
        u64::from(consumer::copy::direct::BREAKER),
        "the burst; copies while off are not sent this way"
    );
    assert!(decided > 1, "copies decided directly again, besides the start-up probe: {decided}");
    assert!(stdout(&out).contains(&format!("copied {}, already present 1", keys.len())), "{}", stdout(&out));
    assert_end_state(&env, &keys, &conflict_etag).await;
}

/// A server that takes a direct copy and never answers holds neither the copy nor its
/// message: past `S3_REQUEST_TIMEOUT` the same copy goes through the SDK, and the run ends.
#[tokio::test]
async fn a_hung_direct_copy_goes_through_the_sdk_after_its_timeout() {
    let (env, keys, conflict_etag) = seeded_and_fed().await;
    let s3 = FaultProxy::start(&env.s3_endpoint).await.unwrap();
    let mut hang = Rule::always(When { contains: Some("image".into()), ..direct_only() }, Fault::Hang);
    hang.remaining = Some(1);
    s3.add(hang);
    let vars = [
        ("AWS_ENDPOINT_URL_S3", s3.url.as_str()),
        ("DESTINATION_CHECK", "on-conflict"),
        ("S3_REQUEST_TIMEOUT", "2s"),
        ("RUST_LOG", "warn,consumer=info"),
    ];
    let out = drain(&env, &vars).await;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("no whole answer within 2s"), "{log}");
    assert_eq!(s3.injected(), 1);
    assert_eq!(direct_counts(&out), (keys.len() as u64 + 2, 1), "{}", stdout(&out));
    assert!(stdout(&out).contains(&format!("copied {}, already present 1", keys.len())), "{}", stdout(&out));
    assert_end_state(&env, &keys, &conflict_etag).await;
}

/// Direct copies go through the proxy the environment names, as the SDK's requests do
/// (`HTTP_PROXY`; `HTTPS_PROXY` for an https endpoint), and not for a host `NO_PROXY` names.
/// The proxy here forwards to SeaweedFS, reached as `localhost`; SQS, at 127.0.0.1, is left
/// out of it by `NO_PROXY`.
#[tokio::test]
async fn direct_copies_follow_the_proxy_settings_of_the_environment() {
    for proxied in [true, false] {
        let (env, keys, conflict_etag) = seeded_and_fed().await;
        let proxy = FaultProxy::start(&env.s3_endpoint).await.unwrap();
        let endpoint = env.s3_endpoint.replace("127.0.0.1", "localhost");
        let no_proxy = if proxied { "127.0.0.1" } else { "127.0.0.1,localhost" };
        let vars = [
            ("AWS_ENDPOINT_URL_S3", endpoint.as_str()),
            ("HTTP_PROXY", proxy.url.as_str()),
            ("NO_PROXY", no_proxy),
            ("DESTINATION_CHECK", "on-conflict"),
        ];
        let out = drain(&env, &vars).await;
        assert_eq!(direct_counts(&out), (keys.len() as u64 + 3, 0), "{}", stdout(&out));
        let copies = proxy.forwarded_by_kind().get("S3 copy").copied().unwrap_or_default();
        if proxied {
            assert!(copies >= keys.len() as u64 + 3, "every copy through the proxy: {copies}");
        } else {
            assert_eq!(proxy.forwarded(), 0, "NO_PROXY names the host");
        }
        assert_end_state(&env, &keys, &conflict_etag).await;
    }
}

/// Whatever else a direct copy meets (S3's late error in a 200, a 5xx, an answer lost after
/// the copy took effect), the same copy goes through the SDK, whose conditional copy and 412
/// keep every guarantee: every object moved once, the conflict kept.
#[tokio::test]
async fn a_direct_copy_that_is_not_clearly_answered_is_sent_again_through_the_sdk() {
    let (env, keys, conflict_etag) = seeded_and_fed().await;
    let s3 = FaultProxy::start(&env.s3_endpoint).await.unwrap();
    // "/avatar-1.png", which "/avatar-11.png" does not contain.
    let direct = |key: &str| When { contains: Some(key.replacen("image", "", 1)), ..direct_only() };
    let late_error = "<Error><Code>InternalError</Code><Message>We encountered an internal error</Message></Error>";
    s3.add(Rule::always(direct(&keys[0]), Fault::Answer { status: 200, body: late_error }));
    s3.add(Rule::always(direct(&keys[1]), Fault::Error { status: 500, code: "InternalError" }));
    s3.add(Rule::always(direct(&keys[2]), Fault::ResetAfter));
    let vars = [("AWS_ENDPOINT_URL_S3", s3.url.as_str()), ("DESTINATION_CHECK", "on-conflict")];
    let out = drain(&env, &vars).await;
    assert_eq!(s3.injected(), 3, "each fault met once: afterwards the SDK sent those copies");
    assert_eq!(direct_counts(&out), (keys.len() as u64, 3), "{}", stdout(&out));
    // The copy whose answer was lost took effect: the SDK's copy then met the server's 412.
    assert!(stdout(&out).contains(&format!("copied {}, already present 2", keys.len() - 1)), "{}", stdout(&out));
    assert_end_state(&env, &keys, &conflict_etag).await;
}

/// S3 asking the direct path to slow down (503 SlowDown) is answered by the pace
/// (`consumer::pace`) and the copy is tried again the same way: every copy is still decided
/// directly, none is handed to the SDK, and the summary counts the slow-downs.
#[tokio::test]
async fn a_slow_down_on_the_direct_path_is_paced_and_tried_again_directly() {
    let (env, keys, conflict_etag) = seeded_and_fed().await;
    let s3 = FaultProxy::start(&env.s3_endpoint).await.unwrap();
    let mut slow_down = Rule::always(
        When { contains: Some("image".into()), ..direct_only() },
        Fault::Error { status: 503, code: "SlowDown" },
    );
    slow_down.remaining = Some(5);
    s3.add(slow_down);
    let vars = [("AWS_ENDPOINT_URL_S3", s3.url.as_str()), ("DESTINATION_CHECK", "on-conflict")];
    let out = drain(&env, &vars).await;
    assert_eq!(direct_counts(&out), (keys.len() as u64 + 3, 0), "{}", stdout(&out));
    assert_eq!(s3.injected(), 5);
    assert!(stdout(&out).contains("copies S3 asked to slow down 5"), "{}", stdout(&out));
    assert_end_state(&env, &keys, &conflict_etag).await;
}

/// Over TLS, as on AWS: SeaweedFS's HTTPS port, its certificate trusted through
/// `SSL_CERT_FILE`, which the SDK's transport reads for its trusted roots and the direct
/// copy, on the same transport, reads too. Every copy and 412 is still decided directly.
#[tokio::test]
async fn direct_copies_go_over_tls_with_the_sdks_trusted_roots() {
    let (env, keys, conflict_etag) = seeded_and_fed().await;
    let (https, ca) = (testkit::required("SEAWEEDFS_TLS_ENDPOINT_URL"), testkit::required("SEAWEEDFS_CA_FILE"));
    assert!(https.starts_with("https://"), "{https}");
    let vars =
        [("AWS_ENDPOINT_URL_S3", https.as_str()), ("SSL_CERT_FILE", ca.as_str()), ("DESTINATION_CHECK", "on-conflict")];
    let out = drain(&env, &vars).await;
    assert_eq!(direct_counts(&out), (keys.len() as u64 + 3, 0), "{}", stdout(&out));
    assert!(stdout(&out).contains(&format!("copied {}, already present 1", keys.len())), "{}", stdout(&out));
    assert_end_state(&env, &keys, &conflict_etag).await;
}

/// The read-only identity of the local SeaweedFS: it may read and list, every write is refused
/// with S3's own 403 AccessDenied (a role missing its s3:PutObject grant).
fn read_only() -> [(&'static str, String); 2] {
    [
        ("AWS_ACCESS_KEY_ID", testkit::required("SEAWEEDFS_READ_ONLY_KEY")),
        ("AWS_SECRET_ACCESS_KEY", testkit::required("SEAWEEDFS_READ_ONLY_SECRET")),
    ]
}

/// A destination that refuses every write, found at start-up: the write probe's refusal exits
/// 2 with a line naming the destination and the grant, before any message is received.
#[tokio::test]
async fn a_destination_refusing_writes_is_found_at_start_up() {
    let (env, _, _) = seeded_and_fed().await;
    let depth = env.depth(&env.queue_url).await;
    let creds = read_only();
    let vars: Vec<(&str, &str)> = creds.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = tokio::process::Command::from(crate::helpers::consumer(&env, &vars)).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("DESTINATION_BUCKET_NAME") && stderr.contains("s3:PutObject"), "{stderr}");
    assert!(stderr.contains("AccessDenied"), "{stderr}");
    assert_eq!(env.depth(&env.queue_url).await, depth, "no message received");
    assert_eq!(env.failures().await, vec![], "nothing recorded");
}

/// A destination that refuses every copy mid-run (no start-up probe here): the consumer stops
/// within seconds with exit 1 and a line naming the refusal and the grants to check, records
/// at most a few refusals, rewrites no row and deletes no message. Once the grant is back (the
/// full identity), a rerun moves everything and leaves no refusal record standing.
#[tokio::test]
async fn refusals_in_a_row_stop_the_consumer_and_a_rerun_after_the_fix_finishes() {
    let (env, keys, conflict_etag) = seeded_and_fed().await;
    let (visible, _) = env.depth(&env.queue_url).await;
    let creds = read_only();
    let mut vars: Vec<(&str, &str)> = creds.iter().map(|(k, v)| (*k, v.as_str())).collect();
    vars.extend([("DESTINATION_CHECK", "before-copy"), ("SHUTDOWN_GRACE_SECONDS", "5"), ("VISIBILITY_TIMEOUT", "2")]);
    let begun = std::time::Instant::now();
    let out = tokio::process::Command::from(crate::helpers::consumer(&env, &vars)).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(begun.elapsed() < std::time::Duration::from_secs(30), "stopped within seconds: {:?}", begun.elapsed());
    assert!(stderr.contains("objects in a row were refused (access_denied)"), "{stderr}");
    assert!(stderr.contains("s3:PutObject") && stderr.contains("AccessDenied"), "{stderr}");
    let recorded: Vec<_> =
        env.failures().await.into_iter().filter(|(reason, _)| reason != "destination_conflict").collect();
    assert!(
        !recorded.is_empty()
            && recorded.len() <= consumer::refusals::RECORDED_PER_STREAK as usize
            && recorded.iter().all(|(reason, _)| reason == "access_denied"),
        "a few refusals recorded: {recorded:?}"
    );
    let moved: Vec<String> =
        env.rows().await.into_iter().map(|(_, p)| p).filter(|p| p.starts_with("avatar/")).collect();
    assert!(
        moved.iter().all(|p| p == "avatar/same.png"),
        "no copy, so no row rewritten but where the bytes were already there: {moved:?}"
    );
    let (now_visible, in_flight) = env.depth(&env.queue_url).await;
    assert_eq!(now_visible + in_flight, visible, "every message kept");

    crate::helpers::drain(&env, &[("VISIBILITY_TIMEOUT", "2")]).await;
    assert_end_state(&env, &keys, &conflict_etag).await;
}
