//! WebSocket clients: [`WsClient`] (tokio-tungstenite) for sync sessions and event streams, and
//! [`Recorded`], which keeps what a session receives in the background.

use std::net::SocketAddr;

use serde_json::Value;
use tokio::task::JoinHandle;

use crate::server::TestServer;

/// A WebSocket sync session opened with a real client (tokio-tungstenite).
pub struct WsClient {
    stream: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
}

/// What the server did when a WebSocket upgrade was attempted.
pub enum WsOpen {
    /// The session is open.
    Open(Box<WsClient>),
    /// The server answered with an HTTP error instead: status and JSON body.
    Refused(u16, Value),
}

impl TestServer {
    /// Opens `/devices/{device}/kv` as a WebSocket with `token` in the Authorization header and
    /// `query` appended (e.g. `"?sinceRev=3"`).
    pub async fn ws(&self, device: u64, token: &str, query: &str) -> WsOpen {
        self.ws_request(device, Some(token), query).await
    }

    /// Like [`TestServer::ws`], with the token only where `query` puts it (or nowhere).
    pub async fn ws_request(&self, device: u64, token: Option<&str>, query: &str) -> WsOpen {
        self.ws_path(&format!("/devices/{device}/kv{query}"), token).await
    }

    /// Opens `GET /events/websocket{query}` with `token` (none when `None`).
    pub async fn events(&self, token: Option<&str>, query: &str) -> WsOpen {
        self.ws_path(&format!("/events/websocket{query}"), token).await
    }

    /// Opens an event stream that must succeed.
    pub async fn events_open(&self, token: &str, query: &str) -> WsClient {
        match self.events(Some(token), query).await {
            WsOpen::Open(c) => *c,
            WsOpen::Refused(status, body) => panic!("event stream refused with {status}: {body}"),
        }
    }

    /// Opens a WebSocket on `path` with `token` in the Authorization header.
    pub async fn ws_path(&self, path: &str, token: Option<&str>) -> WsOpen {
        ws_connect(self.addr, path, token).await
    }

    /// Opens a session that must succeed.
    pub async fn ws_open(&self, device: u64, token: &str, query: &str) -> WsClient {
        match self.ws(device, token, query).await {
            WsOpen::Open(c) => *c,
            WsOpen::Refused(status, body) => panic!("websocket refused with {status}: {body}"),
        }
    }
}

/// Opens a WebSocket on `ws://{addr}{path}` with `token` in the Authorization header.
pub async fn ws_connect(addr: SocketAddr, path: &str, token: Option<&str>) -> WsOpen {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("ws://{addr}{path}");
    let mut request = url.into_client_request().expect("request");
    if let Some(t) = token {
        request.headers_mut().insert("Authorization", format!("ModeCloud {t}").parse().expect("header"));
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((stream, _)) => WsOpen::Open(Box::new(WsClient { stream })),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body =
                resp.body().as_ref().map(|b| serde_json::from_slice(b).unwrap_or(Value::Null)).unwrap_or(Value::Null);
            WsOpen::Refused(status, body)
        }
        Err(e) => panic!("websocket connect failed: {e}"),
    }
}

/// A TLS client configuration that trusts only `ca_pem` (a test server's self-signed certificate).
pub fn tls_client_config(ca_pem: &str) -> std::sync::Arc<tokio_rustls::rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("a PEM certificate")).expect("a usable root");
    }
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    std::sync::Arc::new(config)
}

/// Opens `wss://{host}:{port}{path}` (connecting to `addr`), trusting only `ca_pem`, with
/// `token` in the Authorization header.
pub async fn wss_connect(addr: SocketAddr, host: &str, path: &str, token: Option<&str>, ca_pem: &str) -> WsOpen {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("wss://{host}:{}{path}", addr.port());
    let mut request = url.into_client_request().expect("request");
    if let Some(t) = token {
        request.headers_mut().insert("Authorization", format!("ModeCloud {t}").parse().expect("header"));
    }
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let connector = tokio_tungstenite::Connector::Rustls(tls_client_config(ca_pem));
    match tokio_tungstenite::client_async_tls_with_config(request, tcp, None, Some(connector)).await {
        Ok((stream, _)) => WsOpen::Open(Box::new(WsClient { stream })),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body =
                resp.body().as_ref().map(|b| serde_json::from_slice(b).unwrap_or(Value::Null)).unwrap_or(Value::Null);
            WsOpen::Refused(status, body)
        }
        Err(e) => panic!("wss connect failed: {e}"),
    }
}

/// Every JSON message a session received, recorded by a background task (stopped when dropped).
pub struct Recorded {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    ended: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl Recorded {
    pub(crate) fn start<F>(run: impl FnOnce(Box<dyn Fn(Value) + Send>) -> F) -> Recorded
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (into, done) = (seen.clone(), ended.clone());
        let push = Box::new(move |v: Value| into.lock().expect("recorder").push(v));
        let fut = run(push);
        let task = tokio::spawn(async move {
            fut.await;
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        Recorded { seen, ended, task }
    }

    /// The messages so far, in arrival order.
    pub fn messages(&self) -> Vec<Value> {
        self.seen.lock().expect("recorder").clone()
    }

    /// Whether the session has ended.
    pub fn ended(&self) -> bool {
        self.ended.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a session ended, from the client's side.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEnd {
    /// A close frame with this code.
    Closed(u16),
    /// The connection ended without a close frame.
    Dropped,
}

impl WsClient {
    /// The next JSON text message (pings and pongs are skipped); panics after 10 s or on close.
    pub async fn next_json(&mut self) -> Value {
        match self.next_json_within(std::time::Duration::from_secs(10)).await {
            Ok(v) => v,
            Err(end) => panic!("session ended while a message was expected: {end:?}"),
        }
    }

    /// The next text message exactly as sent (pings and pongs are skipped).
    pub async fn next_text(&mut self) -> String {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let msg = tokio::time::timeout(std::time::Duration::from_secs(10), self.stream.next())
                .await
                .expect("a message in time");
            match msg {
                Some(Ok(Message::Text(t))) => return t.as_str().to_owned(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// The next JSON text message within `wait`, or how the session ended. Times out with a panic.
    pub async fn next_json_within(&mut self, wait: std::time::Duration) -> Result<Value, WsEnd> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.stream.next()).await.expect("a message in time");
            match msg {
                Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(t.as_str()).expect("JSON text frame")),
                Some(Ok(Message::Close(frame))) => return Err(WsEnd::Closed(frame.map_or(1005, |f| f.code.into()))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(WsEnd::Dropped),
            }
        }
    }

    /// Whether a message arrives within `wait` (for asserting that nothing more comes).
    pub async fn quiet_for(&mut self, wait: std::time::Duration) -> bool {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return true,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(_) => return false,
            }
        }
    }

    /// Waits for the end of the session and tells how it ended.
    pub async fn end(&mut self) -> WsEnd {
        loop {
            match self.next_json_within(std::time::Duration::from_secs(10)).await {
                Ok(_) => continue,
                Err(end) => return end,
            }
        }
    }

    /// Records every JSON message from now on in the background.
    pub fn record(self) -> Recorded {
        use futures_util::StreamExt;
        let mut stream = self.stream;
        Recorded::start(|push| async move {
            while let Some(Ok(message)) = stream.next().await {
                if let tokio_tungstenite::tungstenite::Message::Text(t) = message
                    && let Ok(v) = serde_json::from_str(t.as_str())
                {
                    push(v);
                }
            }
        })
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        use futures_util::SinkExt;
        self.stream.send(tokio_tungstenite::tungstenite::Message::text(text)).await.expect("send");
    }

    /// Sends a JSON message.
    pub async fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string()).await;
    }

    /// Closes the session from the client side.
    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}

/// The sending half of a [`WsClient`] whose receiving half is drained by a task.
pub struct WsWriter {
    sink: futures_util::stream::SplitSink<
        tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
        tokio_tungstenite::tungstenite::Message,
    >,
}

impl WsWriter {
    /// Sends a JSON message.
    pub async fn send_json(&mut self, value: &Value) {
        use futures_util::SinkExt;
        self.sink.send(tokio_tungstenite::tungstenite::Message::text(value.to_string())).await.expect("send");
    }
}

impl WsClient {
    /// Splits the session: the receiving half is read (and its JSON messages kept) by a task until
    /// the session ends, as a device that always reads its socket would.
    pub fn drained(self) -> (WsWriter, tokio::task::JoinHandle<Vec<Value>>) {
        use futures_util::StreamExt;
        let (sink, mut stream) = self.stream.split();
        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(Ok(message)) = stream.next().await {
                if let tokio_tungstenite::tungstenite::Message::Text(t) = message
                    && let Ok(v) = serde_json::from_str(t.as_str())
                {
                    seen.push(v);
                }
            }
            seen
        });
        (WsWriter { sink }, reader)
    }
}
