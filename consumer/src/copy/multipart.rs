//! Multipart copy: objects above `MULTIPART_THRESHOLD` (at most 5 GiB, the largest a single
//! CopyObject may copy) are copied server-side in parts with `UploadPartCopy`, several parts at
//! once.
//!
//! Promises:
//! - every part is copied from the same source version: each `UploadPartCopy` carries
//!   `x-amz-copy-source-if-match` on the ETag the source had when the copy began, so a source
//!   replaced mid-copy fails the copy (tried again later), never mixes two versions;
//! - the upload is completed with `If-None-Match: *`, so where the server enforces it (AWS S3)
//!   a destination written meanwhile is never overwritten (I3); the caller's destination check
//!   covers the servers that do not;
//! - the destination gets the source's content type, user metadata, caching and encoding
//!   headers and tags, as `CopyObject` with `MetadataDirective=COPY` would give it;
//! - when the source was itself uploaded in parts of one size (what SDK uploaders do), the
//!   copy uses the same part size, so the destination's ETag equals the source's: a later
//!   delivery proves the copy complete from the ETags alone, without reading gigabytes;
//! - an upload that fails or is abandoned is aborted (best effort; a bucket lifecycle rule
//!   `AbortIncompleteMultipartUpload` catches the rest, see the README);
//! - its writes under the destination prefix (the upload's start, each part, its completion)
//!   start at the consumer's pace (`crate::pace`), as its single copies do, and one S3 asks to
//!   slow down is sent again when the pace allows: throttling never fails a copy in parts.

use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use common::aws::{Call, S3};
use futures::{StreamExt, TryStreamExt};

use super::outcome::{CopyError, MAX_SINGLE_COPY, source_missing};
use super::paced::Paced;

/// The smallest part S3 accepts (except the last one).
pub const MIN_PART: i64 = 5 * 1024 * 1024;
/// The most parts an upload may have.
pub const MAX_PARTS: i64 = 10_000;

/// How large objects are copied.
#[derive(Debug, Clone, Copy)]
pub struct Multipart {
    /// Objects larger than this are copied in parts (at most [`MAX_SINGLE_COPY`]).
    pub threshold: i64,
    /// Part size when the source's own cannot be reused; raised so that no copy needs more
    /// than [`MAX_PARTS`] parts.
    pub part_size: i64,
    /// Parts of one object copied at once.
    pub concurrency: usize,
}

impl Default for Multipart {
    fn default() -> Self {
        Self { threshold: MAX_SINGLE_COPY, part_size: 512 * 1024 * 1024, concurrency: 8 }
    }
}

/// What the copy needs to know of the source, from one HEAD.
struct Source {
    etag: String,
    size: i64,
    head: aws_sdk_s3::operation::head_object::HeadObjectOutput,
}

/// What a copy in parts did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InParts {
    Copied,
    /// The destination appeared meanwhile (the server refused to complete over it): the
    /// caller compares.
    DestinationExists,
    /// The source is now no larger than the threshold (it was replaced since it was listed):
    /// the caller copies it whole.
    Small,
}

/// Copies `source` to `destination` in parts.
pub(crate) async fn copy(
    s3: &S3,
    paced: Paced<'_>,
    config: &Multipart,
    (src_bucket, src_key): (&str, &str),
    (dst_bucket, dst_key): (&str, &str),
) -> Result<InParts, CopyError> {
    let step = |what: &str| format!("{what} s3://{src_bucket}/{src_key} -> s3://{dst_bucket}/{dst_key}");
    let source = head_source(s3, src_bucket, src_key).await?;
    if source.size <= config.threshold {
        return Ok(InParts::Small);
    }
    let part_size = part_size(s3, config, src_bucket, src_key, &source).await;
    let tagging = tagging(s3, src_bucket, src_key).await?;
    let h = &source.head;
    let create = paced
        .s3
        .create_multipart_upload()
        .bucket(dst_bucket)
        .key(dst_key)
        .set_content_type(h.content_type().map(str::to_owned))
        .set_cache_control(h.cache_control().map(str::to_owned))
        .set_content_disposition(h.content_disposition().map(str::to_owned))
        .set_content_encoding(h.content_encoding().map(str::to_owned))
        .set_content_language(h.content_language().map(str::to_owned))
        .set_metadata(h.metadata().cloned())
        .set_tagging(tagging);
    let created = paced.send(|| step("starting a multipart copy"), || create.clone().send()).await?;
    let upload_id = created
        .upload_id()
        .ok_or_else(|| CopyError::Transient(step("starting a multipart copy: no upload id in the answer")))?
        .to_owned();
    let guard = AbortOnDrop::new(s3.clone(), dst_bucket, dst_key, &upload_id);
    let done =
        copy_parts(paced, config, &source, part_size, (src_bucket, src_key), (dst_bucket, dst_key), &upload_id).await;
    match done {
        Ok(InParts::Copied) => guard.disarm(),
        // The destination appeared meanwhile, or a part failed: the parts are removed.
        _ => guard.abort().await,
    }
    done
}

/// Copies the parts and completes the upload; see [`copy`].
async fn copy_parts(
    paced: Paced<'_>,
    config: &Multipart,
    source: &Source,
    part_size: i64,
    (src_bucket, src_key): (&str, &str),
    (dst_bucket, dst_key): (&str, &str),
    upload_id: &str,
) -> Result<InParts, CopyError> {
    let step = |what: &str| format!("{what} s3://{src_bucket}/{src_key} -> s3://{dst_bucket}/{dst_key}");
    let copy_source = common::keys::copy_source(src_bucket, src_key);
    let count = (source.size + part_size - 1) / part_size;
    tracing::info!(size = source.size, part_size, parts = count, key = dst_key, "copying in parts");
    let mut parts: Vec<CompletedPart> = futures::stream::iter(1..=count)
        .map(|n| {
            let (first, last) = ((n - 1) * part_size, (n * part_size).min(source.size) - 1);
            let request = paced
                .s3
                .upload_part_copy()
                .bucket(dst_bucket)
                .key(dst_key)
                .upload_id(upload_id)
                .part_number(n as i32)
                .copy_source(&copy_source)
                .copy_source_range(format!("bytes={first}-{last}"))
                .copy_source_if_match(&source.etag);
            let step = &step;
            async move {
                let bound = || common::aws::copy_attempt(paced.request_timeout, (last - first + 1) as u64);
                let call = || step(&format!("copying part {n}"));
                let sent = paced.send(call, || request.clone().customize().config_override(bound()).send()).await;
                let out = sent.map_err(|e| match e.is_precondition_failed() {
                    true => CopyError::Transient(format!(
                        "{}: the source changed during the copy; it is copied again later",
                        step("multipart copy")
                    )),
                    false => CopyError::from(e),
                })?;
                let etag = out.copy_part_result().and_then(|r| r.e_tag()).map(str::to_owned);
                Ok::<_, CopyError>(CompletedPart::builder().part_number(n as i32).set_e_tag(etag).build())
            }
        })
        .buffer_unordered(config.concurrency.max(1))
        .try_collect()
        .await?;
    parts.sort_by_key(|p| p.part_number());
    let complete = paced
        .s3
        .complete_multipart_upload()
        .bucket(dst_bucket)
        .key(dst_key)
        .upload_id(upload_id)
        .if_none_match("*")
        .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build());
    // S3 may take minutes to complete a large upload.
    let bound = || common::aws::copy_attempt(paced.request_timeout, source.size as u64);
    let call = || step("completing a multipart copy");
    let completed = paced.send(call, || complete.clone().customize().config_override(bound()).send()).await;
    match completed {
        Ok(_) => Ok(InParts::Copied),
        Err(e) if e.is_precondition_failed() => Ok(InParts::DestinationExists),
        Err(e) => Err(e.into()),
    }
}

async fn head_source(s3: &S3, bucket: &str, key: &str) -> Result<Source, CopyError> {
    match s3.head_object().bucket(bucket).key(key).send().await.call(|| format!("HEAD s3://{bucket}/{key}")) {
        Ok(head) => Ok(Source {
            etag: head.e_tag().unwrap_or_default().to_owned(),
            size: head.content_length().unwrap_or(0),
            head,
        }),
        Err(e) if e.status() == Some(404) => Err(source_missing(bucket, key)),
        Err(e) => Err(e.into()),
    }
}

/// The source's own part size when its parts (bar the last) are all one size, so that the
/// copy's ETag equals the source's; otherwise, or when the server does not tell, the
/// configured size. Either is raised to keep within [`MAX_PARTS`] and kept within S3's part
/// limits. Only an optimisation: every part is still copied conditionally on the ETag.
async fn part_size(s3: &S3, config: &Multipart, bucket: &str, key: &str, source: &Source) -> i64 {
    let smallest = (source.size + MAX_PARTS - 1) / MAX_PARTS;
    let clamp = |size: i64| size.max(smallest).clamp(MIN_PART, MAX_SINGLE_COPY);
    let Some(parts) = source_parts(&source.etag) else { return clamp(config.part_size) };
    let head = s3.head_object().bucket(bucket).key(key).part_number(1).send().await;
    let first = match head.call(|| format!("HEAD part 1 of s3://{bucket}/{key}")) {
        Ok(head) => head.content_length().unwrap_or(0),
        Err(e) => {
            tracing::debug!("{e}");
            0
        }
    };
    let uniform = first > 0 && (source.size + first - 1) / first == parts;
    if uniform && clamp(first) == first { first } else { clamp(config.part_size) }
}

/// The part count of a multipart upload's ETag (`"<md5 of md5s>-<parts>"`).
pub fn source_parts(etag: &str) -> Option<i64> {
    let (_, parts) = etag.trim_matches('"').rsplit_once('-')?;
    parts.parse().ok().filter(|&n| n > 1)
}

/// Everything but unreserved characters is percent-encoded in a tag set.
const TAG: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// The source's tags, URL-encoded as `x-amz-tagging` wants them (`None`: no tags).
async fn tagging(s3: &S3, bucket: &str, key: &str) -> Result<Option<String>, CopyError> {
    let out = s3
        .get_object_tagging()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .call(|| format!("reading the tags of s3://{bucket}/{key}"))?;
    if out.tag_set().is_empty() {
        return Ok(None);
    }
    let encode = |s: &str| percent_encoding::utf8_percent_encode(s, TAG).to_string();
    let pairs: Vec<String> =
        out.tag_set().iter().map(|t| format!("{}={}", encode(t.key()), encode(t.value()))).collect();
    Ok(Some(pairs.join("&")))
}

/// The upload to abort unless the copy completes: [`Self::abort`] after an error, or when
/// dropped armed (the copy abandoned at shutdown: then in a task of its own, best effort).
struct AbortOnDrop {
    upload: Option<(S3, String, String, String)>,
}

impl AbortOnDrop {
    fn new(s3: S3, bucket: &str, key: &str, upload_id: &str) -> Self {
        Self { upload: Some((s3, bucket.to_owned(), key.to_owned(), upload_id.to_owned())) }
    }

    fn disarm(mut self) {
        self.upload = None;
    }

    async fn abort(mut self) {
        if let Some(upload) = self.upload.take() {
            abort(upload).await
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(upload) = self.upload.take() else { return };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(abort(upload));
        }
    }
}

async fn abort((s3, bucket, key, id): (S3, String, String, String)) {
    let aborted = s3.abort_multipart_upload().bucket(&bucket).key(&key).upload_id(&id).send().await;
    if let Err(e) = aborted.call(|| format!("aborting the multipart copy {id} of s3://{bucket}/{key}")) {
        tracing::warn!("{e}; a lifecycle rule AbortIncompleteMultipartUpload removes its parts");
    }
}

#[cfg(test)]
mod tests {
    use super::source_parts;

    #[test]
    fn reads_the_part_count_of_a_multipart_etag() {
        assert_eq!(source_parts("\"d41d8cd98f00b204e9800998ecf8427e-12\""), Some(12));
        assert_eq!(source_parts("d41d8cd98f00b204e9800998ecf8427e-2"), Some(2));
        assert_eq!(source_parts("\"d41d8cd98f00b204e9800998ecf8427e-1\""), None, "one part: any size fits");
        assert_eq!(source_parts("\"d41d8cd98f00b204e9800998ecf8427e\""), None);
        assert_eq!(source_parts("\"abc-x\""), None);
        assert_eq!(source_parts(""), None);
    }
}
