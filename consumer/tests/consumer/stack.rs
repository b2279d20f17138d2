//! What the stack does, read from the template as CloudFormation renders it for given
//! parameters (`testkit::stack`): properties a rule on the template's text cannot see, since
//! they depend on conditions, parameters and values in two places.

use serde_json::{Value, json};
use testkit::stack::Stack;

const SECRET: &str = "arn:aws:secretsmanager:us-east-1:000000000000:secret:database-url";

fn stack(parameters: &[(&str, &str)]) -> Stack {
    let template = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/avatar-migration.yaml");
    let mut all = vec![
        ("DatabaseSecretArn", SECRET),
        ("AlarmEmail", "oncall@example.com"),
        ("ImageUri", "000000000000.dkr.ecr.us-east-1.amazonaws.com/avatar-migration:1"),
        ("VpcId", "vpc-1"),
        ("SubnetIds", "subnet-a,subnet-b"),
        ("DatabaseSecurityGroupId", "sg-database"),
    ];
    all.extend_from_slice(parameters);
    let resources = [
        ("Queue", "https://sqs.us-east-1.amazonaws.com/000000000000/avatar-migration"),
        ("Queue.Arn", "arn:aws:sqs:us-east-1:000000000000:avatar-migration"),
        ("Queue.QueueName", "avatar-migration"),
        ("DeadLetterQueue.Arn", "arn:aws:sqs:us-east-1:000000000000:avatar-migration-dlq"),
        ("DeadLetterQueue.QueueName", "avatar-migration-dlq"),
        ("Cluster", "avatar-migration"),
        ("Cluster.Arn", "arn:aws:ecs:us-east-1:000000000000:cluster/avatar-migration"),
        ("ConsumersFailToStart.Arn", "arn:aws:events:us-east-1:000000000000:rule/consumers"),
        ("FeederStopped.Arn", "arn:aws:events:us-east-1:000000000000:rule/feeder"),
        ("ConsumerService.Name", "consumer"),
        ("AlarmTopic", "arn:aws:sns:us-east-1:000000000000:avatar-migration-alarms"),
        ("TaskSecurityGroup", "sg-tasks"),
        ("ExecutionRole.Arn", "arn:aws:iam::000000000000:role/execution"),
        ("ConsumerTaskRole.Arn", "arn:aws:iam::000000000000:role/consumer"),
        ("FeederTaskRole.Arn", "arn:aws:iam::000000000000:role/feeder"),
        ("ConsumerLogs", "/avatar-migration/avatar-migration/consumer"),
        ("FeederLogs", "/avatar-migration/avatar-migration/feeder"),
        ("ConsumerTaskDefinition", "arn:aws:ecs:us-east-1:000000000000:task-definition/consumer:1"),
        ("ConsumerScalableTarget", "service/avatar-migration/consumer|ecs:service:DesiredCount|ecs"),
    ];
    Stack::load(&template, "avatar-migration", &all, &resources).unwrap()
}

fn resource(stack: &Stack, name: &str) -> Value {
    stack.resource(name).unwrap().unwrap_or_else(|| panic!("{name} is not created"))
}

fn consumer_container(stack: &Stack) -> Value {
    resource(stack, "ConsumerTaskDefinition")["Properties"]["ContainerDefinitions"][0].clone()
}

/// The value the stack gives a consumer's environment variable; `Null` when it gives none.
fn consumer_env(stack: &Stack, name: &str) -> Value {
    task_env(stack, "ConsumerTaskDefinition", name)
}

/// The value a task definition's container gets for an environment variable; `Null` when none.
fn task_env(stack: &Stack, task: &str, name: &str) -> Value {
    let container = resource(stack, task)["Properties"]["ContainerDefinitions"][0].clone();
    let variables = container["Environment"].as_array().cloned().unwrap_or_default();
    variables.into_iter().find(|e| e["Name"] == name).map_or(Value::Null, |e| e["Value"].clone())
}

/// Every deploy sends its alarms somewhere: the subscription is created whatever the
/// parameters, and a deploy without an address is refused (the parameter has no default).
#[test]
fn every_deploy_subscribes_someone_to_the_alarms() {
    let subscription = resource(&stack(&[]), "AlarmSubscription");
    assert_eq!(subscription["Properties"]["Endpoint"], "oncall@example.com");
    assert_eq!(subscription["Properties"]["Protocol"], "email");
    let template = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/avatar-migration.yaml");
    let without = Stack::load(&template, "s", &[("DatabaseSecretArn", SECRET)], &[]).unwrap();
    assert_eq!(without.parameter("AlarmEmail"), None, "AlarmEmail has no default: CloudFormation asks for it");
}

/// The tagging grants the copies need are allowed on the right objects: reading tags on the
/// legacy prefix, writing them on the destination prefix.
#[test]
fn tagging_is_allowed_where_the_copies_need_it() {
    let stack = stack(&[]);
    let statements: Vec<Value> = stack
        .role_policies("ConsumerTaskRole")
        .unwrap()
        .into_iter()
        .flat_map(|(_, d)| d["Statement"].as_array().cloned().unwrap_or_default())
        .collect();
    let allows = |action: &str, resource: &str| {
        statements.iter().any(|s| {
            s["Effect"] == "Allow"
                && s["Action"].to_string().contains(&format!("\"{action}\""))
                && s["Resource"] == resource
        })
    };
    assert!(allows("s3:GetObjectTagging", "arn:aws:s3:::legacy-s3/image/*"), "{statements:#?}");
    assert!(allows("s3:PutObjectTagging", "arn:aws:s3:::production-s3/avatar/*"), "{statements:#?}");
}

/// The database admits the tasks on the port the database listens on, whatever it is.
#[test]
fn the_database_ingress_opens_the_databases_port() {
    let stack = stack(&[("DatabasePort", "6432")]);
    let ingress = resource(&stack, "DatabaseIngressFromTasks")["Properties"].clone();
    assert_eq!((ingress["FromPort"].as_str(), ingress["ToPort"].as_str()), (Some("6432"), Some("6432")), "{ingress}");
    assert_eq!(ingress["GroupId"], "sg-database");
    assert_eq!(ingress["SourceSecurityGroupId"], "sg-tasks");
    let egress = resource(&stack, "TaskSecurityGroup")["Properties"]["SecurityGroupEgress"].clone();
    assert!(egress.as_array().unwrap().iter().any(|e| e["FromPort"] == "6432" && e["ToPort"] == "6432"), "{egress}");
}

/// The scaling policy divides by RunningTaskCount, which exists only with Container Insights
/// on the cluster, and only for the dimensions of this cluster and service.
#[test]
fn the_scaling_metric_exists_and_names_this_service() {
    let stack = stack(&[]);
    let settings = resource(&stack, "Cluster")["Properties"]["ClusterSettings"].clone();
    assert!(
        settings
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["Name"] == "containerInsights" && matches!(s["Value"].as_str(), Some("enabled" | "enhanced"))),
        "{settings}"
    );
    let policy = resource(&stack, "BacklogPerTaskTracking");
    let metrics =
        policy["Properties"]["TargetTrackingScalingPolicyConfiguration"]["CustomizedMetricSpecification"]["Metrics"]
            .as_array()
            .unwrap()
            .clone();
    let stat = |id: &str| metrics.iter().find(|m| m["Id"] == id).unwrap()["MetricStat"]["Metric"].clone();
    assert_eq!(stat("m2")["MetricName"], "RunningTaskCount");
    assert_eq!(
        stat("m2")["Dimensions"],
        json!([{"Name": "ClusterName", "Value": "avatar-migration"}, {"Name": "ServiceName", "Value": "consumer"}])
    );
    for queue_metric in ["m1", "m3"] {
        assert_eq!(stat(queue_metric)["Dimensions"], json!([{"Name": "QueueName", "Value": "avatar-migration"}]));
    }
}

/// ECS's SIGKILL comes after the consumer's own grace period: in-flight objects get their
/// SHUTDOWN_GRACE_SECONDS, and the consumer then exits by itself.
#[test]
fn ecs_waits_longer_than_the_consumers_grace_period() {
    let stack = stack(&[]);
    let stop_timeout = consumer_container(&stack)["StopTimeout"].as_u64().unwrap();
    let grace = consumer_env(&stack, "SHUTDOWN_GRACE_SECONDS")
        .as_str()
        .and_then(|v| humantime::parse_duration(v).ok().or_else(|| v.parse().ok().map(std::time::Duration::from_secs)))
        .expect("the consumer's SHUTDOWN_GRACE_SECONDS is set");
    assert!(
        std::time::Duration::from_secs(stop_timeout) >= grace + std::time::Duration::from_secs(5),
        "StopTimeout {stop_timeout}s leaves no margin after a grace of {grace:?}"
    );
}

/// Asks EventBridge (MiniStack's, which evaluates patterns as AWS does: `anything-but`, `$or`)
/// whether `event` matches `pattern`.
async fn matches(pattern: &Value, event: &Value) -> bool {
    use http_body_util::BodyExt;
    let endpoint = testkit::required("AWS_ENDPOINT_URL");
    let body = json!({"EventPattern": pattern.to_string(), "Event": event.to_string()}).to_string();
    let request = hyper::Request::post(format!("{endpoint}/"))
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amz-target", "AWSEvents.TestEventPattern")
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/events/aws4_request, SignedHeaders=host, Signature=0",
        )
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let answer = client.request(request).await.unwrap();
    let status = answer.status();
    let answer: Value = serde_json::from_slice(&answer.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert!(status.is_success(), "TestEventPattern: {status} {answer}");
    answer["Result"].as_bool().unwrap_or_else(|| panic!("TestEventPattern: {answer}"))
}

/// An ECS task stopped: its group, stop code and its one container's exit code.
fn stopped(group: &str, stop_code: &str, exit_code: i64) -> Value {
    json!({
        "version": "0", "id": "1", "detail-type": "ECS Task State Change", "source": "aws.ecs",
        "account": "000000000000", "time": "2026-12-07T00:00:00Z", "region": "us-east-1", "resources": [],
        "detail": {
            "clusterArn": "arn:aws:ecs:us-east-1:000000000000:cluster/avatar-migration",
            "group": group, "lastStatus": "STOPPED", "stopCode": stop_code,
            "containers": [{"name": "x", "exitCode": exit_code}]
        }
    })
}

/// Every consumer that stops on an error, and a feeder that stops on an error or before its
/// end (retired, stopped by hand: it then exits 0 at a checkpoint), reach the alarm topic;
/// scale-in and a feeder that finished do not.
#[tokio::test]
async fn a_task_that_stops_on_an_error_or_early_reaches_the_alarm_topic() {
    let stack = stack(&[]);
    let pattern = |rule: &str| {
        let rule = resource(&stack, rule);
        assert_eq!(
            rule["Properties"]["Targets"][0]["Arn"],
            "arn:aws:sns:us-east-1:000000000000:avatar-migration-alarms"
        );
        rule["Properties"]["EventPattern"].clone()
    };
    let consumers = pattern("ConsumersFailToStart");
    let feeder = pattern("FeederStopped");
    let consumer = "service:consumer";
    for (exit_code, alarm) in [(0, false), (1, true), (2, true), (137, true)] {
        let event = stopped(consumer, "EssentialContainerExited", exit_code);
        assert_eq!(matches(&consumers, &event).await, alarm, "consumer exit {exit_code}");
    }
    let family = "family:avatar-migration-feeder";
    for (stop_code, exit_code, alarm) in [
        ("EssentialContainerExited", 0, false),
        ("EssentialContainerExited", 1, true),
        ("EssentialContainerExited", 137, true),
        ("TerminationNotice", 0, true),
        ("UserInitiated", 0, true),
    ] {
        let event = stopped(family, stop_code, exit_code);
        assert_eq!(matches(&feeder, &event).await, alarm, "feeder {stop_code}, exit {exit_code}");
    }
    assert!(!matches(&feeder, &stopped(consumer, "UserInitiated", 1)).await, "the feeder's rule is the feeder's");
}

/// The alarms on the consumers' own counts read what the consumers write: the namespace the
/// stack gives them (CLOUDWATCH_NAMESPACE) and metric names their lines carry.
#[test]
fn the_count_alarms_read_what_the_consumers_publish() {
    let stack = stack(&[]);
    let namespace = consumer_env(&stack, "CLOUDWATCH_NAMESPACE");
    assert_eq!(namespace, "AvatarMigration/avatar-migration");
    let published: Vec<&str> = consumer::emf::names().collect();
    for alarm in ["ObjectsSetAsideSpike", "ObjectsRefused"] {
        let properties = resource(&stack, alarm)["Properties"].clone();
        assert_eq!(properties["Namespace"], namespace, "{alarm}");
        let metric = properties["MetricName"].as_str().unwrap();
        assert!(published.contains(&metric), "{alarm} reads {metric}, which no consumer publishes: {published:?}");
    }
}

/// The feeder's stall alarm reads what the feeder writes: the namespace its task gets, and
/// metric names its lines carry.
#[test]
fn the_feeder_stall_alarm_reads_what_the_feeder_publishes() {
    let stack = stack(&[]);
    let namespace = task_env(&stack, "FeederTaskDefinition", "CLOUDWATCH_NAMESPACE");
    assert_eq!(namespace, "AvatarMigration/avatar-migration");
    let published: Vec<&str> = feeder::progress::names().collect();
    let metrics = resource(&stack, "FeederStalled")["Properties"]["Metrics"].as_array().cloned().unwrap();
    let read: Vec<Value> = metrics.iter().filter_map(|m| m.get("MetricStat").cloned()).collect();
    assert_eq!(read.len(), 3, "{metrics:?}");
    for stat in read {
        assert_eq!(stat["Metric"]["Namespace"], namespace);
        let metric = stat["Metric"]["MetricName"].as_str().unwrap();
        assert!(published.contains(&metric), "FeederStalled reads {metric}, which the feeder does not publish");
    }
}

/// Replicas given to the stack reach the consumers as a secret (REPLICA_URLS) the execution
/// role may read, with the lag limit; without them, no such secret and no such grant.
#[test]
fn replicas_given_reach_the_consumers_as_a_secret_the_task_may_read() {
    const REPLICAS: &str = "arn:aws:secretsmanager:us-east-1:000000000000:secret:replicas-AbCdEf";
    for (given, expected) in [(false, None), (true, Some(REPLICAS))] {
        let parameters: &[(&str, &str)] = if given { &[("ReplicaUrlsSecretArn", REPLICAS)] } else { &[] };
        let stack = stack(parameters);
        let secrets = consumer_container(&stack)["Secrets"].as_array().cloned().unwrap_or_default();
        let replica = secrets.iter().find(|s| s["Name"] == "REPLICA_URLS").map(|s| s["ValueFrom"].clone());
        assert_eq!(replica, expected.map(Value::from), "REPLICA_URLS, replicas given: {given}");
        assert_eq!(consumer_env(&stack, "MAX_REPLICA_LAG"), "30s");
        let policy = resource(&stack, "ExecutionRole")["Properties"]["Policies"].to_string();
        assert_eq!(policy.contains(REPLICAS), given, "the execution role reads the secret only when given: {policy}");
    }
}
