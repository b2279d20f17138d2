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
//! | [`fence`] (`install`, `remove`, `status`) | the triggers on the referencing tables, the tombstones | a trigger on each referencing table |
//! | [`grants`] | the catalog | nothing (prints SQL) |
//! | [`failures`] | the failure records | nothing |
//! | [`redrive`] | the dead-letter queue | queue messages (moved back); failures: `retries_exhausted` forgotten |
//! | [`report`] | the rewrite journal, the failure records | nothing |
//! | [`rollback`] | the rewrite journal, a HEAD per legacy object | the references' columns (compare-and-set), the journal's `rolled_back_at` |

pub mod cleanup;
pub mod control;
pub mod failures;
pub mod fence;
pub mod grants;
pub mod objects;
pub mod plan;
pub mod reconcile;
pub mod redrive;
pub mod report;
pub mod rollback;
pub mod standing;
pub mod status;
pub mod verify;

use common::keys::{KeyMapping, Prefix};
use common::references::Form;
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

/// Classifies a row's value of `form`: which side it names, and the key it names there (a
/// NULL, a value of another form or naming another prefix is `Other`, without a key).
pub fn classify(value: Option<&str>, form: &Form, mapping: &KeyMapping) -> (Side, Option<String>) {
    let Some(value) = value else { return (Side::Other, None) };
    let under = |bucket: &str, prefix: &Prefix| form.key_in(bucket, value).filter(|k| k.starts_with(prefix.as_str()));
    if let Some(key) = under(&mapping.destination_bucket, &mapping.destination_prefix) {
        return (Side::Modern, Some(key));
    }
    if let Some(key) = under(&mapping.source_bucket, &mapping.source_prefix) {
        return (Side::Legacy, Some(key));
    }
    (Side::Other, None)
}

/// Why a value names no object the migration moves (a [`Side::Other`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unnamed {
    /// NULL or the empty string.
    Empty,
    /// Not the column's form (another host, a bare key in a URL column, a malformed encoding).
    OtherForm,
    /// The column's form, naming a key under neither prefix (or another bucket's).
    OtherPrefix,
}

/// Why `value` is a [`Side::Other`] (see [`classify`]).
pub fn unnamed(value: Option<&str>, form: &Form, mapping: &KeyMapping) -> Unnamed {
    match value {
        None | Some("") => Unnamed::Empty,
        Some(v)
            if [&mapping.source_bucket, &mapping.destination_bucket].iter().any(|b| form.key_in(b, v).is_some()) =>
        {
            Unnamed::OtherPrefix
        }
        Some(_) => Unnamed::OtherForm,
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
        let key = Form::Key;
        assert_eq!(classify(Some("image/a.png"), &key, &m), (Side::Legacy, Some("image/a.png".into())));
        assert_eq!(classify(Some("avatar/a.png"), &key, &m), (Side::Modern, Some("avatar/a.png".into())));
        for other in [Some("imagex/a.png"), Some("Image/a.png"), Some("image"), Some(""), None] {
            assert_eq!(classify(other, &key, &m), (Side::Other, None), "{other:?}");
        }
        let cdn: Form = "https://{bucket}.example.com/{key}".parse().unwrap();
        assert_eq!(
            classify(Some("https://legacy-s3.example.com/image/a%20b.png"), &cdn, &m),
            (Side::Legacy, Some("image/a b.png".into()))
        );
        assert_eq!(
            classify(Some("https://production-s3.example.com/avatar/a.png"), &cdn, &m),
            (Side::Modern, Some("avatar/a.png".into()))
        );
        for other in ["https://production-s3.example.com/image/a.png", "image/a.png", "https://legacy-s3.example.com/x"]
        {
            assert_eq!(classify(Some(other), &cdn, &m), (Side::Other, None), "{other:?}");
        }
    }
}
