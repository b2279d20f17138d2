//! The feeder against the real local services, by scenario: listing one range, resuming,
//! settings and start-up, key ranges, inventory reports.

mod inventory;
mod listing;
mod metrics;
mod ranges;
mod resume;
mod setup;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Parser;
use feeder::{Clients, RunArgs, Settings};
use testkit::{Env, binary, keys_of, wait_until};
use tokio_util::sync::CancellationToken;

pub(crate) async fn clients(env: &Env) -> Clients {
    env.clients().await
}

pub(crate) fn settings(env: &Env) -> Settings {
    Settings::try_parse_from(env.args("feeder")).unwrap()
}

pub(crate) fn run_args(page_size: i32) -> RunArgs {
    RunArgs { page_size, ..RunArgs::default() }
}

/// Keys that are awkward for splitting: a long common part, keys that are prefixes of other
/// keys, control characters, spaces and `+`, non-ASCII, the highest code point, nested `/`,
/// and most keys under one first character.
pub(crate) fn awkward_uneven_keys() -> Vec<String> {
    let mut keys: Vec<String> = (0..240).map(|i| format!("image/avatar-{i}.png")).collect();
    keys.extend((0..40).map(|i| format!("image/{i:x}")));
    keys.extend(
        [
            "image/a",
            "image/a/b",
            "image/ab",
            "image/a b",
            "image/a+b",
            "image/\u{1}ctl",
            "image/\r",
            "image/ünïcødé",
            "image/日本/x.png",
            "image/\u{10FFFF}",
            "image/\u{10FFFF}\u{10FFFF}\u{10FFFF}\u{10FFFF}\u{10FFFF}z",
            "image/~",
            "image/ ",
        ]
        .map(String::from),
    );
    keys.sort();
    keys.dedup();
    keys
}
