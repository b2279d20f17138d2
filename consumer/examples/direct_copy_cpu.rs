//! The CPU one copy costs the consumer through the SDK and through its direct path
//! (`DIRECT_COPY`, `consumer::direct`), alternating in one process, with nothing else around
//! them: no queue, no database.
//!
//! Seeds N objects of 700 bytes into a fresh bucket, then copies them all with the consumer's
//! conditional copy (`x-amz-copy-source-if-match`, `If-None-Match: *`, `MetadataDirective:
//! COPY`), K at once, four times: SDK, direct, SDK, direct. Prints this process's CPU per
//! copy for each, and how many copies did not succeed. One thread, as the consumer runs.
//!
//! ```text
//! scripts/local-services up --with-seaweedfs && eval "$(scripts/local-services env)"
//! AWS_ENDPOINT_URL=$SEAWEEDFS_ENDPOINT_URL cargo run --release -p consumer --example direct_copy_cpu -- 4000 128
//! ```

use anyhow::Context;
use consumer::copy::conditional::conditional_copy;
use consumer::copy::direct::{Answer, DirectCopy, DirectCounters};
use futures::StreamExt;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().as_deref().unwrap_or("4000").parse().context("N: a number of objects")?;
    let at_once: usize = args.next().as_deref().unwrap_or("128").parse().context("K: copies at once")?;
    common::setup::runtime(1)?.block_on(run(n, at_once))
}

async fn run(n: usize, at_once: usize) -> anyhow::Result<()> {
    let config = common::aws::sdk_config().await?;
    let s3 = common::aws::s3_client(&config, true, std::time::Duration::from_secs(30));
    let (bucket, keys, etags) = testkit::bench::seed_copy_sources(&s3, "direct-copy-cpu", n, at_once).await?;
    let timeout = std::time::Duration::from_secs(30);
    let direct = DirectCopy::new(&config, &bucket, true, timeout, DirectCounters::default())?;
    for (round, how) in ["sdk", "direct", "sdk", "direct"].into_iter().enumerate() {
        let copies = futures::stream::iter(keys.iter().zip(&etags))
            .map(|(key, etag)| {
                let (s3, direct, bucket) = (&s3, &direct, &bucket);
                let destination = format!("{how}-{round}/{key}");
                let copy_source = common::keys::copy_source(bucket, key);
                async move {
                    match how {
                        "sdk" => conditional_copy(s3, bucket, &destination, &copy_source, etag).send().await.is_ok(),
                        _ => direct.copy(&destination, &copy_source, etag, 0).await == Answer::Copied,
                    }
                }
            })
            .buffer_unordered(at_once)
            .filter(|ok| std::future::ready(!ok))
            .count();
        testkit::bench::report_copy_cpu(how, n, at_once, copies).await?;
    }
    Ok(())
}
