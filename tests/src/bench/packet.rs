//! The few MQTT 3.1.1 packets the load generator needs, encoded and parsed by hand.
//!
//! Encoding appends to a `Vec<u8>` so a burst of packets becomes one TLS write; parsing takes complete packets
//! off the front of a `BytesMut` read buffer and leaves a partial one there for the next read.

use anyhow::{bail, Result};
use bytes::{Buf, Bytes, BytesMut};

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

/// Largest packet we accept from a broker; far above anything the scenarios send.
const MAX_PACKET: usize = 1 << 20;

/// A packet received from the broker.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet {
    /// CONNACK with its return code (0 = accepted).
    ConnAck { code: u8 },
    /// SUBACK with the granted QoS (or 0x80 = failure) of the first filter.
    SubAck { packet_id: u16, granted: u8 },
    /// An application message; `packet_id` is set for QoS > 0; `dup` when the broker sends it again.
    Publish {
        qos: u8,
        dup: bool,
        retain: bool,
        packet_id: Option<u16>,
        topic: Bytes,
        payload: Bytes,
    },
    /// PUBACK for one of our QoS 1 publishes.
    PubAck { packet_id: u16 },
    /// Answer to PINGREQ.
    PingResp,
    /// DISCONNECT from the server (MQTT 5 only), with its reason code (0 when the packet has none).
    Disconnect { reason: u8 },
    /// Any other packet type (by its type nibble); the scenarios treat it as unexpected.
    Other(u8),
}

fn put_remaining_length(buf: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u16).to_be_bytes());
    buf.extend_from_slice(s);
}

/// CONNECT, MQTT 3.1.1 (protocol level 4), a clean session unless `clean` is false, no will, no username or
/// password: the broker knows the device from its TLS client certificate.
pub fn connect(buf: &mut Vec<u8>, client_id: &str, keep_alive_secs: u16, clean: bool) {
    buf.push(CONNECT << 4);
    put_remaining_length(buf, 10 + 2 + client_id.len());
    put_str(buf, b"MQTT");
    buf.push(4);
    buf.push(if clean { 0x02 } else { 0x00 });
    buf.extend_from_slice(&keep_alive_secs.to_be_bytes());
    put_str(buf, client_id.as_bytes());
}

/// SUBSCRIBE to one filter.
pub fn subscribe(buf: &mut Vec<u8>, packet_id: u16, filter: &str, qos: u8) {
    buf.push((SUBSCRIBE << 4) | 0x02);
    put_remaining_length(buf, 2 + 2 + filter.len() + 1);
    buf.extend_from_slice(&packet_id.to_be_bytes());
    put_str(buf, filter.as_bytes());
    buf.push(qos);
}

/// UNSUBSCRIBE from one filter (its UNSUBACK comes back as `Packet::Other(11)`).
#[allow(dead_code)] // used by the e2e tests only (this module is compiled into both tools)
pub fn unsubscribe(buf: &mut Vec<u8>, packet_id: u16, filter: &str) {
    buf.push((UNSUBSCRIBE << 4) | 0x02);
    put_remaining_length(buf, 2 + 2 + filter.len());
    buf.extend_from_slice(&packet_id.to_be_bytes());
    put_str(buf, filter.as_bytes());
}

/// PUBLISH of `size` payload bytes (at least 8) whose first 8 bytes are `stamp`, big-endian; the rest is
/// filler. `packet_id` is used only for QoS > 0.
pub fn publish(buf: &mut Vec<u8>, topic: &str, qos: u8, packet_id: u16, stamp: u64, size: usize) {
    let size = size.max(8);
    let id_len = if qos > 0 { 2 } else { 0 };
    buf.push((PUBLISH << 4) | (qos << 1));
    put_remaining_length(buf, 2 + topic.len() + id_len + size);
    put_str(buf, topic.as_bytes());
    if qos > 0 {
        buf.extend_from_slice(&packet_id.to_be_bytes());
    }
    buf.extend_from_slice(&stamp.to_be_bytes());
    buf.resize(buf.len() + size - 8, b'.');
}

/// PUBLISH of `payload` as it is (a JSON shadow request, say). `packet_id` is used only for QoS > 0.
#[allow(dead_code)] // used by shadow-bench only (this module is compiled into both tools)
pub fn publish_payload(buf: &mut Vec<u8>, topic: &str, qos: u8, packet_id: u16, payload: &[u8]) {
    let id_len = if qos > 0 { 2 } else { 0 };
    buf.push((PUBLISH << 4) | (qos << 1));
    put_remaining_length(buf, 2 + topic.len() + id_len + payload.len());
    put_str(buf, topic.as_bytes());
    if qos > 0 {
        buf.extend_from_slice(&packet_id.to_be_bytes());
    }
    buf.extend_from_slice(payload);
}

/// PUBACK for a QoS 1 message the broker delivered to us.
pub fn puback(buf: &mut Vec<u8>, packet_id: u16) {
    buf.push(PUBACK << 4);
    buf.push(2);
    buf.extend_from_slice(&packet_id.to_be_bytes());
}

/// PINGREQ.
pub fn pingreq(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&[PINGREQ << 4, 0]);
}

/// DISCONNECT.
pub fn disconnect(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&[DISCONNECT << 4, 0]);
}

/// The send stamp in the first 8 bytes of a payload this tool published.
pub fn stamp(payload: &[u8]) -> Option<u64> {
    payload
        .get(..8)
        .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
}

/// Takes one complete packet off the front of `buf`, or returns `None` when more bytes are needed.
pub fn parse(buf: &mut BytesMut) -> Result<Option<Packet>> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    let mut header = 1;
    loop {
        let Some(&byte) = buf.get(header) else {
            return Ok(None);
        };
        len |= usize::from(byte & 0x7f) << (7 * (header - 1));
        header += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if header > 4 {
            bail!("malformed remaining length");
        }
    }
    if len > MAX_PACKET {
        bail!("packet of {len} bytes is larger than {MAX_PACKET}");
    }
    if buf.len() < header + len {
        buf.reserve(header + len - buf.len());
        return Ok(None);
    }
    buf.advance(header);
    let mut body = buf.split_to(len).freeze();
    let kind = first >> 4;
    let packet = match kind {
        CONNACK if len >= 2 => Packet::ConnAck { code: body[1] },
        SUBACK if len >= 3 => Packet::SubAck {
            packet_id: body.get_u16(),
            granted: body[0],
        },
        PUBACK if len >= 2 => Packet::PubAck {
            packet_id: body.get_u16(),
        },
        PINGRESP => Packet::PingResp,
        DISCONNECT => Packet::Disconnect {
            reason: body.first().copied().unwrap_or(0),
        },
        PUBLISH => {
            let qos = (first >> 1) & 0x03;
            if body.len() < 2 {
                bail!("short PUBLISH");
            }
            let topic_len = usize::from(body.get_u16());
            let id_len = if qos > 0 { 2 } else { 0 };
            if body.len() < topic_len + id_len {
                bail!("short PUBLISH");
            }
            let topic = body.split_to(topic_len);
            let packet_id = (qos > 0).then(|| body.get_u16());
            Packet::Publish {
                qos,
                dup: first & 0b1000 != 0,
                retain: first & 1 == 1,
                packet_id,
                topic,
                payload: body,
            }
        }
        CONNACK | SUBACK | PUBACK => bail!("short packet of type {kind}"),
        other => Packet::Other(other),
    };
    Ok(Some(packet))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8]) -> Vec<Packet> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(p) = parse(&mut buf).unwrap() {
            out.push(p);
        }
        assert!(buf.is_empty());
        out
    }

    #[test]
    fn connect_is_mqtt_311() {
        let mut buf = Vec::new();
        connect(&mut buf, "bench-00001", 60, true);
        assert_eq!(
            buf,
            b"\x10\x17\x00\x04MQTT\x04\x02\x00\x3c\x00\x0bbench-00001".to_vec()
        );
    }

    #[test]
    fn publish_round_trips_with_stamp_and_long_length() {
        let mut buf = Vec::new();
        publish(&mut buf, "devices/a/p2p", 1, 7, 42, 1024);
        publish(&mut buf, "devices/a/p2p", 0, 0, 43, 16);
        let packets = parse_all(&buf);
        let Packet::Publish {
            qos,
            packet_id,
            topic,
            payload,
            ..
        } = &packets[0]
        else {
            panic!("{packets:?}")
        };
        assert_eq!(
            (*qos, *packet_id, &topic[..]),
            (1, Some(7), &b"devices/a/p2p"[..])
        );
        assert_eq!((payload.len(), stamp(payload)), (1024, Some(42)));
        let Packet::Publish {
            qos,
            packet_id,
            payload,
            ..
        } = &packets[1]
        else {
            panic!("{packets:?}")
        };
        assert_eq!(
            (*qos, *packet_id, payload.len(), stamp(payload)),
            (0, None, 16, Some(43))
        );
    }

    #[test]
    fn acks_parse_and_partial_packets_wait() {
        let mut buf = Vec::new();
        puback(&mut buf, 300);
        buf.extend_from_slice(&[0x20, 2, 0, 5, 0x90, 3, 0, 9, 1, 0xd0, 0]);
        assert_eq!(
            parse_all(&buf),
            vec![
                Packet::PubAck { packet_id: 300 },
                Packet::ConnAck { code: 5 },
                Packet::SubAck {
                    packet_id: 9,
                    granted: 1
                },
                Packet::PingResp,
            ]
        );
        let mut partial = BytesMut::from(&buf[..3]);
        assert_eq!(parse(&mut partial).unwrap(), None);
        assert_eq!(partial.len(), 3);
    }
}
