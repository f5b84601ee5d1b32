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
