//! The command lines of `scripts/bench` and `scripts/faults` (their binaries parse them; the
//! docs' test parses every such command the docs show), and what each becomes.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::bench::{Config, Server, Throttle};

/// Measures the migration side by side with copy-only tools on the local services.
#[derive(Parser, Debug)]
#[command(name = "bench")]
pub struct BenchArgs {
    /// Objects seeded (each with a row, for the pipeline).
    #[arg(long, default_value = "20000")]
    pub objects: usize,
    /// Timed repetitions per tool; a further counting one (through a proxy) comes first.
    #[arg(long, default_value = "3")]
    pub reps: usize,
    /// Skip the counting repetition (requests per object are then not reported): for long
    /// runs, such as 1,000,000 objects for the peak RSS.
    #[arg(long)]
    pub no_counting: bool,
    /// Consumer processes.
    #[arg(long, default_value = "2")]
    pub consumers: usize,
    /// Objects in flight per consumer (`CONCURRENCY`); unset: the consumer's default.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// A further setting for the pipeline's processes (repeatable), e.g. `DESTINATION_CHECK=before-copy`.
    #[arg(long = "set", value_name = "VAR=VALUE")]
    pub set: Vec<String>,
    /// A server: `name,s3-url,sqs-url,pgid[,pgid...]` (the process groups whose CPU is the server's).
    #[arg(long = "server", required = true)]
    pub servers: Vec<String>,
    /// Tools, in the order run: `pipeline` (also `pipeline+VAR=VALUE+…` for a variant with
    /// further settings), `rclone-nocheck`, `rclone`, `s5cmd`.
    #[arg(long, value_delimiter = ',', default_value = "pipeline,rclone-nocheck,rclone,s5cmd")]
    pub tools: Vec<String>,
    /// Rows for the row-rewrite measurement (the consumer's statement alone, batches of 100,
    /// three at once); 0: skip it.
    #[arg(long, default_value = "200000")]
    pub rewrites: usize,
    /// S3's limit, played by a proxy in front of the server: PUTs (copies) above this many a
    /// second are refused with 503 SlowDown (a token bucket holding a tenth of a second's
    /// worth). Adds, per tool, the copies let through per second over the limit, the share of
    /// PUTs refused and (with --double-after) how long until it carried the doubled limit.
    #[arg(long, value_name = "PER_SECOND")]
    pub throttle: Option<f64>,
    /// With --throttle: the limit doubles this many seconds after each run starts.
    #[arg(long, value_name = "SECONDS", requires = "throttle")]
    pub double_after: Option<f64>,
    #[arg(long, default_value = "rclone")]
    pub rclone: String,
    #[arg(long, default_value = "s5cmd")]
    pub s5cmd: String,
}

impl BenchArgs {
    /// The benchmark's configuration; a clear error for a malformed `--server` or `--set`.
    pub fn config(&self) -> anyhow::Result<Config> {
        let servers = self.servers.iter().map(|s| parse_server(s)).collect::<anyhow::Result<Vec<_>>>()?;
        let pipeline_env = self
            .set
            .iter()
            .map(|pair| {
                let (k, v) =
                    pair.split_once('=').ok_or_else(|| anyhow::anyhow!("--set {pair:?}: expected VAR=VALUE"))?;
                Ok((k.to_owned(), v.to_owned()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Config {
            objects: self.objects,
            reps: self.reps.max(1),
            counting: !self.no_counting,
            consumers: self.consumers,
            concurrency: self.concurrency,
            pipeline_env,
            servers,
            tools: self.tools.clone(),
            rclone: self.rclone.clone(),
            s5cmd: self.s5cmd.clone(),
            throttle: self.throttle.map(|per_second| Throttle {
                per_second,
                double_after: self.double_after.map(Duration::from_secs_f64),
            }),
        })
    }
}

fn parse_server(s: &str) -> anyhow::Result<Server> {
    let parts: Vec<&str> = s.split(',').collect();
    anyhow::ensure!(parts.len() >= 3, "--server {s:?}: expected name,s3-url,sqs-url[,pgid...]");
    let groups = parts[3..]
        .iter()
        .map(|g| g.parse::<i32>().map_err(|_| anyhow::anyhow!("--server {s:?}: {g:?} is not a process group id")))
        .collect::<anyhow::Result<_>>()?;
    Ok(Server { name: parts[0].into(), s3: parts[1].into(), sqs: parts[2].into(), groups })
}

/// Runs one migration under faults on the local services and checks its end state.
#[derive(Parser, Debug)]
#[command(name = "faults")]
pub struct FaultsArgs {
    /// Legacy objects seeded.
    #[arg(long, default_value = "5000")]
    pub objects: usize,
    /// Consumers at the start (three are SIGKILLed during the run; the last not replaced).
    #[arg(long, default_value = "3")]
    pub consumers: usize,
    /// Seconds SQS is unreachable.
    #[arg(long, default_value = "10")]
    pub sqs_outage_secs: u64,
    /// Seconds a live transaction holds one row.
    #[arg(long, default_value = "20")]
    pub row_lock_secs: u64,
    /// `scripts/local-services`, to restart PostgreSQL mid-run; without it, no restart.
    #[arg(long)]
    pub restart_postgres: Option<PathBuf>,
}

impl FaultsArgs {
    pub fn config(&self) -> crate::faults::Config {
        crate::faults::Config {
            objects: self.objects,
            consumers: self.consumers,
            sqs_outage: Duration::from_secs(self.sqs_outage_secs),
            row_lock: Duration::from_secs(self.row_lock_secs),
            restart_postgres: self.restart_postgres.clone(),
        }
    }
}
