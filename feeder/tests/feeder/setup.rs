//! Settings and start-up: what is wrong is named, with exit 2, and secrets never shown.

use super::*;

/// Runs the feeder with these variables changed; returns (exit code, stderr).
fn feeder_with(env: &Env, changes: &[(&str, Option<&str>)]) -> (Option<i32>, String) {
    let mut cmd = env.command("feeder");
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
        &["verify", "throttle", "status", "cleanup", "plan"],
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

/// `sslmode=verify-full`, as the docs tell users to connect: with the server's CA given
/// (`sslrootcert`), the feeder connects over TLS; without it (sqlx then trusts only the roots
/// compiled into it, which hold neither this CA nor RDS's) or with another CA, it is refused
/// at start-up, exit 2, naming the certificate, the password never shown.
#[tokio::test]
async fn verify_full_connects_with_the_servers_ca_and_is_refused_without_it() {
    let env = Env::new().await;
    let ca = testkit::required("PG_CA_FILE");
    let url = |query: &str| format!("{}?sslmode=verify-full{query}", env.database_url);
    let with_ca = url(&format!("&sslrootcert={ca}"));
    let (code, err) = feeder_with(&env, &[("DATABASE_URL", Some(&with_ca)), ("DRY_RUN", Some("true"))]);
    assert_eq!(code, Some(0), "{err}");
    let ssl: bool = {
        let pool = sqlx::PgPool::connect(&with_ca).await.unwrap();
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetch_one(&pool).await.unwrap()
    };
    assert!(ssl, "the connection is encrypted");

    // Other CAs: the machine's public ones, none of which signed the server's certificate.
    let other_ca = "/etc/ssl/certs/ca-certificates.crt";
    for refused in [url(""), url(&format!("&sslrootcert={other_ca}"))] {
        let (code, err) = feeder_with(&env, &[("DATABASE_URL", Some(&refused)), ("DRY_RUN", Some("true"))]);
        assert_eq!(code, Some(2), "{refused}: {err}");
        assert!(err.to_lowercase().contains("certificate"), "{err}");
        assert!(!err.contains("localdev"), "the password never reaches the output: {err}");
    }
}
