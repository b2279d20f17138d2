//! AWS clients ([`s3_client`], [`s3_paced_client`], [`sqs_client`]), the start-up check of a
//! bucket, and below: what an AWS error means ([`error`]) and the queue's attributes
//! ([`queue`]).
//!
//! Endpoints come from the SDK's own `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` /
//! `AWS_ENDPOINT_URL_SQS` variables (emulators), never from code branches; credentials and
//! region from the SDK's default chain.

use std::time::Duration;

use anyhow::anyhow;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
pub use aws_sdk_s3::Client as S3;
pub use aws_sdk_sqs::Client as Sqs;

pub mod error;
pub mod queue;

pub use error::{AwsError, Call, ErrorClass, Unavailable};
pub use queue::{QueueDepth, check_queue, dead_letter_queue, queue_depth, queue_retention, redrive_policy};

/// Loads the SDK configuration; a missing region is a setup error naming the variable.
pub async fn sdk_config() -> anyhow::Result<SdkConfig> {
    let config = aws_config::defaults(BehaviorVersion::latest()).load().await;
    anyhow::ensure!(
        config.region().is_some(),
        "no AWS region configured: set AWS_REGION (for example AWS_REGION=us-east-1)"
    );
    Ok(config)
}

/// A connection to S3 or SQS must be made within this (the SDK's default).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(3100);
/// The longest attempt of an SQS call: more than a long poll (20 s) takes.
pub const SQS_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// The slowest copy rate a copy's time bound allows for: one second per 25 MiB.
pub const MIN_COPY_RATE: u64 = 25 * 1024 * 1024;

/// Every attempt of every request bounded: the connection within [`CONNECT_TIMEOUT`], the whole
/// answer within `attempt`.
fn timeouts(attempt: Duration) -> TimeoutConfig {
    TimeoutConfig::builder().connect_timeout(CONNECT_TIMEOUT).operation_attempt_timeout(attempt).build()
}

/// The bound of one copy attempt of `size` bytes: `request_timeout` (`S3_REQUEST_TIMEOUT`),
/// plus the time to copy its bytes at [`MIN_COPY_RATE`].
pub fn copy_timeout(request_timeout: Duration, size: u64) -> Duration {
    request_timeout + Duration::from_secs(size / MIN_COPY_RATE)
}

/// A request's configuration with the attempt bound of a copy of `size` bytes, for
/// `customize().config_override(..)`.
pub fn copy_attempt(request_timeout: Duration, size: u64) -> aws_sdk_s3::config::Builder {
    aws_sdk_s3::config::Builder::default().timeout_config(timeouts(copy_timeout(request_timeout, size)))
}

/// The S3 client; each attempt of a request is bounded by `request_timeout`
/// (`S3_REQUEST_TIMEOUT`; copies get [`copy_attempt`]).
pub fn s3_client(config: &SdkConfig, force_path_style: bool, request_timeout: Duration) -> S3 {
    // Adaptive retries: S3 answers 503 SlowDown while it partitions a hot prefix; the adaptive
    // mode backs off and rate-limits this client, then ramps up again, which is what S3 asks
    // for. Eight attempts ride out a partition split without failing the object.
    let conf = aws_sdk_s3::config::Builder::from(config)
        .force_path_style(force_path_style)
        .timeout_config(timeouts(request_timeout))
        .retry_config(RetryConfig::adaptive().with_max_attempts(8))
        .interceptor(CountSlowDowns)
        .endpoint_resolver(KeyBlindEndpoints::default())
        .build();
    S3::from_conf(conf)
}

/// The S3 client for requests whose pace the caller sets (the consumer's copies,
/// `consumer::pace`): the same as [`s3_client`], but with the SDK's standard retries (no
/// client-side rate limiter of its own) and none for an answer asking to slow down (503, 429,
/// a throttling code), which comes back at once for the caller's controller to act on. Other
/// retries (a 500, a reset, a timeout) stay.
pub fn s3_paced_client(config: &SdkConfig, force_path_style: bool, request_timeout: Duration) -> S3 {
    let conf = aws_sdk_s3::config::Builder::from(config)
        .force_path_style(force_path_style)
        .timeout_config(timeouts(request_timeout))
        .retry_config(RetryConfig::standard().with_max_attempts(8))
        .retry_classifier(NoThrottleRetries)
        .interceptor(CountSlowDowns)
        .endpoint_resolver(KeyBlindEndpoints::default())
        .build();
    S3::from_conf(conf)
}

/// Forbids the SDK's retry of an answer asking to slow down; runs after every other
/// classifier, so it has the last word.
#[derive(Debug)]
struct NoThrottleRetries;

impl aws_smithy_runtime_api::client::retries::classifiers::ClassifyRetry for NoThrottleRetries {
    fn classify_retry(
        &self,
        ctx: &aws_smithy_runtime_api::client::interceptors::context::InterceptorContext,
    ) -> aws_smithy_runtime_api::client::retries::classifiers::RetryAction {
        use aws_smithy_runtime_api::client::retries::classifiers::RetryAction;
        let throttled = ctx.response().is_some_and(|r| matches!(r.status().as_u16(), 503 | 429));
        if throttled { RetryAction::RetryForbidden } else { RetryAction::NoActionIndicated }
    }

    fn name(&self) -> &'static str {
        "NoThrottleRetries"
    }

    fn priority(&self) -> aws_smithy_runtime_api::client::retries::classifiers::RetryClassifierPriority {
        use aws_smithy_runtime_api::client::retries::classifiers::RetryClassifierPriority;
        RetryClassifierPriority::run_after(RetryClassifierPriority::transient_error_classifier())
    }
}

/// The SDK's own S3 endpoint rules, asked without the object's key, prefix and copy source.
///
/// The SDK resolves the endpoint again on every request and remembers only the last answer,
/// keyed by every parameter, the object key among them; so with a new key per request it never
/// hits, and resolving was 3-4 % of a consumer's CPU. The rules never read those three
/// parameters (aws-sdk-s3 1.157: they are bound and unused), so leaving them out changes no
/// answer and lets the one remembered answer serve every object of a bucket (unit test
/// `endpoints_do_not_depend_on_the_key`).
#[derive(Debug, Default)]
struct KeyBlindEndpoints(aws_sdk_s3::config::endpoint::DefaultResolver);

impl aws_sdk_s3::config::endpoint::ResolveEndpoint for KeyBlindEndpoints {
    fn resolve_endpoint<'a>(
        &'a self,
        params: &'a aws_sdk_s3::config::endpoint::Params,
    ) -> aws_sdk_s3::config::endpoint::EndpointFuture<'a> {
        use aws_sdk_s3::config::endpoint::{EndpointFuture, Params};
        use futures::FutureExt;
        let blind = Params::builder()
            .set_bucket(params.bucket().map(str::to_owned))
            .set_region(params.region().map(str::to_owned))
            .set_use_fips(params.use_fips())
            .set_use_dual_stack(params.use_dual_stack())
            .set_endpoint(params.endpoint().map(str::to_owned))
            .set_force_path_style(params.force_path_style())
            .set_accelerate(params.accelerate())
            .set_use_global_endpoint(params.use_global_endpoint())
            .set_use_object_lambda_endpoint(params.use_object_lambda_endpoint())
            .set_disable_access_points(params.disable_access_points())
            .set_disable_multi_region_access_points(params.disable_multi_region_access_points())
            .set_use_arn_region(params.use_arn_region())
            .set_use_s3_express_control_endpoint(params.use_s3_express_control_endpoint())
            .set_disable_s3_express_session_auth(params.disable_s3_express_session_auth())
            .build();
        match blind {
            Ok(blind) => match self.0.resolve_endpoint(&blind).now_or_never() {
                Some(resolved) => EndpointFuture::ready(resolved),
                None => self.0.resolve_endpoint(params),
            },
            Err(_) => self.0.resolve_endpoint(params),
        }
    }
}

/// S3 answers (attempts, retried ones included) that asked this process to slow down: 503
/// (`SlowDown`, `ServiceUnavailable`) or 429. Read by the consumer's metrics.
pub static S3_SLOWDOWNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts every attempt S3 answered with 503 or 429 into [`S3_SLOWDOWNS`]; the SDK retries
/// them by itself, so they are otherwise invisible.
#[derive(Debug)]
struct CountSlowDowns;

impl aws_sdk_s3::config::Intercept for CountSlowDowns {
    fn name(&self) -> &'static str {
        "CountSlowDowns"
    }

    fn read_after_attempt(
        &self,
        context: &aws_sdk_s3::config::interceptors::FinalizerInterceptorContextRef<'_>,
        _: &aws_sdk_s3::config::RuntimeComponents,
        _: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        if let Some(response) = context.response()
            && matches!(response.status().as_u16(), 503 | 429)
        {
            S3_SLOWDOWNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
}

pub fn sqs_client(config: &SdkConfig) -> Sqs {
    // Standard retries (3 attempts) suffice: every SQS call we make is safe to repeat, and a
    // call that still fails leaves the message to come back after its visibility timeout.
    let conf = aws_sdk_sqs::config::Builder::from(config).timeout_config(timeouts(SQS_ATTEMPT_TIMEOUT)).build();
    Sqs::from_conf(conf)
}

/// Checks that a bucket exists and is reachable with these credentials.
pub async fn check_bucket(s3: &S3, variable: &str, bucket: &str) -> anyhow::Result<()> {
    let Err(err) = s3.head_bucket().bucket(bucket).send().await.call(|| format!("HeadBucket {bucket}")) else {
        return Ok(());
    };
    Err(match err.status() {
        Some(404) => anyhow!("{variable}: bucket {bucket:?} does not exist: create it or fix {variable}"),
        Some(403) => {
            anyhow!("{variable}: access to bucket {bucket:?} denied: check the credentials and the bucket policy")
        }
        _ => error::refusal_or_unavailable(
            &err,
            format!(
                "{variable}: cannot reach bucket {bucket:?} ({err}): check AWS_ENDPOINT_URL, the network and the region"
            ),
        ),
    })
}

#[cfg(test)]
mod tests {
    use aws_sdk_s3::config::endpoint::{DefaultResolver, Params, ResolveEndpoint};
    use futures::FutureExt;

    use super::KeyBlindEndpoints;

    fn resolve(resolver: &impl ResolveEndpoint, params: &Params) -> String {
        let endpoint = resolver.resolve_endpoint(params).now_or_never().expect("resolved at once").unwrap();
        format!("{} {:?}", endpoint.url(), endpoint.properties())
    }

    /// The rules' answer is the same for any key, prefix and copy source, on AWS (virtual
    /// hosts, path style, FIPS, dual stack, acceleration) and on an endpoint of one's own; and
    /// the key-blind resolver gives exactly the SDK's answer.
    #[test]
    fn endpoints_do_not_depend_on_the_key() {
        let configs = [
            Params::builder().region("us-east-1").bucket("production-s3"),
            Params::builder().region("eu-west-3").bucket("production-s3").force_path_style(true),
            Params::builder().region("us-gov-west-1").bucket("production-s3").use_fips(true),
            Params::builder().region("ap-south-1").bucket("production-s3").use_dual_stack(true),
            Params::builder().region("us-east-1").bucket("production-s3").accelerate(true),
            Params::builder().region("us-east-1").bucket("production-s3").endpoint("http://127.0.0.1:21680"),
            Params::builder()
                .region("us-east-1")
                .bucket("production-s3")
                .endpoint("http://127.0.0.1:21680")
                .force_path_style(true),
        ];
        let (sdk, blind) = (DefaultResolver::new(), KeyBlindEndpoints::default());
        for config in configs {
            let one = config.clone().key("avatar/a.png").copy_source("legacy-s3/image/a.png").build().unwrap();
            let other = config.clone().key("avatar/b c é.png").prefix("avatar/").build().unwrap();
            let none = config.build().unwrap();
            let expected = resolve(&sdk, &one);
            assert!(expected.contains("production-s3"), "{expected}");
            assert_eq!(resolve(&sdk, &other), expected);
            assert_eq!(resolve(&sdk, &none), expected);
            assert_eq!(resolve(&blind, &one), expected);
            assert_eq!(resolve(&blind, &other), expected);
        }
    }
}
