//! Copy stage: puts the object at its destination key, server-side, without ever clobbering
//! (I3).
//!
//! Promises:
//! - a destination that already exists is compared, never overwritten: it counts as done only
//!   when it holds exactly the source's bytes (`common::identity`: size, full-object checksum,
//!   equal ETag, or a bounded streamed comparison), a conflict when it holds other bytes, and
//!   `destination_unproven` when it is too large to compare within `COMPARE_MAX_BYTES`;
//! - the copy itself carries `If-None-Match: *` (closes the race with a live upload where the
//!   server enforces it: AWS, SeaweedFS) and `x-amz-copy-source-if-match` on the source ETag;
//!   servers that ignore the first are covered by the destination check before the copy
//!   (`DESTINATION_CHECK=before-copy`); where the server enforces it, the check can wait for
//!   the server's 412 (`on-conflict`); `auto`, the default, asks the server at start-up;
//! - before-copy looks at a message's destinations with one listing ([`Lookahead`]) and HEADs
//!   only those the listing does not prove absent;
//! - content type and user metadata are copied as they are (`MetadataDirective=COPY`);
//! - the object is never downloaded, except for the bounded comparison;
//! - the copy request goes the direct way first where `DIRECT_COPY` is on ([`direct`]), and
//!   through the SDK whenever that way does not answer clearly: the same conditional request
//!   either way ([`conditional`]), so the promises above hold for both; objects above the
//!   multipart threshold are copied in parts ([`multipart`]), on the same conditions;
//! - every S3 error is classified (`common::aws::ErrorClass`): retried later, recorded for this
//!   object with its reason, or fatal for the process ([`CopyError`]).
//!
//! [`Copier::ensure_copied`] is the one entry point of a copy.

use common::aws::S3;
use common::db::Reason;
use common::identity::{Identity, ObjectHead, head_object, same_content};
use common::keys::KeyMapping;
use common::message::ObjectMessage;

pub mod conditional;
pub mod direct;
mod lookahead;
pub mod multipart;
mod outcome;
mod paced;
mod probe;

use conditional::{Conditional, Refused};
use direct::DirectCopy;
pub use lookahead::{LOOKAHEAD_VALID, Lookahead};
use multipart::{InParts, Multipart};
use outcome::source_missing;
pub use outcome::{Copied, CopyError, MAX_SINGLE_COPY};
use paced::Paced;
pub use probe::{DestinationCheck, PROBE_DIRECTORY, default_concurrency};
use probe::{Probe, Trouble};

use crate::pace::Pace;

/// Copies objects of one mapping.
pub(crate) struct Copier {
    pub(crate) s3: S3,
    pub(crate) mapping: KeyMapping,
    /// Largest object compared byte by byte when metadata cannot prove identity.
    pub(crate) compare_max_bytes: u64,
    pub(crate) destination_check: DestinationCheck,
    /// Objects above `multipart.threshold` are copied in parts.
    pub(crate) multipart: Multipart,
    /// Where set (`DIRECT_COPY`), each copy is sent this way first ([`direct`]).
    pub(crate) direct: Option<DirectCopy>,
    /// The S3 client copies go through when not sent directly: slow-downs come back at once
    /// (`common::aws::s3_paced_client`).
    pub(crate) paced_s3: S3,
    /// When copies start ([`crate::pace`]).
    pub(crate) pace: std::sync::Arc<Pace>,
    /// Each attempt's bound (`S3_REQUEST_TIMEOUT`; a copy's grows with its size).
    pub(crate) request_timeout: std::time::Duration,
}

impl Copier {
    async fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectHead>, CopyError> {
        Ok(head_object(&self.s3, bucket, key).await?)
    }

    fn probe(&self) -> Probe<'_> {
        Probe {
            s3: &self.s3,
            bucket: &self.mapping.destination_bucket,
            prefix: self.mapping.destination_prefix.as_str(),
        }
    }

    fn paced(&self) -> Paced<'_> {
        Paced { s3: &self.paced_s3, pace: &self.pace, request_timeout: self.request_timeout }
    }

    /// Resolves `auto` by asking the server ([`Probe::conditional_copy_enforced`]): where it
    /// refuses a conditional copy onto an existing key, `on-conflict`; otherwise, or on an
    /// error on the way, `before-copy`, the check that is right everywhere. A destination that
    /// refuses the probe's write is an error: it would refuse every copy.
    pub async fn resolve_destination_check(&self) -> anyhow::Result<DestinationCheck> {
        if self.destination_check != DestinationCheck::Auto {
            return Ok(self.destination_check);
        }
        let resolved = match self.probe().conditional_copy_enforced().await {
            Ok(true) => DestinationCheck::OnConflict,
            Ok(false) => DestinationCheck::BeforeCopy,
            Err(Trouble::Refused(why)) => anyhow::bail!(
                "DESTINATION_BUCKET_NAME: writing under the destination prefix is refused ({why}): every copy would \
                 be; grant the consumer's role s3:PutObject on it (and kms:GenerateDataKey on its key), or fix the \
                 bucket's policy"
            ),
            Err(Trouble::Failed(why)) => {
                tracing::warn!(
                    "could not ask the server whether it enforces conditional copies ({why}): checking each destination before its copy"
                );
                DestinationCheck::BeforeCopy
            }
        };
        tracing::info!(
            destination_check = ?resolved,
            "DESTINATION_CHECK=auto: {}",
            match resolved {
                DestinationCheck::OnConflict => "the server refuses a conditional copy onto an existing key; copying first",
                _ => "the server copies over an existing key despite If-None-Match; checking each destination first",
            }
        );
        Ok(resolved)
    }

    /// Sends one copy, of a probe object of ours, the direct way (`DIRECT_COPY`) at start-up:
    /// where it fails and the SDK's same copy succeeds, the direct path is off for the run,
    /// with a warning. Where the probe cannot be put, or neither way copies it, the path stays
    /// on and its breaker judges the first copies.
    pub async fn check_direct_copy(&mut self) {
        let Some(direct) = &self.direct else { return };
        if let Some(miss) = self.probe().direct_copy_misses(direct).await {
            tracing::warn!(
                "DIRECT_COPY off for this run: a probe copy sent directly failed ({miss}) where the SDK's succeeded; \
                 every copy goes through the SDK (a proxy, a clock or a TLS set-up this path cannot use?)"
            );
            self.direct = None;
        }
    }

    /// Lists the destination keys of one message's objects at once, where each copy needs a
    /// look at its destination first ([`Lookahead`]). `None` where no look is needed
    /// (`on-conflict`), for a single key (its HEAD costs as much), and when the listing fails.
    pub async fn look_ahead(&self, objects: &[ObjectMessage]) -> Option<Lookahead> {
        if self.destination_check == DestinationCheck::OnConflict || objects.len() < 2 {
            return None;
        }
        let destinations: Vec<String> = objects.iter().filter_map(|o| self.mapping.destination_key(&o.key)).collect();
        Lookahead::list(&self.s3, &self.mapping.destination_bucket, &destinations).await
    }

    /// Puts `source_key` at `destination_key` unless it is already there. `proven_absent`: a
    /// [`Lookahead`] proved the destination absent, so no HEAD is needed before the copy.
    pub async fn ensure_copied(
        &self,
        source_key: &str,
        listed_etag: &str,
        size: i64,
        destination_key: &str,
        proven_absent: bool,
    ) -> Result<Copied, CopyError> {
        let (dst_bucket, src_bucket) = (&self.mapping.destination_bucket, &self.mapping.source_bucket);
        // Anything but a proven `on-conflict` looks first (an unresolved `auto` included),
        // unless a listing just did.
        if self.destination_check != DestinationCheck::OnConflict
            && !proven_absent
            && let Some(done) = self.existing(source_key, listed_etag, destination_key).await?
        {
            return Ok(done);
        }
        if size > self.multipart.threshold {
            let (source, destination) = ((src_bucket.as_str(), source_key), (dst_bucket.as_str(), destination_key));
            match multipart::copy(&self.s3, self.paced(), &self.multipart, source, destination).await? {
                InParts::Copied => return Ok(Copied::Copied),
                InParts::DestinationExists => {
                    return self.existing(source_key, listed_etag, destination_key).await?.ok_or_else(|| {
                        CopyError::Transient("the multipart copy was refused (412), yet no destination exists".into())
                    });
                }
                // Replaced by a smaller object since it was listed: copied whole below.
                InParts::Small => {}
            }
        }
        let conditional = Conditional { paced: self.paced(), direct: self.direct.as_ref(), bucket: dst_bucket };
        let mut etag = listed_etag.to_owned();
        // Two attempts: the second only when the source was replaced since it was listed, to
        // copy what the legacy row shows today.
        for _ in 0..2 {
            let failed = match conditional.copy((src_bucket, source_key), destination_key, &etag, size).await {
                Ok(()) => return Ok(Copied::Copied),
                Err(Refused::PreconditionFailed(detail)) => detail,
                // The source is gone: deleted after an earlier delivery copied it
                // (`DELETE_SOURCE`, `feeder cleanup`), its copy then in place.
                Err(Refused::Error(err)) if err.is_not_found() => {
                    return self
                        .existing(source_key, listed_etag, destination_key)
                        .await?
                        .ok_or_else(|| source_missing(src_bucket, source_key));
                }
                Err(Refused::Error(err)) => return Err(err.into()),
            };
            // The destination appeared meanwhile, or the source changed since it was listed.
            if let Some(done) = self.existing(source_key, listed_etag, destination_key).await? {
                return Ok(done);
            }
            match self.head(src_bucket, source_key).await? {
                None => return Err(source_missing(src_bucket, source_key)),
                Some(src) if src.etag != etag => etag = src.etag,
                Some(_) => return Err(CopyError::Transient(format!("copy precondition failed: {failed}"))),
            }
        }
        Err(CopyError::Transient(format!("source s3://{src_bucket}/{source_key} keeps changing")))
    }

    /// What [`Self::ensure_copied`] would do, without writing: `Ok(Copied::Copied)` means it
    /// would copy; `AlreadyPresent` and the set-aside errors are decided as for real (HEADs,
    /// and the bounded comparison when metadata cannot tell).
    pub async fn inspect(
        &self,
        source_key: &str,
        listed_etag: &str,
        destination_key: &str,
    ) -> Result<Copied, CopyError> {
        if let Some(done) = self.existing(source_key, listed_etag, destination_key).await? {
            return Ok(done);
        }
        let src_bucket = &self.mapping.source_bucket;
        match self.head(src_bucket, source_key).await? {
            Some(_) => Ok(Copied::Copied),
            None => Err(source_missing(src_bucket, source_key)),
        }
    }

    /// HEADs the destination and, where it exists, compares it with the source
    /// ([`Self::compare`]); `None`: there is no destination.
    async fn existing(
        &self,
        source_key: &str,
        listed_etag: &str,
        destination_key: &str,
    ) -> Result<Option<Copied>, CopyError> {
        match self.head(&self.mapping.destination_bucket, destination_key).await? {
            Some(dest) => self.compare(source_key, listed_etag, destination_key, dest).await.map(Some),
            None => Ok(None),
        }
    }

    /// The destination exists: done if it holds the source's bytes, set aside otherwise.
    async fn compare(
        &self,
        source_key: &str,
        listed_etag: &str,
        destination_key: &str,
        dest: ObjectHead,
    ) -> Result<Copied, CopyError> {
        let (dst_bucket, src_bucket) = (&self.mapping.destination_bucket, &self.mapping.source_bucket);
        let Some(source) = self.head(src_bucket, source_key).await? else {
            // The source is gone (cleaned up after an earlier copy?): only the listed ETag is
            // left to compare with.
            if !listed_etag.is_empty() && dest.etag == listed_etag {
                return Ok(Copied::AlreadyPresent);
            }
            return Err(CopyError::SetAside {
                reason: Reason::SourceMissing,
                detail: format!(
                    "source object s3://{src_bucket}/{source_key} does not exist, and s3://{dst_bucket}/\
                     {destination_key} cannot be compared with it"
                ),
            });
        };
        let identity = same_content(
            &self.s3,
            (src_bucket, source_key, &source),
            (dst_bucket, destination_key, &dest),
            self.compare_max_bytes,
        )
        .await?;
        match identity {
            Identity::Same(how) => {
                tracing::debug!(how, "the destination already holds the same bytes");
                Ok(Copied::AlreadyPresent)
            }
            Identity::Different(why) => Err(CopyError::SetAside {
                reason: Reason::DestinationConflict,
                detail: format!(
                    "destination s3://{dst_bucket}/{destination_key} holds other content ({why}); left as it is"
                ),
            }),
            Identity::Unproven(why) => Err(CopyError::SetAside {
                reason: Reason::DestinationUnproven,
                detail: format!("destination s3://{dst_bucket}/{destination_key} exists: {why}; left as it is"),
            }),
        }
    }
}
