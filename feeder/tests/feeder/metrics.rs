//! The feeder's CloudWatch metric lines (CLOUDWATCH_NAMESPACE), which its stall alarm reads.

use std::io::{BufRead, BufReader};

use super::*;

/// The lines count what the feeder enqueued and the time it was held back by the backlog
/// limit (a feeder held back is not stalled), and the last line is written at its end.
#[tokio::test]
async fn the_feeder_metric_lines_count_what_it_enqueued_and_the_time_it_was_held_back() {
    let env = Env::new().await;
    let keys: Vec<String> = (0..12).map(|i| format!("image/avatar-{i}.png")).collect();
    env.put_many(&env.source_bucket, &keys, b"png").await;
    // Pages of 5 objects, one a message: the third page waits while 10 messages are queued.
    let mut child = env
        .command("feeder")
        .env("PAGE_SIZE", "5")
        .env("OBJECTS_PER_MESSAGE", "1")
        .env("MAX_BACKLOG", "5")
        .env("CLOUDWATCH_NAMESPACE", "AvatarMigration/test")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Stderr is read to its end (a closed pipe would fail the feeder's writes); the moment it
    // says it waits on the backlog is sent over.
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let log = std::thread::spawn(move || {
        let mut log = Vec::new();
        for line in stderr.lines().map_while(Result::ok) {
            if line.contains("queue backlog above the limit: waiting") {
                let _ = held_tx.send(());
            }
            log.push(line);
        }
        log.join("\n")
    });
    let held = tokio::task::spawn_blocking(move || held_rx.recv().is_ok()).await.unwrap();
    assert!(held, "the feeder never waited on the backlog: {}", log.join().unwrap());
    // Each second waited is counted once it has passed, whatever comes next: make room.
    let mut drained = env.drain().await;
    let output = child.wait_with_output().unwrap();
    let log = log.join().unwrap();
    assert!(output.status.success(), "{log}");
    drained.extend(env.drain().await);
    assert_eq!(keys_of(&drained).len(), keys.len());

    let sums = testkit::emf_sums(&output.stdout, "AvatarMigration/test");
    let sum = |name: &str| sums[name];
    assert_eq!(sum("ObjectsEnqueued"), keys.len() as u64);
    assert!(sum("SecondsHeldBack") >= 1, "{sums:?}");
}
