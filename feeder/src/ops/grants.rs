//! `feeder grants`: the SQL that gives the migration's role what it needs on each reference
//! (`REFERENCES`), printed for the tables' owner to run with psql.
//!
//! Promises: reads the catalog only (it creates no table, builds no index); connects to the
//! database alone, so that it runs before the rest of the deployment exists; every statement it
//! prints is safe to run again.

use anyhow::Context;
use common::db::references::find;

use crate::settings::{GrantsArgs, Settings};

/// Prints the script; see the module documentation.
pub async fn grants(settings: &Settings, args: &GrantsArgs) -> anyhow::Result<()> {
    let schema = settings.database.schema()?;
    let pool = common::db::connect(settings.database.connect_options()?, 1).await?;
    let mut conn = pool.acquire().await.context("cannot get a database connection")?;
    println!("-- What role {} needs on REFERENCES={}.", common::references::quote_ident(&args.role), schema.references);
    println!("-- Run as the tables' owner, after deploy/database-role.sql: psql \"$ADMIN_URL\" -f this-file.sql");
    println!("\\set ON_ERROR_STOP on");
    for reference in schema.references.iter() {
        let target = find(&mut conn, reference).await?;
        println!();
        println!("-- {target}");
        if target.index.is_none() {
            println!("-- Lookups by value need an index: built online (the table's reads and writes go on).");
            println!("{}", target.create_index().replacen("CONCURRENTLY", "CONCURRENTLY IF NOT EXISTS", 1));
        }
        println!("ANALYZE {};", target.table());
        println!("{}", target.grants(&args.role));
    }
    // The pool closes once its connection is back.
    drop(conn);
    pool.close().await;
    Ok(())
}
