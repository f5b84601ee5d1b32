//! MQTT clients: [`MqttClient`] (rumqttc) for devices.

use std::net::SocketAddr;

use serde_json::Value;

use crate::server::TestServer;
use crate::ws::Recorded;

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
