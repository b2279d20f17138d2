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

use anyhow::{Context, anyhow, bail};
use aws_sdk_s3::types::EncodingType;
use common::aws::{S3, describe};
use common::message::ObjectMessage;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the lister sends, in order: pages, then `Complete` once the prefix is exhausted.
#[derive(Debug)]
pub enum Listing {
    /// Objects in order; `rows_through`: for an inventory file, the CSV rows read through
    /// the last one (its checkpoint).
    Page {
        objects: Vec<ObjectMessage>,
        rows_through: Option<u64>,
    },
    Complete,
}

/// Lists one bucket and prefix, page by page.
pub struct Lister {
    pub s3: S3,
    pub bucket: String,
    pub prefix: String,
    pub page_size: i32,
}

/// What a listing task sends: the index of its key range and the next item.
pub type Item = (usize, anyhow::Result<Listing>);

impl Lister {
    /// Lists the keys `k` with `after < k <= until` (no bound where `None`) in a task of its
    /// own, so the next page is fetched while this one is enqueued; sends them on `tx` tagged
    /// with `index`. A channel of two pages per task keeps listing from running far ahead of
    /// enqueueing. The task ends without `Complete` when `stop` fires or the listing failed
    /// (the error is its last item).
    pub fn spawn(
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
                let page = self.page(&self.prefix, token.as_deref(), after.as_deref(), self.page_size).await;
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
    pub async fn first_key_after(&self, prefix: &str, after: &str) -> anyhow::Result<Option<String>> {
        let (objects, _) = self.page(prefix, None, Some(after), 1).await?;
        Ok(objects.into_iter().next().map(|o| o.key))
    }

    /// One page and the continuation token of the next one (`None`: this was the last page).
    async fn page(
        &self,
        prefix: &str,
        token: Option<&str>,
        after: Option<&str>,
        max_keys: i32,
    ) -> anyhow::Result<(Vec<ObjectMessage>, Option<String>)> {
        let bucket = &self.bucket;
        let position = after.map(|k| format!(" after key {k:?}")).unwrap_or_default();
        let mut request =
            self.s3.list_objects_v2().bucket(bucket).prefix(prefix).max_keys(max_keys).encoding_type(EncodingType::Url);
        request = match (token, after) {
            (Some(t), _) => request.continuation_token(t),
            (None, Some(after)) => request.start_after(after),
            (None, None) => request,
        };
        let out = request
            .send()
            .await
            .map_err(|e| anyhow!("{}", describe(&e)))
            .with_context(|| format!("listing s3://{bucket}/{prefix}{position}"))?;
        // A server that ignores `encoding-type` says so by leaving the element out.
        let encoded = out.encoding_type() == Some(&EncodingType::Url);
        let mut objects = Vec::with_capacity(out.contents().len());
        for o in out.contents() {
            let raw =
                o.key().with_context(|| format!("listing s3://{bucket}/{prefix}{position}: an entry without a key"))?;
            let key = if encoded { decode_key(raw) } else { Ok(raw.to_owned()) }
                .with_context(|| format!("listing s3://{bucket}/{prefix}{position}"))?;
            objects.push(ObjectMessage::new(key, o.size().unwrap_or(0), o.e_tag().unwrap_or_default().to_owned()));
        }
        let next = match out.is_truncated() {
            Some(false) => None,
            Some(true) => match out.next_continuation_token() {
                Some(t) if !t.is_empty() => Some(t.to_owned()),
                _ => bail!(
                    "listing s3://{bucket}/{prefix}{position}: S3 says the listing goes on but gave no \
                     continuation token"
                ),
            },
            None => bail!(
                "listing s3://{bucket}/{prefix}{position}: the answer does not say whether the listing goes on (no IsTruncated)"
            ),
        };
        Ok((objects, next))
    }
}

/// Decodes a key S3 returned with `EncodingType=url` (form encoding: `+` is a space, `%XX` a
/// byte).
pub fn decode_key(raw: &str) -> anyhow::Result<String> {
    let plus_decoded = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&plus_decoded)
        .decode_utf8()
        .map(|k| k.into_owned())
        .map_err(|_| anyhow!("key {raw:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::decode_key;

    #[test]
    fn decodes_url_encoded_keys() {
        assert_eq!(decode_key("image/a+b%2Bc%25d.png").unwrap(), "image/a b+c%d.png");
        assert_eq!(decode_key("image/%01%0D%09trail%20").unwrap(), "image/\u{1}\r\ttrail ");
        assert_eq!(decode_key("image/%C3%A9").unwrap(), "image/é");
        assert_eq!(decode_key("image/plain.png").unwrap(), "image/plain.png");
        assert!(decode_key("image/%FF").is_err());
    }

    proptest::proptest! {
        /// Whatever the key, and whether the server writes a space as `+` (AWS) or `%20`
        /// (others), decoding gives the key back.
        #[test]
        fn decoding_inverts_both_encodings(key in "\\PC{0,60}|[\\x00-\\x1f +%/é]{0,20}") {
            use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
            const KEEP: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b'/');
            let percent = utf8_percent_encode(&key, KEEP).to_string();
            proptest::prop_assert_eq!(decode_key(&percent).unwrap(), key.clone());
            proptest::prop_assert_eq!(decode_key(&percent.replace("%20", "+")).unwrap(), key);
        }
    }
}
