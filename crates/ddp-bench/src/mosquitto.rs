//! The Mosquitto baseline: Debian's `mosquitto` broker on loopback, relaying QoS 1 messages from
//! publishers to one subscriber per simulated device — the transport floor without durability.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::sync::{LatencyResult, open_mqtt};

/// A running `mosquitto`, killed when dropped.
pub struct Mosquitto {
    child: std::process::Child,
    /// `127.0.0.1:port`.
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `mosquitto` on a free loopback port, without persistence.
pub fn start() -> anyhow::Result<Mosquitto> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\nlog_dest none\n"
        ),
    )?;
    let child = std::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start mosquitto (Debian package mosquitto)")?;
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..100 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            return Ok(Mosquitto { child, addr, _dir: dir });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("mosquitto did not start listening on {addr}")
}

/// `subscribers` clients each subscribe (QoS 1) to their own topic; publishers send messages at
/// `qos` at `rate` spread over the topics; each message's delivery time is measured.
pub async fn measure(
    subscribers: usize,
    rate: u64,
    duration: Duration,
    qos: rumqttc::QoS,
) -> anyhow::Result<LatencyResult> {
    let broker = start()?;
    let epoch = Instant::now();
    let (report_tx, mut report_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let mut readers = Vec::new();
    for chunk in (0..subscribers).collect::<Vec<_>>().chunks(100) {
        let opened = futures_util::future::try_join_all(
            chunk.iter().map(|i| open_mqtt(&broker.addr, format!("sub-{i}"), None, format!("bench/{i}"))),
        )
        .await?;
        for mut device in opened {
            let report = report_tx.clone();
            readers.push(tokio::spawn(async move {
                while let Some(payload) = device.payloads.recv().await {
                    let now = epoch.elapsed().as_micros() as u64;
                    if let Some(sent) =
                        serde_json::from_slice::<serde_json::Value>(&payload).ok().and_then(|v| v["t"].as_u64())
                    {
                        let _ = report.send(now.saturating_sub(sent));
                    }
                }
            }));
        }
    }
    drop(report_tx);

    // Publishers with their acknowledgements counted.
    let acked = Arc::new(AtomicU64::new(0));
    let mut publishers = Vec::new();
    for p in 0..8 {
        let (host, port) = broker.addr.rsplit_once(':').context("addr")?;
        let mut options = rumqttc::MqttOptions::new(format!("pub-{p}"), host, port.parse::<u16>()?);
        options.set_keep_alive(Duration::from_secs(60));
        options.set_inflight(1000);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1024);
        let acked = acked.clone();
        readers.push(tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = event {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        publishers.push(client);
    }
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let start = tokio::time::Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate as f64)).await;
        let topic = format!("bench/{}", (i as usize * 7919) % subscribers);
        let payload = json!({ "t": epoch.elapsed().as_micros() as u64, "s": i }).to_string();
        publishers[(i % 8) as usize].publish(topic, qos, false, payload).await?;
    }
    let mut hist = Histogram::<u64>::new(3)?;
    let mut delivered = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while delivered < total {
        match tokio::time::timeout_at(deadline, report_rx.recv()).await {
            Ok(Some(micros)) => {
                hist.record(micros.max(1))?;
                delivered += 1;
            }
            _ => break,
        }
    }
    for r in readers {
        r.abort();
    }
    // QoS 0 has no acknowledgement: every publish counts as sent.
    let acked = if qos == rumqttc::QoS::AtMostOnce { total } else { acked.load(Ordering::Relaxed).max(delivered) };
    Ok(LatencyResult { hist, acked, delivered, disorder: 0 })
}
