//! The key ranges (or inventory files) of a listing, each with its own position
//! (`avatar_migration_ranges`), saved with the listing's row in one transaction.

use common::db::listing::{Checkpoint, save_checkpoint_on};
use sqlx::{PgConnection, PgPool};

/// One key range of a listing split into ranges listed at once (`LIST_RANGES`): the keys `k`
/// with `after < k <= until` (no bound where `None`). The ranges of a listing cover its key
/// space exactly; each keeps its own position.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct KeyRange {
    #[sqlx(rename = "range_no")]
    pub no: i32,
    #[sqlx(rename = "after_key")]
    pub after: Option<String>,
    #[sqlx(rename = "until_key")]
    pub until: Option<String>,
    /// Set when this part of the input is a data file of an S3 Inventory report (then
    /// `after` and `until` are unset): its key in the report's bucket.
    pub inventory_file: Option<String>,
    /// Of an inventory file: the CSV rows read through the last fully enqueued page.
    pub rows_done: i64,
    /// The last key of the range's last fully enqueued page; listing resumes after it.
    pub last_key: Option<String>,
    pub listed: i64,
    pub finished: bool,
}

impl KeyRange {
    /// Where listing this range starts: after its last enqueued key, or its lower bound.
    pub fn resume_after(&self) -> Option<&str> {
        self.last_key.as_deref().or(self.after.as_deref())
    }
}

/// The saved ranges of a listing, in order (none when it is listed as one range).
pub async fn load_ranges(pool: &PgPool, bucket: &str, prefix: &str) -> sqlx::Result<Vec<KeyRange>> {
    sqlx::query_as(
        "SELECT range_no, after_key, until_key, last_key, listed, finished, inventory_file, rows_done
         FROM avatar_migration_ranges
         WHERE source_bucket = $1 AND source_prefix = $2 ORDER BY range_no",
    )
    .bind(bucket)
    .bind(prefix)
    .fetch_all(pool)
    .await
}

/// Replaces the saved ranges of a listing (none: listed as one range again).
pub async fn replace_ranges(pool: &PgPool, bucket: &str, prefix: &str, ranges: &[KeyRange]) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM avatar_migration_ranges WHERE source_bucket = $1 AND source_prefix = $2")
        .bind(bucket)
        .bind(prefix)
        .execute(&mut *tx)
        .await?;
    for r in ranges {
        save_range(&mut tx, bucket, prefix, r).await?;
    }
    tx.commit().await
}

async fn save_range(conn: &mut PgConnection, bucket: &str, prefix: &str, r: &KeyRange) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO avatar_migration_ranges
             (source_bucket, source_prefix, range_no, after_key, until_key, last_key, listed, finished,
              inventory_file, rows_done)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (source_bucket, source_prefix, range_no) DO UPDATE
         SET last_key = EXCLUDED.last_key, listed = EXCLUDED.listed, finished = EXCLUDED.finished,
             rows_done = EXCLUDED.rows_done",
    )
    .bind(bucket)
    .bind(prefix)
    .bind(r.no)
    .bind(&r.after)
    .bind(&r.until)
    .bind(&r.last_key)
    .bind(r.listed)
    .bind(r.finished)
    .bind(&r.inventory_file)
    .bind(r.rows_done)
    .execute(conn)
    .await?;
    Ok(())
}

/// Saves the listing's checkpoint and, when it is listed in ranges, the range's position, in
/// one transaction.
pub async fn save_progress(
    pool: &PgPool,
    bucket: &str,
    prefix: &str,
    cp: &Checkpoint,
    range: Option<&KeyRange>,
) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    if let Some(range) = range {
        save_range(&mut tx, bucket, prefix, range).await?;
    }
    save_checkpoint_on(&mut tx, bucket, prefix, cp).await?;
    tx.commit().await
}
