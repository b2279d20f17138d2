//! A fault-injecting proxy: forwards every request to a real server (MiniStack, SeaweedFS) and,
//! where a rule says so, answers with an error, closes the connection, or answers late instead.
//! A test tool, not a fake: whatever it forwards is served by the real server, and the faults
//! it injects are answers AWS documents (500 InternalError, 503 SlowDown, 403 AccessDenied,
//! 403 InvalidObjectState, 404 NoSuchBucket, connection resets, slow answers).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, hyper::Error>;

/// What a rule does to a request it matches.
#[derive(Debug, Clone)]
pub enum Fault {
    /// An error answer: S3's XML error, or SQS's JSON one for SQS requests.
    Error { status: u16, code: &'static str },
    /// The connection is closed without an answer (a reset, a crashed server).
    Reset,
    /// The request is forwarded (it takes effect) but the answer is lost: the connection is
    /// closed instead. The client cannot tell whether it happened.
    ResetAfter,
    /// The request is forwarded, its answer held back this long.
    Delay(Duration),
    /// The request is taken and never answered, the connection left open: a hung server.
    Hang,
    /// This answer instead of the server's (a malformed or truncated one, say).
    Answer { status: u16, body: &'static str },
    /// Forwarded while the limit lets it pass, S3's 503 SlowDown otherwise.
    RateLimited(Arc<RateLimit>),
}

/// A rate limit in front of the server, as an S3 partition applies one: a token bucket filled
/// at `per_second` and holding a tenth of a second's worth (at least one); a request that
/// finds it empty is refused with S3's own 503 SlowDown. Shared, so that the rate can change
/// while it runs, and so that what it let through and refused can be read.
#[derive(Debug)]
pub struct RateLimit {
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    per_second: f64,
    tokens: f64,
    filled_at: std::time::Instant,
    /// When each request it let through passed (for goodput over any window).
    accepted: Vec<std::time::Instant>,
    refused: u64,
}

impl RateLimit {
    pub fn new(per_second: f64) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(Bucket {
                per_second,
                tokens: 0.0,
                filled_at: std::time::Instant::now(),
                accepted: Vec::new(),
                refused: 0,
            }),
        })
    }

    /// Changes the rate from now on.
    pub fn set_rate(&self, per_second: f64) {
        let mut b = self.state.lock().unwrap();
        b.fill();
        b.per_second = per_second;
    }

    /// Whether one more request may pass now.
    fn take(&self) -> bool {
        let mut b = self.state.lock().unwrap();
        b.fill();
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            b.accepted.push(std::time::Instant::now());
            true
        } else {
            b.refused += 1;
            false
        }
    }

    /// When each request let through passed, and how many were refused.
    pub fn counts(&self) -> (Vec<std::time::Instant>, u64) {
        let b = self.state.lock().unwrap();
        (b.accepted.clone(), b.refused)
    }
}

impl Bucket {
    fn fill(&mut self) {
        let now = std::time::Instant::now();
        let capacity = (self.per_second / 10.0).max(1.0);
        self.tokens = (self.tokens + now.duration_since(self.filled_at).as_secs_f64() * self.per_second).min(capacity);
        self.filled_at = now;
    }
}

/// Which requests a rule applies to; every field that is set must match.
#[derive(Debug, Clone, Default)]
pub struct When {
    /// HTTP method, e.g. `HEAD`.
    pub method: Option<&'static str>,
    /// A piece of the path and query, or of the `x-amz-copy-source` header (URL-encoded as sent).
    pub contains: Option<String>,
    /// For SQS: the action (`ReceiveMessage`, `SendMessageBatch`...), from `x-amz-target`.
    pub sqs_action: Option<&'static str>,
    /// A header whose value contains this text, e.g. `("user-agent", "direct-copy")`.
    pub header: Option<(&'static str, &'static str)>,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub when: When,
    pub fault: Fault,
    /// Chance that a matching request is faulted (1.0: every one).
    pub probability: f64,
    /// Faults left to inject; `None`: no limit.
    pub remaining: Option<u64>,
}

impl Rule {
    pub fn always(when: When, fault: Fault) -> Self {
        Rule { when, fault, probability: 1.0, remaining: None }
    }

    pub fn sometimes(when: When, fault: Fault, probability: f64) -> Self {
        Rule { when, fault, probability, remaining: None }
    }
}

struct State {
    upstream: String,
    rules: Mutex<Vec<Rule>>,
    client: Client<HttpConnector, Body>,
    forwarded: AtomicU64,
    /// Requests forwarded, by kind (`SQS <Action>`, `S3 <METHOD>`, `S3 copy`).
    by_kind: Mutex<std::collections::BTreeMap<String, u64>>,
    injected: AtomicU64,
    /// Every request is refused (the server is unreachable).
    down: AtomicBool,
    /// Every request forwarded, when recording ([`FaultProxy::record`]).
    seen: Mutex<Option<Vec<Seen>>>,
}

/// A request the proxy forwarded, as far as deciding which IAM action it needs.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// `x-amz-copy-source`, URL-encoded as sent.
    pub copy_source: Option<String>,
    /// For SQS: the action and the body (JSON, naming the queue).
    pub sqs: Option<(String, String)>,
    /// For S3's `DeleteObjects` (`POST ?delete`): the body (XML, naming the keys).
    pub body: Option<String>,
    /// The server's answer: its HTTP status (403: refused).
    pub status: u16,
}

/// A running proxy; it stops when dropped.
pub struct FaultProxy {
    /// Where clients should send their requests, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port in front of `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_owned(),
            rules: Mutex::new(Vec::new()),
            client: Client::builder(TokioExecutor::new()).build_http(),
            forwarded: AtomicU64::new(0),
            by_kind: Mutex::default(),
            injected: AtomicU64::new(0),
            down: AtomicBool::new(false),
            seen: Mutex::new(None),
        });
        let serving = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = serving.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(FaultProxy { url, state, task })
    }

    pub fn add(&self, rule: Rule) {
        self.state.rules.lock().unwrap().push(rule);
    }

    /// Faults the rule added `index`-th has left to inject (its `remaining`).
    pub fn remaining(&self, index: usize) -> Option<u64> {
        self.state.rules.lock().unwrap().get(index).and_then(|r| r.remaining)
    }

    pub fn clear(&self) {
        self.state.rules.lock().unwrap().clear();
    }

    /// While down, every connection is closed unanswered, as if the server were unreachable.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.state.injected.load(Ordering::SeqCst)
    }

    /// Requests forwarded to the real server so far.
    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::SeqCst)
    }

    /// From now on, keeps every request forwarded (read with [`FaultProxy::seen`]).
    pub fn record(&self) {
        self.state.seen.lock().unwrap().get_or_insert_with(Vec::new);
    }

    /// The requests forwarded since [`FaultProxy::record`].
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone().unwrap_or_default()
    }

    /// Requests forwarded so far, by kind: `SQS <Action>`, `S3 <METHOD>`, or `S3 copy`.
    pub fn forwarded_by_kind(&self) -> std::collections::BTreeMap<String, u64> {
        self.state.by_kind.lock().unwrap().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The fault for this request, if a rule picks it.
fn pick(state: &State, req: &Request<Incoming>) -> Option<Fault> {
    if state.down.load(Ordering::SeqCst) {
        return Some(Fault::Reset);
    }
    let target = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or_default();
    let copy_source = req.headers().get("x-amz-copy-source").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let action = sqs_action(req);
    let mut rules = state.rules.lock().unwrap();
    for rule in rules.iter_mut() {
        let w = &rule.when;
        let matches = w.method.is_none_or(|m| req.method().as_str() == m)
            && w.contains.as_deref().is_none_or(|c| target.contains(c) || copy_source.contains(c))
            && w.sqs_action.is_none_or(|a| action == Some(a))
            && w.header.is_none_or(|(name, text)| {
                req.headers().get(name).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains(text))
            });
        if !matches || rule.remaining == Some(0) || fastrand::f64() >= rule.probability {
            continue;
        }
        if let Some(left) = rule.remaining.as_mut() {
            *left -= 1;
        }
        if let Fault::RateLimited(limit) = &rule.fault {
            return if limit.take() { None } else { Some(Fault::Error { status: 503, code: "SlowDown" }) };
        }
        return Some(rule.fault.clone());
    }
    None
}

fn sqs_action(req: &Request<Incoming>) -> Option<&str> {
    let target = req.headers().get("x-amz-target")?.to_str().ok()?;
    target.strip_prefix("AmazonSQS.")
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, std::io::Error> {
    let fault = pick(&state, &req);
    if fault.is_some() {
        state.injected.fetch_add(1, Ordering::SeqCst);
    }
    match fault {
        Some(Fault::Reset) => Err(std::io::Error::other("injected connection reset")),
        Some(Fault::ResetAfter) => {
            // The whole answer is read, so the request has surely taken effect upstream.
            let answer = forward(&state, req).await?;
            let _ = answer.into_body().collect().await;
            Err(std::io::Error::other("injected connection reset after the request took effect"))
        }
        Some(Fault::Error { status, code }) => Ok(error_answer(&req, status, code)),
        Some(Fault::Answer { status, body }) => {
            let body =
                Full::new(Bytes::from_static(body.as_bytes())).map_err(|never: Infallible| match never {}).boxed();
            Ok(Response::builder()
                .status(status)
                .header("content-type", "application/xml")
                .body(body)
                .expect("a valid answer"))
        }
        // `pick` answers a rate limit with forwarding or a SlowDown: never met here.
        Some(Fault::RateLimited(_)) => forward(&state, req).await,
        Some(Fault::Hang) => std::future::pending().await,
        Some(Fault::Delay(delay)) => {
            let answer = forward(&state, req).await;
            tokio::time::sleep(delay).await;
            answer
        }
        None => forward(&state, req).await,
    }
}

async fn forward(state: &State, req: Request<Incoming>) -> Result<Response<Body>, std::io::Error> {
    state.forwarded.fetch_add(1, Ordering::SeqCst);
    let kind = match sqs_action(&req) {
        Some(action) => format!("SQS {action}"),
        None if req.headers().contains_key("x-amz-copy-source") => "S3 copy".to_owned(),
        None => format!("S3 {}", req.method()),
    };
    *state.by_kind.lock().unwrap().entry(kind).or_default() += 1;
    let action = sqs_action(&req).map(str::to_owned);
    let (mut parts, body) = req.into_parts();
    let target = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_owned();
    let recording = state.seen.lock().unwrap().is_some();
    // A recorded SQS request or S3 batch delete is read whole (they are small): its body names
    // the queue, or the keys.
    let whole = recording && (action.is_some() || (parts.method == hyper::Method::POST && target.contains("delete")));
    let (body, text) = if whole {
        let bytes = body.collect().await.map_err(std::io::Error::other)?.to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        (Full::new(bytes).map_err(|never: Infallible| match never {}).boxed(), Some(text))
    } else {
        (body.boxed(), None)
    };
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (method, copy_source) = (parts.method.to_string(), header("x-amz-copy-source"));
    parts.uri = format!("{}{target}", state.upstream).parse().map_err(std::io::Error::other)?;
    let answer = state.client.request(Request::from_parts(parts, body)).await.map_err(std::io::Error::other)?;
    if let Some(seen) = state.seen.lock().unwrap().as_mut() {
        let (sqs, body) = match action {
            Some(action) => (Some((action, text.unwrap_or_default())), None),
            None => (None, text),
        };
        seen.push(Seen { method, target, copy_source, sqs, body, status: answer.status().as_u16() });
    }
    Ok(answer.map(|b| b.boxed()))
}

fn error_answer(req: &Request<Incoming>, status: u16, code: &str) -> Response<Body> {
    let mut answer = Response::builder().status(status).header("x-amz-request-id", "injected-by-fault-proxy");
    let body = if sqs_action(req).is_some() {
        answer = answer
            .header("content-type", "application/x-amz-json-1.0")
            .header("x-amzn-query-error", format!("{code};Sender"));
        format!(r#"{{"__type":"com.amazonaws.sqs#{code}","message":"injected by the fault proxy"}}"#)
    } else if req.method() == hyper::Method::HEAD {
        String::new() // a HEAD's error has no body: its status says it all
    } else {
        answer = answer.header("content-type", "application/xml");
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>injected by the fault \
             proxy</Message><RequestId>injected</RequestId></Error>"
        )
    };
    let body = Full::new(Bytes::from(body)).map_err(|never: Infallible| match never {}).boxed();
    answer.body(body).expect("a valid answer")
}
