//! Device-side key generation: the private key is made here and never leaves the device.

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

use crate::{DeviceId, Error};

/// A fresh ECDSA P-256 key pair and a CSR for it whose subject CN is the device id.
pub struct KeyAndCsr {
    key_pem: String,
    csr_pem: String,
}

impl std::fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("KeyAndCsr")
            .field("csr_pem", &self.csr_pem)
            .finish_non_exhaustive()
    }
}

impl KeyAndCsr {
    /// Generates the key pair and signs a CSR with it.
    pub fn generate(device: &DeviceId) -> Result<Self, Error> {
        let key = KeyPair::generate().map_err(|e| Error::Crypto(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, device.as_str());
        let csr = params
            .serialize_request(&key)
            .map_err(|e| Error::Crypto(e.to_string()))?;
        let csr_pem = csr.pem().map_err(|e| Error::Crypto(e.to_string()))?;
        Ok(Self {
            key_pem: key.serialize_pem(),
            csr_pem,
        })
    }

    /// The private key, PKCS#8 PEM. Keep it on the device.
    pub fn private_key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The certificate signing request, PEM: this is what goes to the platform.
    pub fn csr_pem(&self) -> &str {
        &self.csr_pem
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::{FromDer, X509CertificationRequest};

    #[test]
    fn csr_names_the_device_and_verifies() {
        let id = DeviceId::parse("thermostat-17").unwrap();
        let made = KeyAndCsr::generate(&id).unwrap();
        assert!(made.private_key_pem().contains("BEGIN PRIVATE KEY"));
        let (_, pem) = x509_parser::pem::parse_x509_pem(made.csr_pem().as_bytes()).unwrap();
        assert_eq!(pem.label, "CERTIFICATE REQUEST");
        let (_, csr) = X509CertificationRequest::from_der(&pem.contents).unwrap();
        csr.verify_signature().unwrap();
        let cn = csr
            .certification_request_info
            .subject
            .iter_common_name()
            .next()
            .unwrap();
        assert_eq!(cn.as_str().unwrap(), "thermostat-17");
        assert!(!format!("{made:?}").contains("PRIVATE KEY"));
    }
}
