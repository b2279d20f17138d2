//! Operating a migration: the rewrite journal, `feeder status --json`, `feeder report` and
//! `feeder rollback`, each on a prepared state with exact counts.

use std::collections::BTreeMap;

use serde_json::json;
use testkit::Env;

use crate::helpers::{drain, feed, feeder, last_json, seed_legacy};

/// After a run with a conflict and a row whose object is missing: every rewrite is in the
/// journal, the report counts them and the set-aside by reason (and lists each one in CSV),
/// and status says where things stand, with the rate and an ETA of zero (nothing left).
#[tokio::test]
async fn status_and_report_tell_what_was_moved_and_set_aside() {
    let env = Env::new().await;
    let (_, ids) = seed_legacy(&env, 0..12).await;
    env.put(&env.source_bucket, "image/conflict.png", b"legacy").await;
    env.put(&env.destination_bucket, "avatar/conflict.png", b"a newer upload").await;
    env.insert_rows(&["image/conflict.png".into()]).await;
    feed(&env).await;
    drain(&env, &[]).await;

    let journal: Vec<(String, String, String)> =
        sqlx::query_as("SELECT row_id, old_path, new_path FROM avatar_migration_journal ORDER BY journal_id")
            .fetch_all(&env.db)
            .await
            .unwrap();
    assert_eq!(journal.len(), 12, "one record per rewritten row");
    let by_id: BTreeMap<String, (String, String)> = journal.into_iter().map(|(id, o, n)| (id, (o, n))).collect();
    assert_eq!(
        by_id.get(&ids[3].to_string()),
        Some(&("image/avatar-3.png".to_owned(), "avatar/avatar-3.png".to_owned()))
    );

    let (code, out) = feeder(&env, &["report", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let report = last_json(&out);
    assert_eq!(report["rows_rewritten"], 12);
    assert_eq!(report["rows_rolled_back"], 0);
    assert_eq!(report["set_aside"], json!({"destination_conflict": 1}));

    let (code, csv) = feeder(&env, &["report", "--csv"]);
    assert_eq!(code, Some(0), "{csv}");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "kind,row_id,old_path,new_path,at,reason,detail");
    assert_eq!(lines.iter().filter(|l| l.starts_with("moved,")).count(), 12);
    let conflict: Vec<&&str> = lines.iter().filter(|l| l.starts_with("set_aside,")).collect();
    assert_eq!(conflict.len(), 1);
    assert!(conflict[0].contains("image/conflict.png") && conflict[0].contains("destination_conflict"));

    let (code, out) = feeder(&env, &["status", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let status = last_json(&out);
    assert_eq!(status["rows_modern"], 12);
    assert_eq!(status["rows_legacy"], 1);
    assert_eq!(status["rows_left"], 0, "the legacy row left is set aside");
    assert_eq!((status["queue_visible"].clone(), status["queue_in_flight"].clone()), (json!(0), json!(0)));
    assert_eq!(status["dlq_visible"], 0);
    assert_eq!(status["failures"], json!({"destination_conflict": 1}));
    assert_eq!(status["listing_complete"], true);
    assert_eq!(status["objects_listed"], 13);
    assert_eq!(status["rewrites_recorded"], 12);
    assert!(status["objects_per_s"].as_f64().unwrap() > 0.0, "12 rewrites in the last five minutes");
    assert_eq!(status["eta_s"], 0.0);
}

/// Rollback points rewritten rows back at their legacy paths, compare-and-set: a row the live
/// service changed since is left alone, a row whose legacy object is gone is left alone, a
/// row another transaction holds is skipped (and rolled back by the next run); a dry run
/// writes nothing; and it refuses while the queue holds messages.
#[tokio::test]
async fn rollback_points_rows_back_only_where_it_is_safe() {
    let env = Env::new().await;
    let (keys, ids) = seed_legacy(&env, 0..10).await;
    feed(&env).await;
    drain(&env, &[]).await;
    // The live service uploads a new avatar for row 0; row 1's legacy object is cleaned up.
    sqlx::query("UPDATE avatars SET path = 'avatar/new-upload.png' WHERE id = $1")
        .bind(ids[0])
        .execute(&env.db)
        .await
        .unwrap();
    env.s3.delete_object().bucket(&env.source_bucket).key(&keys[1]).send().await.unwrap();

    let (code, out) = feeder(&env, &["rollback", "--dry-run", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        last_json(&out),
        json!({"dry_run": true, "entries": 10, "rows_rolled_back": 8, "rows_changed_since": 1, "rows_held": 0,
               "legacy_missing": 1})
    );
    assert_eq!(env.count_rows_with_prefix("image/").await, 0, "a dry run writes nothing");

    // A message in the queue: consumers would migrate the rows again.
    env.send_raw("{\"v\":1,\"key\":\"image/avatar-5.png\",\"size\":3,\"etag\":\"\\\"x\\\"\"}").await;
    let (code, out) = feeder(&env, &["rollback"]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(env.count_rows_with_prefix("image/").await, 0);
    env.drain().await;

    // Row 2 is held by a live transaction.
    let mut live = env.db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM avatars WHERE id = $1 FOR UPDATE").bind(ids[2]).execute(&mut *live).await.unwrap();
    let (code, out) = feeder(&env, &["rollback", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        last_json(&out),
        json!({"dry_run": false, "entries": 10, "rows_rolled_back": 7, "rows_changed_since": 1, "rows_held": 1,
               "legacy_missing": 1})
    );
    live.rollback().await.unwrap();
    for (i, id) in ids.iter().enumerate() {
        let expected = match i {
            0 => "avatar/new-upload.png".to_owned(),
            1 | 2 => keys[i].replacen("image/", "avatar/", 1),
            _ => keys[i].clone(),
        };
        assert_eq!(env.path_of(*id).await, expected, "row {i}");
    }

    let (code, out) = feeder(&env, &["rollback", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let again = last_json(&out);
    assert_eq!((again["entries"].clone(), again["rows_rolled_back"].clone()), (json!(3), json!(1)), "{again}");
    assert_eq!(env.path_of(ids[2]).await, keys[2], "the held row, once free");
    let (_, out) = feeder(&env, &["report", "--json"]);
    assert_eq!(last_json(&out)["rows_rolled_back"], 8);
}
