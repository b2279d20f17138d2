//! A TCP forwarder in front of a real server (PostgreSQL): every connection is passed through
//! byte for byte, and while it is "down" every connection, open or new, is closed at once, as
//! a restarting or failing-over server does. A test tool, not a fake: whatever it forwards is
//! served by the real server.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running forwarder; it stops when dropped.
pub struct TcpForward {
    /// Its loopback port.
    pub port: u16,
    down: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpForward {
    /// Starts a forwarder on a free loopback port in front of `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> std::io::Result<TcpForward> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let down = Arc::new(watch::channel(false).0);
        let (upstream, serving) = (upstream.to_owned(), down.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *serving.borrow() {
                    drop(client); // closed unanswered
                    continue;
                }
                let (upstream, mut down) = (upstream.clone(), serving.subscribe());
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else { return };
                    let mut client = client;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = down.wait_for(|d| *d) => {} // both ends dropped: closed mid-conversation
                    }
                });
            }
        });
        Ok(TcpForward { port, down, task })
    }

    /// While down, open connections are closed and new ones are closed on arrival.
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }
}

impl Drop for TcpForward {
    fn drop(&mut self) {
        self.task.abort();
        self.down.send_replace(true);
    }
}
