//! Where the resumable scans of the source prefix stand: `verify --objects`
//! (`avatar_migration_verify`) and `cleanup` (`avatar_migration_cleanup`).

use sqlx::PgPool;

/// Where `feeder verify --objects` stands: (last key, objects, missing copies, conflicts,
/// unproven, finished).
pub type ObjectCheckRow = (Option<String>, i64, i64, i64, i64, bool);

pub async fn load_object_check_row(pool: &PgPool, bucket: &str, prefix: &str) -> sqlx::Result<Option<ObjectCheckRow>> {
    sqlx::query_as(
        "SELECT last_key, objects, missing_copy, conflicts, unproven, finished FROM avatar_migration_verify
         WHERE source_bucket = $1 AND source_prefix = $2",
    )
    .bind(bucket)
    .bind(prefix)
    .fetch_optional(pool)
    .await
}

pub async fn save_object_check_row(
    pool: &PgPool,
    bucket: &str,
    prefix: &str,
    row: &ObjectCheckRow,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO avatar_migration_verify
             (source_bucket, source_prefix, last_key, objects, missing_copy, conflicts, unproven, finished)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (source_bucket, source_prefix) DO UPDATE
         SET last_key = EXCLUDED.last_key, objects = EXCLUDED.objects, missing_copy = EXCLUDED.missing_copy,
             conflicts = EXCLUDED.conflicts, unproven = EXCLUDED.unproven, finished = EXCLUDED.finished",
    )
    .bind(bucket)
    .bind(prefix)
    .bind(&row.0)
    .bind(row.1)
    .bind(row.2)
    .bind(row.3)
    .bind(row.4)
    .bind(row.5)
    .execute(pool)
    .await?;
    Ok(())
}

/// Where `feeder cleanup` stands: (last key, objects, deleted, referenced, not copied,
/// failed, finished).
pub type CleanupRow = (Option<String>, i64, i64, i64, i64, i64, bool);

pub async fn load_cleanup_row(pool: &PgPool, bucket: &str, prefix: &str) -> sqlx::Result<Option<CleanupRow>> {
    sqlx::query_as(
        "SELECT last_key, objects, deleted, referenced, not_copied, failed, finished FROM avatar_migration_cleanup
         WHERE source_bucket = $1 AND source_prefix = $2",
    )
    .bind(bucket)
    .bind(prefix)
    .fetch_optional(pool)
    .await
}

pub async fn save_cleanup_row(pool: &PgPool, bucket: &str, prefix: &str, row: &CleanupRow) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO avatar_migration_cleanup
             (source_bucket, source_prefix, last_key, objects, deleted, referenced, not_copied, failed, finished)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (source_bucket, source_prefix) DO UPDATE
         SET last_key = EXCLUDED.last_key, objects = EXCLUDED.objects, deleted = EXCLUDED.deleted,
             referenced = EXCLUDED.referenced, not_copied = EXCLUDED.not_copied, failed = EXCLUDED.failed,
             finished = EXCLUDED.finished",
    )
    .bind(bucket)
    .bind(prefix)
    .bind(&row.0)
    .bind(row.1)
    .bind(row.2)
    .bind(row.3)
    .bind(row.4)
    .bind(row.5)
    .bind(row.6)
    .execute(pool)
    .await?;
    Ok(())
}
