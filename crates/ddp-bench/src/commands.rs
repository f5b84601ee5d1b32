//! Command delivery latency: devices connected over MQTT (subscribed to `/devices/{id}/command`)
//! or MODE's command WebSocket, apps sending `PUT /devices/{id}/command` at a steady rate, each
//! command carrying its issue time; beside Mosquitto relaying QoS 0 publishes to as many
//! subscribers. Commands are not durable, so Mosquitto is the floor to compare with.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::devices::{self, Device};
use crate::sync::{LatencyResult, WriteRequest, open_mqtt, timed_writes};
use crate::{mosquitto, server};

/// How devices receive commands.
#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq, Eq)]
pub enum Via {
    /// MQTT 3.1.1, subscribed to `/devices/{id}/command`.
    Mqtt,
    /// MODE's command WebSocket, `GET /devices/{id}/command`.
    Ws,
}

impl Via {
    /// A name for tables.
    pub fn label(self) -> &'static str {
        match self {
            Via::Mqtt => "MQTT",
            Via::Ws => "the command WebSocket",
        }
    }
}

/// Settings of `ddp-bench commands`.
#[derive(clap::Args)]
pub struct CommandsArgs {
    /// The `ddp` binary to start (default: next to this one).
    #[arg(long)]
    ddp_bin: Option<PathBuf>,
    /// Connected devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Commands per second, spread over the devices.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Also measure Mosquitto (Debian's `mosquitto`) relaying QoS 0 publishes.
    #[arg(long)]
    mosquitto: bool,
}

/// Connects `devices` to the server at `base` (HTTP) / `mqtt` to take commands `via`, sends
/// commands at `rate` for `duration`, and measures delivery: each device checks that its
/// commands arrive in the order sent.
pub async fn measure(
    base: &str,
    mqtt: &str,
    devices: &[Device],
    rate: u64,
    duration: Duration,
    via: Via,
) -> anyhow::Result<LatencyResult> {
    let epoch = Instant::now();
    let (report_tx, report_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64, bool)>();
    let check = move |report: &tokio::sync::mpsc::UnboundedSender<(u64, u64, bool)>,
                      last: &mut Option<u64>,
                      text: &[u8]| {
        let now = epoch.elapsed().as_micros() as u64;
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(text) else { return };
        let (Some(sent), Some(seq)) = (v["parameters"]["t"].as_u64(), v["parameters"]["s"].as_u64()) else { return };
        let in_order = last.is_none_or(|l| seq > l);
        *last = Some(seq);
        let _ = report.send((now.saturating_sub(sent), seq, in_order));
    };
    let mut readers = Vec::new();
    let http = base.trim_start_matches("http://").to_owned();
    for chunk in devices.chunks(100) {
        match via {
            Via::Mqtt => {
                let opened = futures_util::future::try_join_all(chunk.iter().map(|d| {
                    open_mqtt(
                        mqtt,
                        format!("cmd-{}", d.id),
                        Some((d.id.to_string(), d.key.clone())),
                        format!("/devices/{}/command", d.id),
                    )
                }))
                .await?;
                for mut device in opened {
                    let report = report_tx.clone();
                    readers.push(tokio::spawn(async move {
                        let mut last = None;
                        while let Some(payload) = device.payloads.recv().await {
                            check(&report, &mut last, &payload);
                        }
                    }));
                }
            }
            Via::Ws => {
                let opened = futures_util::future::try_join_all(chunk.iter().map(|d| {
                    let http = http.clone();
                    async move {
                        let mut request = format!("ws://{http}/devices/{}/command", d.id).into_client_request()?;
                        request.headers_mut().insert("Authorization", format!("ModeCloud {}", d.key).parse()?);
                        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
                        anyhow::Ok(ws)
                    }
                }))
                .await?;
                for mut ws in opened {
                    let report = report_tx.clone();
                    readers.push(tokio::spawn(async move {
                        let mut last = None;
                        while let Some(Ok(message)) = ws.next().await {
                            if let Message::Text(text) = message {
                                check(&report, &mut last, text.as_bytes());
                            }
                        }
                    }));
                }
            }
        }
    }
    drop(report_tx);
    let (base, ids) = (base.to_owned(), devices.iter().map(|d| d.id).collect::<Vec<_>>());
    let request: WriteRequest = Arc::new(move |client, i, payload| {
        let device = ids[(i as usize * 7919) % ids.len()];
        client
            .put(format!("{base}/devices/{device}/command"))
            .header("Authorization", format!("ModeCloud {}", server::ADMIN_KEY))
            .header("Content-Type", "application/json")
            .body(format!(r#"{{"action":"bench","parameters":{payload}}}"#))
    });
    let result = timed_writes(request, rate, duration, epoch, report_rx).await;
    for r in readers {
        r.abort();
    }
    result
}

/// `ddp-bench commands`.
pub async fn run(args: CommandsArgs) -> anyhow::Result<()> {
    let bin = args.ddp_bin.clone().unwrap_or_else(server::default_ddp_bin);
    let duration = Duration::from_secs_f64(args.seconds);
    let work = tempfile::tempdir_in(".")?;
    let ddp = server::start(&bin, &work.path().join("data"), &[]).context("ddp serve")?;
    let made = devices::create(&ddp.base, args.devices, 0, 0).await?;
    let mut rows = Vec::new();
    for via in [Via::Mqtt, Via::Ws] {
        let r = measure(&ddp.base, &ddp.mqtt, &made, args.rate, duration, via).await?;
        rows.push(r.row(&format!("DDP command over {} (REST PUT → device)", via.label())));
    }
    if args.mosquitto {
        let r = mosquitto::measure(args.devices, args.rate, duration, rumqttc::QoS::AtMostOnce).await?;
        rows.push(r.row("Mosquitto QoS 0 relay (publish → subscriber)"));
    }
    println!("{}", LatencyResult::HEADER);
    for row in rows {
        println!("{row}");
    }
    Ok(())
}
