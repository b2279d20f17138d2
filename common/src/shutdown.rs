//! Shutdown as a value: a `CancellationToken` cancelled by SIGTERM (ECS stopping a task) or
//! SIGINT (Ctrl-C). Stages take the token and reach a safe point when it fires.
//!
//! Promises: the first signal asks for a graceful stop; a second one ends the process at once
//! (exit code 128 + the signal's number), which is safe at any line: an unfinished object's
//! message comes back after its visibility timeout (I5), an unfinished page is listed again.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT; the second one exits the process.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let fired = token.clone();
    tokio::spawn(async move {
        let (name, _) = next(&mut term, &mut int).await;
        tracing::info!(signal = name, "shutting down: finishing in-flight work (a second signal stops at once)");
        fired.cancel();
        let (name, number) = next(&mut term, &mut int).await;
        tracing::warn!(signal = name, "second signal: stopping now; unfinished messages come back later");
        eprintln!("stopped by a second {name}: unfinished work comes back to the queue");
        std::process::exit(128 + number);
    });
    Ok(token)
}

async fn next(term: &mut Signal, int: &mut Signal) -> (&'static str, i32) {
    tokio::select! {
        _ = term.recv() => ("SIGTERM", 15),
        _ = int.recv() => ("SIGINT", 2),
    }
}
