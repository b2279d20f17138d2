//! `feeder fence install|remove|status`: the fence that keeps deletes safe while the live
//! service writes the references (`REFERENCES`; see `common::db::fence`): one trigger per
//! referencing column.
//!
//! Promises: install and remove are idempotent and say what they changed; remove warns when
//! legacy objects were deleted (a legacy path written from then on names nothing); status
//! changes nothing.

use anyhow::Context;
use common::db::fence::{self, Mode, Removed};

use super::Ops;
use crate::settings::FenceCommand;

pub async fn fence(cx: &Ops<'_>, command: &FenceCommand) -> anyhow::Result<()> {
    let Ops { clients, mapping, .. } = cx;
    let targets = &clients.targets;
    let on: Vec<String> = targets.iter().map(|t| t.label()).collect();
    let on = on.join(", ");
    match command {
        FenceCommand::Install { mode } => {
            let changed = fence::install(&clients.db, targets, mapping, *mode).await?;
            let what = match mode {
                Mode::Rewrite => {
                    "a row written naming a legacy object being or already deleted is written naming \
                                  its copy instead"
                }
                Mode::Reject => {
                    "a row written naming a legacy object being or already deleted is refused \
                                 (SQLSTATE 23514)"
                }
            };
            let verb = if changed { "installed" } else { "already installed" };
            println!("fence: {verb} on {on}, mode {}: {what}", mode.as_str());
        }
        FenceCommand::Remove => {
            let status = fence::status(&clients.db, targets).await.context("reading the fence's state")?;
            match fence::remove(&clients.db, targets).await? {
                Removed::Dropped => println!("fence: removed from {on}"),
                Removed::NotInstalled => println!("fence: not installed; nothing to remove"),
                Removed::TurnedOff => {
                    let drops: Vec<String> =
                        targets.iter().map(|t| format!("DROP TRIGGER {} ON {};", t.fence_name(), t.table())).collect();
                    println!(
                        "fence: off (it protects nothing now); its triggers stay, doing nothing, since only a table's \
                         owner may drop them: {}",
                        drops.join(" ")
                    )
                }
            }
            if status.deleted + status.pending > 0 {
                println!(
                    "fence: warning: {} legacy objects were deleted (or are being deleted): a row written naming one \
                     of them from now on names nothing",
                    status.deleted + status.pending
                );
            }
        }
        FenceCommand::Status { json } => {
            let status = fence::status(&clients.db, targets).await.context("reading the fence's state")?;
            let installed = match (status.mode, status.disabled) {
                (None, _) => "not installed".to_owned(),
                (Some(mode), false) => format!("installed, mode {}", mode.as_str()),
                (Some(mode), true) => format!("installed but DISABLED (protects nothing), mode {}", mode.as_str()),
            };
            println!(
                "fence: {installed}; tombstones: {} deleted, {} being deleted; writes rewritten to the copy: {}",
                status.deleted, status.pending, status.rewrites
            );
            if *json {
                println!(
                    "{}",
                    serde_json::json!({
                        "installed": status.mode.is_some(),
                        "mode": status.mode.map(Mode::as_str),
                        "enabled": status.mode.is_some() && !status.disabled,
                        "tombstones_pending": status.pending,
                        "tombstones_deleted": status.deleted,
                        "writes_rewritten": status.rewrites,
                    })
                );
            }
        }
    }
    Ok(())
}
