//! Fuzzing the packet and session layer: arbitrary bytes, fed in arbitrary chunks through the
//! codec and the session exactly as a connection does, must never panic, and the bytes buffered
//! for one packet never exceed the packet limit. Run longer with `PROPTEST_CASES=200000`.

use bytes::BytesMut;
use proptest::prelude::*;
use tokio_util::codec::Decoder;

use super::session::{Action, AuthOutcome, Session, WriteOutcome};
use super::wire::{self, Version};

const MAX_PACKET: u32 = 4096;

/// Feeds `chunks` to a fresh connection's decoder and session; returns the most bytes buffered.
fn drive(chunks: &[Vec<u8>]) -> usize {
    let mut codec = wire::sniffing_codec();
    let mut buffer = BytesMut::new();
    let mut session: Option<Session> = None;
    let mut most = 0;
    for chunk in chunks {
        buffer.extend_from_slice(chunk);
        most = most.max(buffer.len());
        loop {
            let (decoded, remaining) = match codec.decode(&mut buffer) {
                Ok(Some(decoded)) => decoded,
                Ok(None) => break,
                Err(_) => return most, // the connection closes
            };
            let Some(s) = session.as_mut() else {
                let Some(version) = wire::version_of(&decoded) else { return most };
                codec = wire::codec(version, MAX_PACKET);
                session = Some(Session::new(version));
                continue;
            };
            let mut actions = s.on_packet(wire::inbound(decoded, remaining));
            while let Some(action) = actions.pop() {
                match action {
                    Action::Close(_) => return most,
                    Action::Authenticate { .. } => actions.extend(s.on_authenticated(AuthOutcome::Admitted)),
                    Action::Write { ack, .. } | Action::Event { ack, .. } => {
                        actions.extend(s.on_written(ack, WriteOutcome::Applied));
                    }
                    Action::Send(packet) => {
                        // Every answer must be encodable for the client's version.
                        if let Some(p) = wire::outbound(s.version(), packet, MAX_PACKET) {
                            let mut out = BytesMut::new();
                            let mut enc = wire::codec(s.version(), MAX_PACKET);
                            assert!(tokio_util::codec::Encoder::encode(&mut enc, p, &mut out).is_ok());
                        }
                    }
                    Action::Watch | Action::Unwatch | Action::ListenCommands(_) => {}
                }
            }
        }
    }
    most
}

fn connect(version: u8) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', version, 0xC2, 0, 0];
    if version == 5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(&[0, 0, 0, 1, b'7', 0, 3, b'k', b'e', b'y']);
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

/// Packet-shaped noise: a plausible fixed header over random bytes.
fn packetish() -> impl Strategy<Value = Vec<u8>> {
    (any::<u8>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(first, body)| {
        let mut p = vec![first, body.len() as u8];
        p.extend(body);
        p
    })
}

fn chunked(bytes: Vec<u8>, cuts: Vec<usize>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = bytes.as_slice();
    for c in cuts {
        let at = c.min(rest.len());
        out.push(rest[..at].to_vec());
        rest = &rest[at..];
    }
    out.push(rest.to_vec());
    out
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), cuts in prop::collection::vec(0usize..300, 0..8)) {
        let most = drive(&chunked(bytes, cuts));
        prop_assert!(most <= 2048);
    }

    #[test]
    fn noise_after_a_valid_connect_never_panics_and_stays_bounded(
        v5 in any::<bool>(),
        noise in prop::collection::vec(packetish(), 0..40),
        tail in prop::collection::vec(any::<u8>(), 0..512),
        cuts in prop::collection::vec(0usize..200, 0..12),
    ) {
        let mut bytes = connect(if v5 { 5 } else { 4 });
        for p in noise {
            bytes.extend(p);
        }
        bytes.extend(tail);
        let most = drive(&chunked(bytes, cuts));
        // A packet is buffered whole at most, plus the chunk that completed it.
        prop_assert!(most <= MAX_PACKET as usize + 5 + 2048 + 64 * 40);
    }

    #[test]
    fn declared_lengths_over_the_limit_are_refused_before_they_are_buffered(len in (MAX_PACKET + 1)..(64 * 1024 * 1024u32)) {
        let mut bytes = connect(4);
        bytes.push(0x30); // PUBLISH
        let mut n = len as usize;
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 { b |= 0x80; }
            bytes.push(b);
            if n == 0 { break; }
        }
        bytes.extend_from_slice(&[0u8; 16]);
        let mut codec = wire::sniffing_codec();
        let mut buffer = BytesMut::from(&bytes[..]);
        let version = codec.decode(&mut buffer).ok().flatten().and_then(|(p, _)| wire::version_of(&p));
        prop_assert_eq!(version, Some(Version::V3));
        let mut codec = wire::codec(Version::V3, MAX_PACKET);
        prop_assert!(matches!(codec.decode(&mut buffer), Ok(Some(_))), "the CONNECT decodes");
        prop_assert!(codec.decode(&mut buffer).is_err(), "a {len}-byte packet is refused from its header");
    }
}
