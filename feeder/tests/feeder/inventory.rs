//! An S3 Inventory report read instead of listing, and one refused.

use super::*;

/// A row of an inventory report: key, size, ETag, IsLatest, IsDeleteMarker.
type InventoryRow = (String, i64, &'static str, bool, bool);

/// Writes an S3 Inventory report of the source bucket into the destination bucket: one
/// gzipped CSV file per entry of `files` (rows of Bucket, Key, Size, ETag, IsLatest,
/// IsDeleteMarker, keys URL-encoded as AWS writes them), and its manifest; returns the
/// manifest's location. `corrupt`: the manifest gives the last file a wrong MD5.
async fn write_inventory(env: &Env, files: &[Vec<InventoryRow>], corrupt: bool) -> String {
    use md5::Digest;
    use std::io::Write;
    const ENCODE: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b'/');
    let mut entries = Vec::new();
    for (i, rows) in files.iter().enumerate() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        for (key, size, etag, latest, delete_marker) in rows {
            let key = percent_encoding::utf8_percent_encode(key, ENCODE);
            writeln!(gz, "\"{}\",\"{key}\",\"{size}\",\"{etag}\",\"{latest}\",\"{delete_marker}\"", env.source_bucket)
                .unwrap();
        }
        let bytes = gz.finish().unwrap();
        let mut md5 = format!("{:x}", md5::Md5::digest(&bytes));
        if corrupt && i == files.len() - 1 {
            md5 = "0".repeat(32);
        }
        let key = format!("inventory/data/part-{i}.csv.gz");
        env.put(&env.destination_bucket, &key, &bytes).await;
        entries.push(serde_json::json!({"key": key, "size": bytes.len(), "MD5checksum": md5}));
    }
    let manifest = serde_json::json!({
        "sourceBucket": env.source_bucket,
        "destinationBucket": format!("arn:aws:s3:::{}", env.destination_bucket),
        "version": "2016-11-30",
        "fileFormat": "CSV",
        "fileSchema": "Bucket, Key, Size, ETag, IsLatest, IsDeleteMarker",
        "files": entries,
    });
    env.put(&env.destination_bucket, "inventory/manifest.json", manifest.to_string().as_bytes()).await;
    format!("s3://{}/inventory/manifest.json", env.destination_bucket)
}

/// The rows of an inventory of these keys (latest versions, no delete markers).
fn inventory_rows(keys: &[String]) -> Vec<InventoryRow> {
    keys.iter().map(|k| (k.clone(), 3, "bff139fa05ac583f685a523ab3d110a0", true, false)).collect()
}

/// An S3 Inventory report instead of listing: every object of the report under the prefix
/// is enqueued once with its size and ETag (keys URL-decoded), nothing outside the prefix,
/// no delete marker and no older version; each data file ends with its own checkpoint.
#[tokio::test]
async fn an_inventory_report_is_read_instead_of_listing() {
    let env = Env::new().await;
    let keys = awkward_uneven_keys();
    let (first, second) = keys.split_at(100);
    let mut file_a = inventory_rows(first);
    file_a.push(("imagex/outside.png".into(), 3, "e", true, false));
    file_a.push(("image/deleted.png".into(), 0, "d", true, true));
    let mut file_b = inventory_rows(second);
    file_b.push(("image/old-version.png".into(), 3, "o", false, false));
    let manifest = write_inventory(&env, &[file_a, file_b], false).await;
    // Not one of these objects exists: the feeder must not list.
    let args = RunArgs { inventory: Some(manifest), objects_per_message: 1, ..run_args(7) };
    let summary = feeder::feed(&settings(&env), &args, &clients(&env).await, CancellationToken::new()).await.unwrap();
    assert_eq!((summary.listed, summary.finished), (keys.len() as u64, true));
    let bodies = env.drain().await;
    let mut enqueued = keys_of(&bodies);
    enqueued.sort();
    assert_eq!(enqueued, keys, "each key of the report under the prefix, once");
    let object = &common::message::decode(&bodies[0]).unwrap()[0];
    assert_eq!((object.size, object.etag.as_str()), (3, "\"bff139fa05ac583f685a523ab3d110a0\""));
    let parts = feeder::store::ranges::load_ranges(&env.db, &env.source_bucket, "image/").await.unwrap();
    let done: Vec<_> = parts.iter().map(|p| (p.inventory_file.as_deref(), p.rows_done, p.listed, p.finished)).collect();
    assert_eq!(
        done,
        vec![
            (Some("inventory/data/part-0.csv.gz"), 102, 100, true),
            (Some("inventory/data/part-1.csv.gz"), second.len() as i64 + 1, second.len() as i64, true)
        ]
    );
}

/// A data file whose MD5 is not the manifest's is an error naming it, and the listing is
/// never marked finished; a report of another bucket is refused before anything is sent.
#[tokio::test]
async fn a_corrupt_or_foreign_inventory_report_is_an_error() {
    let env = Env::new().await;
    let manifest = write_inventory(&env, &[inventory_rows(&["image/a.png".into()])], true).await;
    let (settings, clients) = (settings(&env), clients(&env).await);
    let args = RunArgs { inventory: Some(manifest), ..run_args(7) };
    let err = format!("{:#}", feeder::feed(&settings, &args, &clients, CancellationToken::new()).await.unwrap_err());
    assert!(err.contains("part-0.csv.gz") && err.contains("the file is corrupt"), "{err}");
    let cp = common::db::load_checkpoint(&env.db, &env.source_bucket, "image/").await.unwrap();
    assert!(!cp.finished, "{cp:?}");

    let other = Env::new().await;
    let foreign = write_inventory(&other, &[inventory_rows(&["image/a.png".into()])], false).await;
    let args = RunArgs { inventory: Some(foreign), restart: true, ..run_args(7) };
    let err = format!("{:#}", feeder::feed(&settings, &args, &clients, CancellationToken::new()).await.unwrap_err());
    assert!(err.contains("not SOURCE_BUCKET_NAME"), "{err}");
    assert_eq!(env.drain().await.len(), 0, "nothing sent");
}
