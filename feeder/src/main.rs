use std::process::ExitCode;

use clap::Parser;
use common::exit::{Failure, SetupResult, report};
use feeder::{Command, Settings, ops};

/// Exit code of `feeder verify` when the migration is not done.
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

/// Returns false when `verify` found the migration not done.
async fn start(settings: Settings) -> Result<bool, Failure> {
    if let Some(Command::Grants(args)) = &settings.command {
        // Before the role has its grants: the database alone, nothing prepared.
        return ops::grants::grants(&settings, args).await.setup().map(|()| true);
    }
    let shutdown = common::shutdown::on_signals().map_err(anyhow::Error::from).setup()?;
    let clients = feeder::connect(&settings).await?;
    let command = settings.command.clone().unwrap_or(Command::Run);
    // The commands that send messages hold the listing's lease while they run, so consumers
    // with an idle exit wait for what they send (common::db::FeederLease).
    let sends = match &command {
        Command::Run => !settings.run.dry_run,
        Command::Reconcile(_) => true,
        Command::Redrive(args) => !args.dry_run,
        _ => false,
    };
    let lease = if sends {
        let mapping = settings.storage.mapping().setup()?;
        Some(common::db::FeederLease::hold(&clients.db, &mapping.source_bucket, mapping.source_prefix.as_str()).await?)
    } else {
        None
    };
    let cx = ops::Ops::new(&settings, &clients, shutdown.clone()).setup()?;
    let done = match command {
        Command::Run => feeder::feed(&settings, &settings.run, &clients, shutdown).await.map(|_| true),
        Command::Status(args) => ops::status::status(&cx, &args).await.map(|_| true),
        Command::Plan(args) => ops::plan::plan(&cx, &args).await.map(|_| true),
        Command::Verify(args) => ops::verify::verify(&cx, &args).await.map(|v| v.is_done()),
        Command::Reconcile(args) => ops::reconcile::reconcile(&cx, &args).await.map(|_| true),
        Command::Failures(args) => ops::failures::failures(&cx, &args).await.map(|_| true),
        Command::Report(args) => ops::report::report(&cx, &args).await.map(|_| true),
        Command::Cleanup(args) => ops::cleanup::cleanup(&cx, &args).await.map(|_| true),
        Command::Redrive(args) => ops::redrive::redrive(&cx, &args).await.map(|_| true),
        Command::Rollback(args) => ops::rollback::rollback(&cx, &args).await.map(|_| true),
        Command::Fence(command) => ops::fence::fence(&cx, &command).await.map(|_| true),
        Command::Pause => ops::control::pause(&cx, true).await.map(|_| true),
        Command::Resume => ops::control::pause(&cx, false).await.map(|_| true),
        Command::Throttle(args) => ops::control::throttle(&cx, &args).await.map(|_| true),
        Command::Grants(args) => ops::grants::grants(&settings, &args).await.map(|()| true),
    };
    if let Some(lease) = lease {
        lease.end().await;
    }
    Ok(done?)
}
