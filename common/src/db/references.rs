//! The references (`REFERENCES`) looked up in the catalog: each column's table, primary key and
//! index, checked once at start so that every statement after it is an index lookup on a column
//! the role may read and write.
//!
//! Promises:
//! - a reference resolves to one ordinary table, one `text` or `varchar` column and a primary
//!   key of one column of any type (bigint, uuid, text...); a missing table or column, a table
//!   without a primary key or with a composite one, or a missing grant is an error naming the
//!   reference and the fix (the `GRANT` to run);
//! - lookups by value are served by an index (a valid, ready, non-partial btree or hash index
//!   leading with the column). Without one each lookup would scan the whole table: start-up
//!   stops and prints the `CREATE INDEX CONCURRENTLY` to run (`MISSING_INDEX=refuse`, the
//!   default), builds it concurrently itself (`build`, when the role owns the table), or goes on
//!   with a warning (`scan`, for small tables);
//! - the planner has statistics on the column (analyzed when missing and the role may).

use std::fmt;
use std::sync::Arc;

use anyhow::Context;
use sqlx::PgConnection;

use crate::references::{Reference, References, quote_ident, sql_ident};

/// SQL functions that encode and decode keys in URLs as [`Form`] does (`forms.sql`), for the
/// statements that meet values rather than keys.
pub const FUNCTIONS: &str = include_str!("forms.sql");

/// What start-up does about a reference whose column has no index serving lookups by value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MissingIndex {
    /// Stop, printing the `CREATE INDEX CONCURRENTLY` statement to run.
    #[default]
    Refuse,
    /// Build it (`CREATE INDEX CONCURRENTLY`: the table's reads and writes go on; only the
    /// table's owner may).
    Build,
    /// Go on without it: each lookup scans the whole table (small tables only).
    Scan,
}

/// The references and what to do about a missing index: what `prepare` resolves.
#[derive(Clone, Debug, Default)]
pub struct Schema {
    pub references: References,
    pub missing_index: MissingIndex,
}

impl Schema {
    /// The default reference, its index built when missing: the tests' and the demo's schema.
    pub fn building_indexes() -> Self {
        Self { references: References::default(), missing_index: MissingIndex::Build }
    }
}

/// A reference found in the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub reference: Reference,
    /// The catalog's names: schema, table, column, primary key column.
    pub schema_name: String,
    pub table_name: String,
    pub column_name: String,
    pub key_name: String,
    /// The primary key's type, as `format_type` writes it (`integer`, `uuid`, `text`).
    pub key_type: String,
    /// The table's oid, and the column's number in it.
    pub oid: u32,
    pub attnum: i16,
    /// The index serving lookups by value, when there is one.
    pub index: Option<String>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

impl Target {
    /// `schema.table.column`, quoted where needed: what the journal records and reports show.
    pub fn label(&self) -> String {
        [&self.schema_name, &self.table_name, &self.column_name].map(|s| quote_ident(s)).join(".")
    }

    /// `"schema"."table"`, as statements write it.
    pub fn table(&self) -> String {
        format!("{}.{}", sql_ident(&self.schema_name), sql_ident(&self.table_name))
    }

    /// `"column"`, as statements write it.
    pub fn column(&self) -> String {
        sql_ident(&self.column_name)
    }

    /// The primary key's column, as statements write it.
    pub fn key(&self) -> String {
        sql_ident(&self.key_name)
    }

    /// The name of the fence's trigger on this column, and of its function: the take-home's
    /// `avatar_migration_fence` on `avatars.path` (as earlier versions installed it), one per
    /// table and column otherwise.
    pub fn fence_name(&self) -> String {
        if self.table_name == "avatars" && self.column_name == "path" {
            "avatar_migration_fence".to_owned()
        } else {
            format!("avatar_migration_fence_{}_{}", self.oid, self.attnum)
        }
    }

    /// The name of the index the migration builds when the column has none: PostgreSQL's own
    /// default (`avatars_path_idx`), cut to its 63 bytes.
    pub fn index_name(&self) -> String {
        let mut name = format!("{}_{}_idx", self.table_name, self.column_name);
        while name.len() > 63 {
            name.pop();
        }
        name
    }

    /// The statement that builds the index, as a person would type it.
    pub fn create_index(&self) -> String {
        format!(
            "CREATE INDEX CONCURRENTLY {} ON {}.{} ({});",
            quote_ident(&self.index_name()),
            quote_ident(&self.schema_name),
            quote_ident(&self.table_name),
            quote_ident(&self.column_name)
        )
    }

    /// The grants the migration's role needs on this reference, as a person would type them.
    pub fn grants(&self, role: &str) -> String {
        let table = format!("{}.{}", quote_ident(&self.schema_name), quote_ident(&self.table_name));
        let (column, key) = (quote_ident(&self.column_name), quote_ident(&self.key_name));
        let role = quote_ident(role);
        format!(
            "GRANT USAGE ON SCHEMA {schema} TO {role};\n\
             GRANT SELECT ({key}, {column}), UPDATE ({column}) ON {table} TO {role};\n\
             GRANT TRIGGER ON {table} TO {role};",
            schema = quote_ident(&self.schema_name)
        )
    }
}

/// The references resolved, shared by every task of a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Targets(Arc<[Target]>);

impl Targets {
    pub fn new(list: Vec<Target>) -> Self {
        Self(list.into())
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Target> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The target a journal entry's reference names; entries of earlier versions name none
    /// and were `avatars.path`.
    pub fn by_label(&self, label: Option<&str>) -> Option<&Target> {
        match label {
            Some(label) => self.iter().find(|t| t.label() == label),
            None => self.iter().find(|t| t.table_name == "avatars" && t.column_name == "path"),
        }
    }
}

/// Why a reference cannot be followed: each names the reference and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("REFERENCES names {0}, but table {1} does not exist in this database (is it in another schema?)")]
    NoTable(String, String),
    #[error("REFERENCES names {0}, but {1} is not an ordinary table")]
    NotATable(String, String),
    #[error("REFERENCES names {0}, but table {1} has no column {2:?}")]
    NoColumn(String, String, String),
    #[error("REFERENCES names {0}, a column of type {1}: only text and varchar columns hold object names")]
    ColumnType(String, String),
    #[error("REFERENCES names {0}, but its table has no primary key: rewritten rows are found again by it")]
    NoPrimaryKey(String),
    #[error(
        "REFERENCES names {0}, but its table's primary key has {1} columns ({2}): only a primary key of one \
         column is supported"
    )]
    CompositeKey(String, usize, String),
    #[error("this role may not {1} for REFERENCES {0}: run, as the table's owner,\n{2}")]
    Grant(String, String, String),
    #[error(
        "REFERENCES names {0}, whose column has no index serving lookups by value: each lookup would scan the \
         whole table. Run, as the table's owner (the table's reads and writes go on meanwhile):\n  {1}\n\
         then start again; or set MISSING_INDEX=build to have it built now, or MISSING_INDEX=scan for a small \
         table"
    )]
    NoIndex(String, String),
}

/// Looks every reference up in the catalog and checks it (see the module documentation); the
/// index is built or refused here as `missing_index` says.
pub async fn resolve(conn: &mut PgConnection, schema: &Schema) -> anyhow::Result<Targets> {
    let mut list = Vec::new();
    for reference in schema.references.iter() {
        let mut target = find(conn, reference).await?;
        if target.index.is_none() {
            match schema.missing_index {
                MissingIndex::Refuse => {
                    return Err(ReferenceError::NoIndex(reference.name(), target.create_index()).into());
                }
                MissingIndex::Build => {
                    build_index(conn, &target).await?;
                    target.index = find_index(conn, &target).await?;
                    anyhow::ensure!(
                        target.index.is_some(),
                        "the index {} is not valid after building it",
                        target.index_name()
                    );
                }
                MissingIndex::Scan => tracing::warn!(
                    reference = %target,
                    "no index serves lookups by value (MISSING_INDEX=scan): each lookup scans the whole table; \
                     build it with: {}",
                    target.create_index()
                ),
            }
        }
        ensure_statistics(conn, &target).await?;
        list.push(target);
    }
    Ok(Targets::new(list))
}

/// One reference looked up and checked, its index found or not.
pub async fn find(conn: &mut PgConnection, reference: &Reference) -> anyhow::Result<Target> {
    let name = reference.name();
    let relation = match &reference.schema {
        Some(schema) => format!("{}.{}", sql_ident(schema), sql_ident(&reference.table)),
        None => sql_ident(&reference.table),
    };
    let found: Option<(i64, String, String, String, bool)> = sqlx::query_as(
        "SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relkind::text,
                has_schema_privilege(n.oid, 'USAGE')
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
    )
    .bind(&relation)
    .fetch_optional(&mut *conn)
    .await
    .with_context(|| format!("looking up the table of REFERENCES {name}"))?;
    let Some((oid, schema_name, table_name, kind, usage)) = found else {
        return Err(ReferenceError::NoTable(name, relation).into());
    };
    if !matches!(kind.as_str(), "r" | "p") {
        return Err(ReferenceError::NotATable(name, relation).into());
    }
    let oid = oid as u32;
    let column: Option<(String, bool, i16)> = sqlx::query_as(
        "SELECT format_type(atttypid, atttypmod), atttypid IN ('text'::regtype, 'varchar'::regtype), attnum
         FROM pg_attribute WHERE attrelid = $1::int8::oid AND attname = $2 AND attnum > 0 AND NOT attisdropped",
    )
    .bind(i64::from(oid))
    .bind(&reference.column)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((column_type, textual, attnum)) = column else {
        return Err(ReferenceError::NoColumn(name, relation, reference.column.clone()).into());
    };
    if !textual {
        return Err(ReferenceError::ColumnType(name, column_type).into());
    }
    let key: Vec<(String, String)> = sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
         FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = $1::int8::oid AND i.indisprimary ORDER BY k.ord",
    )
    .bind(i64::from(oid))
    .fetch_all(&mut *conn)
    .await?;
    let (key_name, key_type) = match key.as_slice() {
        [] => return Err(ReferenceError::NoPrimaryKey(name).into()),
        [one] => one.clone(),
        many => {
            let names: Vec<&str> = many.iter().map(|(n, _)| n.as_str()).collect();
            return Err(ReferenceError::CompositeKey(name, many.len(), names.join(", ")).into());
        }
    };
    let mut target = Target {
        reference: reference.clone(),
        schema_name,
        table_name,
        column_name: reference.column.clone(),
        key_name,
        key_type,
        oid,
        attnum,
        index: None,
    };
    let (select, update): (bool, bool) = if usage {
        sqlx::query_as(
            "SELECT has_column_privilege($1::int8::oid, $2, 'SELECT') AND has_column_privilege($1::int8::oid, $3, 'SELECT'),
                    has_column_privilege($1::int8::oid, $2, 'UPDATE')",
        )
        .bind(i64::from(oid))
        .bind(&target.column_name)
        .bind(&target.key_name)
        .fetch_one(&mut *conn)
        .await?
    } else {
        (false, false)
    };
    let role: String = sqlx::query_scalar("SELECT current_user::text").fetch_one(&mut *conn).await?;
    for (may, what) in [
        (usage, "use the table's schema"),
        (select, "read the column and the primary key"),
        (update, "update the column"),
    ] {
        if !may {
            return Err(ReferenceError::Grant(target.label(), what.into(), target.grants(&role)).into());
        }
    }
    target.index = find_index(conn, &target).await?;
    Ok(target)
}

/// A valid, ready index that serves `column = value`: btree or hash, not partial, leading with
/// the column.
async fn find_index(conn: &mut PgConnection, target: &Target) -> anyhow::Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT ic.relname::text FROM pg_index i
         JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
         WHERE i.indrelid = $1::int8::oid AND a.attname = $2 AND i.indisvalid AND i.indisready
           AND i.indpred IS NULL AND am.amname IN ('btree', 'hash')
         ORDER BY ic.relname LIMIT 1",
    )
    .bind(i64::from(target.oid))
    .bind(&target.column_name)
    .fetch_optional(conn)
    .await?)
}

/// Builds the index concurrently (dropping one of ours left invalid by an interrupted build).
async fn build_index(conn: &mut PgConnection, target: &Target) -> anyhow::Result<()> {
    let index = format!("{}.{}", sql_ident(&target.schema_name), sql_ident(&target.index_name()));
    let ours_invalid: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indexrelid = to_regclass($1) AND NOT indisvalid)",
    )
    .bind(&index)
    .fetch_one(&mut *conn)
    .await?;
    if ours_invalid {
        tracing::warn!(index, "dropping an invalid index left by an interrupted build");
        sqlx::raw_sql(&format!("DROP INDEX CONCURRENTLY IF EXISTS {index}")).execute(&mut *conn).await?;
    }
    tracing::info!(index, reference = %target, "creating the index concurrently (MISSING_INDEX=build)");
    let create = format!(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} ({})",
        sql_ident(&target.index_name()),
        target.table(),
        target.column()
    );
    sqlx::raw_sql(&create).execute(&mut *conn).await.with_context(|| {
        format!("cannot create the index on {target} (only the table's owner may; or run: {})", target.create_index())
    })?;
    Ok(())
}

/// Makes sure the planner has statistics on the column. Without them (a table loaded and not
/// yet analyzed, a database fresh from `pg_restore` or `pg_upgrade`) it guesses that each value
/// matches 0.5 % of the table, and plans every batched rewrite as full scans with hash joins
/// instead of index lookups: measured 18 ms instead of 1.3 ms per batch of ten on 20,000 rows,
/// and worse as the table grows. `ANALYZE` reads a sample of the table and takes no lock that
/// the live service's reads and writes wait for; only the table's owner may run it, so another
/// role gets a warning naming the fix.
pub async fn ensure_statistics(conn: &mut PgConnection, target: &Target) -> anyhow::Result<()> {
    if has_statistics(conn, target).await? {
        return Ok(());
    }
    tracing::info!(reference = %target, "no planner statistics on the column: analyzing it");
    // PostgreSQL before 17 only warns ("skipping ...") when the role does not own the table;
    // 17 refuses (42501). Either way the statistics are looked for again.
    let analyze = format!("ANALYZE {} ({})", target.table(), target.column());
    match sqlx::raw_sql(&analyze).execute(&mut *conn).await {
        Err(err) if err.as_database_error().and_then(|e| e.code()).as_deref() != Some("42501") => {
            return Err(err).with_context(|| format!("cannot analyze {target}"));
        }
        _ => {}
    }
    let empty: bool = sqlx::query_scalar(&format!("SELECT NOT EXISTS (SELECT 1 FROM {})", target.table()))
        .fetch_one(&mut *conn)
        .await?;
    if !empty && !has_statistics(conn, target).await? {
        tracing::warn!(
            reference = %target,
            "no planner statistics and this role may not analyze the table: each batched rewrite may scan the \
             whole table until autovacuum analyzes it; ask its owner to run ANALYZE {}.{}",
            quote_ident(&target.schema_name),
            quote_ident(&target.table_name)
        );
    }
    Ok(())
}

/// Whether `pg_stats` holds statistics on the column (an empty or never analyzed table has none).
pub async fn has_statistics(conn: &mut PgConnection, target: &Target) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stats WHERE schemaname = $1 AND tablename = $2 AND attname = $3)",
    )
    .bind(&target.schema_name)
    .bind(&target.table_name)
    .bind(&target.column_name)
    .fetch_one(conn)
    .await?)
}

/// Whether the column has an index serving lookups by value now.
pub async fn index_valid(conn: &mut PgConnection, target: &Target) -> anyhow::Result<bool> {
    Ok(find_index(conn, target).await?.is_some())
}
