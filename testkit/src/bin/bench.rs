//! `scripts/bench`: our pipeline against rclone and s5cmd on the same servers, the same objects,
//! in the same run (`testkit::bench`). Prints a table, then, as its last line on stdout, one
//! JSON object: `{"objects":N,"s3_server":"…","pipeline_objects_per_s":X,"best_peer":"…",
//! "best_peer_objects_per_s":Y,"ratio":X/Y,"cpu_s_per_10k":A,"peer_cpu_s_per_10k":B,
//! "peak_rss_mib":M,"requests_per_object":R,…}` about the server that enforces conditional
//! copies (SeaweedFS) when it ran, then every measure: `"servers":{"<server>":{"<tool>":{…}}}`,
//! `"ratios":{"<server>_<pipeline variant>_vs_<peer>":…}` (our objects/s over the peer's), and
//! row rewrites per second through the consumer's statement with and without the journal
//! (`rewrites_per_s`, `rewrites_without_journal_per_s`, `journal_bytes_per_row`).

use std::process::ExitCode;

use clap::Parser;
use testkit::bench::{Config, Server};

/// Measures the migration side by side with copy-only tools on the local services.
#[derive(Parser, Debug)]
#[command(name = "bench")]
struct Args {
    /// Objects seeded (each with a row, for the pipeline).
    #[arg(long, default_value = "20000")]
    objects: usize,
    /// Timed repetitions per tool; a further counting one (through a proxy) comes first.
    #[arg(long, default_value = "3")]
    reps: usize,
    /// Skip the counting repetition (requests per object are then not reported): for long
    /// runs, such as 1,000,000 objects for the peak RSS.
    #[arg(long)]
    no_counting: bool,
    /// Consumer processes.
    #[arg(long, default_value = "2")]
    consumers: usize,
    /// Objects in flight per consumer (`CONCURRENCY`); unset: the consumer's default.
    #[arg(long)]
    concurrency: Option<usize>,
    /// A further setting for the pipeline's processes (repeatable), e.g. `DESTINATION_CHECK=before-copy`.
    #[arg(long = "set", value_name = "VAR=VALUE")]
    set: Vec<String>,
    /// A server: `name,s3-url,sqs-url,pgid[,pgid...]` (the process groups whose CPU is the server's).
    #[arg(long = "server", required = true)]
    servers: Vec<String>,
    /// Tools, in the order run: `pipeline` (also `pipeline+VAR=VALUE+…` for a variant with
    /// further settings), `rclone-nocheck`, `rclone`, `s5cmd`.
    #[arg(long, value_delimiter = ',', default_value = "pipeline,rclone-nocheck,rclone,s5cmd")]
    tools: Vec<String>,
    /// Rows for the row-rewrite measurement (the consumer's statement alone, batches of 100,
    /// three at once); 0: skip it.
    #[arg(long, default_value = "200000")]
    rewrites: usize,
    /// S3's limit, played by a proxy in front of the server: PUTs (copies) above this many a
    /// second are refused with 503 SlowDown (a token bucket holding a tenth of a second's
    /// worth). Adds, per tool, the copies let through per second over the limit, the share of
    /// PUTs refused and (with --double-after) how long until it carried the doubled limit.
    #[arg(long, value_name = "PER_SECOND")]
    throttle: Option<f64>,
    /// With --throttle: the limit doubles this many seconds after each run starts.
    #[arg(long, value_name = "SECONDS", requires = "throttle")]
    double_after: Option<f64>,
    #[arg(long, default_value = "rclone")]
    rclone: String,
    #[arg(long, default_value = "s5cmd")]
    s5cmd: String,
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

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let servers = match args.servers.iter().map(|s| parse_server(s)).collect::<Result<Vec<_>, _>>() {
        Ok(servers) => servers,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    let mut pipeline_env = Vec::new();
    for pair in &args.set {
        match pair.split_once('=') {
            Some((k, v)) => pipeline_env.push((k.to_owned(), v.to_owned())),
            None => {
                eprintln!("bench: --set {pair:?}: expected VAR=VALUE");
                return ExitCode::from(2);
            }
        }
    }
    let config = Config {
        objects: args.objects,
        reps: args.reps.max(1),
        counting: !args.no_counting,
        consumers: args.consumers,
        concurrency: args.concurrency,
        pipeline_env,
        servers,
        tools: args.tools,
        rclone: args.rclone,
        s5cmd: args.s5cmd,
        throttle: args.throttle.map(|per_second| testkit::bench::Throttle {
            per_second,
            double_after: args.double_after.map(std::time::Duration::from_secs_f64),
        }),
    };
    let measured = async {
        let summaries = testkit::bench::run(&config).await?;
        let rewrites = match args.rewrites {
            0 => None,
            rows => {
                let server = &config.servers[0];
                let (plain_per_s, _) = testkit::bench::rewrites(server, rows, 100, 3, false).await?;
                let (journal_per_s, bytes) = testkit::bench::rewrites(server, rows, 100, 3, true).await?;
                let journal_bytes_per_row = bytes.unwrap_or_default();
                eprintln!(
                    "bench: row rewrites: {rows} rows at {journal_per_s:.0} rows/s with the journal \
                     ({journal_bytes_per_row:.0} bytes a row), {plain_per_s:.0} without"
                );
                Some(testkit::bench::Rewrites { journal_per_s, plain_per_s, journal_bytes_per_row })
            }
        };
        anyhow::Ok((summaries, rewrites))
    };
    match measured.await {
        Ok((summaries, rewrites)) => {
            print!("{}", testkit::bench::table(&summaries));
            if let Some(r) = rewrites {
                println!(
                    "row rewrites (batches of 100, three at once): {:.0} rows/s with the journal ({:.0} bytes a \
                     row on disk), {:.0} without",
                    r.journal_per_s, r.journal_bytes_per_row, r.plain_per_s
                );
            }
            println!("{}", testkit::bench::json(&config, &summaries, rewrites));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
