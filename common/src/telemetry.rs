//! One tracing setup for both binaries: `RUST_LOG`-style filter defaulting to `info` (the SDK
//! and sqlx kept at `warn`), JSON lines when `LOG_FORMAT=json` (for CloudWatch), compact text
//! otherwise, coloured only on a terminal and without `NO_COLOR` (never in `docker compose`
//! logs or a file). Logs go to stderr; stdout carries only the summaries operators read.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

const DEFAULT_FILTER: &str = "info,aws_config=error,aws_smithy_runtime=warn,aws_sdk_s3=warn,aws_sdk_sqs=warn,sqlx=warn";

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    // A second init (tests calling into the library twice) is harmless: keep the first.
    let _ = if json { builder.json().flatten_event(true).try_init() } else { builder.compact().try_init() };
}
