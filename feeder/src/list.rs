//! List stage: pages through the source prefix with `ListObjectsV2`, starting after the
//! checkpointed key.
//!
//! Promises:
//! - every key under the prefix that sorts after `start_after` is yielded exactly once per run,
//!   in S3's (UTF-8 binary) order, page by page, byte for byte: keys are listed with
//!   `EncodingType=url` and decoded, so control characters (`\x01`, `\r`, `\t`) survive the
//!   XML response;
//! - the end of the listing is reported positively ([`Listing::Complete`], sent only after S3
//!   said `IsTruncated=false`); an error, a panic, a missing `IsTruncated` or a truncated page
//!   without a continuation token is an error, never mistaken for the end;
//! - a listing error stops the run with an error naming the bucket, prefix and position (it is
//!   safe to run again: it resumes from the last checkpoint).

use anyhow::{Context, anyhow, bail};
use aws_sdk_s3::types::EncodingType;
use common::aws::{S3, describe};
use common::message::ObjectMessage;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the lister sends, in order: pages, then `Complete` once the prefix is exhausted.
#[derive(Debug)]
pub enum Listing {
    Page(Vec<ObjectMessage>),
    Complete,
}

/// Lists in a task of its own, so the next page is fetched while this one is enqueued. The
/// channel holds two pages: listing never runs far ahead of enqueueing. The channel closes
/// without `Complete` when `stop` fires or the listing failed (the error is the last item).
pub fn spawn(
    s3: S3,
    bucket: String,
    prefix: String,
    start_after: Option<String>,
    page_size: i32,
    stop: CancellationToken,
) -> (mpsc::Receiver<anyhow::Result<Listing>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(2);
    let handle = tokio::spawn(async move {
        let lister = Lister { s3, bucket, prefix, page_size };
        let mut token: Option<String> = None;
        let mut after = start_after;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let page = lister.page(token.as_deref(), after.as_deref()).await;
            let (objects, next) = match page {
                Ok(page) => page,
                Err(err) => {
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            };
            if let Some(last) = objects.last() {
                after = Some(last.key.clone());
            }
            if !objects.is_empty() && tx.send(Ok(Listing::Page(objects))).await.is_err() {
                return;
            }
            match next {
                Some(next) => token = Some(next),
                None => {
                    let _ = tx.send(Ok(Listing::Complete)).await;
                    return;
                }
            }
        }
    });
    (rx, handle)
}

struct Lister {
    s3: S3,
    bucket: String,
    prefix: String,
    page_size: i32,
}

impl Lister {
    /// One page and the continuation token of the next one (`None`: this was the last page).
    async fn page(
        &self,
        token: Option<&str>,
        after: Option<&str>,
    ) -> anyhow::Result<(Vec<ObjectMessage>, Option<String>)> {
        let (bucket, prefix) = (&self.bucket, &self.prefix);
        let position = after.map(|k| format!(" after key {k:?}")).unwrap_or_default();
        let mut request = self
            .s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .max_keys(self.page_size)
            .encoding_type(EncodingType::Url);
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
