//! Schemas other than the take-home's (`REFERENCES`): a table keyed by uuid holding URLs, a
//! second table naming the same objects as bare keys, quoted names, values outside the form or
//! the prefix, NULLs; and the checks at start-up (no index, a composite key, a missing grant).

use std::collections::BTreeMap;

use sqlx::Row;
use testkit::Env;

use crate::helpers::{consumer, drain, feed, last_json, stdout};

/// The second schema: `"Users"."Avatar URL"` (uuid primary key, CDN URLs) and
/// `posts.cover_key` (text primary key, bare keys), both indexed.
const SECOND_SCHEMA: &str = r#"
    CREATE TABLE "Users" (uid uuid PRIMARY KEY DEFAULT gen_random_uuid(), "Avatar URL" text);
    CREATE INDEX users_avatar_url ON "Users" ("Avatar URL");
    CREATE TABLE posts (slug text PRIMARY KEY, cover_key varchar(300));
    CREATE INDEX posts_cover_key ON posts (cover_key);
"#;

const REFERENCES: &str = r#""Users"."Avatar URL"=https://cdn.example.com/{key},public.posts.cover_key"#;

/// `"Avatar URL"` values by user, and `cover_key` values by post, as the tables hold them.
async fn values(env: &Env) -> (BTreeMap<String, Option<String>>, BTreeMap<String, Option<String>>) {
    let users = sqlx::query(r#"SELECT uid::text, "Avatar URL" FROM "Users""#).fetch_all(&env.db).await.unwrap();
    let posts = sqlx::query("SELECT slug, cover_key::text FROM posts").fetch_all(&env.db).await.unwrap();
    (users.iter().map(|r| (r.get(0), r.get(1))).collect(), posts.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Users' URLs and posts' keys naming the same objects, with every value the migration must
/// leave alone, go through the migration and its rollback: every reference to a moved object
/// is rewritten in its own form (a percent-encoded key stays encoded), nothing else changes,
/// the journal names each row's reference, and the rollback gives back every value exactly.
#[tokio::test]
async fn a_second_schema_migrates_in_its_own_forms_and_rolls_back() {
    let env = Env::new().await;
    sqlx::raw_sql(SECOND_SCHEMA).execute(&env.db).await.unwrap();
    let keys: Vec<String> =
        (0..40).map(|i| format!("image/avatar-{i}.png")).chain(["image/with space+plus é.png".into()]).collect();
    env.put_many(&env.source_bucket, &keys, b"png").await;
    env.put(&env.source_bucket, "imagex/outside.png", b"outside").await;
    let cdn = |key: &str| format!("https://cdn.example.com/{}", common::keys::encode_path(key));

    let mut urls: Vec<Option<String>> = keys.iter().map(|k| Some(cdn(k))).collect();
    let untouched_urls = [
        Some("https://cdn.example.com/imagex/outside.png".to_owned()), // outside the prefix
        Some("https://elsewhere.example.com/image/avatar-1.png".to_owned()), // another form
        Some("image/avatar-2.png".to_owned()),                         // a bare key: not this column's form
        Some(String::new()),
        None,
        None,
    ];
    urls.extend(untouched_urls.iter().cloned());
    sqlx::query(r#"INSERT INTO "Users" ("Avatar URL") SELECT * FROM UNNEST($1::text[])"#)
        .bind(&urls)
        .execute(&env.db)
        .await
        .unwrap();
    let mut covers: Vec<(String, Option<String>)> =
        keys.iter().step_by(2).enumerate().map(|(i, k)| (format!("post-{i}"), Some(k.clone()))).collect();
    covers.push(("post-outside".into(), Some("imagex/outside.png".into())));
    covers.push(("post-none".into(), None));
    covers.push(("post-url".into(), Some(cdn("image/avatar-3.png"))));
    let (slugs, cover_keys): (Vec<String>, Vec<Option<String>>) = covers.iter().cloned().unzip();
    sqlx::query("INSERT INTO posts (slug, cover_key) SELECT * FROM UNNEST($1::text[], $2::text[])")
        .bind(&slugs)
        .bind(&cover_keys)
        .execute(&env.db)
        .await
        .unwrap();
    let before = values(&env).await;
    let (users_moved, posts_moved) = (keys.len() as i64, keys.iter().step_by(2).count() as i64);

    feed(&env).await;
    let references = [("REFERENCES", REFERENCES), ("MISSING_INDEX", "refuse")];
    let out = drain(&env, &references).await;
    assert!(stdout(&out).contains("left for retry 0;"), "{}", stdout(&out));
    assert_eq!(env.depth(&env.queue_url).await, (0, 0), "every message done");

    let after = values(&env).await;
    for (user, value) in &before.0 {
        let expected = match value.as_deref().and_then(|v| v.strip_prefix("https://cdn.example.com/image/")) {
            Some(rest) => Some(format!("https://cdn.example.com/avatar/{rest}")),
            None => value.clone(),
        };
        assert_eq!(after.0[user], expected, "user {user}: {value:?}");
    }
    let encoded = cdn("avatar/with space+plus é.png");
    assert!(encoded.contains("with%20space%2Bplus%20%C3%A9.png"), "{encoded}");
    assert!(after.0.values().any(|v| v.as_deref() == Some(encoded.as_str())), "the encoded key is rewritten encoded");
    for (post, value) in &before.1 {
        let expected = match value.as_deref() {
            Some(v) if v.starts_with("image/") => Some(v.replacen("image/", "avatar/", 1)),
            other => other.map(str::to_owned),
        };
        assert_eq!(after.1[post], expected, "post {post}");
    }

    // The journal names each rewrite's reference, and the legacy key where the value is not it.
    let journal: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT reference, count(*), count(legacy_key) FROM avatar_migration_journal GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&env.db)
    .await
    .unwrap();
    assert_eq!(
        journal,
        vec![
            (r#"public."Users"."Avatar URL""#.to_owned(), users_moved, users_moved),
            ("public.posts.cover_key".to_owned(), posts_moved, 0),
        ]
    );

    // Verify follows every reference: each moved row resolves, the values left alone are
    // counted apart (another form, another prefix, NULL, empty), and the migration is done.
    let (code, out) = feeder_with(&env, &["verify", "--json"], &references);
    assert_eq!(code, Some(0), "{out}");
    let verified = last_json(&out);
    assert_eq!(verified["rows_modern"], users_moved + posts_moved, "{out}");
    assert_eq!(verified["rows_other"], untouched_urls.len() + 3, "{out}");
    assert_eq!(verified["rows_legacy"], 0, "{out}");

    // The report lists every rewrite with its reference.
    let (code, csv) = feeder_with(&env, &["report", "--csv"], &references);
    assert_eq!(code, Some(0), "{csv}");
    assert_eq!(csv.lines().filter(|l| l.ends_with("public.posts.cover_key")).count() as i64, posts_moved);

    // A rollback without one of the journal's references refuses rather than half-does it.
    let (code, out) =
        feeder_with(&env, &["rollback"], &[("REFERENCES", "public.posts.cover_key"), ("MISSING_INDEX", "refuse")]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(r#"the journal holds rewrites of public."Users"."Avatar URL""#), "{out}");
    assert_eq!(values(&env).await, after, "nothing rolled back");

    // Rolled back, every value is again exactly what it was.
    let (code, out) = feeder_with(&env, &["rollback", "--json"], &references);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(last_json(&out)["rows_rolled_back"], users_moved + posts_moved, "{out}");
    assert_eq!(values(&env).await, before);

    // Rolled back, the rows name legacy objects again: verify says so, and reconcile sends a
    // message for each legacy object a reference names (an object two references name is sent
    // once for each: harmless, I5); the consumers move them again.
    let (code, out) = feeder_with(&env, &["verify", "--json"], &references);
    assert_eq!(code, Some(3), "{out}");
    assert_eq!(last_json(&out)["rows_legacy_pending"], users_moved + posts_moved, "{out}");
    let (code, out) = feeder_with(&env, &["reconcile"], &references);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("{} messages enqueued", users_moved + posts_moved)), "{out}");
    drain(&env, &references).await;
    assert_eq!(values(&env).await, after);
}

/// `feeder <args>` with more settings.
fn feeder_with(env: &Env, args: &[&str], extra: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = env.command("feeder");
    command.args(args).envs(extra.iter().copied());
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code(), format!("{}{stderr}", String::from_utf8_lossy(&out.stdout)))
}

/// What start-up refuses, each with what to do: a column without an index (and the statement
/// that builds it), a composite primary key, a missing column, a role without the grant.
#[tokio::test]
async fn start_up_refuses_references_it_cannot_follow_and_says_what_to_do() {
    let env = Env::new().await;
    sqlx::raw_sql(
        r#"CREATE TABLE "Users" (uid uuid PRIMARY KEY DEFAULT gen_random_uuid(), "Avatar URL" text);
           CREATE TABLE pairs (a int, b int, path text, PRIMARY KEY (a, b));
           CREATE TABLE keyless (path text);
           CREATE INDEX ON pairs (path);
           CREATE INDEX ON keyless (path);"#,
    )
    .execute(&env.db)
    .await
    .unwrap();
    let start = |references: &str, missing_index: &str| {
        let out = consumer(&env, &[("REFERENCES", references), ("MISSING_INDEX", missing_index)]).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };

    let (code, err) = start(r#""Users"."Avatar URL"=https://cdn.example.com/{key}"#, "refuse");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(r#"CREATE INDEX CONCURRENTLY "Users_Avatar URL_idx" ON public."Users" ("Avatar URL");"#),
        "{err}"
    );
    let (code, err) = start("pairs.path", "refuse");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("primary key has 2 columns (a, b)"), "{err}");
    let (code, err) = start("keyless.path", "refuse");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("has no primary key"), "{err}");
    let (code, err) = start("posts.cover_key", "refuse");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("table posts does not exist") || err.contains("\"posts\" does not exist"), "{err}");
    let (code, err) = start(r#""Users".avatar_url"#, "refuse");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("has no column \"avatar_url\""), "{err}");

    // Built when asked: concurrently, then found valid.
    feed(&env).await;
    let (code, err) = start(r#""Users"."Avatar URL"=https://cdn.example.com/{key}"#, "build");
    assert_eq!(code, Some(0), "an empty queue: the consumer exits when idle: {err}");
    let valid: bool = sqlx::query_scalar(
        r#"SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('"Users_Avatar URL_idx"')"#,
    )
    .fetch_one(&env.db)
    .await
    .unwrap();
    assert!(valid);
}
