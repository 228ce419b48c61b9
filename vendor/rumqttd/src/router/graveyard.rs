use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use super::{
    iobufs::Unacked,
    logs::PubWithProp,
    scheduler::{PauseReason, Tracker},
    ConnectionEvents, FilterIdx,
};
use crate::Cursor;

pub struct Graveyard {
    connections: HashMap<String, SavedState>,
}

impl Graveyard {
    pub fn new() -> Graveyard {
        Graveyard {
            connections: HashMap::new(),
        }
    }

    /// Add a new connection.
    /// Return tracker of previous connection if connection id already exists
    pub fn retrieve(&mut self, id: &str) -> Option<SavedState> {
        let mut saved = self.connections.remove(id)?;
        // Antumbra: a session past its expiry is gone, even if the sweep has not come by yet.
        if saved.expires_at.is_some_and(|at| at <= Instant::now()) {
            saved.session_state = None;
        }
        Some(saved)
    }

    /// Antumbra: drops the persistent sessions whose expiry has passed; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.connections.len();
        self.connections
            .retain(|_, saved| saved.expires_at.is_none_or(|at| at > now));
        before - self.connections.len()
    }

    /// Save connection tracker
    pub fn save_state(
        &mut self,
        mut tracker: Tracker,
        subscriptions: HashSet<String>,
        metrics: ConnectionEvents,
        unacked_pubrels: VecDeque<u16>,
        unacked: VecDeque<Unacked>,
        recorded: VecDeque<PubWithProp>,
        expires_at: Option<Instant>,
    ) {
        tracker.pause(PauseReason::Busy);
        let id = tracker.id.clone();

        let session_state = SessionState {
            tracker,
            subscriptions,
            unacked_pubrels,
            unacked,
            recorded,
        };

        self.connections.insert(
            id,
            SavedState {
                session_state: Some(session_state),
                metrics,
                expires_at,
            },
        );
    }

    /// Antumbra: the trackers of saved persistent sessions (their cursors are where they resume).
    pub fn trackers(&self) -> impl Iterator<Item = &Tracker> {
        self.connections
            .values()
            .filter_map(|saved| Some(&saved.session_state.as_ref()?.tracker))
    }

    /// Antumbra: where the saved persistent sessions' unacknowledged publishes are in the logs.
    pub fn unacked(&self) -> impl Iterator<Item = (FilterIdx, Cursor)> + '_ {
        self.connections
            .values()
            .filter_map(|saved| saved.session_state.as_ref())
            .flat_map(|state| state.unacked.iter().filter_map(Unacked::cursor))
    }

    /// Save only metrics for connection
    pub fn save_metrics(&mut self, id: String, metrics: ConnectionEvents) {
        self.connections.insert(
            id,
            SavedState {
                session_state: None,
                metrics,
                expires_at: None,
            },
        );
    }
}

#[derive(Debug)]
pub struct SavedState {
    pub session_state: Option<SessionState>,
    pub metrics: ConnectionEvents,
    /// Antumbra: when the session expires (`None`: never).
    pub expires_at: Option<Instant>,
}

#[derive(Debug)]
pub struct SessionState {
    pub tracker: Tracker,
    pub subscriptions: HashSet<String>,
    // used for pubrel in qos2
    pub unacked_pubrels: VecDeque<u16>,
    /// Antumbra: unacknowledged QoS 1/2 publishes (packet id, filter, where to read each again), sent again when
    /// the session resumes. Its filters' cursors stay after what was delivered.
    pub unacked: VecDeque<Unacked>,
    /// Antumbra: the client's QoS 2 publishes received (PUBREC sent) and not yet released by its PUBREL; they are
    /// published when it comes, on a later connection.
    pub recorded: VecDeque<PubWithProp>,
}
