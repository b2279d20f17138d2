//! S3 Inventory as input (`INVENTORY_MANIFEST`): listing 300 M keys takes hours; an Inventory
//! report lists them all in a few gzipped CSV files, delivered daily or weekly.
//!
//! Promises:
//! - only a CSV report of the source bucket is read (`sourceBucket` must be
//!   SOURCE_BUCKET_NAME; ORC and Parquet are refused with a clear error), and only its rows
//!   under SOURCE_PREFIX are enqueued, with their size and ETag; keys are URL-decoded (the
//!   report URL-encodes them); delete markers and versions that are not the latest are skipped;
//! - each data file is read as a stream (memory stays flat whatever its size) and its MD5 is
//!   checked against the manifest's once it is read to its end: a corrupt or truncated file is
//!   an error, never the end of the input;
//! - each data file is a part of the input with its own checkpoint (CSV rows consumed), so a
//!   restart resumes every file where its last enqueued page ended.
//!
//! A report is a snapshot (up to a day or a week old): objects written after it are not in
//! it. `feeder verify` finds their rows and `feeder reconcile` enqueues them.

use std::io::Read;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail, ensure};
use common::aws::{Call, S3};
use common::message::ObjectMessage;
use md5::Digest;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::list::{Item, Listing};
use common::listing::decode_key;

/// The parts of `manifest.json` the feeder reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestJson {
    source_bucket: String,
    destination_bucket: String,
    file_format: String,
    file_schema: String,
    files: Vec<DataFile>,
}

/// One gzipped CSV file of the report.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct DataFile {
    pub(crate) key: String,
    #[serde(rename = "MD5checksum")]
    pub(crate) md5: String,
}

/// Where the columns the feeder needs are.
#[derive(Debug, Clone)]
pub(crate) struct Columns {
    key: usize,
    size: usize,
    etag: usize,
    is_latest: Option<usize>,
    is_delete_marker: Option<usize>,
}

#[derive(Debug)]
pub(crate) struct Manifest {
    /// The bucket that holds the data files.
    pub(crate) report_bucket: String,
    pub(crate) files: Vec<DataFile>,
    pub(crate) columns: Columns,
}

/// Reads and checks the manifest at `s3://bucket/key`.
pub(crate) async fn read_manifest(s3: &S3, location: &str, source_bucket: &str) -> anyhow::Result<Manifest> {
    let (bucket, key) = location
        .strip_prefix("s3://")
        .and_then(|rest| rest.split_once('/'))
        .ok_or_else(|| anyhow!("INVENTORY_MANIFEST {location:?} is not of the form s3://bucket/path/manifest.json"))?;
    let body = s3
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .call(|| format!("reading the inventory manifest {location}"))?
        .body
        .collect()
        .await
        .with_context(|| format!("reading the inventory manifest {location}"))?
        .into_bytes();
    let manifest: ManifestJson = serde_json::from_slice(&body)
        .with_context(|| format!("the inventory manifest {location} is not an S3 Inventory manifest.json"))?;
    parse(manifest, source_bucket).with_context(|| format!("the inventory manifest {location}"))
}

fn parse(m: ManifestJson, source_bucket: &str) -> anyhow::Result<Manifest> {
    ensure!(
        m.file_format.eq_ignore_ascii_case("CSV"),
        "its files are {}: only CSV inventory reports are read (configure the report's format as CSV)",
        m.file_format
    );
    ensure!(
        m.source_bucket == source_bucket,
        "it lists bucket {:?}, not SOURCE_BUCKET_NAME {source_bucket:?}",
        m.source_bucket
    );
    ensure!(!m.files.is_empty(), "it lists no data files");
    let report_bucket = m.destination_bucket.rsplit(':').next().unwrap_or_default().to_owned();
    ensure!(!report_bucket.is_empty(), "its destinationBucket {:?} names no bucket", m.destination_bucket);
    let schema: Vec<&str> = m.file_schema.split(',').map(str::trim).collect();
    let find = |name: &str| schema.iter().position(|c| c.eq_ignore_ascii_case(name));
    let need = |name: &str| {
        find(name).ok_or_else(|| {
            anyhow!("its fileSchema {:?} has no {name} column (the report needs Key, Size and ETag)", m.file_schema)
        })
    };
    let columns = Columns {
        key: need("Key")?,
        size: need("Size")?,
        etag: need("ETag")?,
        is_latest: find("IsLatest"),
        is_delete_marker: find("IsDeleteMarker"),
    };
    Ok(Manifest { report_bucket, files: m.files, columns })
}

/// Reads one data file in a task of its own, skipping its first `skip_rows` rows, and sends
/// the objects under `prefix` in pages of `page_size`, each with the count of rows read
/// through its last one; then `Complete` once the file was read to its end and its MD5 matched.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn(
    s3: S3,
    manifest: Arc<Manifest>,
    file: usize,
    prefix: String,
    skip_rows: u64,
    page_size: usize,
    tx: mpsc::Sender<Item>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let data = &manifest.files[file];
        let location = format!("s3://{}/{}", manifest.report_bucket, data.key);
        let got = s3.get_object().bucket(&manifest.report_bucket).key(&data.key).send().await;
        let body = match got.call(|| format!("reading the inventory file {location}")) {
            Ok(out) => out.body.into_async_read(),
            Err(e) => {
                let _ = tx.send((file, Err(e.into()))).await;
                return;
            }
        };
        let manifest = manifest.clone();
        let reader = tokio_util::io::SyncIoBridge::new(body);
        let sender = tx.clone();
        let read = tokio::task::spawn_blocking(move || {
            read_file(reader, &manifest, file, &prefix, skip_rows, page_size, &sender, &stop)
        })
        .await;
        let ended = match read {
            Ok(Ok(true)) => Ok(Listing::Complete),
            Ok(Ok(false)) => return, // stopped, or nobody listens any more
            Ok(Err(e)) => Err(e.context(format!("reading the inventory file {location}"))),
            Err(e) => Err(anyhow!("reading the inventory file {location}: {e}")),
        };
        let _ = tx.send((file, ended)).await;
    })
}

/// `Ok(true)`: read to its end with the right MD5; `Ok(false)`: stopped early.
#[allow(clippy::too_many_arguments)]
fn read_file(
    reader: impl Read,
    manifest: &Manifest,
    file: usize,
    prefix: &str,
    skip_rows: u64,
    page_size: usize,
    tx: &mpsc::Sender<Item>,
    stop: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut hashed = Md5Reader { inner: reader, md5: md5::Md5::new() };
    let gz = flate2::read::MultiGzDecoder::new(&mut hashed);
    let mut csv = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(gz);
    let c = &manifest.columns;
    let mut page = Vec::with_capacity(page_size);
    let mut rows: u64 = 0;
    let mut record = csv::StringRecord::new();
    while csv.read_record(&mut record).with_context(|| format!("CSV row {}", rows + 1))? {
        rows += 1;
        if rows <= skip_rows {
            continue;
        }
        let field = |i: usize| record.get(i).ok_or_else(|| anyhow!("CSV row {rows} has no column {}", i + 1));
        let key = decode_key(field(c.key)?).with_context(|| format!("CSV row {rows}"))?;
        let skipped = c.is_latest.is_some_and(|i| record.get(i) == Some("false"))
            || c.is_delete_marker.is_some_and(|i| record.get(i) == Some("true"));
        if !skipped && key.starts_with(prefix) {
            let size = field(c.size)?.parse().with_context(|| format!("CSV row {rows}: Size is not a number"))?;
            let etag = field(c.etag)?;
            let etag = if etag.starts_with('"') { etag.to_owned() } else { format!("\"{etag}\"") };
            page.push(ObjectMessage::new(key, size, etag));
        }
        if page.len() == page_size {
            if stop.is_cancelled() {
                return Ok(false);
            }
            let full = std::mem::replace(&mut page, Vec::with_capacity(page_size));
            if tx.blocking_send((file, Ok(Listing::Page { objects: full, rows_through: Some(rows) }))).is_err() {
                return Ok(false);
            }
        }
    }
    // The MD5 covers the whole compressed file: read what the decoder left.
    std::io::copy(&mut hashed, &mut std::io::sink())?;
    let md5 = format!("{:x}", hashed.md5.finalize());
    let expected = &manifest.files[file].md5;
    if !md5.eq_ignore_ascii_case(expected) {
        bail!("its MD5 is {md5}, the manifest says {expected}: the file is corrupt or was replaced");
    }
    if !page.is_empty()
        && tx.blocking_send((file, Ok(Listing::Page { objects: page, rows_through: Some(rows) }))).is_err()
    {
        return Ok(false);
    }
    Ok(true)
}

/// Hashes what passes through.
struct Md5Reader<R> {
    inner: R,
    md5: md5::Md5,
}

impl<R: Read> Read for Md5Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.md5.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(format: &str, schema: &str) -> ManifestJson {
        ManifestJson {
            source_bucket: "legacy-s3".into(),
            destination_bucket: "arn:aws:s3:::reports".into(),
            file_format: format.into(),
            file_schema: schema.into(),
            files: vec![DataFile { key: "data/a.csv.gz".into(), md5: "0".repeat(32) }],
        }
    }

    #[test]
    fn a_manifest_is_checked_before_anything_is_read() {
        let ok = parse(manifest("CSV", "Bucket, Key, Size, LastModifiedDate, ETag, IsLatest"), "legacy-s3").unwrap();
        assert_eq!(ok.report_bucket, "reports");
        assert_eq!((ok.columns.key, ok.columns.size, ok.columns.etag, ok.columns.is_latest), (1, 2, 4, Some(5)));
        let err = |m, b| format!("{:#}", parse(m, b).unwrap_err());
        assert!(err(manifest("ORC", "Bucket, Key, Size, ETag"), "legacy-s3").contains("only CSV"));
        assert!(err(manifest("CSV", "Bucket, Key, Size, ETag"), "other").contains("not SOURCE_BUCKET_NAME"));
        assert!(err(manifest("CSV", "Bucket, Key, Size"), "legacy-s3").contains("no ETag column"));
        let empty = ManifestJson { files: vec![], ..manifest("CSV", "Bucket, Key, Size, ETag") };
        assert!(err(empty, "legacy-s3").contains("no data files"));
    }
}
