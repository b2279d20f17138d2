use std::process::ExitCode;

use clap::Parser;
use common::exit::{Failure, SetupResult, report};
use consumer::Settings;

fn main() -> ExitCode {
    if let Err(err) = common::settings::load_dotenv() {
        return report("consumer", Err(Failure::Setup(err)));
    }
    let settings = Settings::parse();
    match common::setup::runtime(settings.worker_threads.into()) {
        Ok(runtime) => runtime.block_on(consume(settings)),
        Err(err) => {
            report("consumer", Err(Failure::Setup(anyhow::Error::from(err).context("starting the async runtime"))))
        }
    }
}

async fn consume(settings: Settings) -> ExitCode {
    if settings.health_check {
        let Some(addr) = settings.metrics_addr else {
            eprintln!("consumer --health-check: METRICS_ADDR is not set: there is no endpoint to ask");
            return ExitCode::FAILURE;
        };
        return match consumer::metrics::probe(addr).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("consumer --health-check: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    common::telemetry::init();
    report("consumer", start(settings).await)
}

async fn start(settings: Settings) -> Result<(), Failure> {
    let shutdown = common::shutdown::on_signals().map_err(anyhow::Error::from).setup()?;
    let clients = consumer::connect(&settings).await?;
    consumer::run(settings, clients, shutdown).await.map(|_| ())
}
