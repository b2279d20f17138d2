//! `feeder plan` against the run it plans: its request counts are the ones the feeder and the
//! consumers then make.

use testkit::proxy::{FaultProxy, Seen};

use super::*;
use helpers::last_json;

/// What S3 bills a request as: `write` (PUT, COPY, POST, LIST) or `read` (GET, HEAD, the
/// rest); DELETE is free.
fn s3_class(seen: &Seen) -> Option<&'static str> {
    match seen.method.as_str() {
        _ if seen.sqs.is_some() => None,
        "PUT" | "POST" => Some("write"),
        "GET" if seen.target.contains("list-type=2") => Some("write"),
        "GET" | "HEAD" => Some("read"),
        _ => None,
    }
}

/// The plan's request counts, from a full listing, are within 5 % of the requests the feeder
/// and a consumer make for the same objects: a listing per page, a destination listing per
/// message (`before-copy`), a copy per object, the requests of two copies in parts, one send
/// per ten messages.
#[tokio::test]
async fn the_plan_counts_the_requests_the_run_makes() {
    let env = Env::new().await;
    env.seed_legacy(0..1200).await;
    let big = vec![7u8; 6 << 20];
    let large: Vec<String> = (1..=2).map(|i| format!("image/large-{i}.bin")).collect();
    for key in &large {
        env.put(&env.source_bucket, key, &big).await;
    }
    env.insert_rows(&large).await;
    let copy =
        [("MULTIPART_THRESHOLD", "5242880"), ("MULTIPART_PART_SIZE", "5242880"), ("DESTINATION_CHECK", "before-copy")];

    let out = env
        .command("feeder")
        .args(["plan", "--full", "--json", "--destination-check", "before-copy"])
        .envs(copy)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}{}", String::from_utf8_lossy(&out.stderr));
    let plan = last_json(&printed);
    assert_eq!((plan["objects"].as_u64(), plan["source"].as_str()), (Some(1202), Some("full listing")), "{printed}");
    let planned = &plan["requests"];
    let field = |name: &str| planned[name].as_u64().unwrap();
    assert_eq!(field("s3_multipart"), 2 * (2 + 2), "two copies in two parts each: {planned}");
    let planned_write = field("s3_list") + field("s3_lookahead_list") + field("s3_copy") + field("s3_multipart");
    let planned_s3 = planned_write + field("s3_head");

    // A sample: a few objects looked at, the count from the rows, the requests scaled to it.
    let out = env.command("feeder").args(["plan", "--sample", "100", "--json"]).envs(copy).output().unwrap();
    let sampled = last_json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!((sampled["objects"].as_u64(), sampled["source"].as_str()), (Some(1202), Some("sample")), "{sampled}");
    assert!(sampled["looked_at"].as_u64().unwrap() <= 116, "{sampled}");
    assert!(sampled["objects_from"].as_str().unwrap().contains("rows"), "{sampled}");
    let copies = sampled["requests"]["s3_copy"].as_u64().unwrap();
    assert!((1100..=1202).contains(&copies), "copies scaled to the rows: {sampled}");

    let proxy = FaultProxy::start(&env.s3_endpoint).await.unwrap();
    proxy.record();
    let via = [("AWS_ENDPOINT_URL_S3", proxy.url.as_str()), ("AWS_ENDPOINT_URL_SQS", proxy.url.as_str())];
    let fed = tokio::process::Command::from(env.command("feeder")).envs(via).output().await.unwrap();
    assert!(fed.status.success(), "{}", String::from_utf8_lossy(&fed.stderr));
    drain(&env, &[&via[..], &copy[..]].concat()).await;
    assert_eq!(env.keys(&env.destination_bucket).await.len(), 1202, "the run moved everything");

    let seen = proxy.seen();
    let count = |f: &dyn Fn(&Seen) -> bool| seen.iter().filter(|s| f(s)).count() as u64;
    let made_write = count(&|s| s3_class(s) == Some("write"));
    let made_s3 = count(&|s| s3_class(s).is_some());
    let sends = count(&|s| s.sqs.as_ref().is_some_and(|(action, _)| action == "SendMessageBatch"));
    eprintln!(
        "{printed}planned S3 {planned_write} + {}, made {made_write} + {}",
        planned_s3 - planned_write,
        made_s3 - made_write
    );
    let within = |planned: u64, made: u64| (planned as f64 - made as f64).abs() <= 0.05 * made as f64;
    assert!(within(planned_write, made_write), "S3 PUT/COPY/POST/LIST: planned {planned_write}, made {made_write}");
    assert!(within(planned_s3, made_s3), "S3 requests: planned {planned_s3}, made {made_s3}");
    assert_eq!(field("sqs_send"), sends, "SendMessageBatch");
    let deletes = count(&|s| s.sqs.as_ref().is_some_and(|(action, _)| action == "DeleteMessageBatch"));
    assert!(field("sqs_delete") <= deletes, "deletes are at least the plan's: {deletes}");
}

/// The plan counts with the consumer's own defaults: the settings both take by the same
/// environment variable have the same default in both.
#[test]
fn the_plan_takes_the_consumers_defaults() {
    let help = |program: &str, args: &[&str]| {
        let out = std::process::Command::new(testkit::binary(program)).args(args).arg("--help").output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (consumer, plan) = (help("consumer", &[]), help("feeder", &["plan"]));
    for variable in ["MULTIPART_THRESHOLD", "MULTIPART_PART_SIZE", "REWRITE_JOURNAL"] {
        let default = |help: &str| {
            let at = help.find(&format!("[env: {variable}=]")).unwrap_or_else(|| panic!("{variable} in {help}"));
            help[at..].split("[default: ").nth(1).and_then(|d| d.split(']').next()).map(str::to_owned)
        };
        assert_eq!(default(&plan), default(&consumer), "{variable}");
    }
}
