//! `feeder verify --objects`: streams the source prefix and checks that each legacy object
//! has its copy at the destination with the same bytes (the identity rule of
//! `common::identity`: size, a full-object checksum, equal ETags, or a bounded comparison).
//!
//! Promises: memory stays flat (one listing page and `VERIFY_CONCURRENCY` checks at a time);
//! objects are only HEADed (and read for the bounded comparison); the position and counts are
//! saved after each page (`avatar_migration_verify`), so an interrupted check resumes where it
//! stopped, and a finished one starts over next time. `--sample N` checks N consecutive
//! objects from a random point of the key space instead, saving nothing.

use std::sync::Arc;

use anyhow::Context;
use common::identity::{Identity, head_object, same_content};
use futures::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

use crate::list::{Lister, Listing};
use crate::settings::VerifyArgs;
use crate::{Clients, Settings};

/// Largest object compared byte by byte when metadata cannot tell (the consumer's default).
const COMPARE_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// What the object check found (totals across resumed runs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectCheck {
    pub last_key: Option<String>,
    pub objects: i64,
    pub missing_copy: i64,
    pub conflicts: i64,
    pub unproven: i64,
    pub finished: bool,
    pub sample: bool,
}

impl ObjectCheck {
    fn from_row(
        (last_key, objects, missing_copy, conflicts, unproven, finished): crate::store::scans::ObjectCheckRow,
    ) -> Self {
        Self { last_key, objects, missing_copy, conflicts, unproven, finished, sample: false }
    }

    fn row(&self) -> crate::store::scans::ObjectCheckRow {
        (self.last_key.clone(), self.objects, self.missing_copy, self.conflicts, self.unproven, self.finished)
    }

    pub fn all_copied(&self) -> bool {
        self.missing_copy == 0 && self.conflicts == 0 && self.unproven == 0
    }
}

/// One legacy object's verdict.
pub(crate) enum Verdict {
    Same,
    MissingCopy,
    Conflict,
    Unproven,
}

pub async fn check(
    settings: &Settings,
    args: &VerifyArgs,
    clients: &Clients,
    shutdown: CancellationToken,
) -> anyhow::Result<ObjectCheck> {
    let mapping = settings.storage.mapping()?;
    let (bucket, prefix) = (mapping.source_bucket.as_str(), mapping.source_prefix.as_str());
    let lister = Arc::new(Lister {
        s3: clients.s3.clone(),
        bucket: bucket.to_owned(),
        prefix: prefix.to_owned(),
        page_size: 1000,
    });
    let mut state = match args.sample {
        Some(_) => ObjectCheck { sample: true, ..ObjectCheck::default() },
        None => {
            match crate::store::scans::load_object_check_row(&clients.db, bucket, prefix)
                .await?
                .map(ObjectCheck::from_row)
            {
                Some(saved) if !saved.finished => saved,
                _ => ObjectCheck::default(),
            }
        }
    };
    let start = match args.sample {
        // A random range of the split points: N consecutive keys from a random place.
        Some(_) => {
            let ranges = crate::ranges::plan(&lister, None, 64).await?;
            ranges[fastrand::usize(..ranges.len())].after.clone()
        }
        None => state.last_key.clone(),
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
        let (tx, pages) = tokio::sync::mpsc::channel(2);
        let task = lister.clone().spawn(0, segment, tx, shutdown.clone());
        check_segment(clients, args, &mapping, pages, &mut state, &mut left, &shutdown).await?;
        task.await.context("the listing task failed")?;
        if !state.sample {
            crate::store::scans::save_object_check_row(&clients.db, bucket, prefix, &state.row()).await?;
        }
    }
    let scope = if state.sample {
        "a sample of"
    } else if state.finished {
        "all"
    } else {
        "so far"
    };
    println!(
        "verify: objects ({scope}): {} legacy objects checked: {} without a copy, {} with a copy of other bytes, {} \
         not provable within 64 MiB{}",
        state.objects,
        state.missing_copy,
        state.conflicts,
        state.unproven,
        if state.finished || state.sample { "" } else { " (interrupted: run again to resume)" }
    );
    Ok(state)
}

/// Checks the objects of one listing until it ends, `left` reaches 0 or `shutdown` fires;
/// saves the position after each page (unless sampling).
#[allow(clippy::too_many_arguments)]
async fn check_segment(
    clients: &Clients,
    args: &VerifyArgs,
    mapping: &common::keys::KeyMapping,
    mut pages: tokio::sync::mpsc::Receiver<crate::list::Item>,
    state: &mut ObjectCheck,
    left: &mut u64,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let (bucket, prefix) = (mapping.source_bucket.as_str(), mapping.source_prefix.as_str());
    while let Some((_, item)) = pages.recv().await {
        let mut page = match item? {
            Listing::Page { objects, .. } => objects,
            Listing::Complete => {
                state.finished = true;
                return Ok(());
            }
        };
        page.truncate((*left).min(page.len() as u64) as usize);
        *left -= page.len() as u64;
        let verdicts: Vec<Verdict> = futures::stream::iter(page.iter().map(|o| async move {
            let destination = mapping.destination_key(&o.key).context("a listed key outside SOURCE_PREFIX")?;
            verdict(clients, (&mapping.source_bucket, &o.key), (&mapping.destination_bucket, &destination)).await
        }))
        .buffered(args.concurrency.get())
        .try_collect()
        .await?;
        for (object, verdict) in page.iter().zip(&verdicts) {
            state.objects += 1;
            let what = match verdict {
                Verdict::Same => continue,
                Verdict::MissingCopy => {
                    state.missing_copy += 1;
                    "has no copy"
                }
                Verdict::Conflict => {
                    state.conflicts += 1;
                    "has a copy with other bytes"
                }
                Verdict::Unproven => {
                    state.unproven += 1;
                    "has a copy that cannot be proven the same within 64 MiB"
                }
            };
            tracing::warn!(key = object.key, "legacy object {what}");
        }
        state.last_key = page.last().map(|o| o.key.clone()).or(state.last_key.take());
        if !state.sample {
            crate::store::scans::save_object_check_row(&clients.db, bucket, prefix, &state.row()).await?;
        }
        if *left == 0 || shutdown.is_cancelled() {
            return Ok(());
        }
    }
    Ok(())
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
