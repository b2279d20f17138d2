//! Where the resumable scans stand (`avatar_migration_scans`), one row per scan kind
//! (`verify`'s pass over the rows, `verify --objects`, `cleanup`), source bucket and prefix:
//! the last key (or row id) decided, the scan's counts (JSON, each kind its own) and whether
//! it finished.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::PgPool;
use sqlx::types::Json;

/// Which scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanKind {
    /// `feeder verify`'s pass over the rows (its position a row id).
    VerifyRows,
    /// `feeder verify --objects`.
    VerifyObjects,
    /// `feeder cleanup`.
    Cleanup,
}

impl ScanKind {
    fn as_str(self) -> &'static str {
        match self {
            ScanKind::VerifyRows => "verify_rows",
            ScanKind::VerifyObjects => "verify_objects",
            ScanKind::Cleanup => "cleanup",
        }
    }
}

/// Where a scan stands, with its counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct ScanPosition<C> {
    /// The last key of the last page decided; the scan resumes after it.
    pub last_key: Option<String>,
    #[sqlx(json)]
    pub counts: C,
    pub finished: bool,
}

/// The saved position of a scan; `None` when none was saved.
pub async fn load<C>(pool: &PgPool, kind: ScanKind, bucket: &str, prefix: &str) -> sqlx::Result<Option<ScanPosition<C>>>
where
    C: DeserializeOwned + Send + Unpin + 'static,
{
    sqlx::query_as(
        "SELECT last_key, counts, finished FROM avatar_migration_scans
         WHERE kind = $1 AND source_bucket = $2 AND source_prefix = $3",
    )
    .bind(kind.as_str())
    .bind(bucket)
    .bind(prefix)
    .fetch_optional(pool)
    .await
}

pub async fn save<C: Serialize>(
    pool: &PgPool,
    kind: ScanKind,
    bucket: &str,
    prefix: &str,
    position: &ScanPosition<C>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO avatar_migration_scans (kind, source_bucket, source_prefix, last_key, counts, finished)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (kind, source_bucket, source_prefix) DO UPDATE
         SET last_key = EXCLUDED.last_key, counts = EXCLUDED.counts, finished = EXCLUDED.finished,
             updated_at = now()",
    )
    .bind(kind.as_str())
    .bind(bucket)
    .bind(prefix)
    .bind(&position.last_key)
    .bind(Json(&position.counts))
    .bind(position.finished)
    .execute(pool)
    .await?;
    Ok(())
}
