//! Reading the referencing tables for the operator's commands: pages in key order, counts,
//! the planner's estimate.

use std::time::Duration;

use common::db::Target;
use common::keys::KeyMapping;
use sqlx::PgPool;

/// One page of a reference's rows in key order, after the row whose key (as text) is `after`
/// (`None`: from the first): (key as text, value). Keyset pagination on the primary key, in
/// its own type's order: no long transaction, no lock, flat memory over any table size.
pub async fn rows_after(
    pool: &PgPool,
    target: &Target,
    after: Option<String>,
    limit: i64,
) -> sqlx::Result<Vec<(String, Option<String>)>> {
    let (table, column, key, key_type) = (target.table(), target.column(), target.key(), &target.key_type);
    // Ordered by the table's column (`a.`), not by the output's text of the same name. Two
    // statements rather than `$1 IS NULL OR ...`, which a generic plan cannot turn into a
    // range scan of the primary key.
    match after {
        None => {
            sqlx::query_as(&format!(
                "SELECT a.{key}::text AS row_key, a.{column}::text AS value FROM {table} a ORDER BY a.{key} LIMIT $1"
            ))
            .bind(limit)
            .fetch_all(pool)
            .await
        }
        Some(after) => {
            sqlx::query_as(&format!(
                "SELECT a.{key}::text AS row_key, a.{column}::text AS value FROM {table} a
                 WHERE a.{key} > $1::text::{key_type} ORDER BY a.{key} LIMIT $2"
            ))
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await
        }
    }
}

/// Rows by what their values name (summed over the references).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowCounts {
    pub all: i64,
    pub legacy: i64,
    pub modern: i64,
    /// Legacy rows whose key is the subject of a failure record (set aside with a reason).
    pub legacy_set_aside: i64,
    /// Estimated from the planner's statistics and the journal's counter, not counted.
    pub estimated: bool,
}

/// Counts a reference's rows by what their values name: one scan of the table, bounded by
/// `timeout` (`statement_timeout`; the session's `lock_timeout` still applies, so it never
/// queues behind a DDL).
pub async fn count_rows(
    pool: &PgPool,
    target: &Target,
    mapping: &KeyMapping,
    timeout: Duration,
) -> sqlx::Result<RowCounts> {
    let form = &target.reference.form;
    let side = |bucket: &str, prefix: &str| {
        let (lead, tail) = form.around(bucket);
        let prefix = if form.encodes() { common::keys::encode_path(prefix).to_string() } else { prefix.to_owned() };
        (format!("{}{}%{}", like_escape(&lead), like_escape(&prefix), like_escape(&tail)), lead, tail)
    };
    let (legacy, lead, tail) = side(&mapping.source_bucket, mapping.source_prefix.as_str());
    let (modern, ..) = side(&mapping.destination_bucket, mapping.destination_prefix.as_str());
    // The legacy key a value names (between the form's text, decoded in a URL).
    let key = "substr(v, length($3) + 1, length(v) - length($3) - length($4))";
    let key = if form.encodes() { format!("avatar_migration_url_decode({key})") } else { key.to_owned() };
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("SET LOCAL statement_timeout = {}", timeout.as_millis().max(1))).execute(&mut *tx).await?;
    let (legacy, modern, all, legacy_set_aside): (i64, i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*) FILTER (WHERE v LIKE $1),
                count(*) FILTER (WHERE v LIKE $2),
                count(*),
                count(*) FILTER (WHERE v LIKE $1
                                 AND EXISTS (SELECT 1 FROM avatar_migration_failures f WHERE f.subject = {key}))
         FROM (SELECT {}::text AS v FROM {}) r",
        target.column(),
        target.table()
    ))
    .bind(legacy)
    .bind(modern)
    .bind(lead)
    .bind(tail)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(RowCounts { all, legacy, modern, legacy_set_aside, estimated: false })
}

/// `text` as a `LIKE` pattern matching itself (`\` escapes).
fn like_escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

impl std::ops::AddAssign for RowCounts {
    fn add_assign(&mut self, other: Self) {
        self.all += other.all;
        self.legacy += other.legacy;
        self.modern += other.modern;
        self.legacy_set_aside += other.legacy_set_aside;
        self.estimated |= other.estimated;
    }
}

/// The planner's estimate of the rows in a reference's table (`pg_class.reltuples`, kept by
/// autovacuum and `ANALYZE`); `None` when the table was never analyzed.
pub async fn estimated_rows(pool: &PgPool, target: &Target) -> sqlx::Result<Option<i64>> {
    let n: f64 = sqlx::query_scalar("SELECT reltuples::float8 FROM pg_class WHERE oid = $1::int8::oid")
        .bind(i64::from(target.oid))
        .fetch_one(pool)
        .await?;
    Ok((n >= 0.0).then_some(n as i64))
}

/// The indexes on a reference's table: a rewrite is never a HOT update (the column is
/// indexed), so each one writes an entry in every index.
pub async fn index_count(pool: &PgPool, target: &Target) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM pg_index WHERE indrelid = $1::int8::oid")
        .bind(i64::from(target.oid))
        .fetch_one(pool)
        .await
}
