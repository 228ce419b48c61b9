//! MQTT framing for the front door: one listener serves MQTT 3.1.1 and 5 by reading the CONNECT's protocol
//! level itself, then decoding with rumqttd's public V4 or V5 codec.
//!
//! It also guards the codecs' known panics (RUMQTTD.md, and our reading of the sources): V4 cannot write a
//! packet that carries v5 properties, so they are stripped for 3.1.1 clients; V5 panics on packet types a
//! client never sends (CONNACK, UNSUBACK, ...), so the type nibble is checked before decoding.

use bytes::BytesMut;
use rumqttd::protocol::{self, v4::V4, v5::V5, Packet, Protocol};

/// The protocol a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5 (protocol level 5).
    V5,
}

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniff {
    /// More bytes are needed.
    Incomplete,
    /// A CONNECT of this version.
    Connect(Version),
    /// Not MQTT, not a CONNECT, or a protocol level we do not serve (3.1 `MQIsdp` among them).
    Unsupported(u8),
}

/// Looks at a buffered CONNECT's protocol level without consuming anything.
pub fn sniff(buf: &[u8]) -> Sniff {
    let Some(&first) = buf.first() else {
        return Sniff::Incomplete;
    };
    if first != 0x10 {
        return Sniff::Unsupported(0);
    }
    // Remaining length: 1 to 4 bytes of varint.
    let mut at = 1;
    loop {
        let Some(&b) = buf.get(at) else {
            return Sniff::Incomplete;
        };
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        if at > 4 {
            return Sniff::Unsupported(0);
        }
    }
    let (Some(&hi), Some(&lo)) = (buf.get(at), buf.get(at + 1)) else {
        return Sniff::Incomplete;
    };
    let name_len = usize::from(u16::from_be_bytes([hi, lo]));
    let name_end = at + 2 + name_len;
    let Some(&level) = buf.get(name_end) else {
        return Sniff::Incomplete;
    };
    match (&buf[at + 2..name_end], level) {
        (b"MQTT", 4) => Sniff::Connect(Version::V4),
        (b"MQTT", 5) => Sniff::Connect(Version::V5),
        (_, level) => Sniff::Unsupported(level),
    }
}

/// A decoder/encoder for one connection.
pub struct Codec {
    version: Version,
    max_packet: usize,
    v4: V4,
    v5: V5,
}

impl Codec {
    /// A codec for `version`, refusing packets larger than `max_packet` bytes.
    pub fn new(version: Version, max_packet: usize) -> Self {
        Self {
            version,
            max_packet,
            v4: V4,
            v5: V5,
        }
    }

    /// The version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Decodes the CONNECT (first packet).
    pub fn read_connect(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, protocol::Error> {
        self.read_any(buf)
    }

    /// Decodes the next packet after CONNECT; `Ok(None)` means more bytes are needed. Packet types a client must
    /// not send after CONNECT are a protocol error.
    pub fn read(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, protocol::Error> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        match first >> 4 {
            3..=8 | 10 | 12 | 14 => self.read_any(buf),
            other => Err(protocol::Error::InvalidPacketType(other)),
        }
    }

    fn read_any(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, protocol::Error> {
        let result = match self.version {
            Version::V4 => self.v4.read_mut(buf, self.max_packet),
            Version::V5 => self.v5.read_mut(buf, self.max_packet),
        };
        match result {
            Ok(packet) => Ok(Some(packet)),
            Err(protocol::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Encodes a packet for this client (properties dropped for 3.1.1). A DISCONNECT to a 3.1.1 client is
    /// nothing: that protocol has none from the server (the connection is closed instead), though the router
    /// asks for one when it ends a connection for a protocol error.
    pub fn write(&self, packet: Packet, out: &mut BytesMut) -> Result<usize, protocol::Error> {
        match self.version {
            Version::V4 if matches!(packet, Packet::Disconnect(..)) => Ok(0),
            Version::V4 => self.v4.write(strip_properties(packet), out),
            Version::V5 => self.v5.write(packet, out),
        }
    }
}

/// The same packet without MQTT 5 properties, which a 3.1.1 client cannot receive.
pub fn strip_properties(packet: Packet) -> Packet {
    match packet {
        Packet::ConnAck(p, _) => Packet::ConnAck(p, None),
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::Subscribe(p, _) => Packet::Subscribe(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::Unsubscribe(p, _) => Packet::Unsubscribe(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::Disconnect(p, _) => Packet::Disconnect(p, None),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(name: &[u8], level: u8) -> Vec<u8> {
        let mut body = vec![0, name.len() as u8];
        body.extend_from_slice(name);
        body.extend_from_slice(&[level, 0x02, 0, 60, 0, 1, b'x']);
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend(body);
        packet
    }

    #[test]
    fn sniffs_both_versions_and_refuses_others() {
        assert_eq!(sniff(&connect(b"MQTT", 4)), Sniff::Connect(Version::V4));
        assert_eq!(sniff(&connect(b"MQTT", 5)), Sniff::Connect(Version::V5));
        assert_eq!(sniff(&connect(b"MQIsdp", 3)), Sniff::Unsupported(3));
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniff::Unsupported(0));
        let full = connect(b"MQTT", 4);
        for cut in 0..9 {
            assert_eq!(sniff(&full[..cut]), Sniff::Incomplete, "{cut}");
        }
    }

    #[test]
    fn decodes_a_connect_and_refuses_client_only_packet_types() {
        let mut codec = Codec::new(Version::V4, 1024);
        let mut buf = BytesMut::from(&connect(b"MQTT", 4)[..]);
        let Some(Packet::Connect(c, ..)) = codec.read_connect(&mut buf).unwrap() else {
            panic!("connect expected")
        };
        assert_eq!(c.client_id, "x");
        let mut connack = BytesMut::from(&[0x20u8, 2, 0, 0][..]);
        assert!(codec.read(&mut connack).is_err(), "a client never sends CONNACK");
        let mut v5 = Codec::new(Version::V5, 1024);
        let mut unsuback = BytesMut::from(&[0xB0u8, 3, 0, 1, 0][..]);
        assert!(
            v5.read(&mut unsuback).is_err(),
            "V5 would panic on UNSUBACK; we refuse it first"
        );
        let mut partial = BytesMut::from(&[0x30u8, 10, 0][..]);
        assert!(matches!(codec.read(&mut partial), Ok(None)));
    }

    #[test]
    fn a_disconnect_goes_only_to_an_mqtt5_client() {
        use rumqttd::protocol::{Disconnect, DisconnectReasonCode};
        let disconnect = || {
            let reason_code = DisconnectReasonCode::ReceiveMaximumExceeded;
            Packet::Disconnect(Disconnect { reason_code }, None)
        };
        let mut out = BytesMut::new();
        Codec::new(Version::V4, 1024)
            .write(disconnect(), &mut out)
            .unwrap();
        assert!(out.is_empty());
        Codec::new(Version::V5, 1024)
            .write(disconnect(), &mut out)
            .unwrap();
        assert_eq!(&out[..3], &[0xE0, 1, 0x93]);
    }

    #[test]
    fn oversized_packets_are_refused() {
        let mut codec = Codec::new(Version::V4, 16);
        let mut publish = BytesMut::from(&[0x30u8, 40][..]);
        publish.extend_from_slice(&[0; 40]);
        assert!(codec.read(&mut publish).is_err());
    }
}
