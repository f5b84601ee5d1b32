//! Run against a local `ddp serve`: `DDP_DEVICE=1 DDP_KEY=ddpd_… cargo run -p ddp-device --example thermostat`
//! (create the device with `POST /devices` first; `DDP_URL` defaults to `ws://127.0.0.1:8080`,
//! `mqtt://127.0.0.1:1883` works too).
//!
//! A thermostat: it reads its target temperature from the key `targetTemp` (set it from an app:
//! `curl -H "$ADMIN" -X PUT $DDP/devices/1/kv/targetTemp -d '{"value": 22}'`), heats or cools
//! its simulated room towards it, and reports the room's temperature in `currentTemp` every two
//! seconds. Its mirror is kept in `thermostat-mirror.json`, so after a restart without network
//! it still knows its last target.

use std::time::Duration;

use ddp_device::{Client, Update};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DDP_URL").unwrap_or_else(|_| "ws://127.0.0.1:8080".into());
    let device: u64 = std::env::var("DDP_DEVICE")?.parse()?;
    let key = std::env::var("DDP_KEY")?;

    let client = Client::builder(&url, device, &key).persist_to("thermostat-mirror.json").start()?;
    let mut updates = client.updates();
    let mut room = 18.0_f64;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    println!("thermostat {device} on {url}; waiting for its configuration…");

    loop {
        tokio::select! {
            update = updates.recv() => match update {
                Ok(Update::Changed(change)) if change.key.as_str() == "targetTemp" => {
                    println!("new target: {:?} ({:?}, rev {})", change.value.map(|v| v.to_string()), change.source, change.rev);
                }
                Ok(Update::Synced { rev }) => println!("in sync at rev {rev}"),
                Ok(Update::Disconnected) => println!("offline; running on the last known target"),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            },
            _ = tick.tick() => {
                // The target comes from the mirror: available offline too.
                let target = client.get("targetTemp").and_then(|v| v.as_json().parse::<f64>().ok()).unwrap_or(20.0);
                room += (target - room).clamp(-0.5, 0.5);
                let reading = (room * 10.0).round() / 10.0;
                match client.set("currentTemp", &reading).await {
                    Ok(rev) => println!("room {reading:.1} °C (target {target:.1}), reported at rev {rev}"),
                    Err(e) => println!("room {reading:.1} °C, not reported: {e}"),
                }
            }
            _ = tokio::signal::ctrl_c() => {
                client.close().await;
                return Ok(());
            }
        }
    }
}
