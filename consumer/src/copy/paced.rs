//! How the consumer's writes to the destination are sent: through the S3 client whose
//! slow-downs come back at once (`common::aws::s3_paced_client`), each started when the
//! consumer's pace allows (`crate::pace`), and sent again at the pace when S3 asks to slow
//! down: throttling never fails a copy.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use common::aws::{AwsError, Call, S3};

use crate::pace::Pace;

/// The paced client, the pace, and each attempt's bound.
#[derive(Clone, Copy)]
pub(crate) struct Paced<'a> {
    pub(crate) s3: &'a S3,
    pub(crate) pace: &'a Pace,
    /// Each attempt's bound (`S3_REQUEST_TIMEOUT`), grown by a part's or object's size.
    pub(crate) request_timeout: std::time::Duration,
}

impl Paced<'_> {
    /// Sends a request when the pace allows, again (at the pace) each time S3 asks to slow
    /// down; an error names its call (`call`).
    pub(crate) async fn send<T, E, F>(&self, call: impl Fn() -> String, request: impl Fn() -> F) -> Result<T, AwsError>
    where
        F: std::future::Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        loop {
            let start = self.pace.start().await;
            match request().await.call(&call) {
                Err(err) if err.is_slow_down() => self.pace.slowed_down(start),
                sent => return sent,
            }
        }
    }
}
