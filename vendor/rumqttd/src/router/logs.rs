use super::Ack;
use slab::Slab;
use tracing::{info, trace};

use crate::protocol::{
    matches, ConnAck, ConnAckProperties, PingResp, PubAck, PubComp, PubCompReason, PubRec, PubRel, Publish,
    PublishProperties, SubAck, UnsubAck,
};
use crate::router::{DataRequest, FilterIdx, SubscriptionMeter, Waiters};
use crate::{ConnectionId, Filter, Offset, RouterConfig, Topic};

use crate::segments::{CommitLog, Position};
use crate::Storage;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::time::Instant;

/// A publish with its MQTT 5 properties (Antumbra: public in the crate, for the router's in-flight copies and
/// saved sessions).
pub type PubWithProp = (Publish, Option<PublishProperties>);

#[derive(Clone)]
pub struct PublishData {
    pub publish: Publish,
    pub properties: Option<PublishProperties>,
    pub timestamp: Instant,
    /// Antumbra: the client id of the connection that published it (`None`: a will, or the broker's own), for
    /// MQTT 5 No Local.
    pub origin: Option<std::sync::Arc<str>>,
}

impl From<PubWithProp> for PublishData {
    fn from((publish, properties): PubWithProp) -> Self {
        PublishData {
            publish,
            properties,
            timestamp: Instant::now(),
            origin: None,
        }
    }
}

impl PublishData {
    /// Antumbra: a publish logged now, published by the client `origin` (see [`PublishData::origin`]).
    pub fn published_by(
        publish: Publish,
        properties: Option<PublishProperties>,
        origin: Option<std::sync::Arc<str>>,
    ) -> Self {
        PublishData {
            origin,
            ..PublishData::from((publish, properties))
        }
    }

    /// Antumbra: whether a reader whose subscription has No Local, `nolocal` being its client id, skips this.
    fn skipped_by(&self, nolocal: Option<&str>) -> bool {
        nolocal.is_some_and(|client| self.origin.as_deref() == Some(client))
    }

    /// Whether its MQTT 5 Message Expiry Interval has passed at `now`.
    fn expired(&self, now: Instant) -> bool {
        expired(&self.properties, self.timestamp, now)
    }

    /// The publish as it leaves the broker at `now` (see [`sent_at`]).
    fn sent_at(self, now: Instant) -> PubWithProp {
        sent_at((self.publish, self.properties), self.timestamp, now)
    }
}

/// Antumbra: whether the MQTT 5 Message Expiry Interval in `properties`, counted from `since`, has passed at
/// `now`.
pub(crate) fn expired(properties: &Option<PublishProperties>, since: Instant, now: Instant) -> bool {
    let interval = properties.as_ref().and_then(|p| p.message_expiry_interval);
    interval.is_some_and(|interval| waited(since, now) >= interval)
}

/// Antumbra: a publish as it leaves the broker at `now`, its Message Expiry Interval counted from `since` less
/// the time waited (MQTT 5 §3.3.2.3.3,
/// ref: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901112).
pub(crate) fn sent_at((publish, mut properties): PubWithProp, since: Instant, now: Instant) -> PubWithProp {
    if let Some(interval) = properties.as_mut().and_then(|p| p.message_expiry_interval.as_mut()) {
        *interval = interval.saturating_sub(waited(since, now));
    }
    (publish, properties)
}

/// Whole seconds from `since` to `now`.
fn waited(since: Instant, now: Instant) -> u32 {
    now.saturating_duration_since(since).as_secs() as u32
}

// TODO: remove this from here
impl Storage for PublishData {
    // TODO: calculate size of publish properties as well!
    fn size(&self) -> usize {
        let publish = &self.publish;
        4 + publish.topic.len() + publish.payload.len()
    }
}

/// Stores 'device' data and 'actions' data in native commitlog
/// organized by subscription filter. Device data is replicated
/// while actions data is not
pub struct DataLog {
    pub config: RouterConfig,
    /// Native commitlog data organized by subscription. Contains
    /// device data and actions data logs.
    ///
    /// Device data is replicated while actions data is not.
    /// Also has waiters used to wake connections/replicator tracker
    /// which are caught up with all the data on 'Filter' and waiting
    /// for new data
    pub native: Slab<Data<PublishData>>,
    /// Map of subscription filter name to filter index
    filter_indexes: HashMap<Filter, FilterIdx>,
    retained_publishes: HashMap<Topic, PublishData>,
    /// List of filters associated with a topic
    publish_filters: HashMap<Topic, Vec<FilterIdx>>,
    /// Antumbra: filters and topics by their first two levels (`level_key`), so that a new topic is matched
    /// against the filters that can match it and a new filter against the topics it can match, not against all
    /// of them: a fleet's devices each bring their own `devices/{id}/…` topics and filters.
    levels: LevelIndex,
}

/// Antumbra: the key of a topic or filter, its first two levels (`devices/d1` for `devices/d1/shadow/update`; a
/// one-level name is its own key). A filter that [`matches`] a topic and has no wildcard in its key has the
/// topic's key, since its first two levels are matched literally (`a/b/#` matches `a/b` too: same key).
fn level_key(name: &str) -> &str {
    match name.match_indices('/').nth(1) {
        Some((end, _)) => &name[..end],
        None => name,
    }
}

/// Antumbra: filters whose key has no wildcard, by key, and the others (`+/…`, `a/#`, `#`), which any topic
/// may match; known topics by key. Filters and topics are never removed from the data log, so neither is
/// removed from here.
#[derive(Default)]
struct LevelIndex {
    filters: HashMap<Box<str>, Vec<FilterIdx>>,
    wildcard_filters: Vec<FilterIdx>,
    topics: HashMap<Box<str>, Vec<Topic>>,
}

impl LevelIndex {
    /// A filter's key when it has no wildcard, `None` otherwise.
    fn literal_key(filter: &str) -> Option<&str> {
        Some(level_key(filter)).filter(|key| !key.contains(['+', '#']))
    }

    fn add_filter(&mut self, filter: &str, idx: FilterIdx) {
        match Self::literal_key(filter) {
            Some(key) => self.filters.entry(key.into()).or_default().push(idx),
            None => self.wildcard_filters.push(idx),
        }
    }

    fn add_topic(&mut self, topic: &str) {
        let key = level_key(topic);
        self.topics.entry(key.into()).or_default().push(topic.to_owned());
    }

    /// The filters that may match `topic`.
    fn candidates(&self, topic: &str) -> impl Iterator<Item = FilterIdx> + '_ {
        let keyed = self.filters.get(level_key(topic)).map(Vec::as_slice);
        keyed.unwrap_or_default().iter().chain(&self.wildcard_filters).copied()
    }

    /// The known topics that `filter` may match, or `None` when any may (a wildcard in its key).
    fn topics_for(&self, filter: &str) -> Option<&[Topic]> {
        let key = Self::literal_key(filter)?;
        Some(self.topics.get(key).map(Vec::as_slice).unwrap_or_default())
    }
}

impl DataLog {
    pub fn new(config: RouterConfig) -> io::Result<DataLog> {
        let mut native = Slab::new();
        let mut filter_indexes = HashMap::new();
        let retained_publishes = HashMap::new();
        let publish_filters = HashMap::new();
        let mut levels = LevelIndex::default();

        if let Some(warmup_filters) = config.initialized_filters.clone() {
            for filter in warmup_filters {
                let data = Data::new(&filter, &config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = native.insert(data);
                levels.add_filter(&filter, idx);
                filter_indexes.insert(filter, idx);
            }
        }

        Ok(DataLog {
            config,
            native,
            publish_filters,
            filter_indexes,
            retained_publishes,
            levels,
        })
    }

    pub fn meter(&mut self, filter: &str) -> Option<&mut SubscriptionMeter> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        Some(&mut data.meter)
    }

    pub fn waiters(&self, filter: &Filter) -> Option<&Waiters<DataRequest>> {
        self.native
            .get(*self.filter_indexes.get(filter)?)
            .map(|data| &data.waiters)
    }

    /// Antumbra: connection `id`'s request parked on `filter`'s log, if it is there.
    pub fn parked_request_mut(&mut self, id: ConnectionId, filter: &str) -> Option<&mut DataRequest> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        data.waiters
            .get_mut()
            .iter_mut()
            .find(|(waiter, request)| *waiter == id && request.filter == filter)
            .map(|(_, request)| request)
    }

    pub fn remove_waiters_for_id(
        &mut self,
        id: ConnectionId,
        filter: &Filter,
    ) -> Option<DataRequest> {
        let data = self
            .native
            .get_mut(*self.filter_indexes.get(filter)?)
            .unwrap();
        let waiters = data.waiters.get_mut();

        waiters
            .iter()
            .position(|(conn_id, request)| *conn_id == id && request.filter == *filter)
            .and_then(|index| {
                waiters
                    .swap_remove_back(index)
                    .map(|(_, data_req)| data_req)
            })
    }

    // TODO: Currently returning a Option<Vec> instead of Option<&Vec> due to Rust borrow checker
    // limitation
    pub fn matches(&mut self, topic: &str) -> Option<Vec<usize>> {
        match &self.publish_filters.get(topic) {
            Some(v) => Some(v.to_vec()),
            None => {
                let native = &self.native;
                let v: Vec<usize> = self
                    .levels
                    .candidates(topic)
                    .filter(|&idx| matches(topic, &native[idx].filter))
                    .collect();

                // Antumbra: remember topics that match no filter too. Otherwise every publish to such a topic
                // (a device's shadow request topics, `…/update/documents` that nobody subscribes to) scans
                // every filter of every device; `next_native_offset` adds a new filter to these entries as it
                // does to the others.
                // Bounded, so that a client publishing to ever new topics cannot grow it without end.
                if !v.is_empty() || self.publish_filters.len() < 1_000_000 {
                    self.publish_filters.insert(topic.to_owned(), v.clone());
                    self.levels.add_topic(topic);
                }

                Some(v)
            }
        }
    }

    pub fn next_native_offset(&mut self, filter: &str) -> (FilterIdx, Offset) {
        let publish_filters = &mut self.publish_filters;
        let filter_indexes = &mut self.filter_indexes;

        let (filter_idx, data) = match filter_indexes.get(filter) {
            Some(idx) => (*idx, self.native.get(*idx).unwrap()),
            None => {
                let data = Data::new(filter, &self.config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = self.native.insert(data);
                self.filter_indexes.insert(filter.to_owned(), idx);
                self.levels.add_filter(filter, idx);

                // Match new filter to existing topics and add to publish_filters if it matches. Antumbra: only
                // the topics with the filter's key, unless its key has a wildcard.
                let add = |topic: &str, filters: &mut Vec<FilterIdx>| {
                    if matches(topic, filter) {
                        filters.push(idx);
                    }
                };
                match self.levels.topics_for(filter) {
                    Some(topics) => {
                        for topic in topics {
                            if let Some(filters) = publish_filters.get_mut(topic) {
                                add(topic, filters);
                            }
                        }
                    }
                    None => {
                        for (topic, filters) in publish_filters.iter_mut() {
                            add(topic, filters);
                        }
                    }
                }

                (idx, self.native.get(idx).unwrap())
            }
        };

        (filter_idx, data.log.next_offset())
    }

    /// Antumbra: trims every filter's log to its oldest reader (`CommitLog::trim`). `oldest` holds, per
    /// filter, the oldest cursor of its readers outside the log (connections' requests, unacknowledged QoS 1/2
    /// publishes, saved persistent sessions); the requests parked on the log itself are added here. A filter
    /// with no reader keeps nothing.
    pub fn trim(&mut self, oldest: &[Option<Offset>]) {
        for (filter_idx, data) in self.native.iter_mut() {
            let keep = data
                .waiters
                .waiters()
                .iter()
                .map(|(_, request)| request.cursor)
                .chain(oldest.get(filter_idx).copied().flatten())
                .min();
            data.log.trim(keep);
        }
    }

    /// Antumbra: `nolocal` is the reader's client id when its subscription has No Local: what that client
    /// published is read past, not returned.
    pub fn native_readv(
        &self,
        filter_idx: FilterIdx,
        offset: Offset,
        len: u64,
        nolocal: Option<&str>,
    ) -> io::Result<(Position, Vec<(PubWithProp, Offset)>)> {
        // unwrap to get index of `self.native` is fine here, because when a new subscribe packet
        // arrives in `Router::handle_device_payload`, it first calls the function
        // `next_native_offset` which creates a new commitlog if one doesn't exist. So any new
        // reads will definitely happen on a valid filter.
        let data = self.native.get(filter_idx).unwrap();
        let mut o = Vec::new();
        // TODO: `readv` is infallible but its current return type does not
        // reflect that. Consequently, this method is also infallible.
        // Encoding this information is important so that calling function
        // has more information on how this method behaves.
        let next = data.log.readv(offset, len, &mut o)?;

        let now = Instant::now();
        let o = o
            .into_iter()
            .filter(|(pubdata, _)| !pubdata.skipped_by(nolocal) && !pubdata.expired(now))
            .map(|(pubdata, offset)| (pubdata.sent_at(now), offset))
            .collect();

        Ok((next, o))
    }

    pub fn shadow(&mut self, filter: &str) -> Option<PubWithProp> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        data.log.last().map(|p| (p.publish, p.properties))
    }

    /// This method is called when the subscriber has caught up with the commit log. In which case,
    /// instead of actively checking for commits in each `Router::run_inner` iteration, we instead
    /// wait and only try reading again when new messages have been added to the commit log. This
    /// methods converts a `DataRequest` (which actively reads the commit log in `Router::consume`)
    /// to a `Waiter` (which only reads when notified).
    pub fn park(&mut self, id: ConnectionId, request: DataRequest) {
        // calling unwrap on index here is fine, because only place this function is called is in
        // `Router::consume` method, when the status after reading from commit log of the same
        // filter as `request` is "done", that is, the subscriber has caught up. In other words,
        // there has been atleast 1 call to `native_readv` for the same filter, which means if
        // `native_readv` hasn't paniced, so this won't panic either.
        let data = self.native.get_mut(request.filter_idx).unwrap();
        data.waiters.register(id, request);
    }

    /// Cleanup a connection from all the waiters
    pub fn clean(&mut self, id: ConnectionId) -> Vec<DataRequest> {
        let mut inflight = Vec::new();
        for (_, data) in self.native.iter_mut() {
            inflight.append(&mut data.waiters.remove(id));
        }

        inflight
    }

    /// Antumbra: `origin`, the publisher's client id, is kept for No Local.
    pub fn insert_to_retained_publishes(
        &mut self,
        publish: Publish,
        publish_properties: Option<PublishProperties>,
        topic: Topic,
        origin: Option<std::sync::Arc<str>>,
    ) {
        let data = PublishData::published_by(publish, publish_properties, origin);
        self.retained_publishes.insert(topic, data);
    }

    pub fn remove_from_retained_publishes(&mut self, topic: Topic) {
        self.retained_publishes.remove(&topic);
    }

    /// Antumbra: `nolocal` as for [`DataLog::native_readv`].
    /// Antumbra: each with when it arrived, for [`sent_at`] when its turn to be sent comes (a subscription's
    /// retained messages may wait for places in its in-flight window).
    pub fn read_retained_messages(&mut self, filter: &str, nolocal: Option<&str>) -> Vec<(PubWithProp, Instant)> {
        trace!(info = "reading retain msg", filter = &filter);
        let now = Instant::now();

        // discard expired retained messages
        // Antumbra: the stored interval stays as published; each copy sent gets what is left of it. Upstream
        // took the time spent off the stored one at every read, without resetting the timestamp, so a retained
        // message read twice lost its waiting time twice and expired early.
        self.retained_publishes.retain(|_, pubdata| !pubdata.expired(now));

        self.retained_publishes
            .iter()
            .filter(|(topic, p)| matches(topic, filter) && !p.skipped_by(nolocal))
            .map(|(_, p)| ((p.publish.clone(), p.properties.clone()), p.timestamp))
            .collect()
    }
}

pub struct Data<T> {
    filter: Filter,
    pub log: CommitLog<T>,
    pub waiters: Waiters<DataRequest>,
    meter: SubscriptionMeter,
}

impl<T> Data<T>
where
    T: Storage + Clone,
{
    pub fn new(filter: &str, router_config: &RouterConfig) -> Data<T> {
        let mut max_segment_size = router_config.max_segment_size;
        let mut max_mem_segments = router_config.max_segment_count;

        // Override segment config for selected filter
        if let Some(config) = &router_config.custom_segment {
            for (f, segment_config) in config {
                if matches(filter, f) {
                    info!("Overriding segment config for filter: {}", filter);
                    max_segment_size = segment_config.max_segment_size;
                    max_mem_segments = segment_config.max_segment_count;
                }
            }
        }

        // max_segment_size: usize, max_mem_segments: usize
        let log = CommitLog::new(max_segment_size, max_mem_segments).unwrap();

        let waiters = Waiters::with_capacity(10);
        let metrics = SubscriptionMeter::default();
        Data {
            filter: filter.to_owned(),
            log,
            waiters,
            meter: metrics,
        }
    }

    /// Writes to all the filters that are mapped to this publish topic
    /// and wakes up consumers that are matching this topic (if they exist)
    pub fn append(
        &mut self,
        item: T,
        notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
    ) -> (Offset, &Filter) {
        let size = item.size();
        let offset = self.log.append(item);
        if let Some(mut parked) = self.waiters.take() {
            notifications.append(&mut parked);
        }

        self.meter.count += 1;
        self.meter.total_size += size;

        (offset, &self.filter)
    }
}

/// Acks log for a subscription
#[derive(Debug)]
pub struct AckLog {
    // Committed acks per connection. First pkid, last pkid, data
    committed: VecDeque<Ack>,
    // Recorded qos 2 publishes
    recorded: VecDeque<PubWithProp>,
}

impl AckLog {
    /// New log
    pub fn new() -> AckLog {
        AckLog {
            committed: VecDeque::new(),
            recorded: VecDeque::new(),
        }
    }

    pub fn connack(&mut self, id: ConnectionId, ack: ConnAck, props: Option<ConnAckProperties>) {
        let ack = Ack::ConnAck(id, ack, props);
        self.committed.push_back(ack);
    }

    pub fn suback(&mut self, ack: SubAck) {
        let ack = Ack::SubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn puback(&mut self, ack: PubAck) {
        let ack = Ack::PubAck(ack);
        self.committed.push_back(ack);
    }

    /// Antumbra: whether recording a QoS 2 publish with packet id `pkid` would pass `crate::RECEIVE_MAXIMUM`
    /// (one sent again before its PUBREL takes no new place).
    pub fn recording_exceeds(&self, pkid: u16) -> bool {
        self.recorded.len() >= usize::from(crate::RECEIVE_MAXIMUM) && self.recorded_at(pkid).is_none()
    }

    /// Antumbra: where the recorded QoS 2 publish with packet id `pkid` is, if one is.
    fn recorded_at(&self, pkid: u16) -> Option<usize> {
        self.recorded.iter().position(|(p, _)| p.pkid == pkid)
    }

    /// Antumbra: a QoS 2 PUBLISH sent again before its PUBREL (DUP) is the same message, recorded once.
    pub fn pubrec(&mut self, publish: Publish, props: Option<PublishProperties>, ack: PubRec) {
        let ack = Ack::PubRec(ack);
        match self.recorded_at(publish.pkid) {
            Some(i) => self.recorded[i] = (publish, props),
            None => self.recorded.push_back((publish, props)),
        }
        self.committed.push_back(ack);
    }

    pub fn pubrel(&mut self, ack: PubRel) {
        let ack = Ack::PubRel(ack);
        self.committed.push_back(ack);
    }

    /// Antumbra: the message the PUBREL's packet id releases (upstream took the oldest recorded, whatever the
    /// id). None when no message has that id (its PUBLISH was on a connection before): the PUBCOMP still goes,
    /// with Packet Identifier Not Found, so that the client's flow ends (upstream disconnected it, and the
    /// client sent the PUBREL again on every reconnection).
    pub fn pubcomp(&mut self, mut ack: PubComp) -> Option<PubWithProp> {
        let recorded = self.recorded_at(ack.pkid).and_then(|i| self.recorded.remove(i));
        if recorded.is_none() {
            ack.reason = PubCompReason::PacketIdentifierNotFound;
        }
        self.committed.push_back(Ack::PubComp(ack));
        recorded
    }

    /// Antumbra: the client's QoS 2 publishes received (PUBREC sent) and not yet released, for its persistent
    /// session to keep until the client sends their PUBRELs on a later connection.
    pub fn take_recorded(&mut self) -> VecDeque<PubWithProp> {
        std::mem::take(&mut self.recorded)
    }

    /// Antumbra: what [`AckLog::take_recorded`] took when the session was saved.
    pub fn restore_recorded(&mut self, recorded: VecDeque<PubWithProp>) {
        self.recorded = recorded;
    }

    /// Antumbra: takes back the ack queued last (its publish could not be logged after all).
    pub fn withdraw_last(&mut self) {
        self.committed.pop_back();
    }

    pub fn pingresp(&mut self, ack: PingResp) {
        let ack = Ack::PingResp(ack);
        self.committed.push_back(ack);
    }

    pub fn unsuback(&mut self, ack: UnsubAck) {
        let ack = Ack::UnsubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn readv(&mut self) -> &mut VecDeque<Ack> {
        &mut self.committed
    }
}

#[cfg(test)]
mod test {
    use super::DataLog;
    use crate::router::shared_subs::Strategy;
    use crate::RouterConfig;

    #[test]
    fn a_pubrel_releases_the_message_with_its_packet_id_once() {
        use super::AckLog;
        use crate::protocol::{PubComp, PubCompReason, PubRec, PubRecReason, Publish, QoS};
        use crate::router::Ack;
        let publish = |pkid, payload: &'static str| {
            let mut p = Publish::new("a/b", payload, false);
            p.qos = QoS::ExactlyOnce;
            p.pkid = pkid;
            p
        };
        let rec = |pkid| PubRec {
            pkid,
            reason: PubRecReason::Success,
        };
        let comp = |pkid| PubComp {
            pkid,
            reason: PubCompReason::Success,
        };
        let mut log = AckLog::new();
        log.pubrec(publish(1, "one"), None, rec(1));
        log.pubrec(publish(2, "two"), None, rec(2));
        // The same PUBLISH again before its PUBREL (DUP): still one message.
        log.pubrec(publish(1, "one"), None, rec(1));
        let released = |p: Option<(Publish, _)>| p.map(|(p, _)| p.payload);
        assert_eq!(released(log.pubcomp(comp(2))), Some("two".into()));
        assert_eq!(released(log.pubcomp(comp(1))), Some("one".into()));
        assert_eq!(released(log.pubcomp(comp(1))), None);
        let last = log.readv().pop_back();
        assert!(
            matches!(&last, Some(Ack::PubComp(c)) if c.reason == PubCompReason::PacketIdentifierNotFound),
            "{last:?}"
        );
    }

    #[test]
    fn publish_filters_updating_correctly_on_new_topic_subscription() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("topic/a");
        data.matches("topic/a");

        data.next_native_offset("topic/+");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 2);
    }

    #[test]
    fn publish_filters_updating_correctly_on_new_publish() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("+/+");

        data.matches("topic/a");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 1);
    }

    fn data_log() -> DataLog {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: Some(vec!["a/b".to_owned(), "+/b/#".to_owned()]),
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        DataLog::new(config).unwrap()
    }

    /// Antumbra: the level index gives the same matches as testing every filter, whatever the order in which
    /// topics and filters arrive: filters before and after topics, keys with and without wildcards, one-level
    /// names, `a/b/#` matching `a/b`, empty levels and `$` topics.
    #[test]
    fn level_index_matches_as_a_scan_of_every_filter() {
        let names = [
            "a", "b", "a/b", "a/c", "a/b/c", "a/b/c/d", "b/b", "b/b/x", "/a", "/a/b", "a//b", "$SYS/a/b",
            "devices/d1/shadow/update", "devices/d2/shadow/update/delta",
        ];
        let filters = [
            "a", "a/b", "a/b/#", "a/#", "#", "+", "+/b", "+/b/#", "a/+", "a/+/c", "a/b/+", "/a/#", "/+",
            "a//b", "devices/d1/shadow/#", "devices/+/shadow/update", "devices/d2/shadow/update/delta",
        ];
        // A fixed shuffle of topics and filters together (linear congruential, so the test is the same on
        // every run), in several orders.
        for seed in 0..20u64 {
            let mut data = data_log();
            let mut state = seed;
            let mut steps: Vec<(bool, &str)> = names
                .iter()
                .map(|n| (true, *n))
                .chain(filters.iter().map(|f| (false, *f)))
                .collect();
            for i in (1..steps.len()).rev() {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                steps.swap(i, (state >> 33) as usize % (i + 1));
            }
            for (is_topic, name) in steps {
                if is_topic {
                    data.matches(name);
                } else {
                    data.next_native_offset(name);
                }
            }
            for topic in names {
                let mut got = data.matches(topic).unwrap();
                got.sort_unstable();
                let mut want: Vec<usize> = data
                    .native
                    .iter()
                    .filter(|(_, d)| crate::protocol::matches(topic, &d.filter))
                    .map(|(idx, _)| idx)
                    .collect();
                want.sort_unstable();
                assert_eq!(got, want, "topic {topic}, seed {seed}");
            }
        }
        // Spot checks of what the scan says, so that the comparison above does not rest on it alone.
        let mut data = data_log();
        data.next_native_offset("a/b/#");
        data.next_native_offset("devices/d1/shadow/#");
        assert_eq!(data.matches("a/b").unwrap().len(), 3, "a/b, a/b/# and +/b/#");
        assert_eq!(data.matches("x/b/y").unwrap().len(), 1, "+/b/#");
        assert_eq!(data.matches("devices/d1/shadow/update").unwrap().len(), 1);
        assert!(data.matches("devices/d2/shadow/update").unwrap().is_empty());
    }

    //     #[test]
    //     fn appends_are_written_to_correct_commitlog() {
    //         pretty_env_logger::init();
    //         let config = RouterConfig {
    //             instant_ack: true,
    //             max_segment_size: 1024,
    //             max_connections: 10,
    //             max_mem_segments: 10,
    //             max_disk_segments: 0,
    //             max_read_len: 1024,
    //             log_dir: None,
    //             dynamic_log: true,
    //         };

    //         let mut data = DataLog::new(config).unwrap();
    //         data.next_native_offset("/devices/2321/actions");
    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/events/imu/jsonarray", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }

    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/actions", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }
    //     }
}
