//! What a copy comes to, shared by the copy paths (conditional, in parts, direct): done
//! (copied, or found already there), or an error of one of three classes.

use common::aws::{AwsError, ErrorClass};
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

impl From<AwsError> for CopyError {
    /// An S3 error met while moving one object, by what it means for the object
    /// ([`AwsError::for_object`]).
    fn from(err: AwsError) -> Self {
        match err.for_object() {
            ErrorClass::Transient => CopyError::Transient(err.to_string()),
            ErrorClass::Fatal => CopyError::Fatal(err.to_string()),
            ErrorClass::Permanent(reason) => CopyError::SetAside { reason, detail: err.to_string() },
        }
    }
}

/// The source is gone: set aside as `source_missing`.
pub fn source_missing(bucket: &str, key: &str) -> CopyError {
    CopyError::SetAside {
        reason: Reason::SourceMissing,
        detail: format!("source object s3://{bucket}/{key} does not exist"),
    }
}
