//! Copy stage: puts the object at its destination key, server-side, without ever clobbering
//! (I3).
//!
//! Promises:
//! - a destination that already exists is compared, never overwritten: same ETag as the
//!   source means done (an earlier delivery copied it), anything else is a conflict;
//! - the copy itself carries `If-None-Match: *` (closes the race with a live upload on real S3)
//!   and `x-amz-copy-source-if-match` on the source ETag; the local emulators ignore the first,
//!   which is why the destination is checked before copying;
//! - content type and user metadata are copied as they are (`MetadataDirective=COPY`);
//! - the object is never downloaded.

use aws_sdk_s3::types::MetadataDirective;
use common::aws::{S3, describe, head_etag, status};
use common::keys::KeyMapping;

/// The largest object a single `CopyObject` can copy (5 GiB).
pub const MAX_SINGLE_COPY: i64 = 5 * 1024 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// This call created the destination object.
    Copied,
    /// The destination already held the same content.
    AlreadyPresent,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("source object s3://{bucket}/{key} does not exist")]
    SourceMissing { bucket: String, key: String },
    #[error("destination s3://{bucket}/{key} already holds different content ({detail}); left as it is")]
    Conflict { bucket: String, key: String, detail: String },
    #[error("object of {0} bytes is larger than a single copy allows (5 GiB)")]
    TooLarge(i64),
    #[error("{0}")]
    Transient(String),
}

struct Head {
    etag: String,
}

async fn head(s3: &S3, bucket: &str, key: &str) -> Result<Option<Head>, CopyError> {
    let etag = head_etag(s3, bucket, key).await.map_err(CopyError::Transient)?;
    Ok(etag.map(|etag| Head { etag }))
}

/// Puts `source_key` at `destination_key` unless it is already there.
pub async fn ensure_copied(
    s3: &S3,
    mapping: &KeyMapping,
    source_key: &str,
    listed_etag: &str,
    size: i64,
    destination_key: &str,
) -> Result<Copied, CopyError> {
    let (dst_bucket, src_bucket) = (&mapping.destination_bucket, &mapping.source_bucket);
    if let Some(dest) = head(s3, dst_bucket, destination_key).await? {
        return compare(s3, mapping, source_key, listed_etag, destination_key, dest).await;
    }
    if size > MAX_SINGLE_COPY {
        return Err(CopyError::TooLarge(size));
    }
    let mut etag = listed_etag.to_owned();
    // Two attempts: the second only when the source was replaced since it was listed, to copy
    // what the legacy row shows today.
    for _ in 0..2 {
        let sent = s3
            .copy_object()
            .bucket(dst_bucket)
            .key(destination_key)
            .copy_source(mapping.copy_source(source_key))
            .copy_source_if_match(&etag)
            .if_none_match("*")
            .metadata_directive(MetadataDirective::Copy)
            .send()
            .await;
        let err = match sent {
            Ok(_) => return Ok(Copied::Copied),
            Err(err) => err,
        };
        let code = describe(&err);
        match status(&err) {
            Some(404) if !code.starts_with("NoSuchBucket") => {
                return Err(CopyError::SourceMissing { bucket: src_bucket.clone(), key: source_key.to_owned() });
            }
            // The destination appeared meanwhile, or the source changed since it was listed.
            Some(412) => {
                if let Some(dest) = head(s3, dst_bucket, destination_key).await? {
                    return compare(s3, mapping, source_key, listed_etag, destination_key, dest).await;
                }
                match head(s3, src_bucket, source_key).await? {
                    None => {
                        return Err(CopyError::SourceMissing {
                            bucket: src_bucket.clone(),
                            key: source_key.to_owned(),
                        });
                    }
                    Some(src) if src.etag != etag => etag = src.etag,
                    Some(_) => {
                        return Err(CopyError::Transient(format!("copy precondition failed: {code}")));
                    }
                }
            }
            _ => {
                return Err(CopyError::Transient(format!(
                    "copy s3://{src_bucket}/{source_key} -> s3://{dst_bucket}/{destination_key}: {code}"
                )));
            }
        }
    }
    Err(CopyError::Transient(format!("source s3://{src_bucket}/{source_key} keeps changing")))
}

/// The destination exists: done if it holds what the source holds, a conflict otherwise.
async fn compare(
    s3: &S3,
    mapping: &KeyMapping,
    source_key: &str,
    listed_etag: &str,
    destination_key: &str,
    dest: Head,
) -> Result<Copied, CopyError> {
    let source_etag = match head(s3, &mapping.source_bucket, source_key).await? {
        Some(src) => src.etag,
        // The source is gone (cleaned up after an earlier copy): compare with what was listed.
        None => listed_etag.to_owned(),
    };
    if dest.etag == source_etag {
        Ok(Copied::AlreadyPresent)
    } else {
        Err(CopyError::Conflict {
            bucket: mapping.destination_bucket.clone(),
            key: destination_key.to_owned(),
            detail: format!("destination ETag {} differs from source ETag {source_etag}", dest.etag),
        })
    }
}
