//! `feeder pause`, `resume` and `throttle`: the operator's hand on a running fleet, through the
//! control row every consumer reads within seconds (`common::control`).
//!
//! Promises: each command writes only the control row, says what it set and what the fleet
//! reports (consumers reporting, paused or not), and is idempotent.

use super::Ops;
use crate::settings::ThrottleArgs;

/// Pauses (or resumes) the fleet.
pub async fn pause(cx: &Ops<'_>, paused: bool) -> anyhow::Result<()> {
    let clients = cx.clients;
    common::control::set_paused(&clients.db, paused).await?;
    let fleet = common::control::fleet(&clients.db).await?;
    println!(
        "{}; {} consumers reporting; they follow within {} s",
        if paused {
            "paused: consumers take no more messages (objects in flight finish)"
        } else {
            "resumed: consumers take messages again"
        },
        fleet.len(),
        common::control::EVERY.as_secs()
    );
    Ok(())
}

/// Sets or lifts the fleet's cap.
pub async fn throttle(cx: &Ops<'_>, args: &ThrottleArgs) -> anyhow::Result<()> {
    let clients = cx.clients;
    let cap = if args.clear { None } else { args.rate };
    common::control::set_cap(&clients.db, cap).await?;
    let fleet = common::control::fleet(&clients.db).await?;
    match cap {
        Some(rate) => println!(
            "capped: at most {rate} copies a second for the fleet; {} consumers reporting share it",
            fleet.len()
        ),
        None => println!("cap lifted: each consumer goes as fast as S3 lets it; {} consumers reporting", fleet.len()),
    }
    Ok(())
}
