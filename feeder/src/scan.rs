//! The page-scanning helper of the commands that go through the source prefix once, resumably
//! (`verify --objects`, `cleanup`): the listing runs a page ahead in a task of its own, and
//! each page is handed to the command's action in order. Where such a scan stands is saved by
//! the command after each page (`crate::store::scans`).

use std::sync::Arc;

use anyhow::Context;
use common::message::ObjectMessage;
use tokio_util::sync::CancellationToken;

use crate::list::{Lister, Listing};

/// How a scan's listing ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Every key of the segment was handed over.
    Complete,
    /// The action asked to stop, or `shutdown` fired.
    Stopped,
}

/// Lists `segment` (keys after its first bound, up to its second) and hands each page to
/// `on_page`, until the listing is complete, `on_page` answers `false`, or `shutdown` fires.
/// A listing error, or one of `on_page`'s, ends the scan with that error.
pub(crate) async fn each_page(
    lister: Arc<Lister>,
    segment: (Option<String>, Option<String>),
    shutdown: &CancellationToken,
    mut on_page: impl AsyncFnMut(Vec<ObjectMessage>) -> anyhow::Result<bool>,
) -> anyhow::Result<Ended> {
    let (tx, mut pages) = tokio::sync::mpsc::channel(2);
    let task = lister.spawn(0, segment, tx, shutdown.clone());
    let mut ended = Ended::Stopped;
    while let Some((_, item)) = pages.recv().await {
        match item? {
            Listing::Complete => {
                ended = Ended::Complete;
                break;
            }
            Listing::Page { objects, .. } => {
                if !on_page(objects).await? || shutdown.is_cancelled() {
                    break;
                }
            }
        }
    }
    drop(pages);
    task.await.context("the listing task failed")?;
    Ok(ended)
}
