//! The platform's certificate authority: creates or loads the CA, issues device and server certificates.
//!
//! Issuing is pure CPU work on keys and certificates and never touches the database: the provisioning service
//! calls it before it writes anything, so a failed issuance never leaves a half-registered device. Only loading
//! the CA at start does ([`shared`]): instances sharing a database share the CA kept there.

mod csr;
mod files;
pub mod known;
mod shared;

use std::path::{Path, PathBuf};

use antumbra_wire::DeviceId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

pub use csr::CsrError;
pub use shared::CaProvenance;

/// How long a newly created CA is valid.
const CA_VALIDITY: Duration = Duration::days(3650);
/// Certificates start being valid a little in the past, so a device whose clock lags can still use them.
const BACKDATE: Duration = Duration::minutes(5);

/// Errors of the certificate authority.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The certificate signing request is unusable; the message says why.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// The operator-provided CA could not be used.
    #[error("CA {path}: {reason}")]
    InvalidCa { path: PathBuf, reason: String },
    /// The CA on record in the database could not be used.
    #[error("the CA stored in the database (table certificate_authority) is unusable: {0}")]
    InvalidStoredCa(String),
    /// Reading or storing the CA record failed.
    #[error("the CA record in the database: {0}")]
    Store(#[from] crate::registry::RegistryError),
    /// Reading or writing the CA files failed.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// Building or signing a certificate failed.
    #[error("certificate generation failed: {0}")]
    Generation(#[from] rcgen::Error),
}

/// Where the CA comes from.
#[derive(Debug, Clone)]
pub struct CaSource {
    /// Directory holding the generated CA (`ca.crt`, `ca.key`) and the MQTT server certificate.
    pub dir: PathBuf,
    /// Operator-provided CA certificate and key, both PEM; when set they are used instead of `dir/ca.*`.
    pub provided: Option<(PathBuf, PathBuf)>,
    /// Keep a copy of a CA that lives in the database in `dir` too (when the database is a local file anyway).
    pub keep_files: bool,
}

/// A certificate the CA has just signed, with the facts the registry stores about it.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// The certificate, PEM.
    pub pem: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// SHA-256 over the DER encoding, lowercase hex.
    pub fingerprint_sha256: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// A server certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct ServerIdentity {
    /// Certificate chain: the server certificate followed by the CA certificate.
    pub chain_pem: String,
    /// Private key, PKCS#8 PEM.
    pub key_pem: String,
}

/// The platform certificate authority.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    /// SHA-256 of the CA certificate's DER, lowercase hex.
    ca_fingerprint: String,
    device_validity: Duration,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads the operator's CA when one is configured, else the CA in `dir`, creating it there on first start.
    pub fn load_or_create(source: &CaSource, device_validity: Duration) -> Result<Self, PkiError> {
        let (cert_pem, key_pem) = match &source.provided {
            Some((cert, key)) => (files::read(cert)?, files::read(key)?),
            None => files::load_or_create_ca(&source.dir, create_ca)?,
        };
        let ca_path = source
            .provided
            .as_ref()
            .map_or_else(|| source.dir.join("ca.crt"), |p| p.0.clone());
        Self::from_pem(&cert_pem, &key_pem, device_validity).map_err(|reason| PkiError::InvalidCa {
            path: ca_path,
            reason,
        })
    }

    fn from_pem(cert_pem: &str, key_pem: &str, device_validity: Duration) -> Result<Self, String> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("private key: {e}"))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| format!("certificate is not PEM: {e}"))?;
        let cert = pem.parse_x509().map_err(|e| format!("certificate: {e}"))?;
        if !cert.is_ca() {
            return Err("certificate is not a CA (basicConstraints CA:TRUE missing)".into());
        }
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err("private key does not match the certificate".into());
        }
        let ca_fingerprint = hex::encode(Sha256::digest(&pem.contents));
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| format!("certificate: {e}"))?;
        Ok(Self {
            issuer,
            ca_pem: cert_pem.trim_end().to_string() + "\n",
            ca_fingerprint,
            device_validity,
        })
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// SHA-256 of the CA certificate's DER, lowercase hex: what certificates it issued record as their issuer.
    pub fn fingerprint_sha256(&self) -> &str {
        &self.ca_fingerprint
    }

    /// Issues a device certificate for a key pair generated here; returns it with the private key (PKCS#8
    /// PEM). The key is not kept anywhere: the caller hands it out once.
    pub fn issue_with_new_key(&self, device: &DeviceId) -> Result<(IssuedCertificate, String), PkiError> {
        let key = KeyPair::generate()?;
        let issued = self.sign_device(device, &key)?;
        Ok((issued, key.serialize_pem()))
    }

    /// Issues a device certificate for the public key in a PKCS#10 CSR (PEM), after checking its signature,
    /// that its subject CN is the device id and that its key is strong enough.
    pub fn issue_from_csr(&self, device: &DeviceId, csr_pem: &str) -> Result<IssuedCertificate, PkiError> {
        let key = csr::parse(csr_pem, device)?;
        self.sign_device(device, &key)
    }

    fn sign_device(
        &self,
        device: &DeviceId,
        key: &impl PublicKeyData,
    ) -> Result<IssuedCertificate, PkiError> {
        let mut params = leaf_params(device.as_str(), self.device_validity)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(key, &self.issuer)?;
        Ok(describe(&params, cert.pem(), cert.der()))
    }

    /// Issues a certificate for the MQTT TLS listener, valid for `dns_names` (IP addresses are accepted too).
    pub fn issue_server(&self, dns_names: &[String]) -> Result<ServerIdentity, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = leaf_params("antumbra-mqtt", Duration::days(397))?;
        params.subject_alt_names = CertificateParams::new(dns_names.to_vec())?.subject_alt_names;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServerIdentity {
            chain_pem: format!("{}{}", cert.pem(), self.ca_pem),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a server certificate, writes it with its key into `dir` (`server.crt`, `server.key`, 0600) for
    /// operators to inspect, and returns it.
    pub fn write_server_identity(
        &self,
        dir: &Path,
        dns_names: &[String],
    ) -> Result<ServerIdentity, PkiError> {
        let identity = self.issue_server(dns_names)?;
        files::write_public(&dir.join("server.crt"), &identity.chain_pem)?;
        files::write_secret(&dir.join("server.key"), &identity.key_pem)?;
        Ok(identity)
    }
}

fn create_ca() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Antumbra");
    params
        .distinguished_name
        .push(DnType::CommonName, "Antumbra Device CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn leaf_params(common_name: &str, validity: Duration) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("0 is a valid nanosecond");
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// A positive 128-bit serial with no leading zero byte, so its hex form is canonical.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn describe(params: &CertificateParams, pem: String, der: &[u8]) -> IssuedCertificate {
    let serial = params
        .serial_number
        .as_ref()
        .map(|s| hex::encode(s.to_bytes()))
        .unwrap_or_default();
    IssuedCertificate {
        pem,
        serial,
        fingerprint_sha256: hex::encode(Sha256::digest(der)),
        not_before: params.not_before,
        not_after: params.not_after,
    }
}

#[cfg(test)]
mod tests;
