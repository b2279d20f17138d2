//! What a copy comes to, shared by the copy paths (`copy`, `multipart`): done (copied, or
//! found already there), or an error of one of three classes.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use common::aws::{ErrorClass, classify_object_error, describe, permanent_object_reason, status};
use common::db::Reason;

/// The largest object a single `CopyObject` can copy (5 GiB).
pub const MAX_SINGLE_COPY: i64 = 5 * 1024 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// This call created the destination object.
    Copied,
    /// The destination already held the same bytes.
    AlreadyPresent,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Permanent for this object: recorded with this reason, the message deleted.
    #[error("{detail}")]
    SetAside { reason: Reason, detail: String },
    /// Nothing can be moved (a bucket is gone, the credentials are refused): stop.
    #[error("{0}")]
    Fatal(String),
    /// Try again later: the message comes back.
    #[error("{0}")]
    Transient(String),
}

impl CopyError {
    /// Classifies an S3 error met at `step` (which names the request and the object).
    pub(crate) fn from_s3<E>(step: &str, err: &SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let detail = format!("{step}: {}", describe(err));
        match classify_object_error(err) {
            ErrorClass::Transient => CopyError::Transient(detail),
            ErrorClass::Fatal => CopyError::Fatal(detail),
            ErrorClass::Permanent => {
                let code = err.as_service_error().and_then(|e| e.code()).unwrap_or_default();
                let reason = permanent_object_reason(code, status(err)).unwrap_or(Reason::AccessDenied);
                CopyError::SetAside { reason, detail }
            }
        }
    }
}
