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
    let container = resource(&stack, "ConsumerTaskDefinition")["Properties"]["ContainerDefinitions"][0].clone();
    let stop_timeout = container["StopTimeout"].as_u64().unwrap();
    let grace = container["Environment"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["Name"] == "SHUTDOWN_GRACE_SECONDS")
        .and_then(|e| e["Value"].as_str())
        .and_then(|v| humantime::parse_duration(v).ok().or_else(|| v.parse().ok().map(std::time::Duration::from_secs)))
        .expect("the consumer's SHUTDOWN_GRACE_SECONDS is set");
    assert!(
        std::time::Duration::from_secs(stop_timeout) >= grace + std::time::Duration::from_secs(5),
        "StopTimeout {stop_timeout}s leaves no margin after a grace of {grace:?}"
    );
}
