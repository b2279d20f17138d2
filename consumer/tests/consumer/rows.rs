//! A live row is never held hostage: a row the live service holds is skipped, the others of
//! its batch proceed at once, and the held one completes once it is released.

use std::time::Duration;

use testkit::{Env, wait_until};

use crate::helpers::{consumer, count_lines, feed, wait_exit};

#[tokio::test]
async fn a_row_held_by_the_live_service_does_not_stall_the_rest_of_its_batch() {
    let env = Env::new().await;
    let (keys, ids) = env.seed_legacy(0..200).await;
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

/// One row the database refuses (here a trigger; in production a constraint or a deadlock)
/// fails only its own object: its batch is retried row by row and the others go through.
#[tokio::test]
async fn a_row_the_database_refuses_fails_only_its_own_object() {
    let env = Env::new().await;
    let (keys, ids) = env.seed_legacy(0..50).await;
    env.prepare().await;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN IF OLD.path = 'image/avatar-7.png' THEN RAISE EXCEPTION 'this row is refused'; END IF;
              RETURN NEW; END $$;
         CREATE TRIGGER refuse_one BEFORE UPDATE ON avatars FOR EACH ROW EXECUTE FUNCTION refuse_one();",
    )
    .execute(&env.db)
    .await
    .unwrap();
    feed(&env).await;
    let vars = [("DB_BATCH_MAX_WAIT_MS", "200"), ("VISIBILITY_TIMEOUT", "1"), ("EXIT_WHEN_IDLE", "2")];
    let mut child = consumer(&env, &vars).spawn().unwrap();
    let row_by_row = count_lines(&mut child, "rewriting row by row");
    wait_until("every other row rewritten", Duration::from_secs(60), || async {
        env.count_rows_with_prefix("avatar/").await == 49
    })
    .await;
    assert!(row_by_row.load(std::sync::atomic::Ordering::SeqCst) > 0, "a batch was retried row by row");
    assert_eq!(env.path_of(ids[7]).await, keys[7]);
    // The refused row's message keeps coming back, then rests in the dead-letter queue.
    assert!(wait_exit(&mut child, Duration::from_secs(120)).await.success());
    assert_eq!(env.depth(&env.dlq_url).await.0, 1);
    assert_eq!(env.depth(&env.queue_url).await, (0, 0));
}
