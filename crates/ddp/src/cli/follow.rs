//! `ddp watch` and `ddp events`: follow a WebSocket and print each message until the server
//! closes it or Ctrl-C.

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::api::{Api, Failure};

/// Opens `path` on the server as a WebSocket and prints every text message with `print`
/// (or as one JSON line each with `json`).
pub async fn follow(api: &Api, path: &str, json: bool, print: fn(&str)) -> Result<(), Failure> {
    let mut url = api.server.clone();
    let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
    url.set_scheme(scheme).map_err(|()| Failure::new("cannot make a WebSocket URL from --server"))?;
    let url = format!("{}{path}", url.as_str().trim_end_matches('/'));
    let mut request = url.as_str().into_client_request().map_err(|e| Failure::new(format!("bad URL {url}: {e}")))?;
    let header = format!("ModeCloud {}", api.token())
        .parse()
        .map_err(|_| Failure::new("the token is not a valid header value"))?;
    request.headers_mut().insert("Authorization", header);
    let (mut stream, _) = match tokio_tungstenite::connect_async(request).await {
        Ok(s) => s,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body: Value =
                response.body().as_ref().and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(Value::Null);
            return Err(Failure {
                reason: body["reason"].as_str().map(str::to_owned),
                message: body["message"]
                    .as_str()
                    .map_or_else(|| format!("the server answered {}", response.status()), str::to_owned),
            });
        }
        Err(e) => return Err(Failure::new(format!("cannot connect to {url}: {e}"))),
    };
    loop {
        let message = tokio::select! {
            m = stream.next() => m,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        match message {
            Some(Ok(Message::Text(text))) => {
                if json {
                    println!("{}", text.as_str());
                } else {
                    print(text.as_str());
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let why = frame.map(|f| format!("{} ({})", f.reason, u16::from(f.code))).unwrap_or_default();
                eprintln!("the server closed the stream {why}");
                return Ok(());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(Failure::new(format!("the stream broke: {e}"))),
            None => return Ok(()),
        }
    }
}

/// One sync message, for people (values exactly as sent).
pub fn print_sync(text: &str) {
    use ddp_protocol::sync::ServerMessage;
    match serde_json::from_str::<ServerMessage>(text) {
        Ok(ServerMessage::Reload { rev, items, .. }) => {
            println!("rev {rev:<6} reload   {} keys", items.len());
            for item in items {
                println!("           {} = {}", item.key, item.value);
            }
        }
        Ok(ServerMessage::Resume { rev }) => println!("rev {rev:<6} resume   (only changes after it follow)"),
        Ok(ServerMessage::Set { rev, key, value }) => println!("rev {rev:<6} set      {key} = {value}"),
        Ok(ServerMessage::Delete { rev, key }) => println!("rev {rev:<6} delete   {key}"),
        Ok(ServerMessage::Batch { rev, changes }) => {
            println!("rev {rev:<6} batch    {} changes, applied at once", changes.len());
            for change in changes {
                match change {
                    ServerMessage::Set { rev, key, value } => println!("  rev {rev:<4} set      {key} = {value}"),
                    ServerMessage::Delete { rev, key } => println!("  rev {rev:<4} delete   {key}"),
                    _ => {}
                }
            }
        }
        Ok(ServerMessage::Error { reason, message, .. }) => println!("error      {reason}: {message}"),
        Ok(ServerMessage::Command { command }) => println!("command    {} {}", command.action, command.parameters),
        Err(_) => println!("{text}"),
    }
}

/// One event, for people (eventData exactly as sent).
pub fn print_event(text: &str) {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Event<'a> {
        home_id: Option<u64>,
        timestamp: Option<&'a str>,
        event_type: Option<&'a str>,
        #[serde(borrow)]
        event_data: Option<&'a serde_json::value::RawValue>,
        origin_device_id: Option<u64>,
        origin_project_key_id: Option<u64>,
    }
    let Ok(e) = serde_json::from_str::<Event<'_>>(text) else {
        println!("{text}");
        return;
    };
    let origin = match (e.origin_device_id, e.origin_project_key_id) {
        (Some(d), _) => format!("  (device {d})"),
        (None, Some(k)) => format!("  (API key {k})"),
        _ => String::new(),
    };
    println!(
        "{}  home {}  {}  {}{origin}",
        e.timestamp.unwrap_or_default(),
        e.home_id.unwrap_or_default(),
        e.event_type.unwrap_or_default(),
        e.event_data.map_or("{}", |d| d.get())
    );
}
