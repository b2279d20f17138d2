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
//!   only those the listing does not prove absent; a listing stands in for a HEAD for at most
//!   [`LOOKAHEAD_VALID`] (a HEAD, too, is only as fresh as its round trip: on a server that
//!   ignores `If-None-Match` no check closes the race with a live upload, AWS closes it);
//! - content type and user metadata are copied as they are (`MetadataDirective=COPY`);
//! - the object is never downloaded, except for the bounded comparison;
//! - the copy request goes the direct way first where `DIRECT_COPY` is on
//!   ([`crate::direct`]), and through the SDK whenever that way does not answer clearly: the
//!   same conditional request either way, so the promises above hold for both;
//! - every S3 error is classified (`common::aws::ErrorClass`): retried later, recorded for this
//!   object with its reason, or fatal for the process.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::copy_object::CopyObjectError;
use aws_sdk_s3::operation::copy_object::builders::CopyObjectFluentBuilder;
use aws_sdk_s3::types::MetadataDirective;
use common::aws::{S3, describe, is_slow_down, status};
use common::db::Reason;
use common::identity::{Identity, ObjectHead, head_object, same_content};
use common::keys::KeyMapping;
use common::listing;
use common::message::ObjectMessage;

use crate::direct::{Answer, DirectCopy};
use crate::multipart::{self, InParts, Multipart};
pub use crate::outcome::{Copied, CopyError, MAX_SINGLE_COPY};
use crate::pace::Pace;

/// Where, under the destination prefix, [`Copier::resolve_destination_check`] puts its two
/// short-lived objects (the IAM grant for deleting them is scoped to it).
pub const PROBE_DIRECTORY: &str = ".avatar-migration-probe/";

/// When the destination key is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DestinationCheck {
    /// Ask the server at start-up ([`Copier::probe_conditional_copy`]): `on-conflict` where it
    /// refuses a conditional copy onto an existing key, `before-copy` otherwise.
    Auto,
    /// HEAD the destination before every copy: right on every server, including those that
    /// ignore `If-None-Match` on CopyObject (MiniStack, moto); one request more per object.
    BeforeCopy,
    /// Copy first and look at the destination only when the server refuses the copy (412):
    /// only for servers that enforce `If-None-Match: *` on CopyObject (AWS S3, SeaweedFS).
    OnConflict,
}

/// Objects a consumer works on at once when `CONCURRENCY` is unset, by how destinations are
/// checked. Copying first, more requests in flight cost less CPU each, the server's included
/// (SeaweedFS, 20,000 objects, side by side, medians of 3: 756 objects/s at 128, 670 at 256,
/// 543 at 32). Looking first, 128 was slower on MiniStack, the server we have that needs it
/// (444 and 396 objects/s against 579 and 510 at 32), with more CPU per object: each
/// message's listing stands in for its HEADs only for [`LOOKAHEAD_VALID`], which objects
/// waiting their turn on a slow server may outlive (not measured apart). docs/performance.md
/// has the runs.
pub fn default_concurrency(check: DestinationCheck) -> usize {
    match check {
        DestinationCheck::OnConflict => 128,
        DestinationCheck::BeforeCopy | DestinationCheck::Auto => 32,
    }
}

/// How long a [`Lookahead`] stands in for a HEAD: a destination it proved absent is copied
/// without a HEAD only this soon after the listing (a message whose copies are slowed by
/// retries HEADs its later destinations again).
pub const LOOKAHEAD_VALID: Duration = Duration::from_secs(2);

/// One listing of the destination, taken before a message's copies where each copy needs a
/// look at its destination first (`before-copy`): one `ListObjectsV2` instead of a HEAD per
/// object. A destination it proves absent is copied straight away (still conditionally); one
/// it lists, one past the listed page, or any once the listing is older than
/// [`LOOKAHEAD_VALID`], gets its HEAD as before.
#[derive(Debug)]
pub struct Lookahead {
    present: HashSet<String>,
    /// Every key up to this one was listed; `None`: every key after the start (the page was
    /// the last).
    seen_through: Option<String>,
    taken: Instant,
}

impl Lookahead {
    /// Whether the listing proved `key` absent, recently enough to skip its HEAD.
    pub fn proves_absent(&self, key: &str) -> bool {
        self.taken.elapsed() <= LOOKAHEAD_VALID
            && !self.present.contains(key)
            && self.seen_through.as_deref().is_none_or(|last| key <= last)
    }
}

/// The longest prefix all `keys` share, cut back to a character boundary.
fn common_prefix(keys: &[String]) -> &str {
    let Some(first) = keys.first() else { return "" };
    let mut len = first.len();
    for key in &keys[1..] {
        len = len.min(first.bytes().zip(key.bytes()).take_while(|(a, b)| a == b).count());
    }
    while !first.is_char_boundary(len) {
        len -= 1;
    }
    &first[..len]
}

/// The consumer's copy request through the SDK: `copy_source` (bucket and encoded key) to
/// `key` in `bucket`, only if `key` does not exist and the source's ETag is still `etag`, its
/// metadata copied as it is.
pub fn conditional_copy(s3: &S3, bucket: &str, key: &str, copy_source: &str, etag: &str) -> CopyObjectFluentBuilder {
    s3.copy_object()
        .bucket(bucket)
        .key(key)
        .copy_source(copy_source)
        .copy_source_if_match(etag)
        .if_none_match("*")
        .metadata_directive(MetadataDirective::Copy)
}

/// Copies objects of one mapping.
pub struct Copier {
    pub s3: S3,
    pub mapping: KeyMapping,
    /// Largest object compared byte by byte when metadata cannot prove identity.
    pub compare_max_bytes: u64,
    pub destination_check: DestinationCheck,
    /// Objects above `multipart.threshold` are copied in parts.
    pub multipart: Multipart,
    /// Where set (`DIRECT_COPY`), each copy is sent this way first ([`crate::direct`]).
    pub direct: Option<DirectCopy>,
    /// The S3 client copies go through when not sent directly: slow-downs come back at once
    /// (`common::aws::s3_paced_client`).
    pub paced_s3: S3,
    /// When copies start ([`crate::pace`]).
    pub pace: std::sync::Arc<Pace>,
    /// Each attempt's bound (`S3_REQUEST_TIMEOUT`; a copy's grows with its size).
    pub request_timeout: std::time::Duration,
}

/// Why the start-up probe could not tell.
enum Probe {
    /// The destination refuses the probe's write (access denied, a KMS key): it would refuse
    /// every copy.
    Refused(String),
    /// Anything else: the probe cannot tell, the run goes on looking first.
    Failed(String),
}

/// What one copy request came to.
enum Sent {
    Copied,
    /// S3 asked to slow down: nothing was copied; the pace decides when to try again.
    SlowDown,
    Refused(Refused),
}

/// Why a copy request did not copy.
enum Refused {
    /// 412: the destination exists, or the source's ETag changed; S3's words for it.
    PreconditionFailed(String),
    Error(Box<SdkError<CopyObjectError, HttpResponse>>),
}

impl Copier {
    async fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectHead>, CopyError> {
        head_object(&self.s3, bucket, key)
            .await
            .map_err(|e| CopyError::from_s3(&format!("HEAD s3://{bucket}/{key}"), &e))
    }

    /// Resolves `auto`: whether the server refuses a copy onto an existing key when the copy
    /// carries `If-None-Match: *` (AWS S3 and SeaweedFS do; MiniStack and moto copy over it).
    /// Asked on two objects of our own under the destination prefix, with unique keys and
    /// removed afterwards: put A (conditionally), copy A to B, copy A to B again with
    /// `If-None-Match: *`, which must answer 412. Any other answer, or an error on the way,
    /// means `before-copy`: the check that is right everywhere.
    pub async fn resolve_destination_check(&self) -> anyhow::Result<DestinationCheck> {
        if self.destination_check != DestinationCheck::Auto {
            return Ok(self.destination_check);
        }
        let resolved = match self.probe_conditional_copy().await {
            Ok(true) => DestinationCheck::OnConflict,
            Ok(false) => DestinationCheck::BeforeCopy,
            Err(Probe::Refused(why)) => anyhow::bail!(
                "DESTINATION_BUCKET_NAME: writing under the destination prefix is refused ({why}): every copy would \
                 be; grant the consumer's role s3:PutObject on it (and kms:GenerateDataKey on its key), or fix the \
                 bucket's policy"
            ),
            Err(Probe::Failed(why)) => {
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

    /// The probe of [`Self::resolve_destination_check`]: `Ok(true)` when enforced.
    async fn probe_conditional_copy(&self) -> Result<bool, Probe> {
        let bucket = &self.mapping.destination_bucket;
        let [a, b] = self.probe_keys();
        self.put_probe(&a).await?;
        let copy = || self.s3.copy_object().bucket(bucket).key(&b).copy_source(common::keys::copy_source(bucket, &a));
        let outcome = match copy().send().await {
            Err(e) => Err(Probe::Failed(format!("copy s3://{bucket}/{a}: {}", describe(&e)))),
            Ok(_) => match copy().if_none_match("*").send().await {
                Ok(_) => Ok(false),
                Err(e) if status(&e) == Some(412) => Ok(true),
                Err(e) => {
                    tracing::debug!("conditional copy answered {}", describe(&e));
                    Ok(false)
                }
            },
        };
        self.remove_probes([&a, &b]).await;
        outcome
    }

    /// Sends one copy, of a probe object of ours, the direct way (`DIRECT_COPY`) at start-up:
    /// where it fails and the SDK's same copy succeeds, the direct path is off for the run,
    /// with a warning. Where the probe cannot be put, or neither way copies it, the path stays
    /// on and its breaker judges the first copies.
    pub async fn check_direct_copy(&mut self) {
        let Some(direct) = &self.direct else { return };
        let bucket = &self.mapping.destination_bucket;
        let [a, b] = self.probe_keys();
        let etag = match self.put_probe(&a).await {
            Ok(etag) => etag,
            Err(Probe::Refused(why) | Probe::Failed(why)) => {
                tracing::warn!("DIRECT_COPY not tried at start-up: {why}");
                return;
            }
        };
        let copy_source = common::keys::copy_source(bucket, &a);
        let failed = match direct.copy(&b, &copy_source, &etag, 0).await {
            Answer::Copied | Answer::PreconditionFailed | Answer::SlowDown => None,
            Answer::Elsewhere(handover) => {
                match conditional_copy(&self.s3, bucket, &b, &copy_source, &etag).send().await {
                    Ok(_) => Some(handover.miss),
                    Err(e) => {
                        tracing::warn!(
                            "DIRECT_COPY not tried at start-up: the probe copy failed both ways ({})",
                            describe(&e)
                        );
                        None
                    }
                }
            }
        };
        self.remove_probes([&a, &b]).await;
        if let Some(miss) = failed {
            tracing::warn!(
                "DIRECT_COPY off for this run: a probe copy sent directly failed ({miss}) where the SDK's succeeded; \
                 every copy goes through the SDK (a proxy, a clock or a TLS set-up this path cannot use?)"
            );
            self.direct = None;
        }
    }

    /// Two keys of our own under the destination prefix, unique to this call.
    fn probe_keys(&self) -> [String; 2] {
        let unique = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
        );
        let a = format!("{}{PROBE_DIRECTORY}{unique}", self.mapping.destination_prefix);
        [a.clone(), format!("{a}.copy")]
    }

    /// Puts a small probe object at `key`, only if it does not exist; its ETag.
    async fn put_probe(&self, key: &str) -> Result<String, Probe> {
        let bucket = &self.mapping.destination_bucket;
        let put = self
            .s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .if_none_match("*")
            .body(aws_sdk_s3::primitives::ByteStream::from_static(b"avatar-migration probe"))
            .send()
            .await
            .map_err(|e| match CopyError::from_s3(&format!("PUT s3://{bucket}/{key}"), &e) {
                CopyError::SetAside { reason: Reason::AccessDenied | Reason::EncryptionKeyUnusable, detail } => {
                    Probe::Refused(detail)
                }
                _ => Probe::Failed(format!("PUT s3://{bucket}/{key}: {}", describe(&e))),
            })?;
        Ok(put.e_tag().unwrap_or_default().to_owned())
    }

    async fn remove_probes(&self, keys: [&str; 2]) {
        let bucket = &self.mapping.destination_bucket;
        for key in keys {
            if let Err(e) = self.s3.delete_object().bucket(bucket).key(key).send().await {
                tracing::warn!("could not remove the probe object s3://{bucket}/{key}: {}", describe(&e));
            }
        }
    }

    /// Lists the destination keys of one message's objects at once, where each copy needs a
    /// look at its destination first. `None` where no look is needed (`on-conflict`), for a single key (its
    /// HEAD costs as much), and when the listing fails (each key then gets its HEAD).
    ///
    /// The listing starts just below the smallest key (after that key without its last
    /// character) under the keys' common prefix, and asks for a few more keys than the message
    /// has: keys of others between them (live uploads) end the page early, and the keys past
    /// it are HEADed.
    pub async fn look_ahead(&self, objects: &[ObjectMessage]) -> Option<Lookahead> {
        if self.destination_check == DestinationCheck::OnConflict || objects.len() < 2 {
            return None;
        }
        let destinations: Vec<String> = objects.iter().filter_map(|o| self.mapping.destination_key(&o.key)).collect();
        let mut after = destinations.iter().min()?.clone();
        after.pop();
        let max_keys = (2 * destinations.len() + 8).min(1000) as i32;
        let taken = Instant::now();
        let (bucket, prefix) = (&self.mapping.destination_bucket, common_prefix(&destinations));
        let after = Some(after.as_str()).filter(|a| !a.is_empty());
        match listing::page(&self.s3, bucket, prefix, None, after, max_keys).await {
            Ok((objects, next)) => {
                let seen_through = match next {
                    None => None,
                    Some(_) => Some(objects.last()?.key.clone()),
                };
                Some(Lookahead { present: objects.into_iter().map(|o| o.key).collect(), seen_through, taken })
            }
            Err(err) => {
                tracing::debug!(error = format!("{err:#}"), "a HEAD before each copy: the listing failed");
                None
            }
        }
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
            && let Some(dest) = self.head(dst_bucket, destination_key).await?
        {
            return self.compare(source_key, listed_etag, destination_key, dest).await;
        }
        if size > self.multipart.threshold {
            let (source, destination) = ((src_bucket.as_str(), source_key), (dst_bucket.as_str(), destination_key));
            let paced =
                multipart::Paced { s3: &self.paced_s3, pace: &self.pace, request_timeout: self.request_timeout };
            match multipart::copy(&self.s3, paced, &self.multipart, source, destination).await? {
                InParts::Copied => return Ok(Copied::Copied),
                InParts::DestinationExists => {
                    return match self.head(dst_bucket, destination_key).await? {
                        Some(dest) => self.compare(source_key, listed_etag, destination_key, dest).await,
                        None => Err(CopyError::Transient(
                            "the multipart copy was refused (412), yet no destination exists".into(),
                        )),
                    };
                }
                // Replaced by a smaller object since it was listed: copied whole below.
                InParts::Small => {}
            }
        }
        let source_missing = || CopyError::SetAside {
            reason: Reason::SourceMissing,
            detail: format!("source object s3://{src_bucket}/{source_key} does not exist"),
        };
        let mut etag = listed_etag.to_owned();
        // Two attempts: the second only when the source was replaced since it was listed, to
        // copy what the legacy row shows today.
        for _ in 0..2 {
            let failed = match self.send_copy(source_key, destination_key, &etag, size).await {
                Ok(()) => return Ok(Copied::Copied),
                Err(Refused::PreconditionFailed(detail)) => detail,
                Err(Refused::Error(err)) => {
                    let code = err.as_service_error().and_then(|e| e.code()).unwrap_or_default();
                    if status(&err) == Some(404) && code != "NoSuchBucket" {
                        // The source is gone: deleted after an earlier delivery copied it
                        // (`DELETE_SOURCE`, `feeder cleanup`), its copy then in place.
                        return match self.head(dst_bucket, destination_key).await? {
                            Some(dest) => self.compare(source_key, listed_etag, destination_key, dest).await,
                            None => Err(source_missing()),
                        };
                    }
                    let step = format!("copy s3://{src_bucket}/{source_key} -> s3://{dst_bucket}/{destination_key}");
                    return Err(CopyError::from_s3(&step, &err));
                }
            };
            // The destination appeared meanwhile, or the source changed since it was listed.
            if let Some(dest) = self.head(dst_bucket, destination_key).await? {
                return self.compare(source_key, listed_etag, destination_key, dest).await;
            }
            match self.head(src_bucket, source_key).await? {
                None => return Err(source_missing()),
                Some(src) if src.etag != etag => etag = src.etag,
                Some(_) => return Err(CopyError::Transient(format!("copy precondition failed: {failed}"))),
            }
        }
        Err(CopyError::Transient(format!("source s3://{src_bucket}/{source_key} keeps changing")))
    }

    /// One conditional copy of `source_key` to `destination_key` (if the source's ETag is still
    /// `etag` and the destination does not exist), started when the pace allows
    /// ([`crate::pace`]); a copy S3 asks to slow down is tried again, by this consumer, when
    /// the pace allows again: throttling never sends a message back to the queue, where it
    /// would spend a receive towards the dead-letter queue (its lease keeps it invisible).
    async fn send_copy(&self, source_key: &str, destination_key: &str, etag: &str, size: i64) -> Result<(), Refused> {
        loop {
            let start = self.pace.start().await;
            match self.send_copy_once(source_key, destination_key, etag, size).await {
                Sent::SlowDown => {
                    self.pace.slowed_down(start);
                    tracing::debug!("copy: S3 asks to slow down; trying again at the pace");
                }
                Sent::Copied => return Ok(()),
                Sent::Refused(refused) => return Err(refused),
            }
        }
    }

    /// One copy request: sent directly where that path is on and decides, through the SDK
    /// otherwise (whose own retries leave slow-downs to the pace).
    async fn send_copy_once(&self, source_key: &str, destination_key: &str, etag: &str, size: i64) -> Sent {
        let copy_source = self.mapping.copy_source(source_key);
        let handed_over = match &self.direct {
            Some(direct) => match direct.copy(destination_key, &copy_source, etag, size.max(0) as u64).await {
                Answer::Copied => return Sent::Copied,
                Answer::PreconditionFailed => {
                    return Sent::Refused(Refused::PreconditionFailed("412 Precondition Failed".to_owned()));
                }
                Answer::SlowDown => return Sent::SlowDown,
                Answer::Elsewhere(handover) => Some((direct, handover)),
            },
            None => None,
        };
        let sent =
            conditional_copy(&self.paced_s3, &self.mapping.destination_bucket, destination_key, &copy_source, etag)
                .customize()
                .config_override(common::aws::copy_attempt(self.request_timeout, size.max(0) as u64))
                .send()
                .await;
        if let Some((direct, handover)) = handed_over {
            direct.settle(&handover, sent.is_ok());
        }
        match sent {
            Ok(_) => Sent::Copied,
            Err(err) if status(&err) == Some(412) => Sent::Refused(Refused::PreconditionFailed(describe(&err))),
            Err(err) if is_slow_down(&err) => Sent::SlowDown,
            Err(err) => Sent::Refused(Refused::Error(Box::new(err))),
        }
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
        let (dst_bucket, src_bucket) = (&self.mapping.destination_bucket, &self.mapping.source_bucket);
        if let Some(dest) = self.head(dst_bucket, destination_key).await? {
            return self.compare(source_key, listed_etag, destination_key, dest).await;
        }
        match self.head(src_bucket, source_key).await? {
            Some(_) => Ok(Copied::Copied),
            None => Err(CopyError::SetAside {
                reason: Reason::SourceMissing,
                detail: format!("source object s3://{src_bucket}/{source_key} does not exist"),
            }),
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
        .await
        .map_err(|e| {
            CopyError::from_s3(&format!("comparing s3://{dst_bucket}/{destination_key} with its source"), &e)
        })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lookahead(present: &[&str], seen_through: Option<&str>, age: Duration) -> Lookahead {
        Lookahead {
            present: present.iter().map(|k| k.to_string()).collect(),
            seen_through: seen_through.map(str::to_owned),
            taken: Instant::now().checked_sub(age).expect("the clock has run this long"),
        }
    }

    #[test]
    fn a_lookahead_proves_absent_only_what_it_saw_not_listed_and_only_while_fresh() {
        let whole = lookahead(&["avatar/b"], None, Duration::ZERO);
        assert!(whole.proves_absent("avatar/a"));
        assert!(!whole.proves_absent("avatar/b"), "listed: present");
        assert!(whole.proves_absent("avatar/z"), "the page was the last: nothing after it exists");

        let page = lookahead(&["avatar/b", "avatar/c"], Some("avatar/c"), Duration::ZERO);
        assert!(page.proves_absent("avatar/a"));
        assert!(page.proves_absent("avatar/bb"), "between two listed keys");
        assert!(!page.proves_absent("avatar/c"));
        assert!(!page.proves_absent("avatar/ca"), "past the page: not seen");
        assert!(!page.proves_absent("avatar/d"));

        let stale = lookahead(&[], None, LOOKAHEAD_VALID + Duration::from_millis(10));
        assert!(!stale.proves_absent("avatar/a"), "too old to stand in for a HEAD");
    }

    #[test]
    fn copying_first_works_on_more_objects_at_once_and_an_unresolved_check_on_fewer() {
        assert_eq!(default_concurrency(DestinationCheck::OnConflict), 128);
        assert_eq!(default_concurrency(DestinationCheck::BeforeCopy), 32);
        assert_eq!(default_concurrency(DestinationCheck::Auto), 32, "a dry run does not resolve auto");
    }

    #[test]
    fn the_common_prefix_stops_at_a_character_boundary() {
        let keys = |ks: &[&str]| ks.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        assert_eq!(common_prefix(&keys(&["avatar/a-1", "avatar/a-2", "avatar/a-10"])), "avatar/a-");
        assert_eq!(common_prefix(&keys(&["avatar/x", "image/x"])), "");
        assert_eq!(common_prefix(&keys(&["avatar/only"])), "avatar/only");
        // 'é' (C3 A9) and 'è' (C3 A8) share their first byte, which is no prefix of its own.
        assert_eq!(common_prefix(&keys(&["avatar/é", "avatar/è"])), "avatar/");
        assert_eq!(common_prefix(&[]), "");
    }
}
