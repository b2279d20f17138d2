//! Whether a failure record still stands: `verify` and `reconcile` count a legacy row as set
//! aside only while what was recorded is still so.
//!
//! Promises: a record is re-checked against the objects today where one look can tell:
//! `source_missing` and `row_object_missing` stand while the legacy object is missing;
//! `destination_conflict` and `destination_unproven` while the copy's key holds other bytes
//! (or bytes not proven the same). A record found stale is removed (and said so in the log); a
//! record of any other reason (access denied, archived, ...) stands until the object moves or
//! the operator retries it.

use std::collections::HashSet;

use common::db::Reason;
use common::identity::head_etag;
use common::keys::KeyMapping;
use futures::{StreamExt, TryStreamExt};

use super::objects::{Verdict, verdict};
use common::setup::Clients;

/// Of these legacy paths, those with a failure record that still stands; stale records are
/// removed.
pub async fn standing(
    clients: &Clients,
    mapping: &KeyMapping,
    paths: &[&str],
    concurrency: usize,
) -> anyhow::Result<HashSet<String>> {
    let recorded = common::db::recorded_reasons(&clients.db, paths).await?;
    let checks = futures::stream::iter(recorded.into_iter().map(|(path, reasons)| async move {
        let mut stands = false;
        let mut stale = Vec::new();
        for name in reasons {
            let reason = Reason::parse(&name);
            let holds = match reason {
                Some(Reason::SourceMissing | Reason::RowObjectMissing) => {
                    head_etag(&clients.s3, &mapping.source_bucket, &path).await?.is_none()
                }
                Some(Reason::DestinationConflict | Reason::DestinationUnproven) => match mapping.destination_key(&path)
                {
                    Some(copy) => matches!(
                        verdict(clients, (&mapping.source_bucket, &path), (&mapping.destination_bucket, &copy)).await?,
                        Verdict::Conflict | Verdict::Unproven
                    ),
                    None => true,
                },
                _ => true,
            };
            match (holds, reason) {
                (false, Some(reason)) => stale.push(reason),
                _ => stands = true,
            }
        }
        for reason in stale {
            tracing::info!(key = path, reason = reason.as_str(), "a failure record no longer holds: removed");
            common::db::clear_failures(&clients.db, std::slice::from_ref(&path), reason).await?;
        }
        anyhow::Ok(stands.then_some(path))
    }))
    .buffer_unordered(concurrency)
    .try_collect::<Vec<_>>()
    .await?;
    Ok(checks.into_iter().flatten().collect())
}
