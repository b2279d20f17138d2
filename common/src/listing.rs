//! One page of `ListObjectsV2`, byte for byte: what the feeder's listing and the consumer's
//! look at the destination (`consumer::copy::Lookahead`) share.
//!
//! Promises: keys are listed with `EncodingType=url` and decoded, so control characters
//! (`\x01`, `\r`, `\t`) survive the XML response; a missing `IsTruncated`, or a truncated page
//! without a continuation token, is an error, never mistaken for the end; every error names the
//! bucket, prefix and position.

use anyhow::{Context, anyhow, bail};
use aws_sdk_s3::types::EncodingType;

use crate::aws::{Call, S3};
use crate::message::ObjectMessage;

/// One page of at most `max_keys` objects under `prefix`, in S3's (UTF-8 binary) order, and
/// the continuation token of the next one (`None`: this was the last page). The page starts
/// after `token` when given, else after the key `after` (which errors name either way), else
/// at the prefix's start.
pub async fn page(
    s3: &S3,
    bucket: &str,
    prefix: &str,
    token: Option<&str>,
    after: Option<&str>,
    max_keys: i32,
) -> anyhow::Result<(Vec<ObjectMessage>, Option<String>)> {
    let position = after.map(|k| format!(" after key {k:?}")).unwrap_or_default();
    let mut request =
        s3.list_objects_v2().bucket(bucket).prefix(prefix).max_keys(max_keys).encoding_type(EncodingType::Url);
    request = match (token, after) {
        (Some(t), _) => request.continuation_token(t),
        (None, Some(after)) => request.start_after(after),
        (None, None) => request,
    };
    let out = request.send().await.call(|| format!("listing s3://{bucket}/{prefix}{position}"))?;
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
                "listing s3://{bucket}/{prefix}{position}: S3 says the listing goes on but gave no continuation token"
            ),
        },
        None => bail!(
            "listing s3://{bucket}/{prefix}{position}: the answer does not say whether the listing goes on (no IsTruncated)"
        ),
    };
    Ok((objects, next))
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
