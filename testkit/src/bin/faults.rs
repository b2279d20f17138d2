//! `scripts/faults`: runs the fault matrix (`testkit::faults`) and prints a table per fault,
//! then, as its last line on stdout, one JSON object:
//! `{"objects":N,"faults_injected":F,"lost":L,"violations":V,"overwritten":O,"samples":S,"live_write_max_ms":M}`.
//! Exits 0 when nothing was lost, violated or overwritten and faults were injected.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// Runs one migration under faults on the local services and checks its end state.
#[derive(Parser, Debug)]
#[command(name = "faults")]
struct Args {
    /// Legacy objects seeded.
    #[arg(long, default_value = "5000")]
    objects: usize,
    /// Consumers at the start (three are SIGKILLed during the run; the last not replaced).
    #[arg(long, default_value = "3")]
    consumers: usize,
    /// Seconds SQS is unreachable.
    #[arg(long, default_value = "10")]
    sqs_outage_secs: u64,
    /// Seconds a live transaction holds one row.
    #[arg(long, default_value = "20")]
    row_lock_secs: u64,
    /// `scripts/local-services`, to restart PostgreSQL mid-run; without it, no restart.
    #[arg(long)]
    restart_postgres: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = testkit::faults::Config {
        objects: args.objects,
        consumers: args.consumers,
        sqs_outage: Duration::from_secs(args.sqs_outage_secs),
        row_lock: Duration::from_secs(args.row_lock_secs),
        restart_postgres: args.restart_postgres,
    };
    match testkit::faults::run(&config).await {
        Ok(report) => {
            print!("{}", report.table());
            for problem in &report.problems {
                println!("problem: {problem}");
            }
            println!("{}", report.json());
            if report.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(err) => {
            eprintln!("faults: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
