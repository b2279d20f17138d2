//! `feeder report`: what was moved and what was set aside, from the rewrite journal and the
//! failure records. Writes nothing. `--csv` streams every record (journal pages, then the
//! failures), so it works at 300 M rows; the default and `--json` print totals.

use std::io::Write;

use common::db::keyset::Keyset;
use common::db::{FailureRecord, failures_after};

use super::Ops;
use crate::settings::ReportArgs;
use crate::store::journal::{EARLIER_REFERENCE, journal_page};
use common::setup::Clients;

use super::ROWS_PAGE;

/// Totals of the report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub rows_rewritten: i64,
    pub rows_rolled_back: i64,
    pub first_rewrite: Option<String>,
    pub last_rewrite: Option<String>,
    /// Rows rewritten and rolled back, by reference (`schema.table.column`).
    pub by_reference: Vec<(String, i64, i64)>,
    pub set_aside: Vec<(String, i64)>,
}

impl Report {
    pub fn json(&self) -> String {
        let set_aside: serde_json::Map<String, serde_json::Value> =
            self.set_aside.iter().map(|(r, n)| (r.clone(), (*n).into())).collect();
        let by_reference: serde_json::Map<String, serde_json::Value> = self
            .by_reference
            .iter()
            .map(|(r, rewritten, rolled_back)| {
                (r.clone(), serde_json::json!({"rows_rewritten": rewritten, "rows_rolled_back": rolled_back}))
            })
            .collect();
        serde_json::json!({
            "rows_rewritten": self.rows_rewritten,
            "by_reference": by_reference,
            "rows_rolled_back": self.rows_rolled_back,
            "first_rewrite": self.first_rewrite,
            "last_rewrite": self.last_rewrite,
            "set_aside": set_aside,
        })
        .to_string()
    }
}

pub async fn report(cx: &Ops<'_>, args: &ReportArgs) -> anyhow::Result<Report> {
    let clients = cx.clients;
    if args.csv {
        csv(clients).await?;
    }
    let totals = crate::store::journal::journal_totals(&clients.db).await?;
    let by_reference = crate::store::journal::journal_by_reference(&clients.db).await?;
    let by_reference = by_reference
        .into_iter()
        .map(|(r, rewritten, rolled_back)| (r.unwrap_or_else(|| EARLIER_REFERENCE.into()), rewritten, rolled_back))
        .collect();
    let report = Report {
        by_reference,
        rows_rewritten: totals.rewrites,
        rows_rolled_back: totals.rolled_back,
        first_rewrite: totals.first,
        last_rewrite: totals.last,
        set_aside: common::db::failure_counts(&clients.db).await?,
    };
    if !args.csv {
        println!(
            "report: {} rows rewritten (journal) between {} and {}, {} of them rolled back",
            report.rows_rewritten,
            report.first_rewrite.as_deref().unwrap_or("-"),
            report.last_rewrite.as_deref().unwrap_or("-"),
            report.rows_rolled_back
        );
        if report.by_reference.len() > 1 {
            for (reference, rewritten, rolled_back) in &report.by_reference {
                println!("report: {reference}: {rewritten} rows rewritten, {rolled_back} of them rolled back");
            }
        }
        for (reason, n) in &report.set_aside {
            println!("report: set aside: {n} {reason} (feeder failures)");
        }
        if args.json {
            println!("{}", report.json());
        }
    }
    Ok(report)
}

/// Every journal entry, then every failure, as CSV on stdout.
async fn csv(clients: &Clients) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = csv::Writer::from_writer(stdout.lock());
    out.write_record(["kind", "row_id", "old_path", "new_path", "at", "reason", "detail", "reference"])?;
    let mut pages = Keyset::after(0);
    let journal = |after| journal_page(&clients.db, after, ROWS_PAGE, false);
    while let Some(page) = pages.next(journal, |e| e.journal_id).await? {
        for e in &page {
            let kind = if e.rolled_back { "rolled_back" } else { "moved" };
            out.write_record([kind, &e.row_id, &e.old_path, &e.new_path, &e.rewritten_at, "", "", e.reference()])?;
        }
    }
    let mut pages = Keyset::after(None);
    let failures = |after| failures_after(&clients.db, None, after, ROWS_PAGE);
    while let Some(page) = pages.next(failures, FailureRecord::position).await? {
        for f in &page {
            out.write_record(["set_aside", "", &f.subject, "", "", &f.reason, &f.detail, ""])?;
        }
    }
    out.flush()?;
    std::io::stdout().flush()?;
    Ok(())
}
