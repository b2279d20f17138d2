//! `feeder failures`: what was set aside, streamed page by page (never every record at once):
//! one per line (reason, subject, occurrences, detail, tab-separated), or CSV, or one JSON
//! object per line; `--reason` keeps one reason. Writes nothing.

use std::io::Write;

use common::db::keyset::Keyset;
use common::db::{FailureRecord, failures_after};

use super::Ops;
use crate::settings::FailuresArgs;

pub async fn failures(cx: &Ops<'_>, args: &FailuresArgs) -> anyhow::Result<u64> {
    let clients = cx.clients;
    let stdout = std::io::stdout();
    let mut csv = args.csv.then(|| csv::Writer::from_writer(stdout.lock()));
    if let Some(out) = &mut csv {
        out.write_record(["reason", "subject", "occurrences", "detail"])?;
    }
    let mut count = 0;
    let mut pages = Keyset::after(None);
    let reason = args.reason.map(common::db::Reason::as_str);
    let failures = |after| failures_after(&clients.db, reason, after, 1000);
    while let Some(page) = pages.next(failures, FailureRecord::position).await? {
        count += page.len() as u64;
        for f in &page {
            let occurrences = f.occurrences.to_string();
            match &mut csv {
                Some(out) => out.write_record([&f.reason, &f.subject, &occurrences, &f.detail])?,
                None if args.json => println!(
                    "{}",
                    serde_json::json!({"reason": f.reason, "subject": f.subject, "occurrences": f.occurrences,
                                       "detail": f.detail})
                ),
                None => println!("{}\t{}\t{}\t{}", f.reason, f.subject, f.occurrences, f.detail),
            }
        }
    }
    if let Some(mut out) = csv {
        out.flush()?;
    }
    std::io::stdout().flush()?;
    eprintln!("{count} set aside");
    Ok(count)
}
