//! The delete protocol for legacy objects, shared by `feeder cleanup --yes` and the consumer's
//! `DELETE_SOURCE` (see `docs/design.md`, "Deleting legacy objects").
//!
//! For a batch of objects whose copies are proven:
//! 0. check the references: a referenced object is kept;
//! 1. commit a tombstone for each other ([`fence::claim`]); from then on the fence turns any write of
//!    that legacy path into its copy's path (or refuses it);
//! 2. wait until every transaction open at that commit has ended
//!    ([`fence::wait_for_older_transactions`]), bounded: those are the only ones that could
//!    write the path unseen by the fence, or hold such a write uncommitted;
//! 3. check the references again: a referenced object is kept (its tombstone withdrawn);
//! 4. check that this process still holds its lease ([`lease::Lease::valid`]);
//! 5. delete, conditional on the listed ETag (an object replaced since is kept): in
//!    `DeleteObjects` batches of up to 1,000, and one `DeleteObject` each for the keys XML 1.0
//!    cannot carry (`DeleteObjects` is an XML body; a key with `\x01` would fail the batch);
//! 6. mark the tombstones of deleted objects; withdraw those of objects the answer says were
//!    kept. After an answer that says nothing (a timeout), the tombstones stay: the object may
//!    be gone, and the fence goes on protecting it.
//!
//! Promises: no object is deleted while a committed row names it, nor can a row naming it be
//! committed after (with the fence installed); an error in any step before 5 deletes nothing.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use sqlx::PgPool;

use crate::aws::{Call, S3};
use crate::db::fence::{self, Tombstone};
use crate::db::lease::Lease;

/// `DeleteObjects` takes at most this many keys.
const DELETE_BATCH: usize = 1000;

/// What happened to a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Keys deleted.
    pub deleted: Vec<String>,
    /// Kept: a row referenced the legacy path when checked again.
    pub referenced: Vec<String>,
    /// Kept: another live deleter holds its tombstone (a message delivered twice).
    pub elsewhere: Vec<String>,
    /// Kept: the delete was refused (replaced since it was listed, access denied, ...), with why.
    pub failed: Vec<(String, String)>,
}

/// Deletes legacy objects in one bucket by the protocol.
#[derive(Clone)]
pub struct Deleter {
    pub db: PgPool,
    pub s3: S3,
    pub bucket: String,
    /// The references whose rows may name the objects.
    pub targets: crate::db::Targets,
    /// How long step 2 may wait (`DELETE_WAIT`).
    pub wait: Duration,
}

impl Deleter {
    /// Runs the protocol for `batch` under `lease` (whose id claims the tombstones).
    pub async fn delete(&self, lease: &Lease, batch: &[Tombstone]) -> anyhow::Result<Deleted> {
        let mut out = Deleted::default();
        if batch.is_empty() {
            return Ok(out);
        }
        let holder = lease.id();
        // A referenced object gets no tombstone at all (while it had one, the fence would write
        // its copy's path for it: the same bytes, but not what the writer asked for).
        let paths: Vec<&str> = batch.iter().map(|t| t.legacy.as_str()).collect();
        let referenced =
            fence::referenced(&self.db, &self.targets, &self.bucket, &paths).await.context("checking references")?;
        let (referenced, batch): (Vec<&Tombstone>, Vec<&Tombstone>) =
            batch.iter().partition(|t| referenced.contains(&t.legacy));
        out.referenced = referenced.into_iter().map(|t| t.legacy.clone()).collect();
        let batch: Vec<Tombstone> = batch.into_iter().cloned().collect();
        let claimed = fence::claim(&self.db, holder, &batch).await.context("committing tombstones")?;
        let mine: Vec<&Tombstone> = batch.iter().filter(|t| claimed.contains(&t.legacy)).collect();
        out.elsewhere = batch.iter().filter(|t| !claimed.contains(&t.legacy)).map(|t| t.legacy.clone()).collect();
        let keys: Vec<&str> = mine.iter().map(|t| t.legacy.as_str()).collect();
        // Nothing is deleted yet: on any error below, the tombstones are withdrawn (best effort:
        // one left behind only makes the fence write the copy's path, the same bytes).
        let checked = async {
            fence::wait_for_older_transactions(&self.db, self.wait).await?;
            let referenced = fence::referenced(&self.db, &self.targets, &self.bucket, &keys)
                .await
                .context("checking references again")?;
            anyhow::ensure!(
                lease.valid(),
                "the lease on the legacy objects could not be renewed in time (the database is out of reach?): \
                 nothing was deleted"
            );
            Ok(referenced)
        }
        .await;
        let referenced: HashSet<String> = match checked {
            Ok(referenced) => referenced,
            Err(err) => {
                if let Err(e) = fence::withdraw(&self.db, holder, &keys).await {
                    tracing::warn!(error = %e, "cannot withdraw tombstones of objects kept; they stay (harmless)");
                }
                return Err(err);
            }
        };
        let (kept, doomed): (Vec<&Tombstone>, Vec<&Tombstone>) =
            mine.into_iter().partition(|t| referenced.contains(&t.legacy));
        out.referenced.extend(kept.iter().map(|t| t.legacy.clone()));
        let kept_keys: Vec<&str> = kept.iter().map(|t| t.legacy.as_str()).collect();
        fence::withdraw(&self.db, holder, &kept_keys).await.context("withdrawing tombstones of referenced objects")?;

        let (batched, single): (Vec<&Tombstone>, Vec<&Tombstone>) =
            doomed.into_iter().partition(|t| xml_can_carry(&t.legacy));
        // After an answer that says nothing, what was decided before it is still saved.
        let mut unanswered = Ok(());
        for chunk in batched.chunks(DELETE_BATCH) {
            unanswered = self.delete_many(chunk, &mut out).await;
            if unanswered.is_err() {
                break;
            }
        }
        for one in single {
            if unanswered.is_err() {
                break;
            }
            unanswered = self.delete_one(one, &mut out).await;
        }
        let deleted: Vec<&str> = out.deleted.iter().map(String::as_str).collect();
        fence::mark_deleted(&self.db, holder, &deleted).await.context("marking tombstones deleted")?;
        let failed: Vec<&str> = out.failed.iter().map(|(k, _)| k.as_str()).collect();
        fence::withdraw(&self.db, holder, &failed).await.context("withdrawing tombstones of objects kept")?;
        unanswered.map(|()| out)
    }

    async fn delete_many(&self, chunk: &[&Tombstone], out: &mut Deleted) -> anyhow::Result<()> {
        let ids = chunk
            .iter()
            .map(|t| {
                let id = ObjectIdentifier::builder().key(&t.legacy);
                let id = if t.etag.is_empty() { id } else { id.e_tag(&t.etag) };
                id.build().context("an object identifier")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let answer = self
            .s3
            .delete_objects()
            .bucket(&self.bucket)
            .delete(Delete::builder().set_objects(Some(ids)).quiet(true).build()?)
            .send()
            .await
            .call(|| format!("deleting legacy objects in s3://{}", self.bucket))?;
        let refused: HashSet<&str> = answer.errors().iter().filter_map(|e| e.key()).collect();
        for error in answer.errors() {
            let key = error.key().unwrap_or_default();
            tracing::warn!(key, code = error.code(), "legacy object not deleted: kept");
            out.failed.push((key.to_owned(), error.code().unwrap_or("an error").to_owned()));
        }
        out.deleted.extend(chunk.iter().filter(|t| !refused.contains(t.legacy.as_str())).map(|t| t.legacy.clone()));
        Ok(())
    }

    async fn delete_one(&self, one: &Tombstone, out: &mut Deleted) -> anyhow::Result<()> {
        let mut delete = self.s3.delete_object().bucket(&self.bucket).key(&one.legacy);
        if !one.etag.is_empty() {
            delete = delete.if_match(&one.etag);
        }
        match delete.send().await.call(|| format!("deleting s3://{}/{}", self.bucket, one.legacy)) {
            Ok(_) => out.deleted.push(one.legacy.clone()),
            Err(err) if err.status().is_some_and(|s| s < 500) => {
                tracing::warn!(key = one.legacy, error = %err, "legacy object not deleted: kept");
                out.failed.push((one.legacy.clone(), err.to_string()));
            }
            Err(err) => return Err(err.into()),
        }
        Ok(())
    }
}

/// Whether XML 1.0 can carry `key` in a `DeleteObjects` body: its characters are all in
/// `[#x20-#xD7FF] | [#xE000-#xFFFD] | [#x10000-#x10FFFF]`. Tab, line feed and carriage return
/// are legal XML but a parser normalizes line ends: they go one by one too.
pub fn xml_can_carry(key: &str) -> bool {
    key.chars().all(|c| matches!(c, '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_carries_what_xml_1_0_allows() {
        for key in ["image/a.png", "image/é ü 漢字", "image/😀", "image/\u{E000}\u{FFFD}"] {
            assert!(xml_can_carry(key), "{key:?}");
        }
        for key in ["image/\u{1}", "image/\t", "image/a\nb", "image/\r", "image/\u{FFFE}", "image/\u{FFFF}"] {
            assert!(!xml_can_carry(key), "{key:?}");
        }
    }
}
