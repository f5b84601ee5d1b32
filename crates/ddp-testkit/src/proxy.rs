//! [`TcpProxy`]: a loopback proxy whose connections can be cut at once.

use std::net::SocketAddr;

/// A TCP proxy on loopback in front of a server, whose connections can be cut all at once — a
/// network drop, as the client sees it.
pub struct TcpProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    cuts: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Forwards connections on a new loopback port to `target`.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let cut_rx = cuts.subscribe();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut cut = cut_rx.clone();
                cut.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        TcpProxy { addr, cuts, task }
    }

    /// Drops every connection open through the proxy (new ones are accepted).
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
