use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Instant,
};

use flume::{Receiver, Sender};
use parking_lot::Mutex;
use tracing::{error, warn};

use crate::{
    protocol::{Packet, QoS},
    router::{FilterIdx, MAX_CHANNEL_CAPACITY},
    Cursor, Notification,
};

use super::{logs::PubWithProp, Forward, IncomingMeter, OutgoingMeter};

const MAX_INFLIGHT: usize = 100;
const MAX_PKID: u16 = MAX_INFLIGHT as u16;

#[derive(Debug)]
pub struct Incoming {
    /// Identifier associated with connected client
    pub(crate) client_id: String,
    /// Recv buffer
    pub(crate) buffer: Arc<Mutex<VecDeque<Packet>>>,
    /// incoming metrics
    pub(crate) meter: IncomingMeter,
}

impl Incoming {
    #[inline]
    pub(crate) fn new(client_id: String) -> Self {
        Self {
            buffer: Arc::new(Mutex::new(VecDeque::new())),
            meter: Default::default(),
            client_id,
        }
    }

    #[inline]
    pub(crate) fn buffer(&self) -> Arc<Mutex<VecDeque<Packet>>> {
        self.buffer.clone()
    }

    #[inline]
    pub(crate) fn exchange(&mut self, mut v: VecDeque<Packet>) -> VecDeque<Packet> {
        std::mem::swap(&mut v, &mut self.buffer.lock());
        v
    }
}

#[derive(Debug)]
pub struct Outgoing {
    /// Identifier associated with connected client
    pub(crate) client_id: String,
    /// Send buffer
    pub(crate) data_buffer: Arc<Mutex<VecDeque<Notification>>>,
    /// Handle which is given to router to allow router to communicate with this connection
    pub(crate) handle: Sender<()>,
    /// The buffer to keep track of inflight packets (Antumbra: where each can be read again, and the QoS and
    /// RETAIN flag it went with).
    inflight_buffer: VecDeque<Unacked>,
    /// PubRels waiting for PubComp
    pub(crate) unacked_pubrels: VecDeque<u16>,
    /// Last packet id
    last_pkid: u16,
    /// Antumbra: most QoS 1/2 publishes unacknowledged at once (a PUBREL waiting for its PUBCOMP included): the
    /// client's MQTT 5 Receive Maximum, capped at `MAX_INFLIGHT`.
    receive_max: usize,
    /// Antumbra: a resumed persistent session's unacknowledged QoS 1/2 publishes, to be sent again, with their
    /// packet ids and DUP, before anything else.
    pub(crate) resend: VecDeque<Unacked>,
    /// Metrics of outgoing messages of this connection
    pub(crate) meter: OutgoingMeter,
}

impl Outgoing {
    #[inline]
    pub(crate) fn new(client_id: String) -> (Self, Receiver<()>) {
        let (handle, rx) = flume::bounded(MAX_CHANNEL_CAPACITY);
        // Antumbra: no preallocation. An idle device connection must stay small (these buffers took ~130 KB
        // of address space per connection); they grow on first use and the router caps their length anyway.
        let data_buffer = VecDeque::new();
        let inflight_buffer = VecDeque::new();
        let unacked_pubrels = VecDeque::new();

        let outgoing = Self {
            client_id,
            data_buffer: Arc::new(Mutex::new(data_buffer)),
            inflight_buffer,
            unacked_pubrels,
            handle,
            last_pkid: 0,
            receive_max: MAX_INFLIGHT,
            resend: VecDeque::new(),
            meter: Default::default(),
        };

        (outgoing, rx)
    }

    #[inline]
    pub(crate) fn buffer(&self) -> Arc<Mutex<VecDeque<Notification>>> {
        self.data_buffer.clone()
    }

    /// Antumbra: at most `max` QoS 1/2 publishes unacknowledged at once (MQTT 5 Receive Maximum, §3.1.2.11.3;
    /// 0 is a protocol error the session refuses, and is taken as 1 here).
    pub fn limit_inflight(&mut self, max: u16) {
        self.receive_max = usize::from(max).clamp(1, MAX_INFLIGHT);
    }

    /// Antumbra: a QoS 2 publish takes its slot until its PUBCOMP (MQTT 5 §4.9), not only until its PUBREC.
    pub fn free_slots(&self) -> usize {
        self.receive_max
            .saturating_sub(self.inflight_buffer.len() + self.unacked_pubrels.len())
    }

    pub fn push_notification(&mut self, notification: Notification) -> usize {
        let mut buffer = self.data_buffer.lock();
        buffer.push_back(notification);
        buffer.len()
    }

    /// Push packets to the outgoing buffer. Antumbra: each comes with, for a retained message (in no log), the
    /// copy to send again should it stay unacknowledged until a persistent session resumes.
    pub fn push_forwards(
        &mut self,
        publishes: impl Iterator<Item = (Forward, Option<Arc<PubWithProp>>)>,
        qos: u8,
        filter_idx: usize,
    ) -> (usize, usize) {
        let mut buffer = self.data_buffer.lock();
        let publishes = publishes;

        if qos == 0 {
            for (p, _) in publishes {
                self.meter.publish_count += 1;
                buffer.push_back(Notification::Forward(p));
                // self.meter.total_size += p.len();
            }

            // self.meter.update_data_rate(total_size);
            let buffer_count = buffer.len();
            let inflight_count = self.inflight_buffer.len();
            return (buffer_count, inflight_count);
        }

        for (mut p, copy) in publishes {
            // Antumbra: a publish delivered at QoS 0 under a QoS 1 or 2 subscription (it was published at QoS 0)
            // takes no packet id and waits for no acknowledgement.
            if p.publish.qos == QoS::AtMostOnce {
                self.meter.publish_count += 1;
                buffer.push_back(Notification::Forward(p));
                continue;
            }
            // Index and pkid of current outgoing packet
            let in_use = [&self.inflight_buffer, &self.resend];
            p.publish.pkid = next_pkid(&mut self.last_pkid, &self.unacked_pubrels, in_use);

            let held = match (p.cursor, copy) {
                (Some(cursor), _) => Held::Log(cursor),
                (None, Some(copy)) => Held::Copy(copy, Instant::now()),
                (None, None) => Held::Copy(Arc::new((p.publish.clone(), p.properties.clone())), Instant::now()),
            };
            self.inflight_buffer.push_back(Unacked {
                pkid: p.publish.pkid,
                filter_idx,
                held,
                qos: p.publish.qos,
                retain: p.publish.retain,
            });

            self.meter.publish_count += 1;
            self.meter.total_size += p.publish.topic.len() + p.publish.payload.len();
            buffer.push_back(Notification::Forward(p));
        }

        let buffer_count = buffer.len();
        let inflight_count = self.inflight_buffer.len();

        if inflight_count + self.unacked_pubrels.len() > self.receive_max {
            warn!(
                "More inflight publishes than max allowed, inflight count = {}, max allowed = {}",
                inflight_count + self.unacked_pubrels.len(),
                self.receive_max
            );
        }

        (buffer_count, inflight_count)
    }

    /// Antumbra: takes the publish `pkid` out of the window when it is the oldest in flight and was sent at `qos`
    /// (PUBACK: QoS 1, PUBREC: QoS 2); `false` (nothing taken) for an out-of-order ack, an unknown id or an ack of
    /// the wrong kind, which the router treats as a protocol error. Upstream took the oldest out first, so a
    /// persistent session saved after such an error no longer had that publish to send again.
    pub fn register_ack(&mut self, pkid: u16, qos: QoS) -> bool {
        let Some(head) = self.inflight_buffer.front() else {
            return false;
        };
        // We don't support out of order acks
        if pkid != head.pkid || qos != head.qos {
            error!(pkid, head = head.pkid, ?qos, head_qos = ?head.qos, "out of order or unexpected ack.");
            return false;
        }
        self.inflight_buffer.pop_front();
        true
    }

    pub fn register_pubrec(&mut self, pkid: u16) {
        // NOTE: we can return true of false
        // to indicate whether this is duplicate or not
        self.unacked_pubrels.push_back(pkid);
    }

    // OASIS standards don't specify anything about ordering of PubComp
    // https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901240
    // But we don't support out of order / unsolicited pubcomps
    // to be consistent with the behaviour with other acks
    pub fn register_pubcomp(&mut self, pkid: u16) -> Option<()> {
        let id = self.unacked_pubrels.pop_front()?;

        // out of order acks
        if pkid != id {
            error!(pkid, id, "out of order ack.");
            return None;
        }

        Some(())
    }

    /// Antumbra: the unacknowledged QoS 1/2 publishes, oldest first, for a persistent session to send again when
    /// it resumes: those in flight, then those still waiting to be sent again (a resumed session taken over
    /// before it sent them all; nothing new goes out while some wait, so they are the newer).
    pub fn unacked(&self) -> VecDeque<Unacked> {
        self.inflight_buffer
            .iter()
            .chain(&self.resend)
            .cloned()
            .collect()
    }

    /// Antumbra: sends `publish` again as the unacknowledged `pkid` (DUP set) ahead of new publishes, whose
    /// packet ids continue after it.
    pub fn push_resend(&mut self, mut forward: Forward, unacked: Unacked) {
        forward.publish.pkid = unacked.pkid;
        forward.publish.dup = true;
        forward.publish.qos = unacked.qos;
        // As it went: the log keeps the flag as published, the forward had cleared it or not.
        forward.publish.retain = unacked.retain;
        self.last_pkid = if unacked.pkid == MAX_PKID { 0 } else { unacked.pkid };
        self.inflight_buffer.push_back(unacked);
        self.meter.publish_count += 1;
        self.data_buffer.lock().push_back(Notification::Forward(forward));
    }

    /// Antumbra: the log position of every unacknowledged QoS 1/2 publish (a retained publish has none and is
    /// skipped), and of those waiting to be sent again.
    pub fn unacked_cursors(&self) -> impl Iterator<Item = (FilterIdx, Cursor)> + '_ {
        self.inflight_buffer
            .iter()
            .chain(&self.resend)
            .filter_map(Unacked::cursor)
    }
}

/// Antumbra: the packet id after `last` (which becomes it), past any still waiting for a PUBCOMP, in flight or
/// waiting to be sent again: an id is free again only once its flow is complete (MQTT §2.2.1). Upstream reused
/// one whose PUBREL was unanswered.
fn next_pkid(last: &mut u16, pubrels: &VecDeque<u16>, unacked: [&VecDeque<Unacked>; 2]) -> u16 {
    let in_use = |id: u16| pubrels.contains(&id) || unacked.iter().any(|list| list.iter().any(|u| u.pkid == id));
    // At most one turn: the window (`MAX_INFLIGHT`) is never wider than the ids. Always checked: a PUBCOMP
    // that came meanwhile can leave a gap among the ids in flight, which the sequence would reach again.
    for _ in 0..MAX_PKID {
        *last = if *last >= MAX_PKID { 1 } else { *last + 1 };
        if !in_use(*last) {
            break;
        }
    }
    *last
}

/// Antumbra: where an unacknowledged publish can be read again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// Its position in its filter's log.
    Log(Cursor),
    /// A copy: a retained message sent for a subscription is in no log (kept as sent, before any topic
    /// alias), and when it was sent, so that it goes again with its Message Expiry Interval counted down from
    /// then (MQTT 5 §3.3.2.3.3).
    Copy(Arc<PubWithProp>, Instant),
}

/// Antumbra: an unacknowledged QoS 1/2 publish in flight or of a persistent session: its packet id, its filter,
/// where it can be read again, and the QoS and RETAIN flag it went with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unacked {
    pub pkid: u16,
    pub filter_idx: FilterIdx,
    pub held: Held,
    pub qos: QoS,
    pub retain: bool,
}

impl Unacked {
    /// Its filter and position in that filter's log, if it is in one (the log keeps it until acknowledged).
    pub fn cursor(&self) -> Option<(FilterIdx, Cursor)> {
        match self.held {
            Held::Log(cursor) => Some((self.filter_idx, cursor)),
            Held::Copy(..) => None,
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::protocol::Publish;

    #[test]
    fn unacked_keeps_packet_ids_positions_and_retained_copies_in_order() {
        let (mut outgoing, _) = Outgoing::new("unacked-test".to_string());
        let logged = |pkid, cursor, qos| Unacked {
            pkid,
            filter_idx: 0,
            held: Held::Log(cursor),
            qos,
            retain: false,
        };
        let copy = Arc::new((Publish::new("a/b", "retained", true), None));
        let retained = Unacked {
            pkid: 5,
            filter_idx: 1,
            held: Held::Copy(copy, Instant::now()),
            qos: QoS::AtLeastOnce,
            retain: true,
        };
        outgoing.inflight_buffer.extend([
            logged(4, (0, 8), QoS::AtLeastOnce),
            retained.clone(),
            logged(6, (0, 10), QoS::ExactlyOnce),
        ]);
        // Still to be sent again after a resume whose window was full: newer than those in flight.
        outgoing.resend.push_back(logged(7, (0, 11), QoS::AtLeastOnce));
        assert_eq!(
            outgoing.unacked(),
            [
                logged(4, (0, 8), QoS::AtLeastOnce),
                retained,
                logged(6, (0, 10), QoS::ExactlyOnce),
                logged(7, (0, 11), QoS::AtLeastOnce)
            ]
        );
        // The log keeps what is in it; the retained copy needs no log.
        assert_eq!(
            outgoing.unacked_cursors().collect::<Vec<_>>(),
            [(0, (0, 8)), (0, (0, 10)), (0, (0, 11))]
        );
    }

    fn forwards(count: u64) -> impl Iterator<Item = (Forward, Option<Arc<PubWithProp>>)> {
        (0..count).map(|n| {
            let mut publish = Publish::new("a/b", "m", false);
            publish.qos = QoS::ExactlyOnce;
            let forward = Forward {
                cursor: Some((0, n)),
                size: 0,
                publish,
                properties: None,
            };
            (forward, None)
        })
    }

    #[test]
    fn the_window_keeps_to_the_receive_maximum_and_counts_a_pubrel_until_its_pubcomp() {
        let (mut outgoing, _) = Outgoing::new("window-test".to_string());
        assert_eq!(outgoing.free_slots(), MAX_INFLIGHT);
        outgoing.limit_inflight(0);
        assert_eq!(outgoing.free_slots(), 1);
        outgoing.limit_inflight(u16::MAX);
        assert_eq!(outgoing.free_slots(), MAX_INFLIGHT);
        outgoing.limit_inflight(3);
        outgoing.push_forwards(forwards(2), 2, 0);
        assert_eq!(outgoing.free_slots(), 1);
        // PUBREC: the publish leaves the in-flight buffer, its PUBREL waits for a PUBCOMP and keeps the slot.
        assert!(outgoing.register_ack(1, QoS::ExactlyOnce));
        outgoing.register_pubrec(1);
        assert_eq!(outgoing.free_slots(), 1);
        outgoing.register_pubcomp(1).unwrap();
        assert_eq!(outgoing.free_slots(), 2);
    }

    #[test]
    fn a_packet_id_waiting_for_its_pubcomp_is_not_given_again() {
        let (mut outgoing, _) = Outgoing::new("pkid-test".to_string());
        outgoing.last_pkid = MAX_PKID - 1;
        outgoing.unacked_pubrels.extend([MAX_PKID, 1]);
        outgoing.push_forwards(forwards(2), 2, 0);
        let ids: Vec<u16> = outgoing.inflight_buffer.iter().map(|u| u.pkid).collect();
        assert_eq!(ids, [2, 3]);
    }

    #[test]
    fn a_packet_id_still_in_flight_is_not_given_again_after_a_gap() {
        // Ids 1-100 in flight but 50 (acknowledged out of the sequence's turn, as a PUBCOMP can be): the next is
        // 50, not 1 again.
        let (mut outgoing, _) = Outgoing::new("gap-test".to_string());
        let unacked = |pkid| Unacked {
            pkid,
            filter_idx: 0,
            held: Held::Log((0, u64::from(pkid))),
            qos: QoS::AtLeastOnce,
            retain: false,
        };
        outgoing
            .inflight_buffer
            .extend((1..=MAX_PKID).filter(|id| *id != 50).map(unacked));
        outgoing.last_pkid = MAX_PKID;
        outgoing.limit_inflight(u16::MAX);
        outgoing.push_forwards(forwards(1), 2, 0);
        assert_eq!(outgoing.inflight_buffer.back().unwrap().pkid, 50);
    }

    // use super::{Outgoing, MAX_INFLIGHT};
    // use crate::protocol::{Publish, QoS};
    // use crate::router::Forward;
    // use crate::Notification;
    //
    // fn publishes(count: usize) -> impl Iterator<Item = Forward> {
    //     (1..=count).map(|v| {
    //         let publish = Publish {
    //             dup: false,
    //             retain: false,
    //             pkid: 0,
    //             qos: QoS::AtLeastOnce,
    //             topic: "hello/world".into(),
    //             payload: vec![1, 2, 3].into(),
    //         };
    //
    //         Forward {
    //             cursor: (0, v as u64),
    //             publish,
    //             size: 0,
    //         }
    //     })
    // }
    //
    // #[test]
    // fn inflight_ring_buffer_pushes_correctly() {
    //     let count = MAX_INFLIGHT as usize;
    //     let (mut outgoing, _rx) = Outgoing::new("hello".to_owned());
    //     outgoing.push_forwards(publishes(count), 1, 3);
    //
    //     // Index 1 = (0, 1), Index 99 = (0, 99), Index 0 = (0, 100)
    //     assert_eq!(outgoing.inflight_buffer[0].unwrap().1, (0, count as u64));
    //     for i in 1..count {
    //         assert_eq!(outgoing.inflight_buffer[i].unwrap().1, (0, i as u64));
    //     }
    //
    //     // Outgoing publish pkids are as expected
    //     for (i, o) in outgoing.data_buffer.lock().iter().enumerate() {
    //         let pkid = match &o {
    //             Notification::Forward(f) => f.publish.pkid,
    //             _ => unreachable!(),
    //         };
    //
    //         assert_eq!(pkid, i as u16 + 1);
    //     }
    // }
    //
    // #[test]
    // fn inflight_ring_buffer_pops_correctly() {
    //     let (mut outgoing, _rx) = Outgoing::new("hello".to_owned());
    //     outgoing.push_forwards(publishes(MAX_INFLIGHT as usize), 1, 3);
    //
    //     for pkid in 1..=MAX_INFLIGHT {
    //         let (unsolicited, outoforder) = outgoing.register_ack(pkid);
    //         assert_eq!(unsolicited, false);
    //         assert_eq!(outoforder, false);
    //     }
    // }
}
