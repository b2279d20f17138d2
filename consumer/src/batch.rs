//! A small batcher: callers submit one item and await its own result; a background task
//! gathers items into batches of at most `max` or whatever arrived within `max_wait`, and
//! runs up to `parallel` flushes at once. Used for the row rewrites (one `UPDATE` per batch)
//! and the message deletes (one `DeleteMessageBatch` per ten).
//!
//! Promises: every submitted item gets exactly its own result; when every `Batcher` handle is
//! dropped, what was submitted is flushed and the task ends.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

type Entry<I, O> = (I, oneshot::Sender<O>);

pub struct Batcher<I, O> {
    tx: mpsc::Sender<Entry<I, O>>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone() }
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// `flush` gets a batch and returns one result per item, in order.
    pub fn spawn<F, Fut>(max: usize, max_wait: Duration, parallel: usize, flush: F) -> (Self, JoinHandle<()>)
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Entry<I, O>>(max * parallel.max(1) * 2);
        let flush = Arc::new(flush);
        let slots = Arc::new(Semaphore::new(parallel.max(1)));
        let handle = tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                let deadline = tokio::time::sleep(max_wait);
                tokio::pin!(deadline);
                while batch.len() < max {
                    tokio::select! {
                        next = rx.recv() => match next {
                            Some(entry) => batch.push(entry),
                            None => break,
                        },
                        _ = &mut deadline => break,
                    }
                }
                let permit = slots.clone().acquire_owned().await.expect("semaphore never closed");
                let flush = flush.clone();
                tasks.spawn(async move {
                    let (items, replies): (Vec<I>, Vec<oneshot::Sender<O>>) = batch.into_iter().unzip();
                    let results = flush(items).await;
                    debug_assert_eq!(results.len(), replies.len());
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(result); // the submitter may have given up; fine
                    }
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        });
        (Self { tx }, handle)
    }

    /// Submits an item and waits for its result; `None` if the batcher is gone.
    pub async fn submit(&self, item: I) -> Option<O> {
        let (reply, result) = oneshot::channel();
        self.tx.send((item, reply)).await.ok()?;
        result.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test(start_paused = true)]
    async fn each_item_gets_its_own_result_in_batches_of_at_most_max() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let (batcher, handle) = Batcher::spawn(4, Duration::from_millis(10), 2, move |items: Vec<u32>| {
            seen.lock().unwrap().push(items.len());
            async move { items.into_iter().map(|i| i * 10).collect::<Vec<_>>() }
        });
        let results = futures::future::join_all((0..10).map(|i| {
            let b = batcher.clone();
            async move { b.submit(i).await }
        }))
        .await;
        assert_eq!(results, (0..10).map(|i| Some(i * 10)).collect::<Vec<_>>());
        drop(batcher);
        handle.await.unwrap();
        let sizes = sizes.lock().unwrap();
        assert!(sizes.iter().all(|&n| n <= 4), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_item_is_flushed_after_max_wait() {
        let (batcher, _h) = Batcher::spawn(100, Duration::from_secs(1), 1, |items: Vec<u8>| async move { items });
        let start = tokio::time::Instant::now();
        assert_eq!(batcher.submit(7).await, Some(7));
        assert!(start.elapsed() >= Duration::from_secs(1));
    }
}
