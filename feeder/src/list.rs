//! List stage: pages through the source prefix with `ListObjectsV2`, starting after the
//! checkpointed key, as one range or as several key ranges at once (`crate::ranges`).
//!
//! Promises:
//! - every key under the prefix in the range (`after < key <= until`) is yielded exactly once
//!   per run, in S3's (UTF-8 binary) order, page by page, byte for byte: keys are listed with
//!   `EncodingType=url` and decoded, so control characters (`\x01`, `\r`, `\t`) survive the
//!   XML response;
//! - the end of the listing is reported positively ([`Listing::Complete`], sent only after S3
//!   said `IsTruncated=false` or listed a key past the range's end); an error, a panic, a missing `IsTruncated` or a truncated page
//!   without a continuation token is an error, never mistaken for the end;
//! - a listing error stops the run with an error naming the bucket, prefix and position (it is
//!   safe to run again: it resumes from the last checkpoint).

use common::aws::S3;
use common::listing;
use common::message::ObjectMessage;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the lister sends, in order: pages, then `Complete` once the prefix is exhausted.
#[derive(Debug)]
pub(crate) enum Listing {
    /// Objects in order; `rows_through`: for an inventory file, the CSV rows read through
    /// the last one (its checkpoint).
    Page {
        objects: Vec<ObjectMessage>,
        rows_through: Option<u64>,
    },
    Complete,
}

/// Lists one bucket and prefix, page by page.
pub(crate) struct Lister {
    pub(crate) s3: S3,
    pub(crate) bucket: String,
    pub(crate) prefix: String,
    pub(crate) page_size: i32,
}

/// What a listing task sends: the index of its key range and the next item.
pub(crate) type Item = (usize, anyhow::Result<Listing>);

impl Lister {
    /// Lists the keys `k` with `after < k <= until` (no bound where `None`) in a task of its
    /// own, so the next page is fetched while this one is enqueued; sends them on `tx` tagged
    /// with `index`. A channel of two pages per task keeps listing from running far ahead of
    /// enqueueing. The task ends without `Complete` when `stop` fires or the listing failed
    /// (the error is its last item).
    pub(crate) fn spawn(
        self: Arc<Self>,
        index: usize,
        (after, until): (Option<String>, Option<String>),
        tx: mpsc::Sender<Item>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut token: Option<String> = None;
            let mut after = after;
            loop {
                if stop.is_cancelled() {
                    return;
                }
                let (bucket, prefix) = (&self.bucket, &self.prefix);
                let page =
                    listing::page(&self.s3, bucket, prefix, token.as_deref(), after.as_deref(), self.page_size).await;
                let (mut objects, next) = match page {
                    Ok(page) => page,
                    Err(err) => {
                        let _ = tx.send((index, Err(err))).await;
                        return;
                    }
                };
                let mut complete = next.is_none();
                // The range ends at `until`: the first key past it ends the range's listing.
                if let Some(until) = &until
                    && let Some(past) = objects.iter().position(|o| o.key.as_str() > until.as_str())
                {
                    objects.truncate(past);
                    complete = true;
                }
                if let Some(last) = objects.last() {
                    after = Some(last.key.clone());
                }
                if !objects.is_empty()
                    && tx.send((index, Ok(Listing::Page { objects, rows_through: None }))).await.is_err()
                {
                    return;
                }
                if complete {
                    let _ = tx.send((index, Ok(Listing::Complete))).await;
                    return;
                }
                token = next;
            }
        })
    }

    /// The first key under `prefix` after `after`, if any.
    pub(crate) async fn first_key_after(&self, prefix: &str, after: &str) -> anyhow::Result<Option<String>> {
        let (objects, _) = listing::page(&self.s3, &self.bucket, prefix, None, Some(after), 1).await?;
        Ok(objects.into_iter().next().map(|o| o.key))
    }
}
