//! What the destination server does, asked at start-up with two short-lived objects of our own
//! under the destination prefix ([`PROBE_DIRECTORY`]): whether it refuses a conditional copy
//! onto an existing key (`DESTINATION_CHECK=auto`), and whether a copy sent the direct way
//! (`DIRECT_COPY`) works where the SDK's does.

use aws_sdk_s3::primitives::ByteStream;
use common::aws::{Call, S3};

use super::conditional::conditional_copy;
use super::direct::{Answer, DirectCopy, Miss};
use super::outcome::CopyError;

/// Where, under the destination prefix, the probes put their two short-lived objects (the IAM
/// grant for deleting them is scoped to it).
pub const PROBE_DIRECTORY: &str = ".avatar-migration-probe/";

/// When the destination key is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DestinationCheck {
    /// Ask the server at start-up ([`Probe::conditional_copy_enforced`]): `on-conflict` where
    /// it refuses a conditional copy onto an existing key, `before-copy` otherwise.
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
/// message's listing stands in for its HEADs only for `LOOKAHEAD_VALID`, which objects
/// waiting their turn on a slow server may outlive (not measured apart). docs/performance.md
/// has the runs.
pub fn default_concurrency(check: DestinationCheck) -> usize {
    match check {
        DestinationCheck::OnConflict => 128,
        DestinationCheck::BeforeCopy | DestinationCheck::Auto => 32,
    }
}

/// Why a probe could not tell.
pub enum Trouble {
    /// The destination refuses the probe's write (access denied, a KMS key): it would refuse
    /// every copy.
    Refused(String),
    /// Anything else: the probe cannot tell.
    Failed(String),
}

/// The probes' client, destination bucket and prefix.
pub struct Probe<'a> {
    pub s3: &'a S3,
    pub bucket: &'a str,
    pub prefix: &'a str,
}

impl Probe<'_> {
    /// Whether the server refuses a copy onto an existing key when the copy carries
    /// `If-None-Match: *` (AWS S3 and SeaweedFS do; MiniStack and moto copy over it): put A
    /// (conditionally), copy A to B, copy A to B again with `If-None-Match: *`, which must
    /// answer 412. Any other answer to the last copy means "not enforced".
    pub async fn conditional_copy_enforced(&self) -> Result<bool, Trouble> {
        let bucket = self.bucket;
        let [a, b] = self.keys();
        self.put(&a).await?;
        let copy = || self.s3.copy_object().bucket(bucket).key(&b).copy_source(common::keys::copy_source(bucket, &a));
        let outcome = match copy().send().await.call(|| format!("copy s3://{bucket}/{a}")) {
            Err(e) => Err(Trouble::Failed(e.to_string())),
            Ok(_) => match copy().if_none_match("*").send().await.call(|| "conditional copy".to_owned()) {
                Ok(_) => Ok(false),
                Err(e) if e.is_precondition_failed() => Ok(true),
                Err(e) => {
                    tracing::debug!("{e}");
                    Ok(false)
                }
            },
        };
        self.remove([&a, &b]).await;
        outcome
    }

    /// Sends one copy, of a probe object, the direct way: what that way missed where the
    /// SDK's same copy succeeded (`None` when it worked, or when neither way could tell).
    pub async fn direct_copy_misses(&self, direct: &DirectCopy) -> Option<Miss> {
        let bucket = self.bucket;
        let [a, b] = self.keys();
        let etag = match self.put(&a).await {
            Ok(etag) => etag,
            Err(Trouble::Refused(why) | Trouble::Failed(why)) => {
                tracing::warn!("DIRECT_COPY not tried at start-up: {why}");
                return None;
            }
        };
        let copy_source = common::keys::copy_source(bucket, &a);
        let missed = match direct.copy(&b, &copy_source, &etag, 0).await {
            Answer::Copied | Answer::PreconditionFailed | Answer::SlowDown => None,
            Answer::Elsewhere(handover) => {
                let sent = conditional_copy(self.s3, bucket, &b, &copy_source, &etag).send().await;
                match sent.call(|| format!("copy s3://{bucket}/{a}")) {
                    Ok(_) => Some(handover.miss),
                    Err(e) => {
                        tracing::warn!("DIRECT_COPY not tried at start-up: the probe copy failed both ways ({e})");
                        None
                    }
                }
            }
        };
        self.remove([&a, &b]).await;
        missed
    }

    /// Two keys of our own under the destination prefix, unique to this call.
    fn keys(&self) -> [String; 2] {
        let unique = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
        );
        let a = format!("{}{PROBE_DIRECTORY}{unique}", self.prefix);
        [a.clone(), format!("{a}.copy")]
    }

    /// Puts a small probe object at `key`, only if it does not exist; its ETag.
    async fn put(&self, key: &str) -> Result<String, Trouble> {
        let bucket = self.bucket;
        let put = self
            .s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .if_none_match("*")
            .body(ByteStream::from_static(b"avatar-migration probe"))
            .send()
            .await
            .call(|| format!("PUT s3://{bucket}/{key}"))
            .map_err(|e| match CopyError::from(e) {
                CopyError::SetAside { reason, detail } if reason.is_refusal() => Trouble::Refused(detail),
                other => Trouble::Failed(other.to_string()),
            })?;
        Ok(put.e_tag().unwrap_or_default().to_owned())
    }

    async fn remove(&self, keys: [&str; 2]) {
        let bucket = self.bucket;
        for key in keys {
            let removed = self.s3.delete_object().bucket(bucket).key(key).send().await;
            if let Err(e) = removed.call(|| format!("removing the probe object s3://{bucket}/{key}")) {
                tracing::warn!("{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copying_first_works_on_more_objects_at_once_and_an_unresolved_check_on_fewer() {
        assert_eq!(default_concurrency(DestinationCheck::OnConflict), 128);
        assert_eq!(default_concurrency(DestinationCheck::BeforeCopy), 32);
        assert_eq!(default_concurrency(DestinationCheck::Auto), 32, "a dry run does not resolve auto");
    }
}
