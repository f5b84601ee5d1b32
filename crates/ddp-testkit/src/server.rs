//! [`TestServer`]: a real server in this process, with the helpers that drive its admin API over
//! HTTP and assert on answers.

use std::net::SocketAddr;

use ddp_server::{Config, Server};
use reqwest::{Client, Method, RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::postgres::{fresh_database, suite_on_postgres};

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
    /// The MQTT-over-WebSocket listener's address (when on).
    pub mqtt_ws_addr: Option<SocketAddr>,
    /// The HTTPS listener's address (when on).
    pub https_addr: Option<SocketAddr>,
    /// A client for requests.
    pub client: Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    dir: Option<tempfile::TempDir>,
    database: Option<String>,
}

/// A self-signed certificate and its key, as PEM files.
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: std::path::PathBuf,
    /// The private key.
    pub key: std::path::PathBuf,
    /// The certificate in PEM, for clients to trust as their CA.
    pub ca_pem: String,
}

impl TlsFiles {
    /// Writes (or overwrites, as a renewal would) `cert.pem` and `key.pem` in `dir`: a fresh
    /// certificate self-signed for `names`, with a fresh key.
    pub fn write(dir: &std::path::Path, names: &[&str]) -> TlsFiles {
        let cert = rcgen::generate_simple_self_signed(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("certificate");
        std::fs::create_dir_all(dir).expect("tls directory");
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        // The key first, then the certificate: a reader between the two sees a pair that does
        // not match, and keeps the running certificate (as with a real renewal).
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
        std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
        TlsFiles { cert: cert_path, key: key_path, ca_pem: cert.cert.pem() }
    }
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

    /// A server with HTTPS (`https_addr`) and MQTT over TLS (`mqtt_tls_addr`) on a certificate
    /// self-signed for `names`, its files in the server's own temporary directory (a test may
    /// renew them with [`TlsFiles::write`]; the server checks them every 100 ms); `tweak` as
    /// for [`TestServer::start_with`].
    pub async fn start_with_tls(names: &[&str], tweak: impl FnOnce(&mut Config)) -> (TestServer, TlsFiles) {
        let dir = tempfile::tempdir().expect("temporary data directory");
        let files = TlsFiles::write(&dir.path().join("tls"), names);
        let mut config = TestServer::config(&dir.path().join("data"));
        if suite_on_postgres() {
            config.database = Some(fresh_database().await);
        }
        config.https_listen = Some("127.0.0.1:0".parse().expect("addr"));
        config.mqtt.tls_listen = Some("127.0.0.1:0".parse().expect("addr"));
        config.tls.cert = Some(files.cert.clone());
        config.tls.key = Some(files.key.clone());
        config.tls.reload_every = std::time::Duration::from_millis(100);
        tweak(&mut config);
        (TestServer::start_config(config, Some(dir)).await, files)
    }

    /// A server with an MQTT TLS listener (`mqtt_tls_addr`) whose certificate is self-signed for
    /// `names`; returns it with that certificate in PEM, for clients to trust as their CA.
    pub async fn start_with_mqtt_tls(names: &[&str]) -> (TestServer, String) {
        let (server, files) = TestServer::start_with_tls(names, |_| {}).await;
        (server, files.ca_pem)
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
        let mqtt_ws_addr = server.mqtt_ws_addr();
        let https_addr = server.https_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        TestServer {
            base: format!("http://{addr}"),
            addr,
            mqtt_addr,
            mqtt_tls_addr,
            mqtt_ws_addr,
            https_addr,
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
