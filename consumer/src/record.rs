//! Record stage: rewrites the rows that point at a copied object, compare-and-set (I4),
//! batched into one `UPDATE` per batch.
//!
//! Promises: a row is rewritten only while its path is still the old one, so a row the live
//! service repointed meanwhile keeps the live value; a rewrite is only ever asked for after the
//! destination object exists (I1); a failed batch fails every object in it, and their messages
//! come back later (the `UPDATE` is idempotent: I5).

use std::time::Duration;

use sqlx::PgPool;

use crate::batch::Batcher;

#[derive(Clone)]
pub struct Rewriter {
    batcher: Batcher<(String, String), Result<u64, String>>,
}

impl Rewriter {
    pub fn spawn(pool: PgPool, max: usize, max_wait: Duration, parallel: usize) -> (Self, tokio::task::JoinHandle<()>) {
        let (batcher, handle) = Batcher::spawn(max, max_wait, parallel, move |pairs: Vec<(String, String)>| {
            let pool = pool.clone();
            async move {
                match common::db::rewrite_paths(&pool, &pairs).await {
                    // A path twice in one batch (a duplicate delivery) counts its rows once.
                    Ok(mut counts) => pairs.iter().map(|(old, _)| Ok(counts.remove(old).unwrap_or(0))).collect(),
                    Err(err) => {
                        let why = format!("rewriting rows: {err}");
                        pairs.iter().map(|_| Err(why.clone())).collect()
                    }
                }
            }
        });
        (Self { batcher }, handle)
    }

    /// Points every row at `old` to `new`; returns how many rows this call changed.
    pub async fn rewrite(&self, old: String, new: String) -> Result<u64, String> {
        self.batcher.submit((old, new)).await.unwrap_or_else(|| Err("the row rewriter has stopped".into()))
    }
}
