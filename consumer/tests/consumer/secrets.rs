//! Secrets never reach what the binaries print: not in logs (even at debug level, text or
//! JSON), not in errors, not in `--help`.

use futures::future::join_all;
use tokio::process::Command;

use testkit::Env;

use crate::helpers::{feed, legacy_keys};

const DB_PASSWORD: &str = "s3cr3t-db-pw-4242";
const AWS_SECRET: &str = "s3cr3t-aws-key-4242";

/// Runs a binary with both secrets set; returns everything it printed.
async fn printed(program: &str, env: &Env, database_url: &str, args: &[&str], extra: &[(&str, &str)]) -> String {
    let out = Command::from(env.command(program))
        .env("DATABASE_URL", database_url)
        .env("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
        .env("RUST_LOG", "debug")
        .env("EXIT_WHEN_IDLE", "1")
        .envs(extra.iter().copied())
        .args(args)
        .output()
        .await
        .unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test]
async fn neither_binary_ever_prints_a_secret() {
    let env = Env::new().await;
    env.put_many(&env.source_bucket, &legacy_keys(0..5), b"png").await;
    env.insert_rows(&legacy_keys(0..5)).await;
    feed(&env).await;
    // The database accepts this password: the role gets it for this test.
    sqlx::raw_sql(&format!(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'secrets_test') THEN
             CREATE ROLE secrets_test LOGIN SUPERUSER; END IF; END $$;
         ALTER ROLE secrets_test PASSWORD '{DB_PASSWORD}';"
    ))
    .execute(&env.db)
    .await
    .unwrap();
    let (_, rest) = env.database_url.split_once('@').unwrap();
    let good = format!("postgres://secrets_test:{DB_PASSWORD}@{rest}");
    let (host_port, database) = rest.split_once('/').unwrap();
    let host = host_port.rsplit_once(':').map_or(host_port, |(host, _)| host);
    let wrong_port = format!("postgres://secrets_test:{DB_PASSWORD}@{host}:1/{database}");
    let wrong_password = format!("postgres://secrets_test:{DB_PASSWORD}-not@{rest}");
    let malformed = format!("postgres://secrets_test:{DB_PASSWORD}@h:notaport/db");

    // The runs that work first (they move the objects), then the failing ones, all at once.
    let mut everything = Vec::new();
    for json in ["text", "json"] {
        let log = [("LOG_FORMAT", json)];
        everything.push(printed("consumer", &env, &good, &[], &log).await);
        for args in [&[][..], &["status"], &["verify"], &["reconcile"], &["failures"]] {
            everything.push(printed("feeder", &env, &good, args, &log).await);
        }
    }
    let failing = [
        ("text", &wrong_port),
        ("text", &wrong_password),
        ("json", &wrong_password),
        ("text", &malformed),
        ("json", &malformed),
    ];
    let env = &env;
    let failing = failing.iter().flat_map(|&(json, url)| {
        ["feeder", "consumer"]
            .map(move |program| async move { printed(program, env, url, &[], &[("LOG_FORMAT", json)]).await })
    });
    everything.extend(join_all(failing).await);
    everything.push(printed("feeder", env, &good, &["--help"], &[]).await);
    everything.push(printed("consumer", env, &good, &["--help"], &[]).await);
    everything.push(printed("feeder", env, &good, &["verify", "--help"], &[]).await);

    assert_eq!(env.count_rows_with_prefix("avatar/").await, 5, "the runs did their work");
    assert!(everything.iter().any(|o| o.contains("DEBUG") || o.contains("\"level\":\"DEBUG\"")), "debug logs were on");
    for output in &everything {
        for secret in [DB_PASSWORD, AWS_SECRET] {
            assert!(!output.contains(secret), "{secret} printed in:\n{output}");
        }
    }
}
