//! Every command runs under the grants the stack gives the role that runs it: the template's
//! task-role policies (deploy/avatar-migration.yaml, rendered for the test's buckets and queues
//! by `testkit::stack`) held by IAM users of a MiniStack that evaluates IAM policies
//! (`AUTH=true`, `scripts/local-services up --with-iam`), every command run with the keys of
//! its role, through a proxy that keeps every request and its answer. A refused request fails
//! the test naming the command, the action and the resource; a grant no request used fails it
//! too (a grant nothing needs is a grant to remove).
//!
//! What the evaluator cannot check here is left to rules (deploy/guard/): KMS key policies and
//! `kms:ViaService` conditions (S3 here does not call KMS), the execution role (ECS pulls the
//! image and reads the secret, not our code).

use std::process::Output;

use testkit::proxy::{Fault, FaultProxy, Rule, When};
use testkit::stack::{ACCOUNT, REGION, Stack};
use testkit::{Env, grants};

use crate::helpers::{last_json, modern};

/// A stack's roles on the IAM-enforcing server, and the proxy every command goes through.
struct Deployed {
    env: Env,
    proxy: FaultProxy,
    roles: Vec<Role>,
    /// Every request so far, with the role and command that made it.
    log: Vec<(usize, String, testkit::proxy::Seen)>,
}

struct Role {
    name: &'static str,
    policies: Vec<(String, serde_json::Value)>,
    key: (String, String),
}

const FEEDER: usize = 0;
const CONSUMER: usize = 1;

impl Deployed {
    /// The stack rendered with `parameters` (beside the test's names), its task roles as users.
    async fn new(parameters: &[(&str, &str)]) -> Deployed {
        let endpoint = testkit::required("IAM_ENDPOINT_URL");
        let env = Env::with(&endpoint, &endpoint, 30).await;
        let queue = env.queue_url.rsplit('/').next().unwrap().to_owned();
        let dlq = env.dlq_url.rsplit('/').next().unwrap().to_owned();
        assert_eq!(dlq, format!("{queue}-dlq"), "the stack names the dead-letter queue after the queue");
        let arn = |name: &str| format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{name}");
        let mut all = vec![
            ("SourceBucketName", env.source_bucket.as_str()),
            ("DestinationBucketName", env.destination_bucket.as_str()),
            ("DatabaseSecretArn", "arn:aws:secretsmanager:us-east-1:000000000000:secret:database-url"),
        ];
        all.extend_from_slice(parameters);
        let resources = [
            ("Queue", env.queue_url.clone()),
            ("Queue.Arn", arn(&queue)),
            ("Queue.QueueName", queue.clone()),
            ("DeadLetterQueue.Arn", arn(&dlq)),
            ("DeadLetterQueue.QueueName", dlq.clone()),
        ];
        let resources: Vec<(&str, &str)> = resources.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let template = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/avatar-migration.yaml");
        let stack = Stack::load(&template, &queue, &all, &resources).unwrap();
        let mut roles = Vec::new();
        for (name, resource) in [("feeder", "FeederTaskRole"), ("consumer", "ConsumerTaskRole")] {
            let policies = stack.role_policies(resource).unwrap();
            let held = grants::as_ministack_decides(&policies);
            let key = grants::user(&endpoint, &format!("{name}-{}", env.id), &held).await.unwrap();
            roles.push(Role { name, policies, key });
        }
        let proxy = FaultProxy::start(&endpoint).await.unwrap();
        proxy.record();
        let slow = When { method: Some("PUT"), contains: Some("avatar/large.png?".into()), ..When::default() };
        proxy.add(Rule::always(slow, Fault::Delay(std::time::Duration::from_millis(1500))));
        Deployed { env, proxy, roles, log: Vec::new() }
    }

    /// Runs `program args` with the keys of `role`, through the proxy; returns its output and
    /// files its requests under the role and the command.
    async fn run(&mut self, role: usize, program: &str, args: &[&str], extra: &[(&str, &str)]) -> Output {
        let before = self.proxy.seen().len();
        let (key, secret) = &self.roles[role].key;
        let mut command = self.env.command(program);
        command
            .args(args)
            .env("AWS_ENDPOINT_URL_S3", &self.proxy.url)
            .env("AWS_ENDPOINT_URL_SQS", &self.proxy.url)
            .env("AWS_ACCESS_KEY_ID", key)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("RUST_LOG", "warn");
        for (k, v) in extra {
            command.env(k, v);
        }
        let out = tokio::process::Command::from(command).output().await.unwrap();
        let name = format!("{program} {}", args.join(" "));
        for seen in self.proxy.seen().into_iter().skip(before) {
            self.log.push((role, name.trim().to_owned(), seen));
        }
        assert!(
            out.status.success(),
            "`{name}` under the {} role: {:?}\n{}{}",
            self.roles[role].name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// No request was refused, and every grant of each role was used (`only`: of these
    /// statements, by `Sid`).
    fn assert_every_grant_needed_and_used(&self, only: Option<&[&str]>) {
        let refused: Vec<String> = self
            .log
            .iter()
            .filter(|(_, _, seen)| seen.status == 403)
            .flat_map(|(role, command, seen)| {
                grants::actions(seen).into_iter().map(move |(action, resource)| {
                    format!("`{command}` ({} role): {action} on {resource} refused", self.roles[*role].name)
                })
            })
            .collect();
        assert!(refused.is_empty(), "requests the stack's grants refuse:\n{}", refused.join("\n"));
        for (index, role) in self.roles.iter().enumerate() {
            let used: Vec<(String, String)> = self
                .log
                .iter()
                .filter(|(r, _, seen)| *r == index && seen.status < 400)
                .flat_map(|(_, _, seen)| grants::actions(seen))
                .collect();
            let unknown: Vec<&(String, String)> = used.iter().filter(|(a, _)| a.starts_with("unknown")).collect();
            assert!(unknown.is_empty(), "requests the test cannot name an action for: {unknown:?}");
            let unused: Vec<String> = grants::unused(&role.policies, &used)
                .into_iter()
                .filter(|grant| !FAILURE_PATHS.iter().any(|(action, _)| grant.contains(&format!(" {action} on "))))
                .filter(|grant| only.is_none_or(|sids| sids.iter().any(|sid| grant.starts_with(&format!("{sid}:")))))
                .collect();
            assert!(unused.is_empty(), "grants of the {} role no command used:\n{}", role.name, unused.join("\n"));
        }
    }
}

/// Grants only a failure uses, with what needs them: not met in a run that goes well.
const FAILURE_PATHS: &[(&str, &str)] =
    &[("s3:AbortMultipartUpload", "a copy in parts that fails is aborted (consumer/src/copy/multipart.rs)")];

/// Seeds plain objects, a tagged one and one copied in parts, each with a row.
async fn seed(env: &Env) -> Vec<i32> {
    let (mut keys, _) = env.seed_legacy(0..4).await;
    env.s3
        .put_object()
        .bucket(&env.source_bucket)
        .key("image/tagged.png")
        .tagging("team=avatars")
        .body(b"tagged".to_vec().into())
        .send()
        .await
        .unwrap();
    env.put(&env.source_bucket, "image/large.png", &[7u8; 4096]).await;
    keys.extend(["image/tagged.png".to_owned(), "image/large.png".to_owned()]);
    env.insert_rows(&keys[4..]).await;
    sqlx::query_scalar("SELECT id FROM avatars ORDER BY id").fetch_all(&env.db).await.unwrap()
}

/// Objects over 1 KiB are copied in parts (the large one); a message worked on for over a
/// second has its visibility extended (the proxy holds the large one's part back 1.5 s).
const CONSUMER_SETTINGS: &[(&str, &str)] =
    &[("EXIT_WHEN_IDLE", "2"), ("MULTIPART_THRESHOLD", "1024"), ("VISIBILITY_TIMEOUT", "2s")];

/// The default stack: the feeder (listing in ranges), the consumer (its start-up probe, copies,
/// a copy in parts, tags, the dead-letter queue's redrive policy) and every operator command
/// the feeder role runs.
#[tokio::test]
async fn every_command_runs_under_the_grants_of_the_default_stack() {
    let mut stack = Deployed::new(&[]).await;
    let ids = seed(&stack.env).await;
    stack.run(FEEDER, "feeder", &[], &[("LIST_RANGES", "2")]).await;
    stack.run(CONSUMER, "consumer", &[], CONSUMER_SETTINGS).await;
    for id in &ids {
        let path = stack.env.path_of(*id).await;
        assert!(path.starts_with("avatar/"), "row {id} moved: {path}");
    }
    let verified = stack.run(FEEDER, "feeder", &["verify", "--objects", "--json"], &[]).await;
    assert_eq!(last_json(&String::from_utf8_lossy(&verified.stdout))["done"], true);
    for command in [&["status"][..], &["failures"], &["report"], &["reconcile"], &["verify"]] {
        stack.run(FEEDER, "feeder", command, &[]).await;
    }
    // A message the dead-letter queue holds: redrive moves it back, a consumer finds it done.
    let body =
        common::message::encode(&[common::message::ObjectMessage::new("image/avatar-0.png".into(), 3, String::new())]);
    stack.env.sqs.send_message().queue_url(&stack.env.dlq_url).message_body(body).send().await.unwrap();
    stack.run(FEEDER, "feeder", &["redrive"], &[]).await;
    stack.run(CONSUMER, "consumer", &[], CONSUMER_SETTINGS).await;
    stack.run(FEEDER, "feeder", &["rollback"], &[]).await;
    assert_eq!(stack.env.path_of(ids[0]).await, "image/avatar-0.png", "rolled back");
    stack.assert_every_grant_needed_and_used(None);
}

/// With legacy cleanup and the consumer's DELETE_SOURCE on: the consumer deletes each moved
/// source, `feeder cleanup --yes` the rest.
#[tokio::test]
async fn deleting_sources_runs_under_the_grants_of_the_cleanup_stack() {
    let mut stack = Deployed::new(&[("EnableLegacyCleanup", "true"), ("ConsumerDeleteSource", "true")]).await;
    let ids = seed(&stack.env).await;
    stack.run(FEEDER, "feeder", &[], &[]).await;
    stack.run(FEEDER, "feeder", &["fence", "install"], &[]).await;
    let mut settings = CONSUMER_SETTINGS.to_vec();
    settings.push(("DELETE_SOURCE", "true"));
    stack.run(CONSUMER, "consumer", &[], &settings).await;
    // One legacy object the consumer left: moved by an earlier run without DELETE_SOURCE.
    stack.env.put(&stack.env.source_bucket, "image/left.png", b"left").await;
    stack.env.put(&stack.env.destination_bucket, &modern("image/left.png"), b"left").await;
    stack.run(FEEDER, "feeder", &["cleanup", "--yes"], &[]).await;
    assert!(stack.env.keys(&stack.env.source_bucket).await.is_empty(), "every moved source deleted");
    for id in &ids {
        assert!(stack.env.path_of(*id).await.starts_with("avatar/"));
    }
    stack.run(FEEDER, "feeder", &["verify", "--objects"], &[]).await;
    stack.run(FEEDER, "feeder", &["status"], &[]).await;
    // The other grants are the default stack's, used by the test above.
    stack.assert_every_grant_needed_and_used(Some(&["CleanupLegacy", "DeleteMovedSources"]));
}

/// What the evaluator here cannot check (S3 does not call KMS on MiniStack): with customer
/// keys, every role that reads objects may decrypt with them, and only through S3.
#[test]
fn kms_keys_are_granted_to_every_role_that_reads_encrypted_objects() {
    let (source_key, destination_key) = (
        "arn:aws:kms:us-east-1:000000000000:key/11111111-1111-1111-1111-111111111111",
        "arn:aws:kms:us-east-1:000000000000:key/22222222-2222-2222-2222-222222222222",
    );
    let template = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/avatar-migration.yaml");
    let parameters = [
        ("DatabaseSecretArn", "arn:aws:secretsmanager:us-east-1:000000000000:secret:database-url"),
        ("SourceKmsKeyArn", source_key),
        ("DestinationKmsKeyArn", destination_key),
    ];
    let resources = [("Queue.Arn", "arn:aws:sqs:us-east-1:000000000000:q"), ("DeadLetterQueue.Arn", "arn:aws:sqs:x")];
    let stack = Stack::load(&template, "q", &parameters, &resources).unwrap();
    for role in ["FeederTaskRole", "ConsumerTaskRole"] {
        let statements: Vec<serde_json::Value> = stack
            .role_policies(role)
            .unwrap()
            .into_iter()
            .flat_map(|(_, document)| document["Statement"].as_array().cloned().unwrap_or_default())
            .collect();
        for key in [source_key, destination_key] {
            let decrypts = statements.iter().any(|s| {
                let actions = s["Action"].to_string();
                s["Resource"] == key
                    && actions.contains("kms:Decrypt")
                    && s["Condition"]["StringEquals"]["kms:ViaService"] == "s3.us-east-1.amazonaws.com"
            });
            assert!(decrypts, "{role} may not decrypt with {key} through S3: {statements:#?}");
        }
    }
}
