//! The consumer's copy request: one conditional `CopyObject`, sent the direct way first where
//! `DIRECT_COPY` is on ([`super::direct`]) and through the SDK whenever that way does not
//! answer clearly; the same request either way.
//!
//! Promises: the copy carries `If-None-Match: *` (never over an existing key, where the server
//! enforces it) and `x-amz-copy-source-if-match` on the listed ETag (only the bytes listed);
//! the metadata is copied as it is; a copy S3 asks to slow down is tried again, by this
//! consumer, when its pace allows: throttling never sends a message back to the queue, where
//! it would spend a receive towards the dead-letter queue (its lease keeps it invisible).

use aws_sdk_s3::operation::copy_object::builders::CopyObjectFluentBuilder;
use aws_sdk_s3::types::MetadataDirective;
use common::aws::{AwsError, Call, S3};

use super::direct::{Answer, DirectCopy};
use super::paced::Paced;

/// The copy request through the SDK: `copy_source` (bucket and encoded key) to `key` in
/// `bucket`, only if `key` does not exist and the source's ETag is still `etag`, its metadata
/// copied as it is.
pub fn conditional_copy(s3: &S3, bucket: &str, key: &str, copy_source: &str, etag: &str) -> CopyObjectFluentBuilder {
    s3.copy_object()
        .bucket(bucket)
        .key(key)
        .copy_source(copy_source)
        .copy_source_if_match(etag)
        .if_none_match("*")
        .metadata_directive(MetadataDirective::Copy)
}

/// Why a copy request did not copy.
pub(crate) enum Refused {
    /// 412: the destination exists, or the source's ETag changed; S3's words for it.
    PreconditionFailed(String),
    Error(AwsError),
}

/// Copies to one destination bucket.
pub(crate) struct Conditional<'a> {
    pub(crate) paced: Paced<'a>,
    pub(crate) direct: Option<&'a DirectCopy>,
    pub(crate) bucket: &'a str,
}

/// What one copy request came to.
enum Sent {
    Copied,
    /// S3 asked to slow down: nothing was copied; the pace decides when to try again.
    SlowDown,
    Refused(Refused),
}

impl Conditional<'_> {
    /// One conditional copy of `source` (bucket, key) to `key` (if the source's ETag is still
    /// `etag` and `key` does not exist), started when the pace allows, again each time S3 asks
    /// to slow down.
    pub(crate) async fn copy(
        &self,
        (bucket, source): (&str, &str),
        key: &str,
        etag: &str,
        size: i64,
    ) -> Result<(), Refused> {
        let copy_source = common::keys::copy_source(bucket, source);
        let call = || format!("copy s3://{bucket}/{source} -> s3://{}/{key}", self.bucket);
        loop {
            let start = self.paced.pace.start().await;
            match self.send(key, &copy_source, etag, size, call).await {
                Sent::SlowDown => {
                    self.paced.pace.slowed_down(start);
                    tracing::debug!("copy: S3 asks to slow down; trying again at the pace");
                }
                Sent::Copied => return Ok(()),
                Sent::Refused(refused) => return Err(refused),
            }
        }
    }

    /// One copy request: sent directly where that path is on and decides, through the SDK
    /// otherwise (whose own retries leave slow-downs to the pace).
    async fn send(&self, key: &str, copy_source: &str, etag: &str, size: i64, call: impl Fn() -> String) -> Sent {
        let size = size.max(0) as u64;
        let handed_over = match self.direct {
            Some(direct) => match direct.copy(key, copy_source, etag, size).await {
                Answer::Copied => return Sent::Copied,
                Answer::PreconditionFailed => {
                    return Sent::Refused(Refused::PreconditionFailed("412 Precondition Failed".to_owned()));
                }
                Answer::SlowDown => return Sent::SlowDown,
                Answer::Elsewhere(handover) => Some((direct, handover)),
            },
            None => None,
        };
        let sent = conditional_copy(self.paced.s3, self.bucket, key, copy_source, etag)
            .customize()
            .config_override(common::aws::copy_attempt(self.paced.request_timeout, size))
            .send()
            .await
            .call(call);
        if let Some((direct, handover)) = handed_over {
            direct.settle(&handover, sent.is_ok());
        }
        match sent {
            Ok(_) => Sent::Copied,
            Err(err) if err.is_precondition_failed() => Sent::Refused(Refused::PreconditionFailed(err.to_string())),
            Err(err) if err.is_slow_down() => Sent::SlowDown,
            Err(err) => Sent::Refused(Refused::Error(err)),
        }
    }
}
