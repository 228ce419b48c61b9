//! The TLS side of the front door: mutual TLS against the platform CA, and the identity a client
//! certificate proves.

use std::sync::Arc;

use antumbra_wire::DeviceId;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::pki::known::{fingerprint, KnownCertificates};

/// Errors building the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A PEM input could not be read.
    #[error("{what}: {reason}")]
    Pem { what: &'static str, reason: String },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

/// A TLS server configuration that requires a client certificate chaining to `ca_pem` (and valid now).
pub fn server_config(
    ca_pem: &str,
    chain_pem: &str,
    key_pem: &str,
    known: Arc<KnownCertificates>,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let mut provider = super::kx::provider();
    // AES-128-GCM with SHA-256 first, as Mozilla's server configurations order TLS 1.3 suites: clients (rustls,
    // OpenSSL) list AES-256-GCM with SHA-384 first, whose key schedule hashes with SHA-512 in software, while
    // SHA-256 runs on the CPU's SHA extensions. conn-10k under perf: SHA-512 was 5 % of the broker's CPU.
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let provider = Arc::new(provider);
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| TlsSetupError::Pem {
            what: "CA certificate",
            reason: e.to_string(),
        })?;
        roots.add(cert)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsSetupError::Verifier(e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::Pem {
            what: "server certificate",
            reason: e.to_string(),
        })?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsSetupError::Pem {
        what: "server key",
        reason: e.to_string(),
    })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(super::verifier::CachingVerifier::new(verifier, known)))
        .with_single_cert(chain, key)?;
    // Stateless session tickets (keys rotate every 6 h): a device reconnecting after a network blip resumes
    // without a certificate chain to check or a signature to make, which is what a reconnect storm needs. The
    // default (a 256-entry server-side cache, two tickets per handshake) cannot hold a fleet. A resumed session
    // carries the original client certificate; `identity` checks its validity window on every connection.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    config.send_tls13_tickets = 1;
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The device id, from the subject CN.
    pub device: DeviceId,
    /// Serial, lowercase hex (as the registry stores it).
    pub serial: String,
    /// SHA-256 of the certificate, when it is one the platform holds on record ([`KnownCertificates`]).
    pub on_record: Option<[u8; 32]>,
}

/// Why a verified certificate still names no device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The TLS session carries no client certificate.
    #[error("no client certificate")]
    Missing,
    /// The certificate does not parse.
    #[error("client certificate does not parse")]
    Unparsable,
    /// The subject CN is missing or not a valid device id.
    #[error("client certificate CN is not a valid device id")]
    BadCommonName,
    /// Outside its validity window (a resumed TLS session skips the verifier, so it is checked here too).
    #[error("client certificate is expired or not yet valid")]
    OutsideValidity,
}

/// [`identity`], read from the record when the certificate is one the platform holds (no x509 parsing).
pub fn identify(
    known: &KnownCertificates,
    peer_certs: Option<&[CertificateDer<'_>]>,
) -> Result<PeerIdentity, IdentityError> {
    let leaf = end_entity(peer_certs)?;
    let print = fingerprint(leaf.as_ref());
    match known.lookup_fingerprint(&print, time::OffsetDateTime::now_utc().unix_timestamp()) {
        Some(cert) => Ok(PeerIdentity {
            device: cert.device,
            serial: cert.serial,
            on_record: Some(print),
        }),
        None => parse_identity(leaf),
    }
}

/// Reads the device id and serial from the end-entity certificate of a verified chain.
pub fn identity(peer_certs: Option<&[CertificateDer<'_>]>) -> Result<PeerIdentity, IdentityError> {
    parse_identity(end_entity(peer_certs)?)
}

fn end_entity<'a>(
    peer_certs: Option<&'a [CertificateDer<'_>]>,
) -> Result<&'a CertificateDer<'a>, IdentityError> {
    peer_certs.and_then(|c| c.first()).ok_or(IdentityError::Missing)
}

fn parse_identity(leaf: &CertificateDer<'_>) -> Result<PeerIdentity, IdentityError> {
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).map_err(|_| IdentityError::Unparsable)?;
    let mut cns = cert.subject().iter_common_name();
    let cn = cns
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(IdentityError::BadCommonName)?;
    if cns.next().is_some() {
        return Err(IdentityError::BadCommonName);
    }
    let device = DeviceId::parse(cn).map_err(|_| IdentityError::BadCommonName)?;
    if !cert.validity().is_valid() {
        return Err(IdentityError::OutsideValidity);
    }
    Ok(PeerIdentity {
        device,
        serial: hex::encode(cert.raw_serial()),
        on_record: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};
    use time::{Duration, OffsetDateTime};

    fn cert(cn: &str, from: OffsetDateTime, until: OffsetDateTime) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.not_before = from;
        params.not_after = until;
        params
            .self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .clone()
    }

    /// Runs a whole handshake between `client` and `server` in memory.
    fn handshake(client: &mut rustls::ClientConnection, server: &mut rustls::ServerConnection) {
        for _ in 0..10 {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
            if !client.is_handshaking() && !server.is_handshaking() {
                return;
            }
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn prefers_aes_128_gcm_over_the_clients_first_choice() {
        use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        let ca = crate::mqtt::test_pki::ca();
        let until = OffsetDateTime::now_utc() + Duration::days(1);
        let (server_cert, server_key) = ca.leaf("localhost", ServerAuth, until);
        let (device_cert, device_key) = ca.leaf("dev-1", ClientAuth, until);
        let server = server_config(
            &ca.pem,
            &server_cert.pem(),
            &server_key.serialize_pem(),
            Arc::default(),
        )
        .unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        assert_eq!(
            provider.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            "the client offers AES-256 first"
        );
        let mut roots = RootCertStore::empty();
        roots.add(ca.der.clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![device_cert.der().clone()],
                PrivateKeyDer::try_from(device_key.serialize_der()).unwrap(),
            )
            .unwrap();
        let mut client = rustls::ClientConnection::new(
            Arc::new(client),
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut server = rustls::ServerConnection::new(server).unwrap();
        handshake(&mut client, &mut server);
        assert_eq!(
            server.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        let peer = identity(server.peer_certificates()).unwrap();
        assert_eq!(peer.device.as_str(), "dev-1");
    }

    #[test]
    fn identity_is_the_cn_of_a_certificate_within_its_validity() {
        let now = OffsetDateTime::now_utc();
        let day = Duration::days(1);
        let ok = identity(Some(&[cert("dev-7", now - day, now + day)])).unwrap();
        assert_eq!(ok.device.as_str(), "dev-7");
        // A resumed TLS session skips the verifier: the window is checked here as well.
        let expired = identity(Some(&[cert("dev-7", now - day * 2, now - day)]));
        assert_eq!(expired, Err(IdentityError::OutsideValidity));
        let early = identity(Some(&[cert("dev-7", now + day, now + day * 2)]));
        assert_eq!(early, Err(IdentityError::OutsideValidity));
        assert_eq!(identity(None), Err(IdentityError::Missing));
        assert_eq!(
            identity(Some(&[cert("a/b", now - day, now + day)])),
            Err(IdentityError::BadCommonName)
        );
    }
}
