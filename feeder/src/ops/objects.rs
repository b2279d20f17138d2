//! `feeder verify --objects`: streams the source prefix and checks that each legacy object
//! has its copy at the destination with the same bytes (the identity rule of
//! `common::identity`: size, a full-object checksum, equal ETags, or a bounded comparison).
//!
//! Promises: memory stays flat (one listing page and `VERIFY_CONCURRENCY` checks at a time);
//! objects are only HEADed (and read for the bounded comparison); the position and counts are
//! saved after each page (`avatar_migration_scans`), so an interrupted check resumes where it
//! stopped, and a finished one starts over next time. `--sample N` checks N consecutive
//! objects from a random point of the key space instead, saving nothing.

use std::sync::Arc;

use anyhow::Context;
use common::identity::{COMPARE_MAX_BYTES, Identity, head_object, same_content};
use futures::{StreamExt, TryStreamExt};

use serde::{Deserialize, Serialize};

use super::Ops;
use crate::list::Lister;
use crate::scan::{self, Ended};
use crate::settings::VerifyArgs;
use crate::store::scans::{self, ScanKind, ScanPosition};
use common::setup::Clients;

/// What the object check found (totals across resumed runs), and where it stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectCheck {
    pub scan: ScanPosition<Counts>,
    /// A sample (`--sample N`): nothing saved, nothing resumed.
    pub sample: bool,
}

/// The counts saved with the check's position.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub objects: i64,
    pub missing_copy: i64,
    pub conflicts: i64,
    pub unproven: i64,
}

impl ObjectCheck {
    pub fn all_copied(&self) -> bool {
        let c = &self.scan.counts;
        c.missing_copy == 0 && c.conflicts == 0 && c.unproven == 0
    }
}

/// One legacy object's verdict.
pub(crate) enum Verdict {
    Same,
    MissingCopy,
    Conflict,
    Unproven,
}

pub async fn check(cx: &Ops<'_>, args: &VerifyArgs) -> anyhow::Result<ObjectCheck> {
    let Ops { clients, mapping, shutdown, .. } = cx;
    let (bucket, prefix) = (mapping.source_bucket.as_str(), mapping.source_prefix.as_str());
    let lister = Arc::new(Lister {
        s3: clients.s3.clone(),
        bucket: bucket.to_owned(),
        prefix: prefix.to_owned(),
        page_size: 1000,
    });
    let mut state = match args.sample {
        Some(_) => ObjectCheck { sample: true, ..ObjectCheck::default() },
        None => match scans::load(&clients.db, ScanKind::VerifyObjects, bucket, prefix).await? {
            Some(saved) if !saved.finished => ObjectCheck { scan: saved, sample: false },
            _ => ObjectCheck::default(),
        },
    };
    let start = match args.sample {
        // A random range of the split points: N consecutive keys from a random place.
        Some(_) => {
            let ranges = crate::ranges::plan(&lister, None, 64).await?;
            ranges[fastrand::usize(..ranges.len())].after.clone()
        }
        None => state.scan.last_key.clone(),
    };
    // A sample that reaches the end of the prefix goes on from its beginning, up to where it
    // started.
    let mut segments = vec![(start.clone(), None)];
    if state.sample && start.is_some() {
        segments.push((None, start));
    }
    let mut left = args.sample.unwrap_or(u64::MAX);
    for segment in segments {
        if left == 0 || shutdown.is_cancelled() {
            break;
        }
        let ended = scan::each_page(lister.clone(), segment, shutdown, async |page| {
            check_page(clients, args, mapping, page, &mut state, &mut left).await?;
            Ok(left > 0)
        })
        .await?;
        if ended == Ended::Complete {
            state.scan.finished = true;
        }
        if !state.sample {
            scans::save(&clients.db, ScanKind::VerifyObjects, bucket, prefix, &state.scan).await?;
        }
    }
    let scope = if state.sample {
        "a sample of"
    } else if state.scan.finished {
        "all"
    } else {
        "so far"
    };
    println!(
        "verify: objects ({scope}): {} legacy objects checked: {} without a copy, {} with a copy of other bytes, {} \
         not provable within 64 MiB{}",
        state.scan.counts.objects,
        state.scan.counts.missing_copy,
        state.scan.counts.conflicts,
        state.scan.counts.unproven,
        if state.scan.finished || state.sample { "" } else { " (interrupted: run again to resume)" }
    );
    Ok(state)
}

/// Checks the objects of one page (at most `left` of them, which it counts down); saves the
/// position after it (unless sampling).
async fn check_page(
    clients: &Clients,
    args: &VerifyArgs,
    mapping: &common::keys::KeyMapping,
    mut page: Vec<common::message::ObjectMessage>,
    state: &mut ObjectCheck,
    left: &mut u64,
) -> anyhow::Result<()> {
    page.truncate((*left).min(page.len() as u64) as usize);
    *left -= page.len() as u64;
    let verdicts: Vec<Verdict> = futures::stream::iter(
        page.iter().map(|o| async move { copy_verdict(clients, mapping, &o.key).await.map(|(_, copy)| copy) }),
    )
    .buffered(args.concurrency.get())
    .try_collect()
    .await?;
    let counts = &mut state.scan.counts;
    for (object, verdict) in page.iter().zip(&verdicts) {
        counts.objects += 1;
        let what = match verdict {
            Verdict::Same => continue,
            Verdict::MissingCopy => {
                counts.missing_copy += 1;
                "has no copy"
            }
            Verdict::Conflict => {
                counts.conflicts += 1;
                "has a copy with other bytes"
            }
            Verdict::Unproven => {
                counts.unproven += 1;
                "has a copy that cannot be proven the same within 64 MiB"
            }
        };
        tracing::warn!(key = object.key, "legacy object {what}");
    }
    state.scan.last_key = page.last().map(|o| o.key.clone()).or(state.scan.last_key.take());
    if !state.sample {
        let (bucket, prefix) = (mapping.source_bucket.as_str(), mapping.source_prefix.as_str());
        scans::save(&clients.db, ScanKind::VerifyObjects, bucket, prefix, &state.scan).await?;
    }
    Ok(())
}

/// The verdict on a listed legacy object's copy ([`verdict`]), with the copy's key.
pub(crate) async fn copy_verdict(
    clients: &Clients,
    mapping: &common::keys::KeyMapping,
    key: &str,
) -> anyhow::Result<(String, Verdict)> {
    let destination = mapping.destination_key(key).context("a listed key outside SOURCE_PREFIX")?;
    let copy = verdict(clients, (&mapping.source_bucket, key), (&mapping.destination_bucket, &destination)).await?;
    Ok((destination, copy))
}

pub(crate) async fn verdict(
    clients: &Clients,
    source: (&str, &str),
    destination: (&str, &str),
) -> anyhow::Result<Verdict> {
    let Some(dst) = head_object(&clients.s3, destination.0, destination.1).await? else {
        return Ok(Verdict::MissingCopy);
    };
    let Some(src) = head_object(&clients.s3, source.0, source.1).await? else {
        return Ok(Verdict::Same); // gone since it was listed: nothing left to compare
    };
    let identity =
        same_content(&clients.s3, (source.0, source.1, &src), (destination.0, destination.1, &dst), COMPARE_MAX_BYTES)
            .await?;
    Ok(match identity {
        Identity::Same(_) => Verdict::Same,
        Identity::Different(_) => Verdict::Conflict,
        Identity::Unproven(_) => Verdict::Unproven,
    })
}
