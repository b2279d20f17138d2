//! List stage: pages through the source prefix with `ListObjectsV2`, starting after the
//! checkpointed key.
//!
//! Promises: every key under the prefix that sorts after `start_after` is yielded exactly once
//! per run, in S3's (UTF-8 binary) order, page by page; a listing error stops the run (it is
//! safe to run again: it resumes from the last checkpoint).

use anyhow::Context;
use common::aws::{S3, describe};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct Listed {
    pub key: String,
    pub size: i64,
    pub etag: String,
}

#[derive(Debug)]
pub struct Page {
    pub objects: Vec<Listed>,
}

/// Lists in a task of its own, so the next page is fetched while this one is enqueued. The
/// channel holds two pages: listing never runs far ahead of enqueueing.
pub fn spawn(
    s3: S3,
    bucket: String,
    prefix: String,
    start_after: Option<String>,
    page_size: i32,
    stop: CancellationToken,
) -> (mpsc::Receiver<anyhow::Result<Page>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(2);
    let handle = tokio::spawn(async move {
        let mut token: Option<String> = None;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let mut request = s3.list_objects_v2().bucket(&bucket).prefix(&prefix).max_keys(page_size);
            request = match (&token, &start_after) {
                (Some(t), _) => request.continuation_token(t),
                (None, Some(after)) => request.start_after(after),
                (None, None) => request,
            };
            let page = request
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("{}", describe(&e)))
                .with_context(|| format!("listing s3://{bucket}/{prefix}"));
            let out = match page {
                Ok(out) => out,
                Err(err) => {
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            };
            let objects = out
                .contents()
                .iter()
                .filter_map(|o| {
                    Some(Listed {
                        key: o.key()?.to_owned(),
                        size: o.size().unwrap_or(0),
                        etag: o.e_tag().unwrap_or_default().to_owned(),
                    })
                })
                .collect::<Vec<_>>();
            token = out.next_continuation_token().map(str::to_owned);
            let more = out.is_truncated().unwrap_or(false) && token.is_some();
            if !objects.is_empty() && tx.send(Ok(Page { objects })).await.is_err() {
                return;
            }
            if !more {
                return;
            }
        }
    });
    (rx, handle)
}
