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

/// A key as the users' column names it (its form in `REFERENCES`).
fn cdn(key: &str) -> String {
    format!("https://cdn.example.com/{}", common::keys::encode_path(key))
}

/// `n` legacy keys, and one with a space, a plus and an accent last.
fn legacy_keys_and_an_odd_one(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("image/avatar-{i}.png")).chain(["image/with space+plus é.png".into()]).collect()
}

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
    let keys = legacy_keys_and_an_odd_one(40);
    env.put_many(&env.source_bucket, &keys, b"png").await;
    env.put(&env.source_bucket, "imagex/outside.png", b"outside").await;

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
    // NULL or empty: 3 users, a post; not the column's form: a URL of another host and a bare
    // key among the users (any text is a bare key: the URL among the posts names another
    // prefix, as do the keys outside `image/`).
    assert_eq!(
        (verified["rows_other_empty"].as_u64(), verified["rows_other_form"].as_u64()),
        (Some(4), Some(2)),
        "{out}"
    );
    assert_eq!(verified["rows_legacy"], 0, "{out}");

    // Status counts every reference's rows by what their values name.
    let (code, out) = feeder_with(&env, &["status", "--json"], &references);
    assert_eq!(code, Some(0), "{out}");
    let status = last_json(&out);
    assert_eq!(
        (status["rows_modern"].as_i64(), status["rows_legacy"].as_i64(), status["rows_other"].as_i64()),
        (Some(users_moved + posts_moved), Some(0), Some(untouched_urls.len() as i64 + 3)),
        "{out}"
    );

    // The report lists every rewrite with its reference.
    let (code, csv) = feeder_with(&env, &["report", "--csv"], &references);
    assert_eq!(code, Some(0), "{csv}");
    assert_eq!(csv.lines().filter(|l| l.ends_with("public.posts.cover_key")).count() as i64, posts_moved);
    let (_, out) = feeder_with(&env, &["report", "--json"], &references);
    let by = &last_json(&out)["by_reference"];
    assert_eq!(by[r#"public."Users"."Avatar URL""#]["rows_rewritten"], users_moved, "{out}");
    assert_eq!(by["public.posts.cover_key"]["rows_rewritten"], posts_moved, "{out}");

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
    // A key set aside is counted so by status, whichever form names it (this one: a URL with
    // percent-encoding, and a bare key).
    common::db::record_failure(&env.db, &keys[40], common::db::Reason::DestinationConflict, "test").await.unwrap();
    let (_, out) = feeder_with(&env, &["status", "--json"], &references);
    let status = last_json(&out);
    assert_eq!(status["rows_legacy"], users_moved + posts_moved, "{out}");
    assert_eq!(status["rows_legacy_set_aside"], 2, "the rows naming {:?}: {out}", keys[40]);
    let reason = common::db::Reason::DestinationConflict;
    common::db::clear_failures(&env.db, &[keys[40].clone()], reason).await.unwrap();
    let (code, out) = feeder_with(&env, &["reconcile"], &references);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("{} messages enqueued", users_moved + posts_moved)), "{out}");
    drain(&env, &references).await;
    assert_eq!(values(&env).await, after);
}

/// `feeder <args>` with more settings: its exit code, and its stderr then its stdout (whose
/// last line stays last).
fn feeder_with(env: &Env, args: &[&str], extra: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = env.command("feeder");
    command.args(args).envs(extra.iter().copied());
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code(), format!("{stderr}{}", String::from_utf8_lossy(&out.stdout)))
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

/// The SQL functions that meet URL values (status's counts, the fence) encode and decode keys
/// exactly as the forms do in Rust, and refuse what is not an encoding.
#[tokio::test]
async fn sql_url_encoding_matches_the_forms() {
    let env = Env::new().await;
    env.prepare().await;
    let encode = |s: &str| {
        let db = env.db.clone();
        let s = s.to_owned();
        async move {
            sqlx::query_scalar::<_, String>("SELECT avatar_migration_url_encode($1)")
                .bind(s)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    let decode = |s: &str| {
        let db = env.db.clone();
        let s = s.to_owned();
        async move {
            sqlx::query_scalar::<_, Option<String>>("SELECT avatar_migration_url_decode($1)")
                .bind(s)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    for key in ["image/a.png", "image/with space+plus é.png", "image/%41~!*'();:@&=+$,?#[]\\\"", "image/日本/ü.png", ""]
    {
        let encoded = encode(key).await;
        assert_eq!(encoded, common::keys::encode_path(key).to_string(), "{key:?}");
        assert_eq!(decode(&encoded).await.as_deref(), Some(key), "{key:?}");
    }
    assert_eq!(decode("image%2Fa%7e.png").await.as_deref(), Some("image/a~.png"));
    for bad in ["a%zz", "a%", "a%4", "%C3", "%FF%FE"] {
        assert_eq!(decode(bad).await, None, "{bad:?}");
    }
}

/// On the second schema, cleanup deletes a legacy object only when no reference names it in
/// its form (a live write of a legacy URL keeps its object), and the fence, one trigger per
/// referencing column, turns a later write of a deleted object's legacy value (a URL with its
/// percent-encoding, a bare key) into its copy's value.
#[tokio::test]
async fn on_a_second_schema_cleanup_and_the_fence_follow_every_reference() {
    let env = Env::new().await;
    sqlx::raw_sql(SECOND_SCHEMA).execute(&env.db).await.unwrap();
    let keys = legacy_keys_and_an_odd_one(6);
    env.put_many(&env.source_bucket, &keys, b"png").await;
    env.put(&env.source_bucket, "image/orphan.png", b"no row names it").await;
    let urls: Vec<String> = [0, 1, 2, 3, 6].iter().map(|&i| cdn(&keys[i])).collect();
    sqlx::query(r#"INSERT INTO "Users" ("Avatar URL") SELECT * FROM UNNEST($1::text[])"#)
        .bind(&urls)
        .execute(&env.db)
        .await
        .unwrap();
    for (i, key) in keys.iter().enumerate().take(6).skip(2) {
        sqlx::query("INSERT INTO posts (slug, cover_key) VALUES ($1, $2)")
            .bind(format!("post-{i}"))
            .bind(key)
            .execute(&env.db)
            .await
            .unwrap();
    }
    feed(&env).await;
    let references = [("REFERENCES", REFERENCES), ("MISSING_INDEX", "refuse")];
    drain(&env, &references).await;

    // The live service writes a legacy URL again: that object is named, and is kept.
    let live = sqlx::query_scalar::<_, String>(
        r#"UPDATE "Users" SET "Avatar URL" = $1 WHERE "Avatar URL" = $2 RETURNING uid::text"#,
    )
    .bind(cdn(&keys[1]))
    .bind(cdn(&keys[1].replacen("image/", "avatar/", 1)))
    .fetch_one(&env.db)
    .await
    .unwrap();

    let (code, out) = feeder_with(&env, &["fence", "install"], &references);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(r#"public."Users"."Avatar URL", public.posts.cover_key"#), "{out}");
    let (_, out) = feeder_with(&env, &["fence", "status", "--json"], &references);
    assert_eq!(last_json(&out)["enabled"], true, "{out}");

    let (code, out) = feeder_with(&env, &["cleanup", "--yes", "--json"], &references);
    assert_eq!(code, Some(0), "{out}");
    let cleaned = last_json(&out);
    assert_eq!(cleaned["kept_referenced"], 1, "{out}");
    assert_eq!(cleaned["deleted"], keys.len() as i64, "the others and the orphan: {out}");
    let left = env.keys(&env.source_bucket).await;
    assert_eq!(left, vec![keys[1].clone()], "only the object a row names is left");
    let value: String = sqlx::query_scalar(r#"SELECT "Avatar URL" FROM "Users" WHERE uid::text = $1"#)
        .bind(&live)
        .fetch_one(&env.db)
        .await
        .unwrap();
    assert_eq!(value, cdn(&keys[1]), "the live write is never undone");

    // Written after the delete, a deleted object's legacy value names its copy instead.
    let written: String =
        sqlx::query_scalar(r#"INSERT INTO "Users" ("Avatar URL") VALUES ($1) RETURNING "Avatar URL""#)
            .bind(cdn(&keys[6]))
            .fetch_one(&env.db)
            .await
            .unwrap();
    assert_eq!(written, cdn("avatar/with space+plus é.png"));
    let written: String =
        sqlx::query_scalar("INSERT INTO posts (slug, cover_key) VALUES ('late', $1) RETURNING cover_key::text")
            .bind(&keys[5])
            .fetch_one(&env.db)
            .await
            .unwrap();
    assert_eq!(written, "avatar/avatar-5.png");
    let (_, out) = feeder_with(&env, &["fence", "status", "--json"], &references);
    assert_eq!(last_json(&out)["writes_rewritten"], 2, "{out}");

    // Removed, the fence leaves no trigger on either table.
    let (code, out) = feeder_with(&env, &["fence", "remove"], &references);
    assert_eq!(code, Some(0), "{out}");
    let triggers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'avatar_migration_fence%'")
            .fetch_one(&env.db)
            .await
            .unwrap();
    assert_eq!(triggers, 0);
}

/// `feeder grants` prints what the migration's role needs on each reference of the second
/// schema (the missing indexes, statistics, the grants); once the tables' owner has run it
/// after `deploy/database-role.sql`, the migration runs logged in as that role.
#[tokio::test]
async fn the_grants_printed_for_the_references_are_all_the_role_needs() {
    let env = Env::new().await;
    let unindexed: String =
        SECOND_SCHEMA.lines().filter(|l| !l.contains("CREATE INDEX")).collect::<Vec<_>>().join("\n");
    sqlx::raw_sql(&unindexed).execute(&env.db).await.unwrap();
    let keys: Vec<String> = (0..5).map(|i| format!("image/avatar-{i}.png")).collect();
    env.put_many(&env.source_bucket, &keys, b"png").await;
    let urls: Vec<String> = keys.iter().map(|k| format!("https://cdn.example.com/{k}")).collect();
    sqlx::query(r#"INSERT INTO "Users" ("Avatar URL") SELECT * FROM UNNEST($1::text[])"#)
        .bind(&urls)
        .execute(&env.db)
        .await
        .unwrap();
    sqlx::query("INSERT INTO posts (slug, cover_key) SELECT 'post-' || k, k FROM UNNEST($1::text[]) AS k")
        .bind(&keys)
        .execute(&env.db)
        .await
        .unwrap();
    let url = crate::end::least_privilege_url(&env, "grants pw", &[]);
    let references = [("REFERENCES", REFERENCES), ("MISSING_INDEX", "refuse")];

    // Without its grants on these tables, the role is refused at start-up, told what to run.
    let refused = consumer(&env, &references).env("DATABASE_URL", &url).output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{err}");
    assert!(err.contains("may not read the column and the primary key"), "{err}");
    assert!(
        err.contains(
            r#"GRANT SELECT (uid, "Avatar URL"), UPDATE ("Avatar URL") ON public."Users" TO avatar_migrator;"#
        ),
        "{err}"
    );

    let (code, script) = {
        let out = env.command("feeder").args(["grants"]).envs(references).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert_eq!(code, Some(0), "{script}");
    assert!(script.contains(r#"CREATE INDEX CONCURRENTLY IF NOT EXISTS "Users_Avatar URL_idx""#), "{script}");
    assert!(
        script.contains("GRANT SELECT (slug, cover_key), UPDATE (cover_key) ON public.posts TO avatar_migrator;"),
        "{script}"
    );
    let psql = std::env::var("PSQL").expect("PSQL is set by scripts/local-services env");
    let mut run = std::process::Command::new(psql)
        .args([&env.database_url, "-q", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(run.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
    let ran = run.wait_with_output().unwrap();
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));

    // Everything as the role from here: it creates and owns the migration's own tables.
    let fed = env.command("feeder").envs(references).env("DATABASE_URL", &url).output().unwrap();
    assert!(fed.status.success(), "{}", String::from_utf8_lossy(&fed.stderr));
    let out =
        tokio::process::Command::from(consumer(&env, &references)).env("DATABASE_URL", &url).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (users, posts) = values(&env).await;
    assert!(users.values().all(|v| v.as_deref().is_some_and(|v| v.contains("/avatar/"))), "{users:?}");
    assert!(posts.values().all(|v| v.as_deref().is_some_and(|v| v.starts_with("avatar/"))), "{posts:?}");
}

/// A form holding a quote and a backslash reaches the fence's function as written: a tombstoned
/// legacy value is written as its copy's, the form's text kept.
#[tokio::test]
async fn the_fence_keeps_a_form_with_quotes_and_backslashes_as_written() {
    let env = Env::new().await;
    sqlx::raw_sql("CREATE TABLE notes (id bigint PRIMARY KEY, ref text); CREATE INDEX ON notes (ref);")
        .execute(&env.db)
        .await
        .unwrap();
    let references = [("REFERENCES", r"notes.ref=it's\{key}"), ("MISSING_INDEX", "refuse")];
    let (code, out) = feeder_with(&env, &["fence", "install"], &references);
    assert_eq!(code, Some(0), "{out}");
    sqlx::query(
        "INSERT INTO avatar_migration_tombstones (legacy_path, new_path, holder_id)
         VALUES ('image/a.png', 'avatar/a.png', 'test')",
    )
    .execute(&env.db)
    .await
    .unwrap();
    let written: String = sqlx::query_scalar("INSERT INTO notes VALUES (1, $1) RETURNING ref")
        .bind(r"it's\image/a.png")
        .fetch_one(&env.db)
        .await
        .unwrap();
    assert_eq!(written, r"it's\avatar/a.png");
    let untouched: String = sqlx::query_scalar("INSERT INTO notes VALUES (2, $1) RETURNING ref")
        .bind(r"its\image/a.png")
        .fetch_one(&env.db)
        .await
        .unwrap();
    assert_eq!(untouched, r"its\image/a.png", "another form is not this column's");
}
