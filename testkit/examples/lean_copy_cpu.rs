//! How much CPU a CopyObject costs without the SDK's per-request machinery: the same copy
//! (the consumer's headers: `x-amz-copy-source-if-match`, `If-None-Match: *`,
//! `MetadataDirective: COPY`), signed by the SDK's own SigV4 signer (`aws-sigv4`, S3's
//! settings) and sent by a plain hyper client, against the SDK's `copy_object().send()`.
//! A measurement, not a client: no retries, no error model, plain HTTP to a local endpoint.
//!
//! Seeds N objects of 700 bytes into a fresh bucket, then copies them all, K at once, four
//! times, alternating: SDK, lean, SDK, lean. Prints this process's CPU per copy for each.
//!
//! ```text
//! scripts/local-services up --with-seaweedfs && eval "$(scripts/local-services env)"
//! AWS_ENDPOINT_URL=$SEAWEEDFS_ENDPOINT_URL cargo run --release -p testkit --example lean_copy_cpu -- 6000 128
//! ```

use std::time::SystemTime;

use anyhow::Context;
use aws_sdk_s3::types::MetadataDirective;
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings, UriPathNormalizationMode,
    sign,
};
use aws_smithy_runtime_api::client::identity::Identity;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().as_deref().unwrap_or("6000").parse().context("N: a number of objects")?;
    let at_once: usize = args.next().as_deref().unwrap_or("128").parse().context("K: copies at once")?;
    common::setup::runtime(1)?.block_on(run(n, at_once))
}

struct Lean {
    http: Client<HttpConnector, Empty<Bytes>>,
    endpoint: String,
    region: String,
    identity: Identity,
}

impl Lean {
    /// One conditional copy, path-style; Ok(false) when S3 answered anything but 200 without
    /// an error document.
    async fn copy(&self, bucket: &str, source: &str, destination: &str, etag: &str) -> anyhow::Result<bool> {
        let uri = format!("{}/{bucket}/{destination}", self.endpoint);
        let copy_source = format!("{bucket}/{source}");
        let date = SystemTime::now();
        let host = uri.split('/').nth(2).unwrap_or_default().to_owned();
        let headers = [
            ("host", host.as_str()),
            ("x-amz-copy-source", copy_source.as_str()),
            ("x-amz-copy-source-if-match", etag),
            ("if-none-match", "*"),
            ("x-amz-metadata-directive", "COPY"),
        ];
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name("s3")
            .time(date)
            .settings(settings)
            .build()?
            .into();
        let signable = SignableRequest::new("PUT", &uri, headers.iter().copied(), SignableBody::UnsignedPayload)?;
        let (instructions, _) = sign(signable, &params)?.into_parts();
        let mut builder = http::Request::builder().method("PUT").uri(&uri);
        for (name, value) in &headers[1..] {
            builder = builder.header(*name, *value);
        }
        let mut request = builder.body(Empty::<Bytes>::new())?;
        instructions.apply_to_request_http1x(&mut request);
        let response = self.http.request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(status == 200 && !body.windows(7).any(|w| w == b"<Error>"))
    }
}

async fn run(n: usize, at_once: usize) -> anyhow::Result<()> {
    let config = common::aws::sdk_config().await?;
    let s3 = common::aws::s3_client(&config, true);
    let endpoint = std::env::var("AWS_ENDPOINT_URL").context("AWS_ENDPOINT_URL: the local S3 endpoint")?;
    let credentials = config.credentials_provider().context("no credentials provider")?;
    let credentials = aws_sdk_s3::config::ProvideCredentials::provide_credentials(&credentials).await?;
    let lean = Lean {
        http: Client::builder(TokioExecutor::new()).build_http(),
        endpoint: endpoint.trim_end_matches('/').to_owned(),
        region: config.region().map(|r| r.to_string()).unwrap_or_else(|| "us-east-1".into()),
        identity: Identity::from(credentials),
    };
    let (bucket, keys, etags) = testkit::bench::seed_copy_sources(&s3, "lean-copy-cpu", n, at_once).await?;
    for (round, how) in ["sdk", "lean", "sdk", "lean"].into_iter().enumerate() {
        let copies = futures::stream::iter(keys.iter().zip(&etags))
            .map(|(key, etag)| {
                let (s3, lean, bucket) = (&s3, &lean, &bucket);
                let destination = format!("{how}-{round}/{key}");
                async move {
                    match how {
                        "sdk" => s3
                            .copy_object()
                            .bucket(bucket)
                            .key(destination)
                            .copy_source(format!("{bucket}/{key}"))
                            .copy_source_if_match(etag)
                            .if_none_match("*")
                            .metadata_directive(MetadataDirective::Copy)
                            .send()
                            .await
                            .is_ok(),
                        _ => lean.copy(bucket, key, &destination, etag).await.unwrap_or(false),
                    }
                }
            })
            .buffer_unordered(at_once)
            .filter(|ok| std::future::ready(!ok))
            .count();
        testkit::bench::report_copy_cpu(how, n, at_once, copies).await?;
    }
    Ok(())
}
