use std::process::ExitCode;

use clap::Parser;
use common::exit::{Failure, SetupResult, report};
use consumer::Settings;

#[tokio::main]
async fn main() -> ExitCode {
    if let Err(err) = common::settings::load_dotenv() {
        return report("consumer", Err(Failure::Setup(err)));
    }
    let settings = Settings::parse();
    common::telemetry::init();
    report("consumer", start(settings).await)
}

async fn start(settings: Settings) -> Result<(), Failure> {
    let shutdown = common::shutdown::on_signals().map_err(anyhow::Error::from).setup()?;
    let clients = consumer::connect(&settings).await?;
    consumer::run(settings, clients, shutdown).await.map(|_| ())
}
