//! Test support: [`TestServer`] runs a real server (in this process, on `127.0.0.1:0`, with a
//! temporary data directory) and stops it when dropped; its helpers create homes, devices and
//! keys through the real admin API.

use std::net::SocketAddr;

use ddp_server::{Config, Server};
use reqwest::{Client, Method, RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The admin key every test server uses.
pub const ADMIN_KEY: &str = "test-admin-key-0123456789";

/// A running server with a temporary data directory.
pub struct TestServer {
    /// `http://127.0.0.1:port`.
    pub base: String,
    /// The HTTP listener's address.
    pub addr: SocketAddr,
    /// A client for requests.
    pub client: Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    dir: Option<tempfile::TempDir>,
}

impl TestServer {
    /// A server with default settings.
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    /// A server whose settings `tweak` may change.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temporary data directory");
        let mut config = Config::new(dir.path().join("data"), "127.0.0.1:0".parse().expect("addr"));
        config.admin_key = Some(ADMIN_KEY.to_owned());
        tweak(&mut config);
        TestServer::start_config(config, Some(dir)).await
    }

    /// A server on `config` exactly (its data directory is the caller's).
    pub async fn start_config(config: Config, dir: Option<tempfile::TempDir>) -> TestServer {
        let server = Server::bind(config).await.expect("server binds");
        let addr = server.http_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        TestServer {
            base: format!("http://{addr}"),
            addr,
            client: Client::new(),
            stop: Some(stop),
            task: Some(task),
            dir,
        }
    }

    /// Stops the server gracefully and waits until it has closed storage.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    /// Stops the server and hands back its data directory (to start another server on it).
    pub async fn stop_keep_data(mut self) -> tempfile::TempDir {
        self.shutdown().await;
        self.dir.take().expect("the test server owns its data directory")
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server ran");
        }
    }

    /// A request to `path` with `token` (none when `None`).
    pub fn req(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let builder = self.client.request(method, format!("{}{path}", self.base));
        match token {
            Some(t) => builder.header("Authorization", format!("ModeCloud {t}")),
            None => builder,
        }
    }

    /// A request with the admin key.
    pub fn admin(&self, method: Method, path: &str) -> RequestBuilder {
        self.req(method, path, Some(ADMIN_KEY))
    }

    /// Creates a home; returns its id.
    pub async fn create_home(&self, name: &str) -> u64 {
        let body = expect_json(
            self.admin(Method::POST, "/homes").json(&json!({ "name": name })).send().await,
            StatusCode::CREATED,
        )
        .await;
        body["id"].as_u64().expect("home id")
    }

    /// Creates a device (in `home`, when given); returns its id and API key.
    pub async fn create_device(&self, home: Option<u64>) -> (u64, String) {
        let body = expect_json(
            self.admin(Method::POST, "/devices").json(&json!({ "name": "device", "homeId": home })).send().await,
            StatusCode::CREATED,
        )
        .await;
        (body["id"].as_u64().expect("device id"), body["apiKey"].as_str().expect("api key").to_owned())
    }

    /// Creates a project API key; returns its id and secret.
    pub async fn create_api_key(&self, homes: Option<Vec<u64>>, permission: &str) -> (u64, String) {
        let mut req = json!({ "name": "app", "permission": permission });
        if let Some(h) = homes {
            req["homes"] = json!(h);
        }
        let body = expect_json(self.admin(Method::POST, "/apiKeys").json(&req).send().await, StatusCode::CREATED).await;
        (body["id"].as_u64().expect("key id"), body["key"].as_str().expect("key").to_owned())
    }

    /// Sets `key` of `store_path` (e.g. `/devices/1`) with the admin key; returns the new rev.
    pub async fn put(&self, store_path: &str, key: &str, value: Value) -> u64 {
        let resp = self
            .admin(Method::PUT, &format!("{store_path}/kv/{key}"))
            .json(&json!({ "value": value }))
            .send()
            .await
            .expect("PUT sent");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT, "PUT {store_path}/kv/{key}: {:?}", resp.text().await);
        etag_rev(&resp_headers_etag(&resp))
    }

    /// The store's rev (from the list's ETag) with the admin key.
    pub async fn store_rev(&self, store_path: &str) -> u64 {
        let resp = self.admin(Method::GET, &format!("{store_path}/kv")).send().await.expect("GET sent");
        assert_eq!(resp.status(), StatusCode::OK);
        etag_rev(&resp_headers_etag(&resp))
    }

    /// The store's items with the admin key.
    pub async fn items(&self, store_path: &str) -> Vec<Value> {
        let body = expect_json(self.admin(Method::GET, &format!("{store_path}/kv")).send().await, StatusCode::OK).await;
        body.as_array().expect("array").clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn resp_headers_etag(resp: &Response) -> String {
    resp.headers().get("etag").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

/// The rev in an ETag such as `"12"`.
pub fn etag_rev(etag: &str) -> u64 {
    etag.trim_matches('"').parse().unwrap_or_else(|_| panic!("ETag {etag:?} is not a quoted rev"))
}

/// The ETag of a response, as a rev.
pub fn etag_of(resp: &Response) -> u64 {
    etag_rev(&resp_headers_etag(resp))
}

/// Asserts the status and returns the JSON body.
pub async fn expect_json(resp: reqwest::Result<Response>, status: StatusCode) -> Value {
    let resp = resp.expect("request sent");
    let got = resp.status();
    let text = resp.text().await.expect("body");
    assert_eq!(got, status, "unexpected status; body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text}"))
}

/// Asserts an error response: its status and `reason`; returns the whole body.
pub async fn expect_error(resp: reqwest::Result<Response>, status: StatusCode, reason: &str) -> Value {
    let body = expect_json(resp, status).await;
    assert_eq!(body["reason"], reason, "unexpected reason in {body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "errors carry a message: {body}");
    body
}

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
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("ws://{}/devices/{device}/kv{query}", self.addr);
        let mut request = url.into_client_request().expect("request");
        if let Some(t) = token {
            request.headers_mut().insert("Authorization", format!("ModeCloud {t}").parse().expect("header"));
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((stream, _)) => WsOpen::Open(Box::new(WsClient { stream })),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| serde_json::from_slice(b).unwrap_or(Value::Null))
                    .unwrap_or(Value::Null);
                WsOpen::Refused(status, body)
            }
            Err(e) => panic!("websocket connect failed: {e}"),
        }
    }

    /// Opens a session that must succeed.
    pub async fn ws_open(&self, device: u64, token: &str, query: &str) -> WsClient {
        match self.ws(device, token, query).await {
            WsOpen::Open(c) => *c,
            WsOpen::Refused(status, body) => panic!("websocket refused with {status}: {body}"),
        }
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
