//! The consumer's one hot request, the conditional `CopyObject`, sent without the SDK's
//! per-request orchestration (`DIRECT_COPY`).
//!
//! Every piece is the SDK's own: its SigV4 signer (`aws-sigv4`, with S3's settings), its
//! endpoint rules (asked once for the destination bucket, as [`common::aws`]'s key-blind
//! resolver asks them), its credentials provider (the answer kept until five minutes before it
//! expires), and its HTTP transport (`aws-smithy-http-client`: the same TLS, pool and connect
//! timeout). What it leaves out is the work the SDK does around every request (interceptors,
//! retry bookkeeping, user-agent assembly, configuration layering, an XML model), which was
//! more than half of a copy's CPU (docs/performance.md, "Where the time goes").
//!
//! Promises:
//! - it is a fast path only: an answer is taken as it is only when it is unambiguous, a 200
//!   whose body is a `CopyObjectResult` (copied) or a 412 (a precondition failed). Anything
//!   else (another status, a 200 with an error document, a reset, a timeout) is answered
//!   [`Answer::Elsewhere`] and the caller sends the same copy through the SDK, with its
//!   retries and error classes; sending it again is safe, the copy being conditional;
//! - an answer asking to slow down (503, 429) is [`Answer::SlowDown`]: the caller's pace
//!   (`crate::pace`) acts on it and the copy is tried again, this way, when the pace allows;
//! - [`BREAKER`] failures in a row, each a refusal (400, 403) or no answer at all, that the
//!   SDK's request for the same copy then did not meet (a signature, a clock, a credential, a
//!   TLS set-up this path got wrong) turn it off for the rest of the process, with a warning;
//!   a copy this path decides starts the count again, so that a stray dropped connection
//!   among many answers does not add up;
//! - a refusal naming the credentials drops the kept ones, so the next copy asks the provider;
//! - nothing it logs holds a secret: the status and S3's error code, never a header.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use aws_sdk_s3::config::endpoint::{DefaultResolver, Params, ResolveEndpoint};
use aws_sdk_s3::config::{ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_s3::primitives::ByteStream;
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings, UriPathNormalizationMode,
    sign,
};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use aws_smithy_runtime_api::client::http::{HttpConnector, HttpConnectorSettings};
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_types::Document;
use aws_smithy_types::body::SdkBody;
use aws_types::SdkConfig;
use aws_types::service_config::ServiceConfigKey;
use prometheus_client::metrics::counter::Counter;

/// SHA-256 of an empty body: a copy sends none.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Failures in a row that the SDK's request did not meet before the path turns itself off.
pub const BREAKER: u32 = 3;

/// Kept credentials are asked for again this long before they expire.
const CREDENTIALS_MARGIN: Duration = Duration::from_secs(300);

/// S3 error codes that say the credentials themselves are wrong or stale.
const CREDENTIAL_CODES: &[&str] = &["ExpiredToken", "InvalidToken", "TokenRefreshRequired", "InvalidAccessKeyId"];

/// What became of one copy sent this way.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// 200 with a `CopyObjectResult`: the destination holds the copy.
    Copied,
    /// 412: the destination exists, or the source's ETag is no longer the one given.
    PreconditionFailed,
    /// 503 or 429: S3 asks to slow down; nothing was copied.
    SlowDown,
    /// Not decided here: send the copy through the SDK.
    Elsewhere(Miss),
}

/// Why a copy was left to the SDK.
#[derive(Debug, PartialEq, Eq)]
pub enum Miss {
    /// The path is off (turned off).
    Off,
    /// A 400 or 403 with S3's error code: the SDK's answer tells whether this path was wrong.
    Refused { status: u16, code: String },
    /// No answer: the connection failed, was dropped, or the answer could not be read.
    Unanswered(String),
    /// Anything else: another status (a 5xx, a 404), a 200 with an error document, no
    /// credentials from the provider.
    Other(String),
}

/// Counters shared with the consumer's metrics.
#[derive(Debug, Clone, Default)]
pub struct DirectCounters {
    /// Copies this path decided (copied or 412).
    pub answered: Counter,
    /// Copies it left to the SDK while on.
    pub handed_over: Counter,
}

/// A conditional `CopyObject` into one destination bucket.
pub struct DirectCopy {
    connector: aws_smithy_http_client::Connector,
    /// The endpoint's URL for the destination bucket, without a trailing `/`.
    base: String,
    /// The `Host` header: the URL's authority, as signed.
    host: String,
    signing_region: String,
    signing_name: String,
    credentials: KeptCredentials,
    /// Failures in a row that the SDK's request did not meet ([`BREAKER`]).
    failures: AtomicU32,
    off: AtomicBool,
    user_agent: String,
    counters: DirectCounters,
}

impl std::fmt::Debug for DirectCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectCopy").field("base", &self.base).field("signing_region", &self.signing_region).finish()
    }
}

impl DirectCopy {
    /// Builds the path for copies into `bucket`, with the configuration the S3 client was built
    /// from. `Err` says why it cannot be used (the endpoint asks for another signature than
    /// SigV4, no credentials provider): the copies then go through the SDK.
    pub fn new(
        config: &SdkConfig,
        bucket: &str,
        force_path_style: bool,
        counters: DirectCounters,
    ) -> Result<Self, String> {
        let region = config.region().ok_or("no region")?.to_string();
        let params = Params::builder()
            .bucket(bucket)
            .region(&region)
            .set_use_fips(Some(config.use_fips().unwrap_or(false)))
            .set_use_dual_stack(Some(config.use_dual_stack().unwrap_or(false)))
            .set_endpoint(s3_endpoint_url(config))
            .force_path_style(force_path_style)
            .build()
            .map_err(|e| format!("endpoint parameters: {e}"))?;
        let endpoint = resolve_now(&DefaultResolver::new(), &params)?;
        let (signing_name, signing_region) = sigv4_scheme(endpoint.properties().get("authSchemes"), &region)?;
        let base = endpoint.url().trim_end_matches('/').to_owned();
        let uri: http::Uri = base.parse().map_err(|e| format!("endpoint {base}: {e}"))?;
        let host = uri.authority().ok_or_else(|| format!("endpoint {base}: no host"))?.as_str().to_owned();
        let provider = config.credentials_provider().ok_or("no credentials provider")?;
        let mut settings = HttpConnectorSettings::builder();
        if let Some(timeouts) = config.timeout_config() {
            settings.set_connect_timeout(timeouts.connect_timeout());
            settings.set_read_timeout(timeouts.read_timeout());
        }
        let connector = aws_smithy_http_client::Connector::builder()
            .connector_settings(settings.build())
            .tls_provider(Provider::Rustls(CryptoMode::AwsLc))
            .build();
        Ok(DirectCopy {
            connector,
            base,
            host,
            signing_region,
            signing_name,
            credentials: KeptCredentials { provider, kept: Mutex::new(None), asking: tokio::sync::Mutex::new(()) },
            failures: AtomicU32::new(0),
            off: AtomicBool::new(false),
            user_agent: format!("avatar-migration/{} direct-copy", env!("CARGO_PKG_VERSION")),
            counters,
        })
    }

    /// Copies `copy_source` (the `x-amz-copy-source` value, bucket and encoded key) to `key`,
    /// only if `key` does not exist (`If-None-Match: *`) and the source's ETag is still `etag`.
    pub async fn copy(&self, key: &str, copy_source: &str, etag: &str) -> Answer {
        if self.is_off() {
            return Answer::Elsewhere(Miss::Off);
        }
        let answer = self.send(key, copy_source, etag).await;
        match &answer {
            // S3 answered, signature and all: the path works.
            Answer::SlowDown => self.failures.store(0, Ordering::Relaxed),
            Answer::Copied | Answer::PreconditionFailed => {
                self.counters.answered.inc();
                self.failures.store(0, Ordering::Relaxed);
            }
            Answer::Elsewhere(miss) => {
                self.counters.handed_over.inc();
                tracing::debug!(?miss, "direct copy: sent again through the SDK");
                match miss {
                    Miss::Refused { code, .. } if CREDENTIAL_CODES.contains(&code.as_str()) => {
                        self.credentials.forget()
                    }
                    Miss::Refused { .. } | Miss::Off | Miss::Unanswered(_) | Miss::Other(_) => {}
                }
            }
        }
        answer
    }

    /// What the SDK made of a copy this path left to it: a refusal or a missing answer of
    /// ours that the SDK's request did not meet counts towards [`BREAKER`].
    pub fn settle(&self, miss: &Miss, sdk_succeeded: bool) {
        let what = match miss {
            Miss::Refused { status, code } => format!("{status} {code}"),
            Miss::Unanswered(why) => why.clone(),
            Miss::Off | Miss::Other(_) => return,
        };
        if !sdk_succeeded {
            return;
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= BREAKER && !self.off.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                failures,
                last = what,
                "DIRECT_COPY turned off: copies sent directly failed where the SDK's succeeded; every copy goes \
                 through the SDK from now on (a clock off by minutes, credentials or a TLS set-up this path cannot \
                 use?)"
            );
        }
    }

    fn is_off(&self) -> bool {
        self.off.load(Ordering::Relaxed)
    }

    async fn send(&self, key: &str, copy_source: &str, etag: &str) -> Answer {
        let identity = match self.credentials.get().await {
            Ok(identity) => identity,
            Err(why) => return Answer::Elsewhere(Miss::Other(why)),
        };
        let request = match self.signed_request(key, copy_source, etag, &identity) {
            Ok(request) => request,
            Err(why) => return Answer::Elsewhere(Miss::Other(why)),
        };
        let response = match self.connector.call(request).await {
            Ok(response) => response,
            Err(err) => return Answer::Elsewhere(Miss::Unanswered(format!("no answer: {err}"))),
        };
        let status = response.status().as_u16();
        if matches!(status, 503 | 429) {
            common::aws::S3_SLOWDOWNS.fetch_add(1, Ordering::Relaxed);
            return Answer::SlowDown;
        }
        let body = match ByteStream::new(response.into_body()).collect().await {
            Ok(body) => body.into_bytes(),
            Err(err) => return Answer::Elsewhere(Miss::Unanswered(format!("{status}, its body unread: {err}"))),
        };
        read_answer(status, &body)
    }

    fn signed_request(
        &self,
        key: &str,
        copy_source: &str,
        etag: &str,
        identity: &Identity,
    ) -> Result<aws_smithy_runtime_api::http::Request, String> {
        let uri = format!("{}/{}", self.base, common::keys::encode_path(key));
        let signed = [
            ("host", self.host.as_str()),
            ("x-amz-copy-source", copy_source),
            ("x-amz-copy-source-if-match", etag),
            ("if-none-match", "*"),
            ("x-amz-metadata-directive", "COPY"),
        ];
        // S3's signing: single URI encoding, no path normalisation, the payload hash sent.
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(identity)
            .region(&self.signing_region)
            .name(&self.signing_name)
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| format!("signing: {e}"))?
            .into();
        let signable = SignableRequest::new(
            "PUT",
            &uri,
            signed.iter().copied(),
            SignableBody::Precomputed(EMPTY_SHA256.to_owned()),
        )
        .map_err(|e| format!("signing: {e}"))?;
        let (instructions, _) = sign(signable, &params).map_err(|e| format!("signing: {e}"))?.into_parts();
        let mut builder = http::Request::builder().method("PUT").uri(&uri);
        for (name, value) in signed {
            builder = builder.header(name, value);
        }
        let mut request = builder
            .header("content-length", "0")
            .header("user-agent", &self.user_agent)
            .body(SdkBody::empty())
            .map_err(|e| format!("request: {e}"))?;
        instructions.apply_to_request_http1x(&mut request);
        aws_smithy_runtime_api::http::Request::try_from(request).map_err(|e| format!("request: {e}"))
    }
}

/// Reads S3's answer to a copy: only a 200 with a `CopyObjectResult` and a 412 decide.
fn read_answer(status: u16, body: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(body);
    let code = || between(&text, "<Code>", "</Code>").unwrap_or_default().to_owned();
    match status {
        // S3 may answer 200 and then fail the copy: the error is in the body.
        200 if text.contains("<CopyObjectResult") && !text.contains("<Error>") => Answer::Copied,
        200 => Answer::Elsewhere(Miss::Other(format!("200 without a CopyObjectResult: {}", code()))),
        412 => Answer::PreconditionFailed,
        400 | 403 => Answer::Elsewhere(Miss::Refused { status, code: code() }),
        _ => Answer::Elsewhere(Miss::Other(format!("{status} {}", code()))),
    }
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let len = text[start..].find(close)?;
    Some(&text[start..start + len])
}

/// The S3 endpoint URL the SDK's S3 client takes from this configuration: the service's own
/// (`AWS_ENDPOINT_URL_S3`, the profile's `s3 = endpoint_url`) before the global one, as
/// `aws_sdk_s3::config::Builder::from(&SdkConfig)` does.
fn s3_endpoint_url(config: &SdkConfig) -> Option<String> {
    let service = || {
        let key = ServiceConfigKey::builder().service_id("S3").env("AWS_ENDPOINT_URL").profile("endpoint_url").build();
        config.service_config().zip(key.ok()).and_then(|(conf, key)| conf.load_config(key))
    };
    if config.get_origin("endpoint_url").is_client_config() {
        config.endpoint_url().map(str::to_owned)
    } else {
        service().or_else(|| config.endpoint_url().map(str::to_owned))
    }
}

fn resolve_now(resolver: &DefaultResolver, params: &Params) -> Result<aws_smithy_types::endpoint::Endpoint, String> {
    use futures::FutureExt;
    resolver
        .resolve_endpoint(params)
        .now_or_never()
        .ok_or("the endpoint rules did not answer at once")?
        .map_err(|e| format!("endpoint: {e}"))
}

/// The signing name and region of the endpoint's first auth scheme, when it is plain SigV4.
fn sigv4_scheme(schemes: Option<&Document>, region: &str) -> Result<(String, String), String> {
    let Some(Document::Array(schemes)) = schemes else {
        return Ok(("s3".to_owned(), region.to_owned()));
    };
    let Some(Document::Object(first)) = schemes.first() else {
        return Ok(("s3".to_owned(), region.to_owned()));
    };
    let text = |name: &str| match first.get(name) {
        Some(Document::String(s)) => Some(s.clone()),
        _ => None,
    };
    match text("name").as_deref() {
        Some("sigv4") => {}
        other => return Err(format!("the endpoint asks for the auth scheme {other:?}, not sigv4")),
    }
    Ok((
        text("signingName").unwrap_or_else(|| "s3".to_owned()),
        text("signingRegion").unwrap_or_else(|| region.to_owned()),
    ))
}

/// The provider's credentials, kept until [`CREDENTIALS_MARGIN`] before they expire; one
/// request to the provider at a time.
struct KeptCredentials {
    provider: SharedCredentialsProvider,
    kept: Mutex<Option<Identity>>,
    asking: tokio::sync::Mutex<()>,
}

impl KeptCredentials {
    async fn get(&self) -> Result<Identity, String> {
        if let Some(identity) = self.fresh() {
            return Ok(identity);
        }
        let _one_at_a_time = self.asking.lock().await;
        if let Some(identity) = self.fresh() {
            return Ok(identity);
        }
        let credentials = self.provider.provide_credentials().await.map_err(|e| format!("credentials: {e}"))?;
        let identity = Identity::from(credentials);
        *self.kept.lock().expect("not poisoned") = Some(identity.clone());
        Ok(identity)
    }

    fn fresh(&self) -> Option<Identity> {
        let kept = self.kept.lock().expect("not poisoned");
        let identity = kept.as_ref()?;
        match identity.expiration() {
            Some(expiry) if SystemTime::now() + CREDENTIALS_MARGIN >= expiry => None,
            _ => Some(identity.clone()),
        }
    }

    fn forget(&self) {
        *self.kept.lock().expect("not poisoned") = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_copy_result_or_a_412_decides() {
        let result = br#"<?xml version="1.0"?><CopyObjectResult><ETag>"a"</ETag></CopyObjectResult>"#;
        assert_eq!(read_answer(200, result), Answer::Copied);
        let late_error =
            b"<Error><Code>InternalError</Code><Message>We encountered an internal error</Message></Error>";
        assert_eq!(
            read_answer(200, late_error),
            Answer::Elsewhere(Miss::Other("200 without a CopyObjectResult: InternalError".into()))
        );
        assert!(matches!(read_answer(200, b""), Answer::Elsewhere(Miss::Other(_))));
        assert_eq!(read_answer(412, b""), Answer::PreconditionFailed);
        let signature = b"<Error><Code>SignatureDoesNotMatch</Code></Error>";
        assert_eq!(
            read_answer(403, signature),
            Answer::Elsewhere(Miss::Refused { status: 403, code: "SignatureDoesNotMatch".into() })
        );
        assert!(matches!(
            read_answer(404, b"<Error><Code>NoSuchKey</Code></Error>"),
            Answer::Elsewhere(Miss::Other(_))
        ));
        assert!(matches!(
            read_answer(500, b"<Error><Code>InternalError</Code></Error>"),
            Answer::Elsewhere(Miss::Other(_))
        ));
    }

    fn config(endpoint: Option<&str>) -> SdkConfig {
        let mut config = SdkConfig::builder()
            .region(aws_types::region::Region::new("eu-west-3"))
            .credentials_provider(SharedCredentialsProvider::new(aws_sdk_s3::config::Credentials::for_tests()))
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest());
        if let Some(endpoint) = endpoint {
            config = config.endpoint_url(endpoint);
        }
        config.build()
    }

    #[test]
    fn the_endpoint_is_the_sdks_for_the_bucket() {
        let counters = DirectCounters::default;
        let aws = DirectCopy::new(&config(None), "production-s3", false, counters()).unwrap();
        assert_eq!(aws.base, "https://production-s3.s3.eu-west-3.amazonaws.com");
        assert_eq!(aws.host, "production-s3.s3.eu-west-3.amazonaws.com");
        assert_eq!((aws.signing_name.as_str(), aws.signing_region.as_str()), ("s3", "eu-west-3"));
        let path_style = DirectCopy::new(&config(None), "production-s3", true, counters()).unwrap();
        assert_eq!(path_style.base, "https://s3.eu-west-3.amazonaws.com/production-s3");
        let local =
            DirectCopy::new(&config(Some("http://127.0.0.1:21680")), "production-s3", true, counters()).unwrap();
        assert_eq!(local.base, "http://127.0.0.1:21680/production-s3");
        assert_eq!(local.host, "127.0.0.1:21680");
    }

    #[test]
    fn an_endpoint_asking_for_another_signature_is_refused() {
        let sigv4a = Document::Array(vec![Document::Object(
            [("name".to_owned(), Document::String("sigv4a".into()))].into_iter().collect(),
        )]);
        assert!(sigv4_scheme(Some(&sigv4a), "us-east-1").unwrap_err().contains("sigv4a"));
        let sigv4 = Document::Array(vec![Document::Object(
            [
                ("name".to_owned(), Document::String("sigv4".into())),
                ("signingName".to_owned(), Document::String("s3".into())),
                ("signingRegion".to_owned(), Document::String("us-gov-west-1".into())),
            ]
            .into_iter()
            .collect(),
        )]);
        assert_eq!(sigv4_scheme(Some(&sigv4), "us-east-1").unwrap(), ("s3".to_owned(), "us-gov-west-1".to_owned()));
    }
}
