//! The CPU one CopyObject costs through the AWS SDK, as the consumer builds its client, with
//! nothing else around it: no queue, no database. The floor under the consumer's own CPU per
//! object (docs/performance.md).
//!
//! Seeds N objects of 700 bytes into a fresh bucket, then copies them all server-side, K at
//! once, twice: plainly, then with the consumer's headers (`x-amz-copy-source-if-match`,
//! `If-None-Match: *`, `MetadataDirective: COPY`). Prints this process's CPU per copy for each.
//! `WORKER_THREADS` picks the runtime as the consumer does (1, the default: one thread).
//!
//! ```text
//! scripts/local-services up --with-seaweedfs && eval "$(scripts/local-services env)"
//! AWS_ENDPOINT_URL=$SEAWEEDFS_ENDPOINT_URL cargo run --release -p testkit --example sdk_copy_cpu -- 6000 32
//! ```

use anyhow::Context;
use aws_sdk_s3::types::MetadataDirective;
use futures::StreamExt;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().as_deref().unwrap_or("6000").parse().context("N: a number of objects")?;
    let at_once: usize = args.next().as_deref().unwrap_or("32").parse().context("K: copies at once")?;
    let threads = std::env::var("WORKER_THREADS").ok().map(|v| v.parse()).transpose()?.unwrap_or(1);
    common::setup::runtime(threads)?.block_on(run(n, at_once))
}

async fn run(n: usize, at_once: usize) -> anyhow::Result<()> {
    let s3 = common::aws::s3_client(&common::aws::sdk_config().await?, true, std::time::Duration::from_secs(30));
    let (bucket, keys, etags) = testkit::bench::seed_copy_sources(&s3, "sdk-copy-cpu", n, at_once).await?;
    for (headers, under) in [("plain", "plain"), ("consumer's headers", "conditional")] {
        let copies = futures::stream::iter(keys.iter().zip(&etags))
            .map(|(key, etag)| {
                let mut copy = s3
                    .copy_object()
                    .bucket(&bucket)
                    .key(format!("{under}/{key}"))
                    .copy_source(format!("{bucket}/{key}"));
                if under == "conditional" {
                    copy =
                        copy.copy_source_if_match(etag).if_none_match("*").metadata_directive(MetadataDirective::Copy);
                }
                copy.send()
            })
            .buffer_unordered(at_once)
            .filter(|sent| std::future::ready(sent.is_err()))
            .count();
        testkit::bench::report_copy_cpu(headers, n, at_once, copies).await?;
    }
    Ok(())
}
