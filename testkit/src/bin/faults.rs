//! `scripts/faults`: runs the fault matrix (`testkit::faults`) and prints a table per fault,
//! then, as its last line on stdout, one JSON object:
//! `{"objects":N,"faults_injected":F,"lost":L,"violations":V,"overwritten":O,"samples":S,"live_write_max_ms":M}`.
//! Exits 0 when nothing was lost, violated or overwritten and faults were injected.

use std::process::ExitCode;

use clap::Parser;
use testkit::cli::FaultsArgs;

#[tokio::main]
async fn main() -> ExitCode {
    let args = FaultsArgs::parse();
    let config = args.config();
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
