//! Test support: [`TestServer`] runs a real server (in this process, on `127.0.0.1:0`, with a
//! temporary data directory) and stops it when dropped; its helpers create homes, devices and
//! keys through the real admin API.
//!
//! With `DDP_TEST_STORE=postgres` (and `DDP_TEST_DATABASE_URL`), servers started with
//! [`TestServer::start`] / [`TestServer::start_with`] store everything in a fresh PostgreSQL
//! database instead, so the same suites run on both backends (`scripts/test` does both).

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
    /// The MQTT listener's address (when on).
    pub mqtt_addr: Option<SocketAddr>,
    /// The MQTT TLS listener's address (when on).
    pub mqtt_tls_addr: Option<SocketAddr>,
    /// A client for requests.
    pub client: Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    dir: Option<tempfile::TempDir>,
    database: Option<String>,
}

/// The storage of a stopped [`TestServer`]: its data directory and, on PostgreSQL, its database.
pub struct KeptData {
    dir: tempfile::TempDir,
    database: Option<String>,
}

impl KeptData {
    /// The test configuration on this storage (change the addresses to restart "in place").
    pub fn config(&self) -> Config {
        let mut config = TestServer::config(&self.dir.path().join("data"));
        config.database.clone_from(&self.database);
        config
    }

    /// Starts a server on `config` (from [`KeptData::config`]), owning this storage.
    pub async fn start(self, config: Config) -> TestServer {
        TestServer::start_config(config, Some(self.dir)).await
    }
}

impl TestServer {
    /// A server with default settings.
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    /// A server whose settings `tweak` may change.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temporary data directory");
        let mut config = TestServer::config(&dir.path().join("data"));
        if suite_on_postgres() {
            config.database = Some(fresh_database().await);
        }
        tweak(&mut config);
        TestServer::start_config(config, Some(dir)).await
    }

    /// A server with an MQTT TLS listener (`mqtt_tls_addr`) whose certificate is self-signed for
    /// `names`; returns it with that certificate in PEM, for clients to trust as their CA.
    pub async fn start_with_mqtt_tls(names: &[&str]) -> (TestServer, String) {
        let cert = rcgen::generate_simple_self_signed(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("certificate");
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
        // The server reads both files at start; the directory may go afterwards.
        let server = TestServer::start_with(|c| {
            c.mqtt.tls_listen = Some("127.0.0.1:0".parse().expect("addr"));
            c.mqtt.tls_cert = Some(cert_path);
            c.mqtt.tls_key = Some(key_path);
        })
        .await;
        (server, cert.cert.pem())
    }

    /// The test configuration for a data directory: loopback ports chosen by the system, the
    /// test admin key.
    pub fn config(data_dir: &std::path::Path) -> Config {
        let mut config = Config::new(data_dir, "127.0.0.1:0".parse().expect("addr"));
        config.admin_key = Some(ADMIN_KEY.to_owned());
        config.mqtt.listen = Some("127.0.0.1:0".parse().expect("addr"));
        config
    }

    /// A server on `config` exactly (its data directory is the caller's).
    pub async fn start_config(config: Config, dir: Option<tempfile::TempDir>) -> TestServer {
        let database = config.database.clone();
        let server = Server::bind(config).await.expect("server binds");
        let addr = server.http_addr();
        let mqtt_addr = server.mqtt_addr();
        let mqtt_tls_addr = server.mqtt_tls_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        TestServer {
            base: format!("http://{addr}"),
            addr,
            mqtt_addr,
            mqtt_tls_addr,
            client: Client::new(),
            stop: Some(stop),
            task: Some(task),
            dir,
            database,
        }
    }

    /// Stops the server gracefully and waits until it has closed storage.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    /// Stops the server and hands back its storage (to start another server on it).
    pub async fn stop_keep_data(mut self) -> KeptData {
        self.shutdown().await;
        KeptData {
            dir: self.dir.take().expect("the test server owns its data directory"),
            database: self.database.take(),
        }
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

/// Every JSON message a session received, recorded by a background task (stopped when dropped).
pub struct Recorded {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    ended: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl Recorded {
    fn start<F>(run: impl FnOnce(Box<dyn Fn(Value) + Send>) -> F) -> Recorded
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

/// An MQTT 3.1.1 client (rumqttc) whose event loop runs in a task; incoming packets are queued.
pub struct MqttClient {
    /// The client handle.
    pub client: rumqttc::AsyncClient,
    incoming: tokio::sync::mpsc::UnboundedReceiver<Result<rumqttc::Packet, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MqttClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    /// MQTT options for a device, with the contract's credentials (username = id, password = key).
    pub fn mqtt_options(&self, device: u64, key: &str) -> rumqttc::MqttOptions {
        mqtt_options(self.mqtt_addr.expect("the MQTT listener is on"), device, key)
    }

    /// Connects `options`; returns once the CONNACK arrived (or panics with what came instead).
    pub async fn mqtt_connect(options: rumqttc::MqttOptions) -> Result<MqttClient, String> {
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
        let (tx, mut incoming) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            return;
                        }
                    }
                    Ok(rumqttc::Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        match tokio::time::timeout(std::time::Duration::from_secs(10), incoming.recv()).await {
            Ok(Some(Ok(rumqttc::Packet::ConnAck(ack)))) if ack.code == rumqttc::ConnectReturnCode::Success => {
                Ok(MqttClient { client, incoming, task })
            }
            Ok(Some(Ok(other))) => Err(format!("{other:?}")),
            Ok(Some(Err(e))) => Err(e),
            Ok(None) => Err("event loop ended".into()),
            Err(_) => Err("no CONNACK within 10 s".into()),
        }
    }

    /// Connects as `device` and subscribes to its kv topic; returns the client and the reload.
    pub async fn mqtt_device(&self, device: u64, key: &str) -> (MqttClient, Value) {
        let mut c = TestServer::mqtt_connect(self.mqtt_options(device, key)).await.expect("mqtt connect");
        c.client.subscribe(format!("/devices/{device}/kv"), rumqttc::QoS::AtMostOnce).await.expect("subscribe");
        let reload = c.next_json().await;
        assert_eq!(reload["action"], "reload", "the first message on the kv topic is a reload");
        (c, reload)
    }
}

/// MQTT options for a device of the server at `addr`, with the contract's credentials
/// (username = id, password = key).
pub fn mqtt_options(addr: SocketAddr, device: u64, key: &str) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(format!("test-{device}"), addr.ip().to_string(), addr.port());
    options.set_credentials(device.to_string(), key);
    options.set_keep_alive(std::time::Duration::from_secs(30));
    options.set_clean_session(true);
    options
}

impl MqttClient {
    /// Records the JSON payload of every PUBLISH from now on in the background.
    pub fn record(mut self) -> Recorded {
        Recorded::start(|push| async move {
            while let Some(Ok(packet)) = self.incoming.recv().await {
                if let rumqttc::Packet::Publish(p) = packet
                    && let Ok(v) = serde_json::from_slice(&p.payload)
                {
                    push(v);
                }
            }
        })
    }

    /// The next incoming packet (10 s at most); `Err` when the connection ended.
    pub async fn next_packet(&mut self) -> Result<rumqttc::Packet, String> {
        match tokio::time::timeout(std::time::Duration::from_secs(10), self.incoming.recv()).await {
            Ok(Some(p)) => p,
            Ok(None) => Err("event loop ended".into()),
            Err(_) => panic!("no MQTT packet within 10 s"),
        }
    }

    /// The next PUBLISH's payload as JSON (other packets are skipped).
    pub async fn next_json(&mut self) -> Value {
        loop {
            match self.next_packet().await {
                Ok(rumqttc::Packet::Publish(p)) => return serde_json::from_slice(&p.payload).expect("JSON payload"),
                Ok(_) => continue,
                Err(e) => panic!("connection ended while a message was expected: {e}"),
            }
        }
    }

    /// Waits for the connection to end; returns the error that ended it.
    pub async fn ended(&mut self) -> String {
        loop {
            if let Err(e) = self.next_packet().await {
                return e;
            }
        }
    }
}

/// Whether this run's servers use PostgreSQL (`DDP_TEST_STORE=postgres`).
pub fn suite_on_postgres() -> bool {
    std::env::var("DDP_TEST_STORE").is_ok_and(|s| s.eq_ignore_ascii_case("postgres"))
}

/// A fresh, empty PostgreSQL database on the test server named by `DDP_TEST_DATABASE_URL` (whose
/// user may create databases); returns its URL.
pub async fn fresh_database() -> String {
    let url = std::env::var("DDP_TEST_DATABASE_URL")
        .expect("DDP_TEST_DATABASE_URL must name a PostgreSQL database (scripts/test starts one)");
    create_database(&url, "ddp_test").await.unwrap_or_else(|e| panic!("{e}"))
}

/// Creates an empty database named `{prefix}_{random}` on the PostgreSQL server of `url` (a
/// `postgres://…/db` URL whose user may create databases); returns the new database's URL.
pub async fn create_database(url: &str, prefix: &str) -> Result<String, String> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("cannot connect to PostgreSQL at {url}: {e}"))?;
    tokio::spawn(conn);
    let name = format!("{prefix}_{:016x}", rand::random::<u64>());
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.map_err(|e| format!("CREATE DATABASE: {e}"))?;
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let (prefix, _) = base.rsplit_once('/').ok_or("the PostgreSQL URL must end in /database")?;
    Ok(format!("{prefix}/{name}{query}"))
}

/// A real `ddp serve` process (for tests that kill it, and for benchmarks), on loopback ports
/// the system picks; killed and reaped when dropped.
pub struct DdpProcess {
    child: std::process::Child,
    /// `http://127.0.0.1:port`.
    pub base: String,
    /// `127.0.0.1:port` of the MQTT listener.
    pub mqtt: String,
    /// The process id.
    pub pid: u32,
}

impl DdpProcess {
    /// Starts `bin serve` with its data in `data_dir`, the given admin key and `extra` flags, and
    /// waits until it logs that HTTP and MQTT are listening.
    pub fn start(
        bin: &std::path::Path,
        data_dir: &std::path::Path,
        admin_key: &str,
        extra: &[&str],
    ) -> Result<DdpProcess, String> {
        use std::io::BufRead;
        let mut child = std::process::Command::new(bin)
            .args(["serve", "--http-listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--admin-key", admin_key])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut lines = std::io::BufReader::new(stderr).lines();
        let (mut http, mut mqtt) = (None, None);
        while http.is_none() || mqtt.is_none() {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                return Err("ddp serve exited before listening".into());
            };
            let Ok(entry) = serde_json::from_str::<Value>(&line) else { continue };
            if entry["message"] == "listening" {
                let addr = entry["addr"].as_str().map(str::to_owned);
                match entry["transport"].as_str() {
                    Some("http") => http = addr,
                    Some("mqtt") => mqtt = addr,
                    _ => {}
                }
            }
        }
        // Keep draining the log so the server never blocks on a full pipe; pass on what it warns of.
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(entry) = serde_json::from_str::<Value>(&line)
                    && matches!(entry["level"].as_str(), Some("WARN" | "ERROR"))
                {
                    eprintln!("ddp serve: {line}");
                }
            }
        });
        let pid = child.id();
        Ok(DdpProcess {
            child,
            base: format!("http://{}", http.unwrap_or_default()),
            mqtt: mqtt.unwrap_or_default(),
            pid,
        })
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DdpProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

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
