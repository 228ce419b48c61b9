//! The table of live MQTT sessions, one per device at most.
//!
//! Takeover is serialised here instead of in the router: a new connection for device X claims X, kicks the old
//! session and waits until it has finished (router told, will published, presence recorded) before it attaches.
//! That sidesteps rumqttd's will race on takeover and its stale-connection-id hazards (see RUMQTTD.md).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use antumbra_wire::DeviceId;
use tokio::sync::{mpsc, watch};

use crate::events::DisconnectReason;

struct Live {
    token: u64,
    /// Its presence session number, once recorded (see [`Claim::record_session`]).
    session: Option<u64>,
    serial: Option<String>,
    kick: mpsc::Sender<DisconnectReason>,
    done: watch::Receiver<bool>,
}

/// Live sessions by device.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<DeviceId, Live>>,
    next_token: AtomicU64,
    attached: AtomicUsize,
}

/// A claim on a device: the holder is its session until the claim drops.
pub struct Claim<'a> {
    sessions: &'a Sessions,
    device: DeviceId,
    token: u64,
    /// Reasons to end, sent by whoever kicks this session.
    pub kicked: mpsc::Receiver<DisconnectReason>,
    done: watch::Sender<bool>,
    previous: Option<(mpsc::Sender<DisconnectReason>, watch::Receiver<bool>)>,
    attached: bool,
}

impl Sessions {
    /// Claims `device` for a new connection; the previous session, if any, is asked to end by
    /// [`Claim::take_over`].
    pub fn claim(&self, device: &DeviceId, serial: Option<String>) -> Claim<'_> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (kick, kicked) = mpsc::channel(4);
        let (done, done_rx) = watch::channel(false);
        let previous = self
            .map
            .lock()
            .expect("sessions lock")
            .insert(
                device.clone(),
                Live {
                    token,
                    session: None,
                    serial,
                    kick,
                    done: done_rx,
                },
            )
            .map(|old| (old.kick, old.done));
        Claim {
            sessions: self,
            device: device.clone(),
            token,
            kicked,
            done,
            previous,
            attached: false,
        }
    }

    /// Whether a session of the device with this id lives on this instance.
    pub fn holds(&self, device: &str) -> bool {
        self.map.lock().expect("sessions lock").contains_key(device)
    }

    /// Asks every session of `device` (optionally only the one using certificate `serial`) to end.
    pub fn kick(&self, device: &DeviceId, serial: Option<&str>, reason: DisconnectReason) -> bool {
        let map = self.map.lock().expect("sessions lock");
        match map.get(device) {
            Some(live) if serial.is_none() || live.serial.as_deref() == serial => {
                live.kick.try_send(reason).is_ok()
            }
            _ => false,
        }
    }

    /// Asks the device's session to end as a takeover if it is older than `session`, the device's session on
    /// another instance. A session whose number is not recorded yet has only just connected, after that one was
    /// announced: it stays.
    pub fn kick_older(&self, device: &DeviceId, session: u64) -> bool {
        let map = self.map.lock().expect("sessions lock");
        match map.get(device) {
            Some(live) if live.session.is_some_and(|own| own < session) => {
                live.kick.try_send(DisconnectReason::Takeover).is_ok()
            }
            _ => false,
        }
    }

    /// Asks every session to end; returns how many were asked.
    pub fn kick_all(&self, reason: DisconnectReason) -> usize {
        let map = self.map.lock().expect("sessions lock");
        map.values()
            .filter(|live| live.kick.try_send(reason).is_ok())
            .count()
    }

    /// Sessions attached to the router now.
    pub fn attached(&self) -> usize {
        self.attached.load(Ordering::Relaxed)
    }

    /// Claims (attached or not) now.
    pub fn len(&self) -> usize {
        self.map.lock().expect("sessions lock").len()
    }

    /// Whether no session exists.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a claim other than `token` holds `device` now.
    pub fn holds_other_than(&self, device: &DeviceId, token: u64) -> bool {
        self.map
            .lock()
            .expect("sessions lock")
            .get(device)
            .is_some_and(|live| live.token != token)
    }

    /// Whether `token` is still the current claim on `device` (no newer connection has claimed it).
    #[cfg(test)]
    pub fn is_current(&self, device: &DeviceId, token: u64) -> bool {
        self.map
            .lock()
            .expect("sessions lock")
            .get(device)
            .is_some_and(|live| live.token == token)
    }
}

impl Claim<'_> {
    /// This claim's unique token.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Ends the previous session of the device and waits (bounded) until it has finished. Returns the reason if
    /// this claim was itself kicked meanwhile.
    pub async fn take_over(&mut self) -> Option<DisconnectReason> {
        let (kick, mut done) = self.previous.take()?;
        let _ = kick.try_send(DisconnectReason::Takeover);
        let wait = async {
            while !*done.borrow_and_update() {
                if done.changed().await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            _ = tokio::time::timeout(Duration::from_secs(10), wait) => None,
            reason = self.kicked.recv() => reason,
        }
    }

    /// Counts this session as attached (for the connection limit) until the claim drops.
    /// Records this session's presence number (for [`Sessions::kick_older`]).
    pub fn record_session(&self, session: u64) {
        let mut map = self.sessions.map.lock().expect("sessions lock");
        if let Some(live) = map.get_mut(&self.device).filter(|live| live.token == self.token) {
            live.session = Some(session);
        }
    }

    pub fn mark_attached(&mut self) {
        if !self.attached {
            self.attached = true;
            self.sessions.attached.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.attached {
            self.sessions.attached.fetch_sub(1, Ordering::Relaxed);
        }
        let mut map = self.sessions.map.lock().expect("sessions lock");
        if map.get(&self.device).is_some_and(|live| live.token == self.token) {
            map.remove(&self.device);
        }
        drop(map);
        let _ = self.done.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_moved_elsewhere_kicks_only_an_older_recorded_session() {
        let sessions = Sessions::default();
        let id = DeviceId::parse("d").unwrap();
        let mut claim = sessions.claim(&id, None);
        assert!(
            !sessions.kick_older(&id, 100),
            "just connecting: no number yet, it stays"
        );
        claim.record_session(7);
        assert!(!sessions.kick_older(&id, 6), "the session here is newer");
        assert!(!sessions.kick_older(&id, 7), "the same session");
        assert!(sessions.kick_older(&id, 8));
        assert_eq!(claim.kicked.try_recv(), Ok(DisconnectReason::Takeover));
        // A stale claim's number never lands on the claim that replaced it.
        let newer = sessions.claim(&id, None);
        claim.record_session(9);
        assert!(!sessions.kick_older(&id, 100));
        drop(newer);
    }

    #[tokio::test]
    async fn a_new_claim_kicks_the_old_one_and_waits_for_it() {
        let sessions = Sessions::default();
        let id = DeviceId::parse("d").unwrap();
        let mut old = sessions.claim(&id, Some("aa".into()));
        let mut new = sessions.claim(&id, Some("bb".into()));
        assert!(!sessions.is_current(&id, old.token()));
        let waiter = async { new.take_over().await };
        let old_side = async {
            assert_eq!(old.kicked.recv().await, Some(DisconnectReason::Takeover));
            drop(old);
        };
        let (kicked, ()) = tokio::join!(waiter, old_side);
        assert_eq!(kicked, None);
        assert!(sessions.is_current(&id, new.token()));
        assert!(
            !sessions.kick(&id, Some("aa"), DisconnectReason::Revoked),
            "the old serial holds nothing now"
        );
        assert!(sessions.kick(&id, Some("bb"), DisconnectReason::Revoked));
        assert_eq!(new.kicked.recv().await, Some(DisconnectReason::Revoked));
        drop(new);
        assert!(sessions.is_empty());
    }
}
