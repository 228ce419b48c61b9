use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use flume::{Receiver, Sender};
use parking_lot::Mutex;
use tracing::{error, warn};

use crate::{
    protocol::{Packet, QoS},
    router::{FilterIdx, MAX_CHANNEL_CAPACITY},
    Cursor, Notification,
};

use super::{Forward, IncomingMeter, OutgoingMeter};

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
    /// The buffer to keep track of inflight packets (Antumbra: with the QoS and RETAIN flag each went with).
    inflight_buffer: VecDeque<(u16, FilterIdx, Option<Cursor>, QoS, bool)>,
    /// PubRels waiting for PubComp
    pub(crate) unacked_pubrels: VecDeque<u16>,
    /// Last packet id
    last_pkid: u16,
    /// Antumbra: a resumed persistent session's unacknowledged QoS 1/2 publishes (packet id, filter, position in
    /// its log), to be sent again, with their packet ids and DUP, before anything else.
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
            resend: VecDeque::new(),
            meter: Default::default(),
        };

        (outgoing, rx)
    }

    #[inline]
    pub(crate) fn buffer(&self) -> Arc<Mutex<VecDeque<Notification>>> {
        self.data_buffer.clone()
    }

    pub fn free_slots(&self) -> usize {
        MAX_INFLIGHT - self.inflight_buffer.len()
    }

    pub fn push_notification(&mut self, notification: Notification) -> usize {
        let mut buffer = self.data_buffer.lock();
        buffer.push_back(notification);
        buffer.len()
    }

    /// Push packets to the outgoing buffer.
    pub fn push_forwards(
        &mut self,
        publishes: impl Iterator<Item = Forward>,
        qos: u8,
        filter_idx: usize,
    ) -> (usize, usize) {
        let mut buffer = self.data_buffer.lock();
        let publishes = publishes;

        if qos == 0 {
            for p in publishes {
                self.meter.publish_count += 1;
                buffer.push_back(Notification::Forward(p));
                // self.meter.total_size += p.len();
            }

            // self.meter.update_data_rate(total_size);
            let buffer_count = buffer.len();
            let inflight_count = self.inflight_buffer.len();
            return (buffer_count, inflight_count);
        }

        for mut p in publishes {
            // Antumbra: a publish delivered at QoS 0 under a QoS 1 or 2 subscription (it was published at QoS 0)
            // takes no packet id and waits for no acknowledgement.
            if p.publish.qos == QoS::AtMostOnce {
                self.meter.publish_count += 1;
                buffer.push_back(Notification::Forward(p));
                continue;
            }
            // Index and pkid of current outgoing packet
            self.last_pkid += 1;
            p.publish.pkid = self.last_pkid;

            self.inflight_buffer
                .push_back((self.last_pkid, filter_idx, p.cursor, p.publish.qos, p.publish.retain));

            // Place max pkid packet at index 0
            if self.last_pkid == MAX_PKID {
                self.last_pkid = 0;
            }

            self.meter.publish_count += 1;
            self.meter.total_size += p.publish.topic.len() + p.publish.payload.len();
            buffer.push_back(Notification::Forward(p));
        }

        let buffer_count = buffer.len();
        let inflight_count = self.inflight_buffer.len();

        if inflight_count > MAX_INFLIGHT {
            warn!(
                "More inflight publishes than max allowed, inflight count = {}, max allowed = {}",
                inflight_count, MAX_INFLIGHT
            );
        }

        (buffer_count, inflight_count)
    }

    // Returns (unsolicited, outoforder) flags
    // Return: Out of order or unsolicited acks
    pub fn register_ack(&mut self, pkid: u16) -> Option<()> {
        let (head, ..) = self.inflight_buffer.pop_front()?;

        // We don't support out of order acks
        if pkid != head {
            error!(pkid, head, "out of order ack.");
            return None;
        }

        Some(())
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

    /// Antumbra: the unacknowledged QoS 1/2 publishes that are in a log, oldest first, for a persistent session
    /// to send again when it resumes (a retained publish has no position in a log, and is not sent again).
    /// Those still waiting to be sent again (a session resumed and taken over before it sent them) come first.
    pub fn unacked(&self) -> VecDeque<Unacked> {
        let inflight = self
            .inflight_buffer
            .iter()
            .filter_map(|(pkid, filter_idx, cursor, qos, retain)| {
                Some(Unacked {
                    pkid: *pkid,
                    filter_idx: *filter_idx,
                    cursor: (*cursor)?,
                    qos: *qos,
                    retain: *retain,
                })
            });
        self.resend.iter().copied().chain(inflight).collect()
    }

    /// Antumbra: sends `publish` again as the unacknowledged `pkid` (DUP set) ahead of new publishes, whose
    /// packet ids continue after it.
    pub fn push_resend(&mut self, mut forward: Forward, unacked: Unacked) {
        let Unacked {
            pkid,
            filter_idx,
            qos,
            retain,
            ..
        } = unacked;
        forward.publish.pkid = pkid;
        forward.publish.dup = true;
        forward.publish.qos = qos;
        // As it went: the log keeps the flag as published, the forward had cleared it or not.
        forward.publish.retain = retain;
        self.inflight_buffer
            .push_back((pkid, filter_idx, forward.cursor, qos, retain));
        self.last_pkid = if pkid == MAX_PKID { 0 } else { pkid };
        self.meter.publish_count += 1;
        self.data_buffer.lock().push_back(Notification::Forward(forward));
    }

    /// Antumbra: the log position of every unacknowledged QoS 1/2 publish, oldest first (a retained publish has
    /// none and is skipped), and of those waiting to be sent again.
    pub fn unacked_cursors(&self) -> impl Iterator<Item = (FilterIdx, Cursor)> + '_ {
        self.inflight_buffer
            .iter()
            .filter_map(|(_, filter_idx, cursor, ..)| Some((*filter_idx, (*cursor)?)))
            .chain(self.resend.iter().map(|u| (u.filter_idx, u.cursor)))
    }
}

/// Antumbra: an unacknowledged QoS 1/2 publish of a persistent session: its packet id, where it is (filter and
/// position in that filter's log), and the QoS and RETAIN flag it went with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unacked {
    pub pkid: u16,
    pub filter_idx: FilterIdx,
    pub cursor: Cursor,
    pub qos: QoS,
    pub retain: bool,
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn unacked_keeps_packet_ids_and_positions_in_order_and_skips_retained_publishes() {
        let (mut outgoing, _) = Outgoing::new("unacked-test".to_string());
        let unacked = |pkid, cursor, qos| Unacked {
            pkid,
            filter_idx: 0,
            cursor,
            qos,
            retain: false,
        };
        outgoing.inflight_buffer.extend([
            (4, 0, Some((0, 8)), QoS::AtLeastOnce, false),
            (5, 1, None, QoS::AtLeastOnce, true),
            (6, 0, Some((0, 10)), QoS::ExactlyOnce, false),
        ]);
        outgoing.resend.push_back(unacked(3, (0, 7), QoS::AtLeastOnce));
        assert_eq!(
            outgoing.unacked(),
            [
                unacked(3, (0, 7), QoS::AtLeastOnce),
                unacked(4, (0, 8), QoS::AtLeastOnce),
                unacked(6, (0, 10), QoS::ExactlyOnce)
            ]
        );
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
