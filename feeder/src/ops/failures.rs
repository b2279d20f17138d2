//! `feeder failures`: prints what was set aside, one per line: reason, subject, occurrences,
//! detail. Writes nothing.

use crate::Clients;

pub async fn failures(clients: &Clients) -> anyhow::Result<()> {
    let all = common::db::list_failures(&clients.db).await?;
    for f in &all {
        println!("{}\t{}\t{}\t{}", f.reason, f.subject, f.occurrences, f.detail);
    }
    eprintln!("{} set aside", all.len());
    Ok(())
}
