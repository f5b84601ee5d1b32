//! A renewed TLS certificate is read again on SIGHUP: the real `ddp serve` process, its files
//! replaced as an ACME client would, the periodic check set too far off to be what picks it up.

use std::time::Duration;

use ddp_testkit::{DdpProcess, TlsFiles};

fn client(ca_pem: &str, https: std::net::SocketAddr) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("pem");
    reqwest::Client::builder().tls_certs_only([ca]).resolve("localhost", https).build().expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dir.path().join("tls");
    let first = TlsFiles::write(&tls, &["localhost"]);
    let (cert, key) = (first.cert.display().to_string(), first.key.display().to_string());
    let server = DdpProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_ddp")),
        &dir.path().join("data"),
        "tls-admin-key-0123456789",
        &["--https-listen", "127.0.0.1:0", "--tls-cert", &cert, "--tls-key", &key, "--tls-reload-every", "1h"],
    )
    .expect("ddp serve");
    let https: std::net::SocketAddr = server.listening["https"].parse().expect("https addr");
    let url = format!("https://localhost:{}/healthz", https.port());
    let ok = |ca: &str| {
        let request = client(ca, https).get(url.clone());
        async move { request.send().await.is_ok_and(|r| r.status() == 200) }
    };
    assert!(ok(&first.ca_pem).await, "served with the first certificate");
    let renewed = TlsFiles::write(&tls, &["localhost"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(ok(&first.ca_pem).await, "not read again before the signal (the check is an hour off)");
    let hup = std::process::Command::new("kill").args(["-HUP", &server.pid.to_string()]).status().expect("kill");
    assert!(hup.success());
    for _ in 0..100 {
        if ok(&renewed.ca_pem).await {
            assert!(!ok(&first.ca_pem).await, "the old certificate is gone");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("SIGHUP did not load the renewed certificate");
}
