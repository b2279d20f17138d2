//! The failure records (`avatar_migration_failures`): what was set aside, by subject and
//! reason; recorded again, a record's count goes up.

use std::collections::HashMap;

use sqlx::PgPool;

use super::keyset::Keyset;

use crate::reason::Reason;

/// Records a failure; recording it again bumps its count.
pub async fn record_failure(pool: &PgPool, subject: &str, reason: Reason, detail: &str) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO avatar_migration_failures (subject, reason, detail) VALUES ($1, $2, $3)
         ON CONFLICT (subject, reason) DO UPDATE
         SET detail = EXCLUDED.detail, occurrences = avatar_migration_failures.occurrences + 1,
             last_seen = now()",
    )
    .bind(subject)
    .bind(reason.as_str())
    .bind(detail)
    .execute(pool)
    .await?;
    Ok(())
}

/// One failure record.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct FailureRecord {
    pub subject: String,
    pub reason: String,
    pub detail: String,
    pub occurrences: i32,
}

impl FailureRecord {
    /// Its position in the order records are read in: (reason, subject).
    pub fn position(&self) -> Option<(String, String)> {
        Some((self.reason.clone(), self.subject.clone()))
    }
}

pub async fn list_failures(pool: &PgPool) -> sqlx::Result<Vec<FailureRecord>> {
    let mut all = Vec::new();
    let mut pages = Keyset::after(None);
    while let Some(page) = pages.next(|after| failures_after(pool, None, after, 1000), FailureRecord::position).await? {
        all.extend(page);
    }
    Ok(all)
}

/// Failure records after `after` ([`FailureRecord::position`]), at most `limit`; only of
/// `reason` when given. Read with [`Keyset`] to page through them all.
pub async fn failures_after(
    pool: &PgPool,
    reason: Option<&str>,
    after: Option<(String, String)>,
    limit: i64,
) -> sqlx::Result<Vec<FailureRecord>> {
    let (after_reason, after_subject) = after.unzip();
    sqlx::query_as(
        "SELECT subject, reason, detail, occurrences FROM avatar_migration_failures
         WHERE ($1::text IS NULL OR reason = $1)
           AND ($2::text IS NULL OR (reason, subject) > ($2, $3))
         ORDER BY reason, subject LIMIT $4",
    )
    .bind(reason)
    .bind(after_reason)
    .bind(after_subject)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Forgets the records of these subjects with this reason (they are being retried).
pub async fn clear_failures(pool: &PgPool, subjects: &[String], reason: Reason) -> sqlx::Result<u64> {
    let done = sqlx::query("DELETE FROM avatar_migration_failures WHERE reason = $1 AND subject = ANY($2)")
        .bind(reason.as_str())
        .bind(subjects)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

/// How many failures of each reason are recorded (one `GROUP BY`, never every row).
pub async fn failure_counts(pool: &PgPool) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as("SELECT reason, count(*) FROM avatar_migration_failures GROUP BY reason ORDER BY reason")
        .fetch_all(pool)
        .await
}

/// The reasons each of these subjects (keys) is recorded with.
pub async fn recorded_reasons(pool: &PgPool, subjects: &[&str]) -> sqlx::Result<HashMap<String, Vec<String>>> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT subject, reason FROM avatar_migration_failures WHERE subject = ANY($1)")
            .bind(subjects)
            .fetch_all(pool)
            .await?;
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for (subject, reason) in rows {
        out.entry(subject).or_default().push(reason);
    }
    Ok(out)
}

/// Whether any refusal ([`Reason::REFUSALS`]) is recorded: one cheap look a consumer takes
/// every few seconds.
pub async fn refusals_recorded(pool: &PgPool) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM avatar_migration_failures WHERE reason = ANY($1))")
        .bind(Reason::refusal_names())
        .fetch_one(pool)
        .await
}

/// Forgets the refusal records ([`Reason::REFUSALS`]) of an object that moved.
pub async fn clear_refusals(pool: &PgPool, subject: &str) -> sqlx::Result<u64> {
    let done = sqlx::query("DELETE FROM avatar_migration_failures WHERE subject = $1 AND reason = ANY($2)")
        .bind(subject)
        .bind(Reason::refusal_names())
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}
