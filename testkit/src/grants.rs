//! Grants, exercised: an IAM user holding a role's rendered policies ([`crate::stack`]) on a
//! server that evaluates them (MiniStack with `AUTH=true`), and, from the requests a recording
//! proxy saw ([`crate::proxy::Seen`]), the IAM action and resource each request needed: which
//! were refused, and which grants no request used.

use aws_config::BehaviorVersion;
use serde_json::Value as Json;

use crate::proxy::Seen;
use crate::stack::{ACCOUNT, REGION};

/// Creates the IAM user `name` holding `policies` (name, document) as inline policies, on the
/// server at `endpoint` (with the environment's credentials, its root); returns its access key
/// and secret.
pub async fn user(endpoint: &str, name: &str, policies: &[(String, Json)]) -> anyhow::Result<(String, String)> {
    let config = aws_config::defaults(BehaviorVersion::latest()).endpoint_url(endpoint).load().await;
    let iam = aws_sdk_iam::Client::new(&config);
    iam.create_user().user_name(name).send().await?;
    for (policy, document) in policies {
        iam.put_user_policy().user_name(name).policy_name(policy).policy_document(document.to_string()).send().await?;
    }
    let key = iam.create_access_key().user_name(name).send().await?;
    let key = key.access_key().ok_or_else(|| anyhow::anyhow!("CreateAccessKey returned no key"))?;
    Ok((key.access_key_id().to_owned(), key.secret_access_key().to_owned()))
}

/// `policies` as MiniStack must hold them to decide as AWS does: AWS authorizes SQS's batch
/// calls by the action of one entry (`SendMessageBatch` by `sqs:SendMessage`, per the SQS API
/// permissions reference), where MiniStack asks for an action named after the batch call. Each
/// statement granting the one also grants the other, which on AWS changes nothing.
pub fn as_ministack_decides(policies: &[(String, Json)]) -> Vec<(String, Json)> {
    const BATCHES: [(&str, &str); 3] = [
        ("sqs:SendMessage", "sqs:SendMessageBatch"),
        ("sqs:DeleteMessage", "sqs:DeleteMessageBatch"),
        ("sqs:ChangeMessageVisibility", "sqs:ChangeMessageVisibilityBatch"),
    ];
    let mut policies = policies.to_vec();
    for (_, document) in &mut policies {
        for statement in document["Statement"].as_array_mut().into_iter().flatten() {
            let mut actions = one_or_many(&statement["Action"]);
            for (one, batch) in BATCHES {
                if actions.iter().any(|a| a == one) {
                    actions.push(batch.to_owned());
                }
            }
            statement["Action"] = actions.into();
        }
    }
    policies
}

/// The IAM actions a request needs, each with the resource it names (an ARN). S3 requests are
/// path-style (`/bucket/key?query`); SQS ones name their queue in their JSON body.
pub fn actions(seen: &Seen) -> Vec<(String, String)> {
    if let Some((action, body)) = &seen.sqs {
        let body: Json = serde_json::from_str(body).unwrap_or_default();
        let queue = body["QueueUrl"]
            .as_str()
            .and_then(|url| url.rsplit('/').next())
            .or_else(|| body["QueueName"].as_str())
            .unwrap_or_default();
        let action = match action.as_str() {
            "SendMessageBatch" => "SendMessage",
            "DeleteMessageBatch" => "DeleteMessage",
            "ChangeMessageVisibilityBatch" => "ChangeMessageVisibility",
            other => other,
        };
        return vec![(format!("sqs:{action}"), format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{queue}"))];
    }
    let (path, query) = seen.target.split_once('?').unwrap_or((&seen.target, ""));
    let path = percent_decode(path.trim_start_matches('/'));
    let (bucket, key) = path.split_once('/').unwrap_or((&path, ""));
    let has = |name: &str| query.split('&').any(|p| p == name || p.starts_with(&format!("{name}=")));
    let bucket_arn = format!("arn:aws:s3:::{bucket}");
    let object_arn = format!("arn:aws:s3:::{bucket}/{key}");
    let object = |action: &str| vec![(format!("s3:{action}"), object_arn.clone())];
    match (seen.method.as_str(), key.is_empty()) {
        ("HEAD" | "GET", true) if has("uploads") => vec![("s3:ListBucketMultipartUploads".into(), bucket_arn)],
        ("HEAD" | "GET", true) => vec![("s3:ListBucket".into(), bucket_arn)],
        ("POST", true) if has("delete") => {
            let body = seen.body.as_deref().unwrap_or_default();
            xml_values(body, "Key")
                .into_iter()
                .map(|k| ("s3:DeleteObject".into(), format!("{bucket_arn}/{k}")))
                .collect()
        }
        ("GET", false) if has("tagging") => object("GetObjectTagging"),
        ("HEAD" | "GET", false) => object("GetObject"),
        ("PUT", false) if has("tagging") => object("PutObjectTagging"),
        ("PUT", false) => {
            let mut needed = object("PutObject");
            if let Some(source) = &seen.copy_source {
                // A copy reads its source; it copies the source's tags (TaggingDirective COPY),
                // which reads them there and writes them on the copy.
                let source = percent_decode(source.split('?').next().unwrap_or_default().trim_start_matches('/'));
                needed.push(("s3:GetObject".into(), format!("arn:aws:s3:::{source}")));
                if !has("uploadId") {
                    needed.push(("s3:GetObjectTagging".into(), format!("arn:aws:s3:::{source}")));
                    needed.push(("s3:PutObjectTagging".into(), object_arn.clone()));
                }
            }
            needed
        }
        ("POST", false) => object("PutObject"), // CreateMultipartUpload, CompleteMultipartUpload
        ("DELETE", false) if has("uploadId") => object("AbortMultipartUpload"),
        ("DELETE", false) => object("DeleteObject"),
        (method, _) => vec![(format!("unknown {method} {}", seen.target), String::new())],
    }
}

/// The grants (action on a resource pattern) of `policies` that no `used` (action, resource)
/// falls under, as `Sid: action on resource`.
pub fn unused(policies: &[(String, Json)], used: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (_, document) in policies {
        for statement in document["Statement"].as_array().into_iter().flatten() {
            if statement["Effect"] != "Allow" {
                continue;
            }
            let sid = statement["Sid"].as_str().unwrap_or("(no Sid)");
            for action in one_or_many(&statement["Action"]) {
                for resource in one_or_many(&statement["Resource"]) {
                    if !used.iter().any(|(a, r)| glob(&action, a) && glob(&resource, r)) {
                        out.push(format!("{sid}: {action} on {resource}"));
                    }
                }
            }
        }
    }
    out
}

fn one_or_many(value: &Json) -> Vec<String> {
    match value {
        Json::String(s) => vec![s.clone()],
        Json::Array(items) => items.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    }
}

/// IAM's wildcard match (`*` any run, `?` one character), case-sensitive as for resources.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < t.len() {
        if i < p.len() && (p[i] == '?' || p[i] == t[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|c| *c == '*')
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// The texts of every `<name>…</name>` element of an XML document.
fn xml_values(xml: &str, name: &str) -> Vec<String> {
    let (open, close) = (format!("<{name}>"), format!("</{name}>"));
    xml.split(&open).skip(1).filter_map(|rest| rest.split_once(&close).map(|(v, _)| v.replace("&amp;", "&"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(method: &str, target: &str, copy_source: Option<&str>) -> Seen {
        Seen {
            method: method.into(),
            target: target.into(),
            copy_source: copy_source.map(Into::into),
            sqs: None,
            body: None,
            status: 200,
        }
    }

    #[test]
    fn requests_name_the_actions_iam_checks() {
        let arn = |s: &str| format!("arn:aws:s3:::{s}");
        assert_eq!(actions(&seen("HEAD", "/b", None)), [("s3:ListBucket".into(), arn("b"))]);
        assert_eq!(actions(&seen("GET", "/b?list-type=2&prefix=image%2F", None)), [("s3:ListBucket".into(), arn("b"))]);
        assert_eq!(
            actions(&seen("HEAD", "/b/image/a%20b.png", None)),
            [("s3:GetObject".into(), arn("b/image/a b.png"))]
        );
        let copy = actions(&seen("PUT", "/d/avatar/a.png", Some("/s/image/a.png")));
        assert!(copy.contains(&("s3:PutObject".into(), arn("d/avatar/a.png"))), "{copy:?}");
        assert!(copy.contains(&("s3:GetObject".into(), arn("s/image/a.png"))), "{copy:?}");
        assert!(copy.contains(&("s3:GetObjectTagging".into(), arn("s/image/a.png"))), "{copy:?}");
        let part = actions(&seen("PUT", "/d/avatar/a.png?partNumber=1&uploadId=x", Some("/s/image/a.png")));
        assert_eq!(part.len(), 2, "a part copy reads no tags: {part:?}");
        assert_eq!(actions(&seen("DELETE", "/d/k?uploadId=x", None))[0].0, "s3:AbortMultipartUpload");
        let mut delete = seen("POST", "/s?delete", None);
        delete.body = Some("<Delete><Object><Key>image/a&amp;b.png</Key></Object></Delete>".into());
        assert_eq!(actions(&delete), [("s3:DeleteObject".into(), arn("s/image/a&b.png"))]);
        let mut batch = seen("POST", "/", None);
        batch.sqs = Some(("DeleteMessageBatch".into(), r#"{"QueueUrl":"http://x/000000000000/q-dlq"}"#.into()));
        assert_eq!(actions(&batch), [("sqs:DeleteMessage".into(), "arn:aws:sqs:us-east-1:000000000000:q-dlq".into())]);
    }

    #[test]
    fn a_grant_is_used_when_a_request_falls_under_it() {
        assert!(glob("arn:aws:s3:::b/image/*", "arn:aws:s3:::b/image/a.png"));
        assert!(!glob("arn:aws:s3:::b/image/*", "arn:aws:s3:::b/avatar/a.png"));
        assert!(glob("s3:Get*", "s3:GetObject"));
        let policy = serde_json::json!({"Statement": [
            {"Sid": "A", "Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": "arn:aws:s3:::b/*"}
        ]});
        let used = [("s3:GetObject".to_owned(), "arn:aws:s3:::b/k".to_owned())];
        assert_eq!(unused(&[("p".into(), policy)], &used), ["A: s3:PutObject on arn:aws:s3:::b/*"]);
    }
}
