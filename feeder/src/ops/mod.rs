//! The operator's commands, one file each; each file opens with what the command promises and
//! what it may write. Their SQL lives in `crate::store` (the feeder's own tables) and
//! `common::db` (what both binaries use).
//!
//! | command | reads | writes |
//! |---|---|---|
//! | [`status`] | checkpoint, queue depths, row counts, failure counts, the journal's counter | nothing |
//! | [`plan`] | a sample of the source listing (or all of it, or an inventory report), row counts, the catalog | nothing |
//! | [`verify`] | every row, a HEAD per legacy or modern row; with `--objects` ([`objects`]) the source listing, HEADs of each legacy object and its copy | failures: `row_object_missing`; the object check's position |
//! | [`reconcile`] | every row, a HEAD per legacy row not yet migrated | queue messages; failures: `row_object_missing` |
//! | [`control`] (`pause`, `resume`, `throttle`) | the control row | the control row |
//! | [`cleanup`] | the source listing, HEADs of each legacy object and its copy, a row count per key | deletes legacy objects (with `--yes`), by the delete protocol: tombstones, the lease; its position |
//! | [`fence`] (`install`, `remove`, `status`) | the trigger on `avatars`, the tombstones | the trigger on `avatars` |
//! | [`failures`] | the failure records | nothing |
//! | [`redrive`] | the dead-letter queue | queue messages (moved back); failures: `retries_exhausted` forgotten |
//! | [`report`] | the rewrite journal, the failure records | nothing |
//! | [`rollback`] | the rewrite journal, a HEAD per legacy object | `avatars.path` (compare-and-set), the journal's `rolled_back_at` |

pub mod cleanup;
pub mod control;
pub mod failures;
pub mod fence;
pub mod objects;
pub mod plan;
pub mod reconcile;
pub mod redrive;
pub mod report;
pub mod rollback;
pub mod standing;
pub mod status;
pub mod verify;

use common::keys::KeyMapping;
use tokio_util::sync::CancellationToken;

use common::setup::Clients;

use crate::settings::Settings;

/// What every operator command runs with, built once by `main`.
pub struct Ops<'a> {
    pub settings: &'a Settings,
    pub clients: &'a Clients,
    /// The settings' key mapping, checked.
    pub mapping: KeyMapping,
    /// Fires on SIGTERM or Ctrl-C: a long command stops between pages, its position saved.
    pub shutdown: CancellationToken,
}

impl<'a> Ops<'a> {
    pub fn new(settings: &'a Settings, clients: &'a Clients, shutdown: CancellationToken) -> anyhow::Result<Self> {
        Ok(Self { settings, clients, mapping: settings.storage.mapping()?, shutdown })
    }
}

/// Rows read per page by the commands that stream the table.
pub const ROWS_PAGE: i64 = 1000;

/// Where a row's path points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Under SOURCE_PREFIX: not migrated yet (or set aside).
    Legacy,
    /// Under DESTINATION_PREFIX.
    Modern,
    /// Neither: not ours to judge (which bucket it names is not known).
    Other,
}

/// Classifies a row's path (a null path is `Other`).
pub fn classify(path: Option<&str>, mapping: &KeyMapping) -> Side {
    match path {
        Some(p) if p.starts_with(mapping.destination_prefix.as_str()) => Side::Modern,
        Some(p) if p.starts_with(mapping.source_prefix.as_str()) => Side::Legacy,
        _ => Side::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_paths_by_exact_prefix() {
        let m = KeyMapping::new(
            "legacy-s3".into(),
            "image/".parse().unwrap(),
            "production-s3".into(),
            "avatar/".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(classify(Some("image/a.png"), &m), Side::Legacy);
        assert_eq!(classify(Some("avatar/a.png"), &m), Side::Modern);
        for other in [Some("imagex/a.png"), Some("Image/a.png"), Some("image"), Some(""), None] {
            assert_eq!(classify(other, &m), Side::Other, "{other:?}");
        }
    }
}
