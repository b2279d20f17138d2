//! A small batcher: callers submit one item and await its own result; a background task
//! gathers items into batches of at most `max` (what arrived within `max_wait`, as long as
//! no gap of `quiet` came, plus whatever
//! arrives while all `parallel` flush slots are busy) and runs up to `parallel` flushes at once. Used for the row rewrites (one `UPDATE` per batch)
//! and the message deletes (one `DeleteMessageBatch` per ten).
//!
//! Promises: every submitted item gets exactly its own result; when every `Batcher` handle is
//! dropped, what was submitted is flushed and the task ends.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

type Entry<I, O> = (I, oneshot::Sender<O>);

pub(crate) struct Batcher<I, O> {
    tx: mpsc::Sender<Entry<I, O>>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone() }
    }
}

/// How batches are made.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    /// Items in a batch at most.
    pub(crate) max: usize,
    /// How long the first item of a batch waits for company at most.
    pub(crate) max_wait: Duration,
    /// A gap this long with nothing new ends the wait.
    pub(crate) quiet: Duration,
    /// A flush that takes longer halves the batches (down to one item); one that takes under
    /// half of it lets them grow back by a tenth of `max`. `None`: batches of `max`.
    pub(crate) flush_target: Option<Duration>,
    /// Flushes at once.
    pub(crate) parallel: usize,
}

impl Shape {
    /// Batches of `max`, each waiting `linger` for company, none quiet, any flush time.
    pub(crate) fn fixed(max: usize, linger: Duration, parallel: usize) -> Shape {
        Shape { max, max_wait: linger, quiet: linger, flush_target: None, parallel }
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// `flush` gets a batch and returns one result per item, in order.
    pub(crate) fn spawn<F, Fut>(shape: Shape, flush: F) -> (Self, JoinHandle<()>)
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        let Shape { max: most, max_wait, quiet, flush_target, parallel } = shape;
        let (tx, mut rx) = mpsc::channel::<Entry<I, O>>(most * parallel.max(1) * 2);
        let flush = Arc::new(flush);
        let slots = Arc::new(Semaphore::new(parallel.max(1)));
        // The batch size now: `most`, or less while flushes take longer than their target.
        let size = Arc::new(AtomicUsize::new(most));
        let handle = tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            while let Some(first) = rx.recv().await {
                let max = size.load(Relaxed).clamp(1, most);
                let mut batch = vec![first];
                // Linger up to `max_wait` for company (0: take only what is already waiting),
                // while company keeps coming: `quiet` with nothing new ends it (the last items
                // of a run do not wait the whole of it).
                let deadline = tokio::time::sleep(max_wait);
                tokio::pin!(deadline);
                let mut closed = false;
                while batch.len() < max {
                    tokio::select! {
                        biased;
                        next = rx.recv() => match next {
                            Some(entry) => batch.push(entry),
                            None => { closed = true; break }
                        },
                        _ = &mut deadline => break,
                        _ = tokio::time::sleep(quiet) => break,
                    }
                }
                // While every flush slot is busy, keep gathering: batches grow with the load
                // and cost no latency when there is none.
                let permit = loop {
                    if batch.len() >= max || closed {
                        break slots.clone().acquire_owned().await.expect("semaphore never closed");
                    }
                    tokio::select! {
                        biased;
                        permit = slots.clone().acquire_owned() => break permit.expect("semaphore never closed"),
                        next = rx.recv() => match next {
                            Some(entry) => batch.push(entry),
                            None => closed = true,
                        },
                    }
                };
                let (flush, size) = (flush.clone(), size.clone());
                tasks.spawn(async move {
                    let (items, replies): (Vec<I>, Vec<oneshot::Sender<O>>) = batch.into_iter().unzip();
                    let started = tokio::time::Instant::now();
                    let results = flush(items).await;
                    if let Some(target) = flush_target {
                        let took = started.elapsed();
                        let now = size.load(Relaxed);
                        let next = if took > target {
                            (now / 2).max(1)
                        } else if took < target / 2 {
                            (now + most.div_ceil(10)).min(most)
                        } else {
                            now
                        };
                        size.store(next, Relaxed);
                    }
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

    /// Hands an item over without waiting for its result (waits only while the queue of
    /// items is full); `false` if the batcher is gone.
    pub(crate) async fn hand_over(&self, item: I) -> bool {
        let (reply, _) = oneshot::channel();
        self.tx.send((item, reply)).await.is_ok()
    }

    /// Submits an item and waits for its result; `None` if the batcher is gone.
    pub(crate) async fn submit(&self, item: I) -> Option<O> {
        let (reply, result) = oneshot::channel();
        self.tx.send((item, reply)).await.ok()?;
        result.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Up to 100 items, a 1 s linger ended by 250 ms of quiet, one flush at a time.
    fn lingering() -> Shape {
        Shape {
            max: 100,
            max_wait: Duration::from_secs(1),
            quiet: Duration::from_millis(250),
            flush_target: None,
            parallel: 1,
        }
    }
    use std::sync::Mutex;

    #[tokio::test(start_paused = true)]
    async fn each_item_gets_its_own_result_in_batches_of_at_most_max() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let (batcher, handle) =
            Batcher::spawn(Shape::fixed(4, Duration::from_millis(10), 2), move |items: Vec<u32>| {
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
    async fn without_lingering_items_gather_while_every_slot_is_busy() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let (release, gate) = tokio::sync::watch::channel(false);
        let (batcher, handle) = Batcher::spawn(Shape::fixed(100, Duration::ZERO, 1), move |items: Vec<u32>| {
            seen.lock().unwrap().push(items.len());
            let mut gate = gate.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await; // the one slot stays busy until released
                items
            }
        });
        let first = tokio::spawn({
            let b = batcher.clone();
            async move { b.submit(0).await }
        });
        tokio::task::yield_now().await;
        let rest: Vec<_> = (1..6)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.submit(i).await })
            })
            .collect();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        release.send(true).unwrap();
        assert_eq!(first.await.unwrap(), Some(0), "a lone item is flushed at once");
        for (i, r) in rest.into_iter().enumerate() {
            assert_eq!(r.await.unwrap(), Some(i as u32 + 1));
        }
        drop(batcher);
        handle.await.unwrap();
        assert_eq!(*sizes.lock().unwrap(), vec![1, 5], "the five gathered while the slot was busy");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_item_is_flushed_once_a_quarter_of_max_wait_brings_nothing() {
        let (batcher, _h) = Batcher::spawn(lingering(), |items: Vec<u8>| async move { items });
        let start = tokio::time::Instant::now();
        assert_eq!(batcher.submit(7).await, Some(7));
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(1), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn items_arriving_steadily_share_a_statement_for_up_to_max_wait() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let (batcher, handle) = Batcher::spawn(lingering(), move |items: Vec<u32>| {
            seen.lock().unwrap().push(items.len());
            async move { items }
        });
        // One item every 100 ms for 3 s: a batch a second, of about ten.
        let mut waiting = Vec::new();
        for i in 0..30 {
            let b = batcher.clone();
            waiting.push(tokio::spawn(async move { b.submit(i).await }));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (i, w) in waiting.into_iter().enumerate() {
            assert_eq!(w.await.unwrap(), Some(i as u32));
        }
        drop(batcher);
        handle.await.unwrap();
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 30);
        assert!(sizes.len() <= 4 && sizes.iter().all(|&n| n <= 11), "{sizes:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn slow_flushes_make_smaller_batches_and_fast_ones_let_them_grow_back() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        // A flush takes 10 ms an item for the first 600 items, then 1 ms: at a target of
        // 200 ms, batches of 100 shrink to 20 or fewer, then grow back to 100.
        let done = Arc::new(AtomicUsize::new(0));
        let shape = Shape { flush_target: Some(Duration::from_millis(200)), ..lingering() };
        let (batcher, handle) = Batcher::spawn(shape, move |items: Vec<u32>| {
            seen.lock().unwrap().push(items.len());
            let per_item = if done.fetch_add(items.len(), Relaxed) < 600 { 10 } else { 1 };
            async move {
                tokio::time::sleep(Duration::from_millis(per_item * items.len() as u64)).await;
                items
            }
        });
        let all = futures::future::join_all((0..2000).map(|i| {
            let b = batcher.clone();
            async move { b.submit(i).await }
        }))
        .await;
        assert!(all.iter().enumerate().all(|(i, r)| *r == Some(i as u32)));
        drop(batcher);
        handle.await.unwrap();
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes[0], 100, "{sizes:?}");
        let smallest = sizes.iter().copied().min().unwrap();
        assert!(smallest <= 25, "slow flushes shrank the batches: {sizes:?}");
        let low = sizes.iter().position(|&n| n == smallest).unwrap();
        assert!(sizes[low..].contains(&100), "fast ones grew them back: {sizes:?}");
    }
}
