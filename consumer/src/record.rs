//! Record stage: rewrites the rows of every reference (`REFERENCES`) that name a copied
//! object, compare-and-set (I4), batched into one `UPDATE` per batch and per reference: a
//! rewrite lingers up to `DB_BATCH_MAX_WAIT_MS` (1 s) for company while company keeps coming,
//! up to `DB_BATCH_SIZE` objects, so that a fleet at a trickle commits tens of rows at a time
//! rather than a message's ten (each commit is a WAL flush on the primary). The message's copy
//! permit is not held meanwhile (`crate::slot::Slot`).
//!
//! Promises:
//! - a row is rewritten only while its value is still the old one, so a row the live service
//!   repointed meanwhile keeps the live value; a rewrite is only ever asked for after the
//!   destination object exists (I1); an object is rewritten only when every reference's
//!   statement went through for it, so its message is deleted only then;
//! - a live transaction holding a row never stalls anything: that row is skipped (its object's
//!   message comes back later) and the others proceed; every statement runs under the
//!   session's `lock_timeout` and `statement_timeout` (`DB_LOCK_TIMEOUT`,
//!   `DB_STATEMENT_TIMEOUT`);
//! - with `REWRITE_JOURNAL` (the default) every rewritten row is recorded (reference, row key,
//!   old and new value, legacy key, when) by the same statement, for `feeder report` and
//!   `feeder rollback`;
//! - a batch that fails (a deadlock, a trigger, a constraint, a timeout) is retried row by row
//!   at once, so one bad row fails only its own object; the `UPDATE` is idempotent (I5).

use std::sync::Arc;
use std::time::Duration;

use common::db::{Rewritten, Target, Targets};
use common::keys::KeyMapping;
use sqlx::PgPool;

use crate::batch::{Batcher, Shape};
use crate::metrics::Stats;

#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum RewriteError {
    #[error("rewriting rows: {0}")]
    Database(#[source] Arc<sqlx::Error>),
    #[error("the row rewriter has stopped")]
    Stopped,
}

impl RewriteError {
    /// An error no retry can fix: the role lacks a grant, the table is gone.
    pub(crate) fn is_fatal(&self) -> bool {
        let RewriteError::Database(err) = self else { return false };
        let code = err.as_database_error().and_then(|e| e.code());
        // 42501 insufficient_privilege, 42P01 undefined_table, 42703 undefined_column.
        matches!(code.as_deref(), Some("42501" | "42P01" | "42703"))
    }
}

type Pair = (String, String);

/// What the rewrites are of: every reference, the mapping between the buckets, the journal.
#[derive(Clone)]
pub(crate) struct Rewrites {
    pub(crate) targets: Targets,
    pub(crate) mapping: KeyMapping,
    /// Record every rewrite in `avatar_migration_journal`, in the same statement.
    pub(crate) journal: bool,
}

#[derive(Clone)]
pub(crate) struct Rewriter {
    batcher: Batcher<Pair, Result<Rewritten, RewriteError>>,
}

impl Rewriter {
    pub(crate) fn spawn(
        pool: PgPool,
        rewrites: Rewrites,
        max: usize,
        max_wait: Duration,
        flush_target: Duration,
        parallel: usize,
        stats: Arc<Stats>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let shape = Shape { max, max_wait, quiet: max_wait / 4, flush_target: Some(flush_target), parallel };
        let rewrites = Arc::new(rewrites);
        let (batcher, handle) = Batcher::spawn(shape, move |pairs: Vec<Pair>| {
            let (pool, rewrites, stats) = (pool.clone(), rewrites.clone(), stats.clone());
            async move { rewrite_batch(&pool, &rewrites, &pairs, &stats).await }
        });
        (Self { batcher }, handle)
    }

    /// Points every row of every reference that names the legacy key `old` at `new`, unless
    /// another transaction holds it.
    pub(crate) async fn rewrite(&self, old: String, new: String) -> Result<Rewritten, RewriteError> {
        self.batcher.submit((old, new)).await.unwrap_or(Err(RewriteError::Stopped))
    }
}

/// One statement per reference; an object is rewritten when every reference's statement went
/// through for it.
async fn rewrite_batch(
    pool: &PgPool,
    rewrites: &Rewrites,
    pairs: &[Pair],
    stats: &Stats,
) -> Vec<Result<Rewritten, RewriteError>> {
    let mut results: Vec<Result<Rewritten, RewriteError>> = vec![Ok(Rewritten::default()); pairs.len()];
    for target in rewrites.targets.iter() {
        for (result, done) in results.iter_mut().zip(rewrite_target(pool, rewrites, target, pairs, stats).await) {
            match (result.as_mut(), done) {
                (Ok(sum), Ok(done)) => *sum += done,
                (Ok(_), Err(err)) => *result = Err(err),
                (Err(_), _) => {}
            }
        }
    }
    results
}

async fn rewrite_target(
    pool: &PgPool,
    rewrites: &Rewrites,
    target: &Target,
    pairs: &[Pair],
    stats: &Stats,
) -> Vec<Result<Rewritten, RewriteError>> {
    let Rewrites { mapping, journal, .. } = rewrites;
    stats.rewrite_statements.inc();
    stats.rows_per_statement.observe(pairs.len() as f64);
    match common::db::rewrite_paths(pool, target, mapping, pairs, *journal).await {
        Ok(mut done) => {
            // A key twice in one batch (a duplicate delivery) counts its rows once.
            pairs.iter().map(|(old, _)| Ok(done.remove(old).unwrap_or_default())).collect()
        }
        // The server refused the statement (not the connection): one row may be to blame, so
        // each row gets its own statement and the others go through.
        Err(err @ sqlx::Error::Database(_)) if pairs.len() > 1 => {
            tracing::warn!(error = %err, reference = %target, rows = pairs.len(), "batch rewrite failed; rewriting row by row");
            stats.rewrite_statements.inc_by(pairs.len() as u64);
            let singles = pairs.iter().map(|pair| async move {
                let result =
                    common::db::rewrite_paths(pool, target, mapping, std::slice::from_ref(pair), *journal).await;
                result
                    .map(|mut done| done.remove(&pair.0).unwrap_or_default())
                    .map_err(|e| RewriteError::Database(Arc::new(e)))
            });
            futures::future::join_all(singles).await
        }
        Err(err) => {
            let err = RewriteError::Database(Arc::new(err));
            pairs.iter().map(|_| Err(err.clone())).collect()
        }
    }
}
