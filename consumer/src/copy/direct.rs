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
//!   TLS set-up this path got wrong) turn it off, with a warning and the `s3_direct_copy_off`
//!   gauge at 1; a copy this path decides starts the count again, so that a stray dropped
//!   connection among many answers does not add up. After a cool-down ([`COOL_DOWN`], doubled
//!   each time the path fails again, up to [`MAX_COOL_DOWN`]) one copy is sent this way as a
//!   trial: decided, the path is back on; failed where the SDK succeeded, off again;
//! - every request is bounded: a connection within the SDK's connect timeout, the whole answer
//!   within `S3_REQUEST_TIMEOUT` plus the time to copy the object's bytes at [`MIN_COPY_RATE`];
//!   past it the copy goes through the SDK (a hung server does not hold a copy, nor its
//!   message);
//! - as the SDK's default client: proxies from `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` and
//!   `NO_PROXY`; the SDK's clock (its time source) corrected by the skew every answer's `Date`
//!   shows, as the SDK's clock-skew interceptor measures it; credentials asked for one load at
//!   a time and again [`CREDENTIALS_MARGIN`] before they expire (the SDK's identity cache's
//!   buffer);
//! - a refusal naming the credentials drops the kept ones, so the next copy asks the provider;
//! - a copy handed to the SDK is logged (info) with what this path met and S3's request ids;
//! - nothing it logs holds a secret: the status and S3's error code, never a header.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use aws_sdk_s3::config::endpoint::{DefaultResolver, Params, ResolveEndpoint};
use aws_sdk_s3::config::{ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_s3::primitives::ByteStream;
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings, UriPathNormalizationMode,
    sign,
};
use aws_smithy_async::time::SharedTimeSource;
use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use aws_smithy_runtime_api::client::http::{HttpConnector, HttpConnectorSettings};
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_types::Document;
use aws_smithy_types::body::SdkBody;
use aws_types::SdkConfig;
use aws_types::service_config::ServiceConfigKey;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// SHA-256 of an empty body: a copy sends none.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Failures in a row that the SDK's request did not meet before the path turns itself off.
pub const BREAKER: u32 = 3;

/// How long the path stays off before a trial copy; doubled each time the trial fails.
pub const COOL_DOWN: Duration = Duration::from_secs(10);

/// The longest cool-down.
const MAX_COOL_DOWN: Duration = Duration::from_secs(300);

/// The slowest copy rate a request's time bound allows for: S3 copies within a region run far
/// faster, so a copy of 5 GB (the most one request copies) may take 200 s more than the bound.
pub const MIN_COPY_RATE: u64 = common::aws::MIN_COPY_RATE;

/// The SDK's connect timeout (`aws-config`'s default) where the configuration sets none.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(3100);

/// Kept credentials are asked for again this long before they expire: the buffer of the SDK's
/// identity cache (`aws-smithy-runtime`'s `LazyCache`).
const CREDENTIALS_MARGIN: Duration = Duration::from_secs(10);

/// Credentials that come back already inside the margin are used until they expire, asked for
/// again at most this often meanwhile.
const CREDENTIALS_ASK_EVERY: Duration = Duration::from_secs(1);

/// A round trip longer than this does not measure the clock's skew (the SDK's bound).
const MAX_TRUSTED_ROUND_TRIP: Duration = Duration::from_secs(15 * 60);

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
    /// Not decided here: send the copy through the SDK, then [`DirectCopy::settle`] it.
    Elsewhere(Handover),
}

/// A copy left to the SDK: why, and what [`DirectCopy::settle`] needs to weigh the SDK's answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Handover {
    pub miss: Miss,
    /// The copy was the trial after a cool-down.
    trial: bool,
}

/// Why a copy was left to the SDK.
#[derive(Debug, PartialEq, Eq)]
pub enum Miss {
    /// The path is off (turned off).
    Off,
    /// A 400 or 403 with S3's error code: the SDK's answer tells whether this path was wrong.
    Refused { status: u16, code: String, request_id: RequestIds },
    /// No answer: the connection failed, was dropped, or the answer could not be read.
    Unanswered(String),
    /// Anything else: another status (a 5xx, a 404), a 200 with an error document, no
    /// credentials from the provider.
    Other(String, RequestIds),
}

impl std::fmt::Display for Miss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Miss::Off => f.write_str("the path is off"),
            Miss::Refused { status, code, request_id } => write!(f, "{status} {code}, request id {request_id}"),
            Miss::Unanswered(why) => f.write_str(why),
            Miss::Other(what, request_id) => write!(f, "{what}, request id {request_id}"),
        }
    }
}

/// S3's ids for one request (`x-amz-request-id`, `x-amz-id-2`), which AWS support asks for.
#[derive(Debug, Default, PartialEq, Eq, Clone)]
pub struct RequestIds(pub Option<String>, pub Option<String>);

impl RequestIds {
    fn of(headers: &aws_smithy_runtime_api::http::Headers) -> Self {
        RequestIds(headers.get("x-amz-request-id").map(str::to_owned), headers.get("x-amz-id-2").map(str::to_owned))
    }
}

impl std::fmt::Display for RequestIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestIds(None, None) => f.write_str("none"),
            RequestIds(id, id2) => {
                write!(f, "{} (id-2 {})", id.as_deref().unwrap_or("-"), id2.as_deref().unwrap_or("-"))
            }
        }
    }
}

/// Counters shared with the consumer's metrics.
#[derive(Debug, Clone, Default)]
pub struct DirectCounters {
    /// Copies this path decided (copied or 412).
    pub answered: Counter,
    /// Copies it left to the SDK while on.
    pub handed_over: Counter,
    /// 1 while the path is off ([`BREAKER`]), 0 otherwise.
    pub off: Gauge,
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
    /// The SDK's clock.
    clock: SharedTimeSource,
    /// S3's clock minus ours, in milliseconds, from the last answer's `Date`.
    skew_ms: AtomicI64,
    /// The answer's bound without the object's bytes (`S3_REQUEST_TIMEOUT`).
    request_timeout: Duration,
    /// Failures in a row that the SDK's request did not meet ([`BREAKER`]).
    failures: AtomicU32,
    /// Whether the path is off: read by every copy, set and cleared under `breaker`.
    off: AtomicBool,
    breaker: Mutex<Breaker>,
    user_agent: String,
    counters: DirectCounters,
}

/// The state of a path that is off.
#[derive(Debug)]
struct Breaker {
    /// When a trial copy may go this way again, while off.
    until: Option<Instant>,
    /// A trial copy is out.
    trial_out: bool,
    /// The next cool-down.
    cool_down: Duration,
}

/// May a copy go this way?
enum Admit {
    On,
    Trial,
    Off,
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
        request_timeout: Duration,
        counters: DirectCounters,
    ) -> anyhow::Result<Self> {
        let region = config.region().context("no region")?.to_string();
        let params = Params::builder()
            .bucket(bucket)
            .region(&region)
            .set_use_fips(Some(config.use_fips().unwrap_or(false)))
            .set_use_dual_stack(Some(config.use_dual_stack().unwrap_or(false)))
            .set_endpoint(s3_endpoint_url(config))
            .force_path_style(force_path_style)
            .build()
            .context("endpoint parameters")?;
        let endpoint = resolve_now(&DefaultResolver::new(), &params)?;
        let (signing_name, signing_region) = sigv4_scheme(endpoint.properties().get("authSchemes"), &region)?;
        let base = endpoint.url().trim_end_matches('/').to_owned();
        let uri: http::Uri = base.parse().with_context(|| format!("endpoint {base}"))?;
        let host = uri.authority().with_context(|| format!("endpoint {base}: no host"))?.as_str().to_owned();
        let provider = config.credentials_provider().context("no credentials provider")?;
        let connect_timeout = config.timeout_config().and_then(|t| t.connect_timeout()).unwrap_or(CONNECT_TIMEOUT);
        let settings = HttpConnectorSettings::builder().connect_timeout(connect_timeout).build();
        let connector = aws_smithy_http_client::Connector::builder()
            .connector_settings(settings)
            .tls_provider(Provider::Rustls(CryptoMode::AwsLc))
            .proxy_config(ProxyConfig::from_env())
            .build();
        Ok(DirectCopy {
            connector,
            base,
            host,
            signing_region,
            signing_name,
            credentials: KeptCredentials::new(provider),
            clock: config.time_source().unwrap_or_default(),
            skew_ms: AtomicI64::new(0),
            request_timeout,
            failures: AtomicU32::new(0),
            off: AtomicBool::new(false),
            breaker: Mutex::new(Breaker { until: None, trial_out: false, cool_down: COOL_DOWN }),
            user_agent: format!("avatar-migration/{} direct-copy", env!("CARGO_PKG_VERSION")),
            counters,
        })
    }

    /// Copies `copy_source` (the `x-amz-copy-source` value, bucket and encoded key) of `size`
    /// bytes to `key`, only if `key` does not exist (`If-None-Match: *`) and the source's ETag
    /// is still `etag`.
    pub async fn copy(&self, key: &str, copy_source: &str, etag: &str, size: u64) -> Answer {
        let trial = match self.admit() {
            Admit::On => false,
            Admit::Trial => true,
            Admit::Off => return Answer::Elsewhere(Handover { miss: Miss::Off, trial: false }),
        };
        let answer = match self.send(key, copy_source, etag, size).await {
            Ok(decided) => decided,
            Err(miss) => Answer::Elsewhere(Handover { miss, trial }),
        };
        match &answer {
            // S3 answered, signature and all: the path works.
            Answer::SlowDown => self.works(trial),
            Answer::Copied | Answer::PreconditionFailed => {
                self.counters.answered.inc();
                self.works(trial);
            }
            Answer::Elsewhere(Handover { miss, .. }) => {
                self.counters.handed_over.inc();
                match miss {
                    Miss::Refused { status, code, request_id } => {
                        tracing::info!(%request_id, "direct copy answered {status} {code}: sent again through the SDK");
                        if CREDENTIAL_CODES.contains(&code.as_str()) {
                            self.credentials.forget();
                        }
                    }
                    Miss::Other(what, request_id) => {
                        tracing::info!(%request_id, "direct copy answered {what}: sent again through the SDK");
                    }
                    Miss::Unanswered(why) => tracing::info!("direct copy: {why}: sent again through the SDK"),
                    Miss::Off => {}
                }
            }
        }
        answer
    }

    /// What the SDK made of a copy this path left to it: a refusal or a missing answer of
    /// ours that the SDK's request did not meet counts towards [`BREAKER`]; after a trial, it
    /// turns the path off again.
    pub fn settle(&self, handover: &Handover, sdk_succeeded: bool) {
        let what = match &handover.miss {
            Miss::Refused { status, code, .. } => Some(format!("{status} {code}")),
            Miss::Unanswered(why) => Some(why.clone()),
            Miss::Off | Miss::Other(..) => None,
        };
        let failed_here = what.filter(|_| sdk_succeeded);
        if handover.trial {
            let mut breaker = self.breaker.lock().expect("not poisoned");
            breaker.trial_out = false;
            if let Some(what) = failed_here {
                self.turn_off(&mut breaker, &what, "the trial copy failed again");
            }
            return;
        }
        let Some(what) = failed_here else { return };
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= BREAKER && !self.is_off() {
            let mut breaker = self.breaker.lock().expect("not poisoned");
            if !self.is_off() {
                self.turn_off(&mut breaker, &what, &format!("{failures} copies sent directly failed in a row"));
            }
        }
    }

    fn turn_off(&self, breaker: &mut Breaker, last: &str, why: &str) {
        let cool_down = breaker.cool_down;
        breaker.until = Some(Instant::now() + cool_down);
        breaker.cool_down = (cool_down * 2).min(MAX_COOL_DOWN);
        self.off.store(true, Ordering::Relaxed);
        self.counters.off.set(1);
        tracing::warn!(
            last,
            "DIRECT_COPY turned off for {}: {why} where the SDK's succeeded; every copy goes through the SDK \
             meanwhile (a clock off by minutes, credentials, a proxy or a TLS set-up this path cannot use?)",
            humantime::format_duration(cool_down)
        );
    }

    /// Whether a copy goes this way: always while on; while off, one trial once the cool-down
    /// is over.
    fn admit(&self) -> Admit {
        if !self.is_off() {
            return Admit::On;
        }
        let mut breaker = self.breaker.lock().expect("not poisoned");
        match breaker.until {
            None => Admit::On,
            Some(until) if breaker.trial_out || Instant::now() < until => Admit::Off,
            Some(_) => {
                breaker.trial_out = true;
                Admit::Trial
            }
        }
    }

    /// S3 answered a copy sent this way: the count starts again, a trial turns the path on.
    fn works(&self, trial: bool) {
        self.failures.store(0, Ordering::Relaxed);
        if trial {
            let mut breaker = self.breaker.lock().expect("not poisoned");
            *breaker = Breaker { until: None, trial_out: false, cool_down: COOL_DOWN };
            self.off.store(false, Ordering::Relaxed);
            self.counters.off.set(0);
            tracing::info!("DIRECT_COPY back on: a trial copy sent directly was answered");
        }
    }

    fn is_off(&self) -> bool {
        self.off.load(Ordering::Relaxed)
    }

    /// The time bound of one copy of `size` bytes.
    fn bound(&self, size: u64) -> Duration {
        common::aws::copy_timeout(self.request_timeout, size)
    }

    async fn send(&self, key: &str, copy_source: &str, etag: &str, size: u64) -> Result<Answer, Miss> {
        let identity =
            self.credentials.get().await.map_err(|why| Miss::Other(format!("{why:#}"), RequestIds::default()))?;
        let sent = self.clock.now();
        let request = self
            .signed_request(key, copy_source, etag, &identity, self.signing_time(sent))
            .map_err(|why| Miss::Other(format!("{why:#}"), RequestIds::default()))?;
        let bound = self.bound(size);
        let exchange = async {
            let response =
                self.connector.call(request).await.map_err(|e| Miss::Unanswered(format!("no answer: {e}")))?;
            self.measure_skew(sent, response.headers());
            let status = response.status().as_u16();
            if matches!(status, 503 | 429) {
                common::aws::S3_SLOWDOWNS.fetch_add(1, Ordering::Relaxed);
                return Ok(Answer::SlowDown);
            }
            let ids = RequestIds::of(response.headers());
            let body = ByteStream::new(response.into_body())
                .collect()
                .await
                .map_err(|e| Miss::Unanswered(format!("{status}, its body unread: {e}")))?;
            read_answer(status, &body.into_bytes(), ids)
        };
        tokio::time::timeout(bound, exchange).await.unwrap_or_else(|_| {
            Err(Miss::Unanswered(format!("no whole answer within {}", humantime::format_duration(bound))))
        })
    }

    /// Our clock corrected by the skew the last answer showed.
    fn signing_time(&self, now: SystemTime) -> SystemTime {
        let skew = self.skew_ms.load(Ordering::Relaxed);
        let shift = Duration::from_millis(skew.unsigned_abs());
        if skew >= 0 { now.checked_add(shift) } else { now.checked_sub(shift) }.unwrap_or(now)
    }

    /// Records S3's clock minus ours from an answer's `Date`, against the middle of the round
    /// trip, as the SDK does: not from a cached answer (`Age`), nor from a round trip too long
    /// to tell.
    fn measure_skew(&self, sent: SystemTime, headers: &aws_smithy_runtime_api::http::Headers) {
        if headers.get("age").is_some() {
            return;
        }
        let Some(server) = headers.get("date").and_then(http_date) else { return };
        if let Some(skew) = skew_ms(server, sent, self.clock.now()) {
            self.skew_ms.store(skew, Ordering::Relaxed);
        }
    }

    fn signed_request(
        &self,
        key: &str,
        copy_source: &str,
        etag: &str,
        identity: &Identity,
        time: SystemTime,
    ) -> anyhow::Result<aws_smithy_runtime_api::http::Request> {
        // `x-id` as the SDK sends it: S3's name for the operation.
        let uri = format!("{}/{}?x-id=CopyObject", self.base, common::keys::encode_path(key));
        // The headers the SDK signs for this copy, in its order.
        let signed = [
            ("host", self.host.as_str()),
            ("x-amz-copy-source", copy_source),
            ("x-amz-copy-source-if-match", etag),
            ("if-none-match", "*"),
            ("x-amz-metadata-directive", "COPY"),
            ("x-amz-user-agent", self.user_agent.as_str()),
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
            .time(time)
            .settings(settings)
            .build()
            .context("signing")?
            .into();
        let signable = SignableRequest::new(
            "PUT",
            &uri,
            signed.iter().copied(),
            SignableBody::Precomputed(EMPTY_SHA256.to_owned()),
        )
        .context("signing")?;
        let (instructions, _) = sign(signable, &params).context("signing")?.into_parts();
        let mut builder = http::Request::builder().method("PUT").uri(&uri);
        for (name, value) in signed {
            builder = builder.header(name, value);
        }
        let mut request = builder
            .header("content-length", "0")
            .header("user-agent", &self.user_agent)
            .body(SdkBody::empty())
            .context("request")?;
        instructions.apply_to_request_http1x(&mut request);
        aws_smithy_runtime_api::http::Request::try_from(request).context("request")
    }
}

/// An HTTP date (`Date: Sun, 06 Nov 1994 08:49:37 GMT`) as a time.
fn http_date(text: &str) -> Option<SystemTime> {
    let date = aws_smithy_types::DateTime::from_str(text, aws_smithy_types::date_time::Format::HttpDate).ok()?;
    SystemTime::try_from(date).ok()
}

/// S3's clock minus ours, in milliseconds: the server's time against the middle of the round
/// trip from `sent` to `received`; `None` when the round trip is too long to tell.
fn skew_ms(server: SystemTime, sent: SystemTime, received: SystemTime) -> Option<i64> {
    let round_trip = received.duration_since(sent).unwrap_or_default();
    if round_trip > MAX_TRUSTED_ROUND_TRIP {
        return None;
    }
    let middle = sent + round_trip / 2;
    Some(match server.duration_since(middle) {
        Ok(ahead) => i64::try_from(ahead.as_millis()).unwrap_or(i64::MAX),
        Err(behind) => -i64::try_from(behind.duration().as_millis()).unwrap_or(i64::MAX),
    })
}

/// Reads S3's answer to a copy: only a 200 with a `CopyObjectResult` and a 412 decide.
fn read_answer(status: u16, body: &[u8], ids: RequestIds) -> Result<Answer, Miss> {
    let text = String::from_utf8_lossy(body);
    let code = || between(&text, "<Code>", "</Code>").unwrap_or_default().to_owned();
    match status {
        // S3 may answer 200 and then fail the copy: the error is in the body.
        200 if text.contains("<CopyObjectResult") && !text.contains("<Error>") => Ok(Answer::Copied),
        200 => Err(Miss::Other(format!("200 without a CopyObjectResult: {}", code()), ids)),
        412 => Ok(Answer::PreconditionFailed),
        400 | 403 => Err(Miss::Refused { status, code: code(), request_id: ids }),
        _ => Err(Miss::Other(format!("{status} {}", code()), ids)),
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

fn resolve_now(resolver: &DefaultResolver, params: &Params) -> anyhow::Result<aws_smithy_types::endpoint::Endpoint> {
    use futures::FutureExt;
    resolver
        .resolve_endpoint(params)
        .now_or_never()
        .context("the endpoint rules did not answer at once")?
        .map_err(|e| anyhow::anyhow!("endpoint: {e}"))
}

/// The signing name and region of the endpoint's first auth scheme, when it is plain SigV4.
fn sigv4_scheme(schemes: Option<&Document>, region: &str) -> anyhow::Result<(String, String)> {
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
        other => anyhow::bail!("the endpoint asks for the auth scheme {other:?}, not sigv4"),
    }
    Ok((
        text("signingName").unwrap_or_else(|| "s3".to_owned()),
        text("signingRegion").unwrap_or_else(|| region.to_owned()),
    ))
}

/// The provider's credentials, kept until [`CREDENTIALS_MARGIN`] before they expire; one
/// request to the provider at a time. Credentials the provider hands out already inside the
/// margin are used until they expire, the provider asked again at most every
/// [`CREDENTIALS_ASK_EVERY`] meanwhile, so that copies do not queue behind it one by one.
struct KeptCredentials {
    provider: SharedCredentialsProvider,
    kept: Mutex<Option<(Identity, Instant)>>,
    asking: tokio::sync::Mutex<()>,
}

impl KeptCredentials {
    fn new(provider: SharedCredentialsProvider) -> Self {
        KeptCredentials { provider, kept: Mutex::new(None), asking: tokio::sync::Mutex::new(()) }
    }

    async fn get(&self) -> anyhow::Result<Identity> {
        if let Some(identity) = self.usable() {
            return Ok(identity);
        }
        let _one_at_a_time = self.asking.lock().await;
        if let Some(identity) = self.usable() {
            return Ok(identity);
        }
        let credentials = self.provider.provide_credentials().await.context("credentials")?;
        let identity = Identity::from(credentials);
        *self.kept.lock().expect("not poisoned") = Some((identity.clone(), Instant::now()));
        Ok(identity)
    }

    fn usable(&self) -> Option<Identity> {
        let kept = self.kept.lock().expect("not poisoned");
        let (identity, asked) = kept.as_ref()?;
        let now = SystemTime::now();
        match identity.expiration() {
            Some(expiry) if now + CREDENTIALS_MARGIN >= expiry => {
                (now < expiry && asked.elapsed() < CREDENTIALS_ASK_EVERY).then(|| identity.clone())
            }
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

    fn read(status: u16, body: &[u8]) -> Result<Answer, Miss> {
        read_answer(status, body, RequestIds::default())
    }

    #[test]
    fn only_a_copy_result_or_a_412_decides() {
        let result = br#"<?xml version="1.0"?><CopyObjectResult><ETag>"a"</ETag></CopyObjectResult>"#;
        assert_eq!(read(200, result), Ok(Answer::Copied));
        let late_error =
            b"<Error><Code>InternalError</Code><Message>We encountered an internal error</Message></Error>";
        let ids = RequestIds(Some("4442587FB7D0A2F9".into()), Some("vlR7PnpV2Ce81puvRRKZ".into()));
        assert_eq!(
            read_answer(200, late_error, ids.clone()),
            Err(Miss::Other("200 without a CopyObjectResult: InternalError".into(), ids.clone()))
        );
        assert!(matches!(read(200, b""), Err(Miss::Other(..))));
        assert_eq!(read(412, b""), Ok(Answer::PreconditionFailed));
        let signature = b"<Error><Code>SignatureDoesNotMatch</Code></Error>";
        let refused = read_answer(403, signature, ids.clone()).unwrap_err();
        assert_eq!(refused, Miss::Refused { status: 403, code: "SignatureDoesNotMatch".into(), request_id: ids });
        assert_eq!(
            refused.to_string(),
            "403 SignatureDoesNotMatch, request id 4442587FB7D0A2F9 (id-2 vlR7PnpV2Ce81puvRRKZ)"
        );
        assert!(matches!(read(404, b"<Error><Code>NoSuchKey</Code></Error>"), Err(Miss::Other(..))));
        assert!(matches!(read(500, b"<Error><Code>InternalError</Code></Error>"), Err(Miss::Other(..))));
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

    fn direct(config: &SdkConfig, path_style: bool) -> DirectCopy {
        DirectCopy::new(config, "production-s3", path_style, Duration::from_secs(30), DirectCounters::default())
            .unwrap()
    }

    #[test]
    fn the_endpoint_is_the_sdks_for_the_bucket() {
        let aws = direct(&config(None), false);
        assert_eq!(aws.base, "https://production-s3.s3.eu-west-3.amazonaws.com");
        assert_eq!(aws.host, "production-s3.s3.eu-west-3.amazonaws.com");
        assert_eq!((aws.signing_name.as_str(), aws.signing_region.as_str()), ("s3", "eu-west-3"));
        let path_style = direct(&config(None), true);
        assert_eq!(path_style.base, "https://s3.eu-west-3.amazonaws.com/production-s3");
        let local = direct(&config(Some("http://127.0.0.1:21680")), true);
        assert_eq!(local.base, "http://127.0.0.1:21680/production-s3");
        assert_eq!(local.host, "127.0.0.1:21680");
    }

    #[test]
    fn an_endpoint_asking_for_another_signature_is_refused() {
        let sigv4a = Document::Array(vec![Document::Object(
            [("name".to_owned(), Document::String("sigv4a".into()))].into_iter().collect(),
        )]);
        assert!(sigv4_scheme(Some(&sigv4a), "us-east-1").unwrap_err().to_string().contains("sigv4a"));
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

    fn handover(miss: Miss, trial: bool) -> Handover {
        Handover { miss, trial }
    }

    /// Three failures where the SDK succeeded turn the path off; after the cool-down one copy
    /// (only one) is a trial; a failed trial turns it off for twice as long, an answered one
    /// turns it on again, with the gauge following.
    #[test]
    fn the_breaker_tries_again_after_a_cool_down() {
        let path = direct(&config(None), false);
        let reset = || Miss::Unanswered("no answer: connection reset".into());
        path.settle(&handover(reset(), false), true);
        path.settle(&handover(reset(), false), false); // the SDK failed too: not this path's fault
        path.settle(&handover(Miss::Other("500 InternalError".into(), RequestIds::default()), false), true);
        path.settle(&handover(reset(), false), true);
        assert!(matches!(path.admit(), Admit::On), "two failures of this path's own");
        path.settle(&handover(reset(), false), true);
        assert!(matches!(path.admit(), Admit::Off));
        assert_eq!(path.counters.off.get(), 1);
        let cool_down_over = |path: &DirectCopy| {
            let mut breaker = path.breaker.lock().unwrap();
            breaker.until = Some(Instant::now() - Duration::from_millis(1));
            breaker.cool_down
        };
        assert_eq!(cool_down_over(&path), 2 * COOL_DOWN, "the next cool-down is doubled");
        assert!(matches!(path.admit(), Admit::Trial));
        assert!(matches!(path.admit(), Admit::Off), "one trial at a time");
        path.settle(&handover(reset(), true), true);
        assert!(matches!(path.admit(), Admit::Off), "a failed trial turns it off again");
        assert!(path.breaker.lock().unwrap().until.unwrap() > Instant::now() + COOL_DOWN);
        cool_down_over(&path);
        assert!(matches!(path.admit(), Admit::Trial));
        path.works(true);
        assert!(matches!(path.admit(), Admit::On));
        assert_eq!(path.counters.off.get(), 0);
        assert_eq!(path.breaker.lock().unwrap().cool_down, COOL_DOWN);
    }

    #[test]
    fn a_copys_bound_grows_with_its_bytes() {
        let path = direct(&config(None), false);
        assert_eq!(path.bound(0), Duration::from_secs(30));
        assert_eq!(path.bound(5 * 1024 * 1024 * 1024), Duration::from_secs(30 + 204));
    }

    /// The skew is S3's clock against the middle of the round trip, either way; a round trip
    /// too long to tell measures nothing; signing shifts our clock by it.
    #[test]
    fn the_clock_is_corrected_by_the_skew_an_answer_shows() {
        let sent = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let received = sent + Duration::from_secs(2);
        assert_eq!(skew_ms(sent + Duration::from_secs(601), sent, received), Some(600_000));
        assert_eq!(skew_ms(sent - Duration::from_secs(899), sent, received), Some(-900_000));
        assert_eq!(skew_ms(sent, sent, sent + Duration::from_secs(16 * 60)), None);
        assert_eq!(http_date("Tue, 14 Nov 2023 22:13:20 GMT"), Some(sent));
        let path = direct(&config(None), false);
        let mut headers = aws_smithy_runtime_api::http::Headers::new();
        headers.insert("date", "Tue, 14 Nov 2023 22:13:20 GMT");
        path.measure_skew(SystemTime::now(), &headers);
        let shifted = path.signing_time(SystemTime::now());
        let error = shifted.duration_since(sent).unwrap_or_else(|e| e.duration());
        assert!(error < Duration::from_secs(2), "signed at S3's time: off by {error:?}");
        headers.insert("age", "30");
        headers.insert("date", "Tue, 14 Nov 2023 23:13:20 GMT");
        path.measure_skew(SystemTime::now(), &headers);
        assert!(path.signing_time(SystemTime::now()) < sent + Duration::from_secs(2), "a cached answer is ignored");
    }

    /// Answers the same credentials, expiring in `expires_in`, and counts how often it is asked.
    #[derive(Debug)]
    struct Counting(std::sync::Arc<AtomicU32>, Duration);

    impl ProvideCredentials for Counting {
        fn provide_credentials<'a>(&'a self) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            self.0.fetch_add(1, Ordering::SeqCst);
            let expiry = SystemTime::now() + self.1;
            let credentials = aws_sdk_s3::config::Credentials::new("AKID", "secret", None, Some(expiry), "test");
            aws_credential_types::provider::future::ProvideCredentials::ready(Ok(credentials))
        }
    }

    /// Credentials are asked for once, kept until the SDK's margin before they expire, and
    /// those handed out already inside the margin do not make every copy ask again.
    #[tokio::test]
    async fn credentials_are_asked_for_once_and_kept() {
        let asked = std::sync::Arc::new(AtomicU32::new(0));
        let long =
            KeptCredentials::new(SharedCredentialsProvider::new(Counting(asked.clone(), Duration::from_secs(3600))));
        let gets = futures::future::join_all((0..20).map(|_| long.get())).await;
        assert!(gets.iter().all(Result::is_ok));
        assert_eq!(asked.load(Ordering::SeqCst), 1, "one load for twenty copies at once");
        let short = std::sync::Arc::new(AtomicU32::new(0));
        let inside =
            KeptCredentials::new(SharedCredentialsProvider::new(Counting(short.clone(), Duration::from_secs(5))));
        for _ in 0..20 {
            inside.get().await.unwrap();
        }
        assert_eq!(short.load(Ordering::SeqCst), 1, "not asked again at every copy");
        inside.forget();
        inside.get().await.unwrap();
        assert_eq!(short.load(Ordering::SeqCst), 2, "a refusal naming the credentials drops them");
    }

    /// A request's method, URI and headers.
    type Taken = (String, String, Vec<(String, String)>);

    /// The request the SDK's client would send, taken before it leaves.
    #[derive(Debug, Clone, Default)]
    struct Capture(std::sync::Arc<Mutex<Option<Taken>>>);

    impl aws_sdk_s3::config::Intercept for Capture {
        fn name(&self) -> &'static str {
            "Capture"
        }

        fn read_before_transmit(
            &self,
            context: &aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
            _: &aws_sdk_s3::config::RuntimeComponents,
            _: &mut aws_sdk_s3::config::ConfigBag,
        ) -> Result<(), aws_sdk_s3::error::BoxError> {
            let request = context.request();
            let headers = request.headers().iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
            *self.0.lock().unwrap() = Some((request.method().to_owned(), request.uri().to_owned(), headers));
            Err("captured, not sent".into())
        }
    }

    /// The same copy, built by the SDK's client (taken before it is sent) and by this path,
    /// with session credentials and a fixed clock, is the same request: method, URI, every
    /// header this path sends, and the signature, for AWS's virtual-host and path-style
    /// endpoints, FIPS with dual-stack, and custom endpoints (plain HTTP and HTTPS).
    #[tokio::test]
    async fn a_direct_copy_is_the_request_the_sdk_sends() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_000_000);
        let credentials = aws_sdk_s3::config::Credentials::new(
            "ASIAEXAMPLEKEYID1234",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            Some("FwoGZXIvYXdzEXAMPLESESSIONTOKEN//////////wEaDA==".into()),
            Some(at + Duration::from_secs(3600)),
            "test",
        );
        let cases: [(&str, Option<&str>, bool, bool); 6] = [
            ("virtual host", None, false, false),
            ("path style", None, true, false),
            ("fips dual-stack", None, false, true),
            ("custom http", Some("http://127.0.0.1:21680"), true, false),
            ("custom https, virtual host", Some("https://objects.example.internal"), false, false),
            ("custom https, path style", Some("https://objects.example.internal:8443/"), true, false),
        ];
        let (key, source) = ("avatar/ünï cødé+%.png", "legacy-s3/image/%C3%BCn%C3%AF%20c%C3%B8d%C3%A9%2B%25.png");
        let etag = "\"0123456789abcdef0123456789abcdef\"";
        for (case, endpoint, path_style, fips_dual_stack) in cases {
            let mut builder = SdkConfig::builder()
                .region(aws_types::region::Region::new("eu-west-3"))
                .credentials_provider(SharedCredentialsProvider::new(credentials.clone()))
                .time_source(aws_smithy_async::time::StaticTimeSource::new(at))
                .use_fips(fips_dual_stack)
                .use_dual_stack(fips_dual_stack)
                .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest());
            if let Some(endpoint) = endpoint {
                builder = builder.endpoint_url(endpoint);
            }
            let config = builder.build();
            let capture = Capture::default();
            let s3 = aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::config::Builder::from(&config)
                    .force_path_style(path_style)
                    .interceptor(capture.clone())
                    .build(),
            );
            let sent =
                super::super::conditional::conditional_copy(&s3, "production-s3", key, source, etag).send().await;
            assert!(sent.is_err(), "{case}: captured, not sent");
            let (method, uri, sdk_headers) = capture.0.lock().unwrap().take().expect("captured");
            let mut path =
                DirectCopy::new(&config, "production-s3", path_style, Duration::from_secs(30), Default::default())
                    .unwrap();
            // The user agent is the one signed header whose value differs: take the SDK's.
            path.user_agent = sdk_headers.iter().find(|(n, _)| n == "x-amz-user-agent").unwrap().1.clone();
            let identity = path.credentials.get().await.unwrap();
            let ours = path.signed_request(key, source, etag, &identity, path.signing_time(path.clock.now())).unwrap();
            assert_eq!((ours.method(), ours.uri()), (method.as_str(), uri.as_str()), "{case}");
            for (name, value) in ours.headers() {
                if name == "host" {
                    // The SDK leaves it to the transport, from the URI, as it signs it.
                    assert_eq!(Some(value), http::Uri::try_from(uri.as_str()).unwrap().authority().map(|a| a.as_str()));
                    continue;
                }
                if name == "user-agent" || name == "content-length" {
                    continue; // neither signed; the transport adds the latter where the SDK leaves it out
                }
                let sdk = sdk_headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
                assert_eq!(Some(value), sdk, "{case}: header {name}");
            }
            assert!(ours.headers().get("authorization").unwrap().contains("Signature="), "{case}");
            assert!(ours.headers().get("x-amz-security-token").is_some(), "{case}");
        }
    }
}
