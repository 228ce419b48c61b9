//! Client-certificate verification that remembers the chains it has already verified.
//!
//! A device presents the same certificate on every connect, and checking its chain (parse, build the path to
//! the CA, one ECDSA verification) is a sizeable part of a handshake's CPU (measured with `perf` during
//! `mqtt-bench --scenario conn-10k`: P-256 arithmetic is the broker's largest cost). What cannot be cached is
//! still done on every handshake: the proof that the client holds the certificate's key (the signature over
//! the handshake, `verify_tls13_signature`), and the validity window, checked against the clock each time.
//! Revocation is not the verifier's job here: the registry is asked at every CONNECT.
//!
//! Before any of that, a certificate this platform issued and holds on record ([`KnownCertificates`]: byte for
//! byte the certificate the CA signed here) needs no chain at all, even on its first connection after a restart.
//! Its validity window is checked like a remembered chain's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::pki::known::KnownCertificates;

/// Chains remembered at most; the table is emptied when full (a fleet larger than this just verifies more).
const CAPACITY: usize = 200_000;

/// Wraps a verifier (the WebPKI one, against the platform CA) with a table of verified chains.
#[derive(Debug)]
pub struct CachingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    /// SHA-256 of the presented chain → its validity window (seconds since the epoch).
    verified: Mutex<HashMap<[u8; 32], (u64, u64)>>,
    /// Certificates the platform issued, on record.
    known: Arc<KnownCertificates>,
}

impl CachingVerifier {
    /// Accepts the certificates in `known` as they are, and remembers what `inner` accepts.
    pub fn new(inner: Arc<dyn ClientCertVerifier>, known: Arc<KnownCertificates>) -> Self {
        Self {
            inner,
            verified: Mutex::new(HashMap::new()),
            known,
        }
    }
}

fn chain_digest(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for cert in std::iter::once(end_entity).chain(intermediates) {
        hash.update((cert.len() as u64).to_be_bytes());
        hash.update(cert.as_ref());
    }
    hash.finalize().into()
}

fn validity(end_entity: &CertificateDer<'_>) -> Option<(u64, u64)> {
    let (_, cert) = X509Certificate::from_der(end_entity.as_ref()).ok()?;
    let validity = cert.validity();
    let from = u64::try_from(validity.not_before.timestamp()).ok()?;
    let until = u64::try_from(validity.not_after.timestamp()).ok()?;
    Some((from, until))
}

impl ClientCertVerifier for CachingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let at = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        if self.known.lookup(end_entity.as_ref(), at).is_some() {
            return Ok(ClientCertVerified::assertion());
        }
        let digest = chain_digest(end_entity, intermediates);
        let known = self
            .verified
            .lock()
            .expect("verifier cache")
            .get(&digest)
            .copied();
        if let Some((from, until)) = known {
            let now = now.as_secs();
            if from <= now && now <= until {
                return Ok(ClientCertVerified::assertion());
            }
        }
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if let Some(window) = validity(end_entity) {
            let mut table = self.verified.lock().expect("verifier cache");
            if table.len() >= CAPACITY {
                table.clear();
            }
            table.insert(digest, window);
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::test_pki::{ca, Ca};
    use rcgen::ExtendedKeyUsagePurpose;
    use rustls::server::WebPkiClientVerifier;
    use rustls::RootCertStore;
    use time::{Duration, OffsetDateTime};

    fn device_cert(ca: &Ca, not_after: OffsetDateTime) -> CertificateDer<'static> {
        let (cert, _) = ca.leaf("dev-1", ExtendedKeyUsagePurpose::ClientAuth, not_after);
        cert.der().clone()
    }

    fn verifier(ca: &Ca) -> CachingVerifier {
        let mut roots = RootCertStore::empty();
        roots.add(ca.der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        CachingVerifier::new(inner, Arc::default())
    }

    fn at(t: OffsetDateTime) -> UnixTime {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(t.unix_timestamp() as u64))
    }

    #[test]
    fn remembers_a_verified_chain_but_still_checks_its_validity_window() {
        let ca = ca();
        let verifier = verifier(&ca);
        let now = OffsetDateTime::now_utc();
        let cert = device_cert(&ca, now + Duration::days(1));
        verifier.verify_client_cert(&cert, &[], at(now)).unwrap();
        assert_eq!(verifier.verified.lock().unwrap().len(), 1);
        verifier.verify_client_cert(&cert, &[], at(now)).unwrap();
        // Past its end the cached chain is verified again, and refused.
        assert!(verifier
            .verify_client_cert(&cert, &[], at(now + Duration::days(2)))
            .is_err());
        // Before its start too.
        assert!(verifier
            .verify_client_cert(&cert, &[], at(now - Duration::days(2)))
            .is_err());
    }

    #[test]
    fn accepts_a_certificate_on_record_without_its_chain_but_only_within_its_window() {
        let (ours, theirs) = (ca(), ca());
        let now = OffsetDateTime::now_utc();
        // Signed by a CA the verifier does not trust: only the record can make it pass.
        let cert = device_cert(&theirs, now + Duration::days(1));
        let known = Arc::new(KnownCertificates::default());
        let verifier = CachingVerifier::new(verifier(&ours).inner, known.clone());
        assert!(verifier.verify_client_cert(&cert, &[], at(now)).is_err());
        known.insert(
            &hex::encode(crate::pki::known::fingerprint(cert.as_ref())),
            antumbra_wire::DeviceId::parse("dev-1").unwrap(),
            "01".into(),
            now - Duration::hours(1),
            now + Duration::days(1),
        );
        verifier.verify_client_cert(&cert, &[], at(now)).unwrap();
        assert!(
            verifier.verified.lock().unwrap().is_empty(),
            "no chain was verified"
        );
        assert!(verifier
            .verify_client_cert(&cert, &[], at(now + Duration::days(2)))
            .is_err());
        known.forget(&antumbra_wire::DeviceId::parse("dev-1").unwrap(), Some("01"));
        assert!(verifier.verify_client_cert(&cert, &[], at(now)).is_err());
    }

    #[test]
    fn never_remembers_a_refused_chain() {
        let (ours, theirs) = (ca(), ca());
        let verifier = verifier(&ours);
        let now = OffsetDateTime::now_utc();
        let foreign = device_cert(&theirs, now + Duration::days(1));
        for _ in 0..2 {
            assert!(verifier.verify_client_cert(&foreign, &[], at(now)).is_err());
        }
        assert!(verifier.verified.lock().unwrap().is_empty());
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(verifier.verify_client_cert(&garbage, &[], at(now)).is_err());
    }
}
