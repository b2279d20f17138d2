//! A live row is never held hostage: a row the live service holds is skipped, the others of
//! its batch proceed at once, and the held one completes once it is released.

use std::time::Duration;

use testkit::{Env, wait_until};

use crate::helpers::{consumer, feed, legacy_keys, wait_exit};

#[tokio::test]
async fn a_row_held_by_the_live_service_does_not_stall_the_rest_of_its_batch() {
    let env = Env::new().await;
    let keys = legacy_keys(0..200);
    env.put_many(&env.source_bucket, &keys, b"png").await;
    let ids = env.insert_rows(&keys).await;
    feed(&env).await;
    // The live service holds one row in a long transaction.
    let mut live = env.db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM avatars WHERE id = $1 FOR UPDATE").bind(ids[7]).execute(&mut *live).await.unwrap();

    // Batches gather for 200 ms, so the held row shares its UPDATE with many others.
    let vars = [("DB_BATCH_MAX_WAIT_MS", "200"), ("VISIBILITY_TIMEOUT", "1"), ("EXIT_WHEN_IDLE", "1")];
    let mut child = consumer(&env, &vars).spawn().unwrap();
    wait_until("every other row rewritten while one is held", Duration::from_secs(60), || async {
        env.count_rows_with_prefix("avatar/").await == 199
    })
    .await;
    assert_eq!(env.path_of(ids[7]).await, keys[7], "the held row is untouched");
    assert!(child.try_wait().unwrap().is_none(), "the consumer waits for the held row's message");
    live.commit().await.unwrap();

    assert!(wait_exit(&mut child, Duration::from_secs(60)).await.success());
    assert_eq!(env.count_rows_with_prefix("avatar/").await, 200);
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
    assert_eq!(env.failures().await, vec![]);
}
