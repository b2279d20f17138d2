//! Several objects per message (`OBJECTS_PER_MESSAGE`): a message is deleted only when every
//! one of its objects is done or recorded; otherwise it comes back whole, and its objects
//! already done are found done (I2, I5).

use std::time::Duration;

use clap::Parser;
use testkit::{Env, wait_until};
use tokio_util::sync::CancellationToken;

use crate::helpers::{consumer, stdout, wait_exit};

#[tokio::test]
async fn a_message_of_several_objects_is_deleted_only_when_every_one_is_done() {
    let env = Env::new().await;
    let (keys, ids) = env.seed_legacy(0..40).await;
    env.prepare().await;
    let mut args = env.args("feeder");
    args.push("--objects-per-message=7".into());
    let settings = feeder::Settings::try_parse_from(args).unwrap();
    let clients = env.clients().await;
    let fed = feeder::feed(&settings, &settings.run, &clients, CancellationToken::new()).await.unwrap();
    assert_eq!(fed.enqueued, 40, "objects enqueued");
    assert_eq!(env.depth(&env.queue_url).await, (6, 0), "40 objects in messages of 7: 6 messages");
    env.send_raw(r#"{"v":2,"objects":[]}"#).await;

    // The live service holds one row: its object cannot finish, so its message cannot go.
    let mut live = env.db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM avatars WHERE id = $1 FOR UPDATE").bind(ids[11]).execute(&mut *live).await.unwrap();
    let mut child = consumer(&env, &[("VISIBILITY_TIMEOUT", "1"), ("EXIT_WHEN_IDLE", "1")]).spawn().unwrap();
    wait_until("every other row rewritten while one is held", Duration::from_secs(60), || async {
        env.count_rows_with_prefix("avatar/").await == 39
    })
    .await;
    assert_eq!(env.path_of(ids[11]).await, keys[11], "the held row is untouched");
    assert_ne!(env.depth(&env.queue_url).await, (0, 0), "the held object's message is not deleted");
    assert!(child.try_wait().unwrap().is_none(), "the consumer waits for that message");
    live.commit().await.unwrap();

    assert!(wait_exit(&mut child, Duration::from_secs(60)).await.success());
    let summary = stdout(&child.wait_with_output().unwrap());
    assert_eq!(env.count_rows_with_prefix("avatar/").await, 40);
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
    assert!(summary.contains("copied 40,"), "each object copied once: {summary}");
    // The message came back whole: its six other objects were found already there.
    let present: u64 =
        summary.split("already present ").nth(1).and_then(|s| s.split(';').next()).unwrap().parse().unwrap();
    assert!(present >= 6, "{summary}");
    let failures = env.failures().await;
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].0, "malformed_message", "an empty batch is recorded, not retried forever");
}

/// At a trickle (a fleet cap well under what one consumer could do), rewrites linger for
/// company across messages: statements of several messages' rows, not one a message.
#[tokio::test]
async fn at_a_trickle_rewrites_of_several_messages_share_a_statement() {
    let env = Env::new().await;
    let (keys, _) = env.seed_legacy(0..300).await;
    crate::helpers::feed(&env).await;
    crate::helpers::feeder(&env, &["throttle", "--rate", "60"]);
    // Messages of ten objects come about every 170 ms: well within the linger's quiet
    // quarter (500 ms), so each statement gathers up to 2 s of them.
    let out = crate::helpers::drain(&env, &[("DB_BATCH_MAX_WAIT_MS", "2000")]).await;
    let summary = stdout(&out);
    let line = summary.lines().find(|l| l.contains("row rewrites in")).unwrap_or_else(|| panic!("{summary}"));
    let statements: u64 =
        line.split("row rewrites in ").nth(1).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
    assert_eq!(env.count_rows_with_prefix("avatar/").await, keys.len() as i64);
    assert!(statements * 25 <= keys.len() as u64, "at least 25 rows a statement: {line}");
}
