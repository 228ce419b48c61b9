//! The active certificates this platform's CA issued, in memory, by SHA-256 of their DER.
//!
//! A device presents the very certificate the platform issued it. When the presented bytes hash to one on
//! record here, they are that certificate: the CA's signature on them was made by this platform, the device id and
//! serial are known without parsing, and (for a single instance on its own SQLite file) it is known to be active
//! without asking the database. What is still done on every handshake: the proof that the client holds the certificate's key (the
//! TLS CertificateVerify signature) and the validity window, against the clock.
//!
//! Filled at start with the active certificates of the current CA (`Registry::active_certificates`), then kept
//! current: a certificate issued here is added, a revoked one or one of a deleted device is dropped (here, and
//! on every instance through the revocation events). Anything not in the table takes the full path: chain
//! verification, x509 parsing and a registry query.
//!
//! Memory: about 0.35 KB per active certificate (two hash-table entries, the device id twice, the serial), held
//! from start whether the device is connected or not.

use std::collections::HashMap;
use std::sync::RwLock;

use antumbra_wire::DeviceId;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::registry::ActiveCertificate;

/// A certificate on record, as the handshake needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownCertificate {
    /// The device it was issued to.
    pub device: DeviceId,
    /// Serial, lowercase hex.
    pub serial: String,
    /// Validity window, seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
}

impl KnownCertificate {
    /// Whether `now` (seconds since the epoch) lies within the validity window.
    pub fn valid_at(&self, now: i64) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

#[derive(Debug, Default)]
struct Table {
    by_fingerprint: HashMap<[u8; 32], KnownCertificate>,
    by_device: HashMap<DeviceId, Vec<[u8; 32]>>,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct KnownCertificates {
    table: RwLock<Table>,
    /// Whether every revocation goes through this table (see [`KnownCertificates::is_authoritative`]).
    authoritative: bool,
}

/// SHA-256 of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

impl KnownCertificates {
    /// A table holding `certificates`; `authoritative` when no other process can revoke a certificate (see
    /// [`KnownCertificates::is_authoritative`]).
    pub fn from_active(certificates: Vec<ActiveCertificate>, authoritative: bool) -> Self {
        let known = Self {
            authoritative,
            ..Self::default()
        };
        for cert in certificates {
            known.insert(
                &cert.fingerprint_sha256,
                cert.device_id,
                cert.serial,
                cert.not_before,
                cert.not_after,
            );
        }
        known
    }

    /// Records an active certificate (`fingerprint_hex`: SHA-256 of its DER, hex). A malformed fingerprint is
    /// ignored: the certificate then takes the full path.
    pub fn insert(
        &self,
        fingerprint_hex: &str,
        device: DeviceId,
        serial: String,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) {
        let mut key = [0u8; 32];
        if hex::decode_to_slice(fingerprint_hex, &mut key).is_err() {
            return;
        }
        let cert = KnownCertificate {
            device: device.clone(),
            serial: serial.to_ascii_lowercase(),
            not_before: not_before.unix_timestamp(),
            not_after: not_after.unix_timestamp(),
        };
        let mut table = self.table.write().expect("known certificates");
        if table.by_fingerprint.insert(key, cert).is_none() {
            table.by_device.entry(device).or_default().push(key);
        }
    }

    /// The certificate whose DER is `der`, when it is on record and valid at `now` (seconds since the epoch).
    pub fn lookup(&self, der: &[u8], now: i64) -> Option<KnownCertificate> {
        self.lookup_fingerprint(&fingerprint(der), now)
    }

    /// [`KnownCertificates::lookup`] by fingerprint.
    pub fn lookup_fingerprint(&self, fingerprint: &[u8; 32], now: i64) -> Option<KnownCertificate> {
        let table = self.table.read().expect("known certificates");
        table
            .by_fingerprint
            .get(fingerprint)
            .filter(|cert| cert.valid_at(now))
            .cloned()
    }

    /// Drops one certificate of `device` (`Some(serial)`) or all of them (`None`).
    pub fn forget(&self, device: &DeviceId, serial: Option<&str>) {
        let mut table = self.table.write().expect("known certificates");
        let Table {
            by_fingerprint,
            by_device,
        } = &mut *table;
        let Some(keys) = by_device.get_mut(device) else {
            return;
        };
        keys.retain(|key| {
            let matches = match serial {
                None => true,
                Some(serial) => by_fingerprint
                    .get(key)
                    .is_none_or(|cert| cert.serial.eq_ignore_ascii_case(serial)),
            };
            if matches {
                by_fingerprint.remove(key);
            }
            !matches
        });
        if keys.is_empty() {
            by_device.remove(device);
        }
    }

    /// Whether a certificate held here is known to be active without asking the registry: true for a single
    /// instance on its own SQLite file, where every revocation goes through this process. With PostgreSQL or in a
    /// cluster another process may revoke, so CONNECT still asks the registry (the table still spares the chain
    /// verification: a certificate's bytes stay the ones the CA signed, revoked or not).
    pub fn is_authoritative(&self) -> bool {
        self.authoritative
    }

    /// Certificates held.
    pub fn len(&self) -> usize {
        self.table
            .read()
            .expect("known certificates")
            .by_fingerprint
            .len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    fn device(id: &str) -> DeviceId {
        DeviceId::parse(id).unwrap()
    }

    #[test]
    fn finds_a_certificate_by_its_bytes_only_within_its_window() {
        let known = KnownCertificates::default();
        let der = b"certificate one".as_slice();
        let now = OffsetDateTime::now_utc();
        known.insert(
            &hex::encode(fingerprint(der)),
            device("dev-1"),
            "0A1B".into(),
            now - Duration::days(1),
            now + Duration::days(1),
        );
        let found = known.lookup(der, now.unix_timestamp()).unwrap();
        assert_eq!(found.device, device("dev-1"));
        assert_eq!(found.serial, "0a1b");
        assert_eq!(known.lookup(b"certificate two", now.unix_timestamp()), None);
        let later = (now + Duration::days(2)).unix_timestamp();
        assert_eq!(known.lookup(der, later), None);
        let earlier = (now - Duration::days(2)).unix_timestamp();
        assert_eq!(known.lookup(der, earlier), None);
        // A malformed fingerprint records nothing.
        known.insert("not hex", device("dev-2"), "01".into(), now, now);
        assert_eq!(known.len(), 1);
    }

    #[test]
    fn forgets_one_serial_or_every_certificate_of_a_device() {
        let known = KnownCertificates::default();
        let now = OffsetDateTime::now_utc();
        let (from, until) = (now - Duration::days(1), now + Duration::days(1));
        let certs = [("dev-1", "01"), ("dev-1", "02"), ("dev-2", "03")];
        for (id, serial) in certs {
            let der = format!("{id}/{serial}");
            known.insert(
                &hex::encode(fingerprint(der.as_bytes())),
                device(id),
                serial.into(),
                from,
                until,
            );
        }
        let held = |id: &str, serial: &str| {
            known
                .lookup(format!("{id}/{serial}").as_bytes(), now.unix_timestamp())
                .is_some()
        };
        known.forget(&device("dev-1"), Some("01"));
        assert!(!held("dev-1", "01") && held("dev-1", "02") && held("dev-2", "03"));
        known.forget(&device("dev-1"), None);
        assert!(!held("dev-1", "02") && held("dev-2", "03"));
        known.forget(&device("dev-9"), None);
        assert_eq!(known.len(), 1);
    }
}
