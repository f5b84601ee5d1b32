//! Raw peers for the protocols' edges, where real client libraries refuse to go: MQTT packets
//! built byte by byte (retransmissions, malformed packets, MQTT 5 properties) and a WebSocket
//! peer that writes any frame (unmasked, reserved bits and opcodes, broken fragments).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---- MQTT ----

/// Appends an MQTT variable-length integer.
pub fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            break;
        }
    }
}

/// Appends an MQTT string (two-byte length, then the bytes).
pub fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A packet: its first byte, the remaining length, the body.
pub fn packet(first: u8, body: Vec<u8>) -> Vec<u8> {
    let mut p = vec![first];
    remaining_length(body.len(), &mut p);
    p.extend(body);
    p
}

/// An MQTT 3.1.1 CONNECT with the contract's credentials and a blank client id.
pub fn connect_packet(device: u64, key: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.push(4); // 3.1.1
    body.push(0x80 | 0x40 | 0x02); // username, password, clean session
    body.extend_from_slice(&keep_alive.to_be_bytes());
    string(b"", &mut body); // blank client id
    string(device.to_string().as_bytes(), &mut body);
    string(key.as_bytes(), &mut body);
    packet(0x10, body)
}

/// An MQTT 5 CONNECT, announcing `max_packet` as its Maximum Packet Size when given.
pub fn connect_v5_packet(device: u64, key: &str, max_packet: Option<u32>) -> Vec<u8> {
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.push(5);
    body.push(0x80 | 0x40 | 0x02);
    body.extend_from_slice(&0u16.to_be_bytes());
    let mut properties = Vec::new();
    if let Some(max) = max_packet {
        properties.push(0x27); // Maximum Packet Size
        properties.extend_from_slice(&max.to_be_bytes());
    }
    remaining_length(properties.len(), &mut body);
    body.extend(properties);
    string(b"raw", &mut body);
    string(device.to_string().as_bytes(), &mut body);
    string(key.as_bytes(), &mut body);
    packet(0x10, body)
}

/// A QoS 1 PUBLISH (3.1.1; for MQTT 5 use [`publish_v5_packet`]).
pub fn publish_packet(topic: &str, payload: &str, packet_id: u16, dup: bool) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic.as_bytes(), &mut body);
    body.extend_from_slice(&packet_id.to_be_bytes());
    body.extend_from_slice(payload.as_bytes());
    packet(0x30 | (u8::from(dup) << 3) | (1 << 1), body)
}

/// A QoS 1 MQTT 5 PUBLISH with no properties.
pub fn publish_v5_packet(topic: &str, payload: &str, packet_id: u16) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic.as_bytes(), &mut body);
    body.extend_from_slice(&packet_id.to_be_bytes());
    body.push(0); // no properties
    body.extend_from_slice(payload.as_bytes());
    packet(0x32, body)
}

/// A SUBSCRIBE to one filter at QoS 0 (`v5`: with an empty property list).
pub fn subscribe_packet(packet_id: u16, filter: &str, v5: bool) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    if v5 {
        body.push(0);
    }
    string(filter.as_bytes(), &mut body);
    body.push(0);
    packet(0x82, body)
}

/// Reads one packet: (first byte, body); `None` when the server closed the connection. Panics
/// when nothing comes within 10 s.
pub async fn read_packet(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut first = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut first)).await.expect("in time").ok()?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).await.ok()?;
        len |= usize::from(b[0] & 0x7f) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.ok()?;
    Some((first[0], body))
}

/// Connects over MQTT 3.1.1 and asserts the CONNACK accepted it.
pub async fn mqtt_connect(addr: SocketAddr, device: u64, key: &str, keep_alive: u16) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("tcp");
    stream.write_all(&connect_packet(device, key, keep_alive)).await.expect("write");
    let (first, body) = read_packet(&mut stream).await.expect("CONNACK");
    assert_eq!((first, body), (0x20, vec![0, 0]), "CONNACK accepted");
    stream
}

// ---- WebSocket ----

/// A WebSocket peer that writes raw bytes after a real handshake.
pub struct RawWs {
    stream: TcpStream,
    buffered: Vec<u8>,
}

/// A frame the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFrame {
    /// FIN.
    pub fin: bool,
    /// The opcode (1 text, 2 binary, 8 close, 9 ping, 10 pong, 0 continuation).
    pub opcode: u8,
    /// The payload (servers never mask).
    pub payload: Vec<u8>,
}

impl ServerFrame {
    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

impl RawWs {
    /// Opens `path` on `addr` with `token` in the Authorization header; panics unless the server
    /// switches protocols.
    pub async fn open(addr: SocketAddr, path: &str, token: &str) -> RawWs {
        let auth = format!("ModeCloud {token}");
        RawWs::open_with(addr, path, &[("Authorization", &auth)]).await.0
    }

    /// Opens `path` on `addr` with these extra headers; returns the socket and the server's
    /// answer head (status line and headers). Panics unless the server switches protocols.
    pub async fn open_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (RawWs, String) {
        let mut stream = TcpStream::connect(addr).await.expect("tcp");
        let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write handshake");
        let mut buffered = Vec::new();
        let end = loop {
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
                .await
                .expect("handshake answer in time")
                .expect("read");
            assert!(n > 0, "the server closed during the handshake");
            buffered.extend_from_slice(&chunk[..n]);
            if let Some(at) = buffered.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        let head = String::from_utf8_lossy(&buffered[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "not upgraded: {head}");
        buffered.drain(..end);
        (RawWs { stream, buffered }, head)
    }

    /// Reads binary messages until `n` more bytes of their payloads have arrived (MQTT over
    /// WebSocket is a byte stream: packets may span messages); `None` when the connection ended.
    pub async fn read_bytes(&mut self, n: usize, into: &mut Vec<u8>) -> Option<()> {
        let target = into.len() + n;
        while into.len() < target {
            let frame = self.next_frame().await?;
            match frame.opcode {
                2 | 0 => into.extend_from_slice(&frame.payload),
                8 => return None,
                _ => {}
            }
        }
        Some(())
    }

    /// A client frame: `fin`, reserved bits `rsv` (0–7), `opcode`, masked or not.
    pub fn frame(fin: bool, rsv: u8, opcode: u8, masked: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | ((rsv & 7) << 4) | (opcode & 0x0f)];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(mask_bit | n as u8),
            n if n <= 0xffff => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [0x37, 0xfa, 0x21, 0x3d];
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
        out
    }

    /// Writes raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Writes raw bytes; `Err` when the server has closed the connection.
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    async fn fill(&mut self, n: usize) -> bool {
        while self.buffered.len() < n {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return false,
                Ok(Ok(k)) => self.buffered.extend_from_slice(&chunk[..k]),
                Err(_) => panic!("no frame from the server within 10 s"),
            }
        }
        true
    }

    /// The next frame from the server; `None` when the connection ended.
    pub async fn next_frame(&mut self) -> Option<ServerFrame> {
        if !self.fill(2).await {
            return None;
        }
        let (b0, b1) = (self.buffered[0], self.buffered[1]);
        let (mut header, mut len) = (2usize, usize::from(b1 & 0x7f));
        if len == 126 {
            if !self.fill(4).await {
                return None;
            }
            len = usize::from(u16::from_be_bytes([self.buffered[2], self.buffered[3]]));
            header = 4;
        } else if len == 127 {
            if !self.fill(10).await {
                return None;
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&self.buffered[2..10]);
            len = usize::try_from(u64::from_be_bytes(n)).expect("length");
            header = 10;
        }
        if !self.fill(header + len).await {
            return None;
        }
        let payload = self.buffered[header..header + len].to_vec();
        self.buffered.drain(..header + len);
        Some(ServerFrame { fin: b0 & 0x80 != 0, opcode: b0 & 0x0f, payload })
    }

    /// Reads until the server's close frame and returns its code; `None` when the connection
    /// ended without one.
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            let frame = self.next_frame().await?;
            if frame.opcode == 8 {
                return frame.close_code();
            }
        }
    }
}

/// A raw MQTT client over a [`RawWs`]: writes packets in whatever binary messages the test
/// chooses, reads the server's binary messages as one byte stream.
pub struct RawMqttWs {
    /// The WebSocket underneath.
    pub ws: RawWs,
    read: Vec<u8>,
}

impl RawMqttWs {
    /// Over an upgraded WebSocket.
    pub fn new(ws: RawWs) -> RawMqttWs {
        RawMqttWs { ws, read: Vec::new() }
    }

    /// Sends `bytes` as one masked binary message.
    pub async fn send_message(&mut self, bytes: &[u8]) {
        self.ws.send(&RawWs::frame(true, 0, 2, true, bytes)).await;
    }

    /// The next MQTT packet from the server: (first byte, body); `None` when it closed.
    pub async fn next_packet(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((len, used)) = Self::header(&self.read)
                && self.read.len() >= used + len
            {
                let first = self.read[0];
                let body = self.read[used..used + len].to_vec();
                self.read.drain(..used + len);
                return Some((first, body));
            }
            let frame = self.ws.next_frame().await?;
            match frame.opcode {
                2 | 0 => self.read.extend_from_slice(&frame.payload),
                8 => return None,
                _ => {}
            }
        }
    }

    /// (remaining length, header length) of the packet at the start of `buf`, once known.
    fn header(buf: &[u8]) -> Option<(usize, usize)> {
        let (mut len, mut shift) = (0usize, 0);
        for (i, b) in buf.iter().enumerate().skip(1).take(4) {
            len |= usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                return Some((len, i + 1));
            }
        }
        None
    }
}
