//! Creating many devices on a server through its admin API.

use std::sync::Arc;

use anyhow::Context;
use serde_json::json;

use crate::server::ADMIN_KEY;

/// A device the benchmark created: its id and API key.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Device {
    /// Id.
    pub id: u64,
    /// API key.
    pub key: String,
}

/// Creates `n` devices (64 requests at a time), each with `keys` keys of `value_bytes` bytes.
pub async fn create(base: &str, n: usize, keys: usize, value_bytes: usize) -> anyhow::Result<Vec<Device>> {
    let client = reqwest::Client::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let value = json!({ "value": "v".repeat(value_bytes.saturating_sub(2)) }).to_string();
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (client, base, next, value) = (client.clone(), base.to_owned(), next.clone(), value.clone());
            tokio::spawn(async move {
                let mut made = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return anyhow::Ok(made);
                    }
                    let created: serde_json::Value = client
                        .post(format!("{base}/devices"))
                        .header("Authorization", format!("ModeCloud {ADMIN_KEY}"))
                        .json(&json!({ "name": format!("bench-{i}") }))
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
                        .await?;
                    let device = Device {
                        id: created["id"].as_u64().context("device id")?,
                        key: created["apiKey"].as_str().context("device key")?.to_owned(),
                    };
                    for k in 0..keys {
                        client
                            .put(format!("{base}/devices/{}/kv/k{k}", device.id))
                            .header("Authorization", format!("ModeCloud {ADMIN_KEY}"))
                            .header("Content-Type", "application/json")
                            .body(value.clone())
                            .send()
                            .await?
                            .error_for_status()?;
                    }
                    made.push(device);
                }
            })
        })
        .collect();
    let mut devices = Vec::with_capacity(n);
    for w in workers {
        devices.extend(w.await??);
    }
    devices.sort_by_key(|d| d.id);
    Ok(devices)
}

/// A client process of the benchmark (`ddp-bench idle-client` or `storm-client`) holding its share
/// of the devices, with its stdout lines.
pub type ClientProcess = (tokio::process::Child, tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>);

/// Starts `processes` processes of this executable's hidden `subcommand` (with `args`), each
/// given its share of `devices` in a file under `work`, and waits until each prints `ready N`.
/// Returns them and the sum of their Ns.
pub async fn spawn_clients(
    subcommand: &str,
    args: &[&str],
    devices: &[Device],
    processes: usize,
    work: &std::path::Path,
) -> anyhow::Result<(Vec<ClientProcess>, usize)> {
    use tokio::io::AsyncBufReadExt;
    let exe = std::env::current_exe()?;
    let per = devices.len().div_ceil(processes.max(1)).max(1);
    let mut children = Vec::new();
    for (i, chunk) in devices.chunks(per).enumerate() {
        let file = work.join(format!("{subcommand}-devices-{i}.json"));
        std::fs::write(&file, serde_json::to_vec(chunk)?)?;
        let mut child = tokio::process::Command::new(&exe)
            .arg(subcommand)
            .args(args)
            .arg("--devices")
            .arg(&file)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("child stdout")?;
        children.push((child, tokio::io::BufReader::new(stdout).lines()));
    }
    let mut ready = 0;
    for (_, lines) in &mut children {
        let line =
            lines.next_line().await?.with_context(|| format!("a {subcommand} process ended before it was ready"))?;
        ready += line
            .strip_prefix("ready ")
            .with_context(|| format!("unexpected {subcommand} output: {line}"))?
            .parse::<usize>()?;
    }
    Ok((children, ready))
}
