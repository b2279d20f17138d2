//! How a binary ends: a setup failure (bad setting, unreachable service, missing bucket or
//! queue) is one line on stderr and exit code 2 before anything was done; a failure during the
//! work is exit code 1; both print the whole cause chain. A run that ended with nothing left
//! to do here but work left elsewhere (a consumer's idle exit while the listing is unfinished
//! and no feeder runs) is exit code 3: never 0 with work left behind.

use std::process::ExitCode;

/// Exit code for a problem the operator must fix before anything can run.
pub const SETUP: u8 = 2;
/// Exit code for a failure during the work (what was done is safe to run again).
pub const RUN: u8 = 1;
/// Exit code for a run that did all it could, with work left that another command must start.
pub const UNFINISHED: u8 = 3;

#[derive(Debug)]
pub enum Failure {
    Setup(anyhow::Error),
    Run(anyhow::Error),
    /// Nothing failed, but the job is not done: what to run next.
    Unfinished(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Failure::Run(err)
    }
}

/// Marks an error as a setup failure (exit code 2).
pub trait SetupResult<T> {
    fn setup(self) -> Result<T, Failure>;
}

impl<T> SetupResult<T> for anyhow::Result<T> {
    fn setup(self) -> Result<T, Failure> {
        self.map_err(Failure::Setup)
    }
}

/// Prints the failure, if any, with its cause chain and turns it into the exit code.
pub fn report(program: &str, result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Setup(err)) => {
            eprintln!("{program}: error: {err:#}");
            ExitCode::from(SETUP)
        }
        Err(Failure::Run(err)) => {
            tracing::error!(error = format!("{err:#}"), "{program} failed");
            eprintln!("{program}: error: {err:#}");
            ExitCode::from(RUN)
        }
        Err(Failure::Unfinished(err)) => {
            tracing::warn!(error = format!("{err:#}"), "{program}: work left");
            eprintln!("{program}: work left: {err:#}");
            ExitCode::from(UNFINISHED)
        }
    }
}
