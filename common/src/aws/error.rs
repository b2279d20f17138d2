//! One error type for every AWS call, and what it means for the caller.
//!
//! Promises: an [`AwsError`] names its call (`HEAD s3://bucket/key`) and keeps the answer's
//! HTTP status, the service's error code and the SDK's error itself; every decision made on an
//! error ([`AwsError::for_object`], [`AwsError::for_queue`], [`AwsError::is_slow_down`],
//! [`AwsError::not_now`]) reads the status and the code, never the wording.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use crate::reason::Reason;

/// An AWS call that failed: which call, what the service answered, and the SDK's error.
///
/// Its text is one line: the call, then the code and message (or the transport failure and
/// its causes). The SDK's error is kept ([`AwsError::sdk`]) rather than chained as the
/// source: its chain says again what that line says.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {summary}")]
pub struct AwsError {
    call: String,
    status: Option<u16>,
    code: String,
    summary: String,
    sdk: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl AwsError {
    /// The failure of `call` (e.g. `HEAD s3://bucket/key`).
    pub fn new<E>(call: impl Into<String>, err: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.as_service_error().and_then(ProvideErrorMetadata::code).unwrap_or_default().to_owned();
        let summary = describe(&err);
        Self { call: call.into(), status, code, summary, sdk: Some(Box::new(err)) }
    }

    /// An answer read without the SDK (the consumer's direct copy path): its status, its error
    /// code (empty when it has none) and a line saying what it was.
    pub fn answered(call: impl Into<String>, status: Option<u16>, code: &str, summary: impl Into<String>) -> Self {
        Self { call: call.into(), status, code: code.to_owned(), summary: summary.into(), sdk: None }
    }

    /// The call that failed.
    pub fn call(&self) -> &str {
        &self.call
    }

    /// The HTTP status of the answer; `None` when there was no answer (a timeout, the network).
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// The service's error code (`NoSuchKey`, `SlowDown`, …); empty when the answer had none
    /// (a HEAD's has no body) or there was no answer.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// The SDK's error, for whoever needs more than the status and code.
    pub fn sdk(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.sdk.as_deref()
    }

    /// The answer was 404 and not about the bucket: no object (or queue entry) at that name.
    pub fn is_not_found(&self) -> bool {
        self.status == Some(404) && self.code != "NoSuchBucket"
    }

    /// The answer was 412: a condition of the request (`If-None-Match`, `If-Match`, a copy
    /// source's ETag) does not hold.
    pub fn is_precondition_failed(&self) -> bool {
        self.status == Some(412)
    }

    /// The service asks the client to slow down: 503, 429, or a throttling code.
    pub fn is_slow_down(&self) -> bool {
        is_slow_down(&self.code, self.status)
    }

    /// "Not now" rather than "no": no answer at all, a 5xx, a 429, or a code any retry may
    /// cure. Start-up waits on these (`crate::setup`).
    pub fn not_now(&self) -> bool {
        self.status.is_none_or(|s| s >= 500 || s == 429) || TRANSIENT_CODES.contains(&self.code.as_str())
    }

    /// What this error, met while moving one object, means for that object's work.
    pub fn for_object(&self) -> ErrorClass {
        classify_object(&self.code, self.status)
    }

    /// What this error, met on the queue, means for the process.
    pub fn for_queue(&self) -> ErrorClass {
        classify_queue(&self.code, self.status)
    }
}

/// Names the call of an SDK result's error: `send().await.call(|| format!("HEAD …"))?`.
pub trait Call<T> {
    fn call(self, call: impl FnOnce() -> String) -> Result<T, AwsError>;
}

impl<T, E> Call<T> for Result<T, SdkError<E, HttpResponse>>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    fn call(self, call: impl FnOnce() -> String) -> Result<T, AwsError> {
        self.map_err(|err| AwsError::new(call(), err))
    }
}

/// What an AWS error means for the work at hand. docs/troubleshooting.md: "What each error
/// means".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Try again later: throttling, 5xx, timeouts, the network, a refreshed credential.
    Transient,
    /// This one object cannot be moved as things stand (access denied to it, archived, key too
    /// long, its encryption key unusable): record it with this reason, go on with the others.
    Permanent(Reason),
    /// Nothing can be moved: a missing bucket or queue, unknown credentials. Stop the process
    /// with the error; messages wait in the queue.
    Fatal,
}

/// Codes any retry may cure. S3's and SQS's error codes are mostly unmodeled in the SDK, so
/// they are matched by their documented names.
const TRANSIENT_CODES: &[&str] = &[
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "OperationAborted",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "ServiceUnavailable",
    "InternalError",
    "InternalFailure",
    "ExpiredToken",
    "TokenRefreshRequired",
];

/// S3's and STS's names for "slow down".
const THROTTLING_CODES: &[&str] =
    &["SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequestsException"];

/// Codes that mean the whole run is misconfigured (with [`NO_SUCH_QUEUE_CODES`]).
const FATAL_CODES: &[&str] = &[
    "NoSuchBucket",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "MissingAuthenticationToken",
    "AllAccessDisabled",
    "AccountProblem",
];

/// The codes SQS answers for a queue that does not exist (the query and JSON protocols).
pub const NO_SUCH_QUEUE_CODES: &[&str] =
    &["QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue", "NonExistentQueue"];

/// Whether a code means the whole run is misconfigured.
fn is_fatal(code: &str) -> bool {
    FATAL_CODES.contains(&code) || NO_SUCH_QUEUE_CODES.contains(&code)
}

/// Whether an answer asks the client to slow down: 503, 429, or a throttling code.
pub fn is_slow_down(code: &str, status: Option<u16>) -> bool {
    matches!(status, Some(503 | 429)) || THROTTLING_CODES.contains(&code)
}

/// Classifies an S3 error met while moving one object.
pub fn classify_object(code: &str, status: Option<u16>) -> ErrorClass {
    if TRANSIENT_CODES.contains(&code) {
        return ErrorClass::Transient;
    }
    if is_fatal(code) {
        return ErrorClass::Fatal;
    }
    let reason = match code {
        "InvalidObjectState" | "ObjectNotInActiveTierError" => Reason::ObjectArchived,
        "KeyTooLongError" | "KeyTooLong" => Reason::KeyTooLong,
        c if c.starts_with("KMS.") || c == "KMSAccessDenied" => Reason::EncryptionKeyUnusable,
        "AccessDenied" => Reason::AccessDenied,
        // A HEAD's error has no body, hence no code: its status says it all.
        "" if status == Some(403) => Reason::AccessDenied,
        _ => return ErrorClass::Transient,
    };
    ErrorClass::Permanent(reason)
}

/// Classifies an SQS error: access denied to the queue is fatal (every message would meet it).
pub fn classify_queue(code: &str, status: Option<u16>) -> ErrorClass {
    if TRANSIENT_CODES.contains(&code) {
        ErrorClass::Transient
    } else if is_fatal(code)
        || code.starts_with("AccessDenied")
        || code == "KMS.AccessDeniedException"
        || status == Some(403)
    {
        ErrorClass::Fatal
    } else {
        ErrorClass::Transient
    }
}

/// One line for logs and failure records: the error code and message, or the transport
/// failure and its causes, without the SDK's multi-line debug dump.
fn describe<E, R>(err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match err {
        SdkError::ServiceError(ctx) => {
            let e = ctx.err();
            match (e.code(), e.message()) {
                (Some(code), Some(msg)) => format!("{code}: {msg}"),
                (Some(code), None) => code.to_owned(),
                _ => format!("{e}"),
            }
        }
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

/// An AWS service that did not answer, or answered that it cannot serve now (a 5xx, a
/// throttle, the network): asking again later may succeed. Start-up waits on it
/// (`setup::is_unavailable`); anything else a check returns is a refusal for good.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// `what` as an error, marked [`Unavailable`] when `err` says "not now".
pub(crate) fn refusal_or_unavailable(err: &AwsError, what: String) -> anyhow::Error {
    if err.not_now() { anyhow::Error::new(Unavailable(what)) } else { anyhow::anyhow!(what) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each code S3 documents for the requests the consumer makes, with the status it comes
    /// with, and what it means for the object at hand.
    #[test]
    fn an_object_error_is_classified_by_its_code_and_status() {
        use ErrorClass::*;
        let cases: &[(&str, Option<u16>, ErrorClass)] = &[
            ("SlowDown", Some(503), Transient),
            ("ServiceUnavailable", Some(503), Transient),
            ("InternalError", Some(500), Transient),
            ("RequestTimeout", Some(400), Transient),
            ("RequestTimeTooSkewed", Some(403), Transient),
            ("ExpiredToken", Some(400), Transient),
            ("OperationAborted", Some(409), Transient),
            ("", None, Transient), // no answer: a timeout, the network
            ("", Some(500), Transient),
            ("NoSuchBucket", Some(404), Fatal),
            ("InvalidAccessKeyId", Some(403), Fatal),
            ("SignatureDoesNotMatch", Some(403), Fatal),
            ("AllAccessDisabled", Some(403), Fatal),
            ("AccountProblem", Some(403), Fatal),
            ("AccessDenied", Some(403), Permanent(Reason::AccessDenied)),
            ("", Some(403), Permanent(Reason::AccessDenied)), // a HEAD: no body, no code
            ("InvalidObjectState", Some(403), Permanent(Reason::ObjectArchived)),
            ("ObjectNotInActiveTierError", Some(403), Permanent(Reason::ObjectArchived)),
            ("KeyTooLongError", Some(400), Permanent(Reason::KeyTooLong)),
            ("KMS.DisabledException", Some(400), Permanent(Reason::EncryptionKeyUnusable)),
            ("KMS.AccessDeniedException", Some(400), Permanent(Reason::EncryptionKeyUnusable)),
            ("KMSAccessDenied", Some(403), Permanent(Reason::EncryptionKeyUnusable)),
            ("PreconditionFailed", Some(412), Transient), // decided by the caller before this
            ("SomethingNew", Some(400), Transient),
        ];
        for &(code, status, expected) in cases {
            assert_eq!(classify_object(code, status), expected, "{code} {status:?}");
        }
    }

    #[test]
    fn a_queue_error_is_fatal_only_when_every_message_would_meet_it() {
        use ErrorClass::*;
        let cases: &[(&str, Option<u16>, ErrorClass)] = &[
            ("AWS.SimpleQueueService.NonExistentQueue", Some(400), Fatal),
            ("QueueDoesNotExist", Some(400), Fatal),
            ("AccessDenied", Some(403), Fatal),
            ("AccessDeniedException", Some(400), Fatal),
            ("KMS.AccessDeniedException", Some(400), Fatal),
            ("", Some(403), Fatal),
            ("InvalidClientTokenId", Some(403), Fatal),
            ("RequestThrottled", Some(400), Transient),
            ("ThrottlingException", Some(400), Transient),
            ("InternalFailure", Some(500), Transient),
            ("ServiceUnavailable", Some(503), Transient),
            ("ExpiredToken", Some(403), Transient),
            ("", None, Transient),
            ("ReceiptHandleIsInvalid", Some(400), Transient),
        ];
        for &(code, status, expected) in cases {
            assert_eq!(classify_queue(code, status), expected, "{code} {status:?}");
        }
    }

    #[test]
    fn a_slow_down_is_read_from_the_status_or_the_code() {
        assert!(is_slow_down("SlowDown", Some(503)));
        assert!(is_slow_down("", Some(503)), "a HEAD's 503 has no code");
        assert!(is_slow_down("", Some(429)));
        assert!(is_slow_down("ThrottlingException", Some(400)));
        assert!(is_slow_down("TooManyRequestsException", Some(400)));
        assert!(!is_slow_down("InternalError", Some(500)));
        assert!(!is_slow_down("", None));
    }

    #[test]
    fn not_now_is_no_answer_a_5xx_a_429_or_a_transient_code() {
        let error = |code: &str, status| AwsError::answered("GET s3://b/k", status, code, "x");
        assert!(error("", None).not_now());
        assert!(error("InternalError", Some(500)).not_now());
        assert!(error("", Some(429)).not_now());
        assert!(error("RequestTimeTooSkewed", Some(403)).not_now());
        assert!(!error("AccessDenied", Some(403)).not_now());
        assert!(!error("NoSuchBucket", Some(404)).not_now());
        assert!(error("NoSuchKey", Some(404)).is_not_found());
        assert!(!error("NoSuchBucket", Some(404)).is_not_found(), "a missing bucket is not a missing object");
        assert_eq!(error("NoSuchKey", Some(404)).to_string(), "GET s3://b/k: x");
    }
}
