//! How a device connects: where to, and with which certificate.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use antumbra_wire::DeviceId;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::Error;

/// A device's identity: its certificate and private key, and the platform CA it trusts (all PEM).
#[derive(Clone)]
pub struct Credentials {
    cert_pem: String,
    key_pem: String,
    ca_pem: String,
    device_id: DeviceId,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// From PEM text. The device id is read from the certificate's subject CN.
    pub fn from_pem(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<Self, Error> {
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| Error::Credentials(format!("certificate: {e}")))?;
        let (_, parsed) = X509Certificate::from_der(cert.as_ref())
            .map_err(|e| Error::Credentials(format!("certificate: {e}")))?;
        let cn = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| Error::Credentials("certificate has no subject CN".into()))?;
        let device_id =
            DeviceId::parse(cn).map_err(|e| Error::Credentials(format!("certificate CN: {e}")))?;
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| Error::Credentials(format!("private key: {e}")))?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            ca_pem: ca_pem.to_owned(),
            device_id,
        })
    }

    /// From PEM files.
    pub fn from_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
        ca: impl AsRef<Path>,
    ) -> Result<Self, Error> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| Error::Credentials(format!("{}: {e}", p.display())))
        };
        Self::from_pem(&read(cert.as_ref())?, &read(key.as_ref())?, &read(ca.as_ref())?)
    }

    /// The device id (the certificate's CN), which is also the MQTT client id.
    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    /// A rustls client configuration presenting this certificate and trusting only the platform CA.
    pub(crate) fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let ca = ca.map_err(|e| Error::Credentials(format!("CA: {e}")))?;
            roots
                .add(ca)
                .map_err(|e| Error::Credentials(format!("CA: {e}")))?;
        }
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Credentials(format!("certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| Error::Credentials(format!("private key: {e}")))?;
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Credentials(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| Error::Credentials(e.to_string()))?;
        Ok(Arc::new(config))
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Config {
    /// Broker host name; it must be one of the names in the platform's MQTT server certificate.
    pub host: String,
    /// Broker port (8883 by default on the platform).
    pub port: u16,
    /// The device's identity.
    pub credentials: Credentials,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// How long a request (`get`, `report`, …) waits for its reply.
    pub request_timeout: Duration,
    /// First reconnect delay; it doubles (with jitter) up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
}

impl Config {
    /// Defaults: keep-alive 30 s, request timeout 10 s, reconnect backoff 100 ms doubling to 30 s.
    pub fn new(host: impl Into<String>, port: u16, credentials: Credentials) -> Self {
        Self {
            host: host.into(),
            port,
            credentials,
            keep_alive: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
        }
    }

    pub(crate) fn check(&self) -> Result<(), Error> {
        ServerName::try_from(self.host.clone())
            .map_err(|e| Error::Credentials(format!("host {:?}: {e}", self.host)))?;
        Ok(())
    }
}
