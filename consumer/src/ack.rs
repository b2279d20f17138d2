//! Acknowledge stage: deletes the messages whose objects are done, ten per
//! `DeleteMessageBatch`.
//!
//! Promises: only messages handed to [`Acker::ack`] are deleted; every entry a batch reports
//! as failed is reported back to its own caller (the message simply comes back later, which
//! is harmless: I5); a call that fails as a whole fails every entry in it.

use std::time::Duration;

use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
use common::aws::{Sqs, describe};

use crate::batch::Batcher;

#[derive(Clone)]
pub struct Acker {
    batcher: Batcher<String, Result<(), String>>,
}

impl Acker {
    pub fn spawn(sqs: Sqs, queue_url: String) -> (Self, tokio::task::JoinHandle<()>) {
        // Ten is the most SQS takes per batch. No lingering: while four calls are in flight the
        // next batch fills up by itself, and a lone message is not held back.
        let (batcher, handle) = Batcher::spawn(10, Duration::ZERO, 4, move |handles: Vec<String>| {
            let sqs = sqs.clone();
            let queue_url = queue_url.clone();
            async move { delete_batch(&sqs, &queue_url, handles).await }
        });
        (Self { batcher }, handle)
    }

    /// Deletes the message with this receipt handle.
    pub async fn ack(&self, receipt_handle: String) -> Result<(), String> {
        self.batcher.submit(receipt_handle).await.unwrap_or_else(|| Err("the acknowledger has stopped".into()))
    }
}

async fn delete_batch(sqs: &Sqs, queue_url: &str, handles: Vec<String>) -> Vec<Result<(), String>> {
    let entries = handles
        .iter()
        .enumerate()
        .map(|(i, h)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(h)
                .build()
                .expect("id and receipt handle are set")
        })
        .collect::<Vec<_>>();
    let out = match sqs.delete_message_batch().queue_url(queue_url).set_entries(Some(entries)).send().await {
        Ok(out) => out,
        Err(err) => {
            let why = format!("DeleteMessageBatch: {}", describe(&err));
            return handles.iter().map(|_| Err(why.clone())).collect();
        }
    };
    let mut results: Vec<Result<(), String>> = handles.iter().map(|_| Ok(())).collect();
    for failed in out.failed() {
        if let Some(slot) = failed.id().parse::<usize>().ok().and_then(|i| results.get_mut(i)) {
            *slot = Err(format!("delete failed: {}: {}", failed.code(), failed.message().unwrap_or_default()));
        }
    }
    results
}
