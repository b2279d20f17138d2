//! Object identity: does the object at one key hold exactly the bytes of another?
//!
//! Promises: "the same" is never decided by an ETag inequality, which proves nothing on AWS
//! (a multipart upload's ETag is `md5-of-md5s-N`, an SSE-KMS object's is not an MD5 at all,
//! and a copy gets a fresh one). In order:
//! 1. different sizes: different;
//! 2. a full-object checksum of the same algorithm on both (HEAD with checksum mode:
//!    CRC64NVME, or CRC32 / CRC32C / SHA-1 / SHA-256 when not composite): equal or not;
//! 3. equal ETags: the same (equal ETags mean equal bytes);
//! 4. otherwise both objects are read and compared byte by byte, streamed (memory stays flat),
//!    when they are at most `compare_max_bytes` long; above that the answer is "unknown", and
//!    the caller records the object for a person instead of guessing.
//!
//! Nothing here writes.

use aws_sdk_s3::primitives::{ByteStream, ByteStreamError};
use aws_sdk_s3::types::{ChecksumMode, ChecksumType};
use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::aws::{AwsError, Call, S3};

/// The largest object read and compared byte by byte when metadata cannot tell (64 MiB): the
/// consumer's `COMPARE_MAX_BYTES` by default, and what the feeder's checks read.
pub const COMPARE_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// What a HEAD tells about an object's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectHead {
    pub etag: String,
    pub size: i64,
    /// Full-object checksums, by algorithm (composite ones are left out: they depend on how
    /// the object was uploaded, not only on its bytes).
    pub checksums: Vec<(&'static str, String)>,
}

/// HEADs an object (with checksum mode); `None` when there is no object at that key.
pub async fn head_object(s3: &S3, bucket: &str, key: &str) -> Result<Option<ObjectHead>, AwsError> {
    let head = s3.head_object().bucket(bucket).key(key).checksum_mode(ChecksumMode::Enabled).send().await;
    let out = match head.call(|| format!("HEAD s3://{bucket}/{key}")) {
        Ok(out) => out,
        Err(err) if err.status() == Some(404) => return Ok(None),
        Err(err) => return Err(err),
    };
    let composite = out.checksum_type() == Some(&ChecksumType::Composite);
    let mut checksums = Vec::new();
    if let Some(v) = out.checksum_crc64_nvme() {
        checksums.push(("CRC64NVME", v.to_owned())); // always full-object
    }
    for (name, value) in [
        ("CRC32", out.checksum_crc32()),
        ("CRC32C", out.checksum_crc32_c()),
        ("SHA1", out.checksum_sha1()),
        ("SHA256", out.checksum_sha256()),
    ] {
        // A composite checksum ends in `-<parts>`, like a multipart ETag.
        if let Some(v) = value.filter(|v| !composite && !v.contains('-')) {
            checksums.push((name, v.to_owned()));
        }
    }
    Ok(Some(ObjectHead {
        etag: out.e_tag().unwrap_or_default().to_owned(),
        size: out.content_length().unwrap_or(0),
        checksums,
    }))
}

/// The ETag of an object, `None` when there is no object at that key (404); any other failure
/// is an error naming the object.
pub async fn head_etag(s3: &S3, bucket: &str, key: &str) -> Result<Option<String>, AwsError> {
    Ok(head_object(s3, bucket, key).await?.map(|head| head.etag))
}

/// What the metadata alone says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Same(&'static str),
    Different(String),
    /// Only the bytes can tell.
    Unknown,
}

/// Compares two objects by their metadata (steps 1-3 of the module documentation).
pub fn compare_heads(a: &ObjectHead, b: &ObjectHead) -> Verdict {
    if a.size != b.size {
        return Verdict::Different(format!("sizes differ: {} and {} bytes", a.size, b.size));
    }
    for (algorithm, value) in &a.checksums {
        if let Some((_, other)) = b.checksums.iter().find(|(alg, _)| alg == algorithm) {
            return if value == other {
                Verdict::Same("full-object checksum")
            } else {
                Verdict::Different(format!("{algorithm} checksums differ: {value} and {other}"))
            };
        }
    }
    if !a.etag.is_empty() && a.etag == b.etag {
        return Verdict::Same("ETag");
    }
    Verdict::Unknown
}

/// The final answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Same(&'static str),
    Different(String),
    /// Too large to read within the bound: not proven either way.
    Unproven(String),
}

/// Decides whether `b` holds exactly the bytes of `a`, reading both only when the metadata
/// cannot tell and they are at most `compare_max_bytes` long. Each GET is conditional on the
/// ETag seen by the HEAD, so an object replaced meanwhile is an error (try again), never a
/// wrong answer.
pub async fn same_content(
    s3: &S3,
    (a_bucket, a_key, a): (&str, &str, &ObjectHead),
    (b_bucket, b_key, b): (&str, &str, &ObjectHead),
    compare_max_bytes: u64,
) -> Result<Identity, AwsError> {
    match compare_heads(a, b) {
        Verdict::Same(how) => return Ok(Identity::Same(how)),
        Verdict::Different(why) => return Ok(Identity::Different(why)),
        Verdict::Unknown => {}
    }
    if a.size as u64 > compare_max_bytes {
        return Ok(Identity::Unproven(format!(
            "same size ({} bytes) but no common checksum and different ETags; reading more than \
             COMPARE_MAX_BYTES ({compare_max_bytes}) to compare the bytes is not allowed",
            a.size
        )));
    }
    let (a_body, b_body) =
        futures::try_join!(get_if_match(s3, a_bucket, a_key, &a.etag), get_if_match(s3, b_bucket, b_key, &b.etag))?;
    match same_bytes(chunks(a_body.body), chunks(b_body.body)).await {
        Ok(true) => Ok(Identity::Same("byte comparison")),
        Ok(false) => Ok(Identity::Different("same size, different bytes".into())),
        // The bodies broke off: no answer to judge by, so asked again later.
        Err(err) => Err(AwsError::answered(
            format!("comparing s3://{a_bucket}/{a_key} with s3://{b_bucket}/{b_key}"),
            None,
            "",
            err.to_string(),
        )),
    }
}

/// GETs an object, only while its ETag is still `etag`.
async fn get_if_match(
    s3: &S3,
    bucket: &str,
    key: &str,
    etag: &str,
) -> Result<aws_sdk_s3::operation::get_object::GetObjectOutput, AwsError> {
    s3.get_object().bucket(bucket).key(key).if_match(etag).send().await.call(|| format!("GET s3://{bucket}/{key}"))
}

/// The chunks of an object's body, as a stream.
fn chunks(body: ByteStream) -> impl Stream<Item = Result<Bytes, ByteStreamError>> + Unpin {
    Box::pin(futures::stream::unfold(body, |mut body| async move {
        body.try_next().await.transpose().map(|chunk| (chunk, body))
    }))
}

/// Compares two byte streams chunk by chunk, holding one chunk of each at a time.
async fn same_bytes<E>(
    mut a: impl Stream<Item = Result<Bytes, E>> + Unpin,
    mut b: impl Stream<Item = Result<Bytes, E>> + Unpin,
) -> Result<bool, E> {
    let (mut chunk_a, mut chunk_b) = (Bytes::new(), Bytes::new());
    loop {
        let more_a = refill(&mut a, &mut chunk_a).await?;
        let more_b = refill(&mut b, &mut chunk_b).await?;
        if !more_a || !more_b {
            return Ok(more_a == more_b);
        }
        let n = chunk_a.len().min(chunk_b.len());
        if chunk_a[..n] != chunk_b[..n] {
            return Ok(false);
        }
        chunk_a = chunk_a.slice(n..);
        chunk_b = chunk_b.slice(n..);
    }
}

/// Makes `chunk` non-empty from the stream; false when the stream is over.
async fn refill<E>(stream: &mut (impl Stream<Item = Result<Bytes, E>> + Unpin), chunk: &mut Bytes) -> Result<bool, E> {
    while chunk.is_empty() {
        match stream.next().await {
            Some(next) => *chunk = next?,
            None => return Ok(false),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(etag: &str, size: i64, checksums: &[(&'static str, &str)]) -> ObjectHead {
        ObjectHead {
            etag: etag.into(),
            size,
            checksums: checksums.iter().map(|(a, v)| (*a, (*v).to_owned())).collect(),
        }
    }

    #[test]
    fn sizes_decide_first() {
        assert!(matches!(compare_heads(&head("\"a\"", 1, &[]), &head("\"a\"", 2, &[])), Verdict::Different(_)));
    }

    #[test]
    fn a_common_full_object_checksum_decides_whatever_the_etags() {
        let a = head("\"abc-3\"", 10, &[("CRC64NVME", "x"), ("CRC32", "c")]);
        assert_eq!(
            compare_heads(&a, &head("\"fresh\"", 10, &[("CRC64NVME", "x")])),
            Verdict::Same("full-object checksum")
        );
        assert!(matches!(compare_heads(&a, &head("\"abc-3\"", 10, &[("CRC64NVME", "y")])), Verdict::Different(_)));
        assert_eq!(compare_heads(&a, &head("\"other\"", 10, &[("CRC32", "c")])), Verdict::Same("full-object checksum"));
    }

    #[test]
    fn equal_etags_are_the_same_and_different_etags_prove_nothing() {
        assert_eq!(compare_heads(&head("\"e\"", 3, &[]), &head("\"e\"", 3, &[])), Verdict::Same("ETag"));
        assert_eq!(compare_heads(&head("\"e-2\"", 3, &[]), &head("\"f\"", 3, &[])), Verdict::Unknown);
        assert_eq!(compare_heads(&head("", 3, &[]), &head("", 3, &[])), Verdict::Unknown);
        // Checksums of different algorithms cannot be compared.
        assert_eq!(
            compare_heads(&head("\"a\"", 3, &[("SHA256", "s")]), &head("\"b\"", 3, &[("CRC32", "c")])),
            Verdict::Unknown
        );
    }

    #[tokio::test]
    async fn byte_streams_compare_across_chunk_boundaries() {
        let stream = |chunks: &[&'static [u8]]| {
            futures::stream::iter(chunks.iter().map(|c| Ok::<_, ()>(Bytes::from_static(c))).collect::<Vec<_>>())
        };
        assert_eq!(same_bytes(stream(&[b"ab", b"", b"cde"]), stream(&[b"a", b"bcd", b"e"])).await, Ok(true));
        assert_eq!(same_bytes(stream(&[b"abcde"]), stream(&[b"abcdX"])).await, Ok(false));
        assert_eq!(same_bytes(stream(&[b"abc"]), stream(&[b"abcd"])).await, Ok(false));
        assert_eq!(same_bytes(stream(&[b"abcd"]), stream(&[b"abc"])).await, Ok(false));
        assert_eq!(same_bytes(stream(&[]), stream(&[b""])).await, Ok(true));
    }
}
