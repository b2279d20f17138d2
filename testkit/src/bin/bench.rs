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
use testkit::cli::BenchArgs;

#[tokio::main]
async fn main() -> ExitCode {
    let args = BenchArgs::parse();
    let config = match args.config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    let measured = async {
        let summaries = testkit::bench::run(&config).await?;
        let rewrites = match args.rewrites {
            0 => None,
            rows => {
                let server = &config.servers[0];
                let consumer = (100, 3);
                let (plain_per_s, _) = testkit::bench::rewrites(server, rows, consumer, false, false).await?;
                let (journal_per_s, bytes) = testkit::bench::rewrites(server, rows, consumer, true, false).await?;
                let (url_per_s, _) = testkit::bench::rewrites(server, rows, consumer, true, true).await?;
                let journal_bytes_per_row = bytes.unwrap_or_default();
                eprintln!(
                    "bench: row rewrites: {rows} rows at {journal_per_s:.0} rows/s with the journal \
                     ({journal_bytes_per_row:.0} bytes a row), {plain_per_s:.0} without, {url_per_s:.0} as CDN URLs"
                );
                Some(testkit::bench::Rewrites { journal_per_s, url_per_s, plain_per_s, journal_bytes_per_row })
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
                     row on disk), {:.0} without, {:.0} with the values as CDN URLs ({})",
                    r.journal_per_s,
                    r.journal_bytes_per_row,
                    r.plain_per_s,
                    r.url_per_s,
                    testkit::bench::URL_FORM
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
