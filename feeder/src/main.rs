use std::process::ExitCode;

use clap::Parser;
use common::exit::{Failure, SetupResult, report};
use feeder::{Command, Settings};

/// Exit code of `feeder verify` when some rows do not resolve.
const UNRESOLVED: u8 = 3;

#[tokio::main]
async fn main() -> ExitCode {
    if let Err(err) = common::settings::load_dotenv() {
        return report("feeder", Err(Failure::Setup(err)));
    }
    let settings = Settings::parse();
    common::telemetry::init();
    match start(settings).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(UNRESOLVED),
        Err(failure) => report("feeder", Err(failure)),
    }
}

/// Returns false when `verify` found rows that do not resolve.
async fn start(settings: Settings) -> Result<bool, Failure> {
    let shutdown = common::shutdown::on_signals().map_err(anyhow::Error::from).setup()?;
    let clients = feeder::connect(&settings).await?;
    let resolved = match settings.command.clone().unwrap_or(Command::Run) {
        Command::Run => feeder::feed(&settings, &settings.run, &clients, shutdown).await.map(|_| true),
        Command::Status => feeder::operator::status(&settings, &clients).await.map(|_| true),
        Command::Verify(args) => feeder::operator::verify(&settings, &args, &clients).await.map(|v| v.all_resolve()),
        Command::Failures => feeder::operator::failures(&clients).await.map(|_| true),
    }?;
    Ok(resolved)
}
