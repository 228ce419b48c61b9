//! PKCS#10 certificate signing requests: parsed and checked with `x509-parser`, never trusted as sent.
//!
//! Only the public key is taken from a request. Its extensions (a request may ask for `CA:TRUE`) are ignored:
//! the platform decides what a device certificate says.

use antumbra_wire::DeviceId;
use rcgen::{PublicKeyData, SignatureAlgorithm};
use x509_parser::oid_registry::{
    Oid, OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::prelude::{FromDer, X509CertificationRequest};

/// Smallest RSA modulus accepted, in bits.
const MIN_RSA_BITS: usize = 2048;

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Not a PEM `CERTIFICATE REQUEST`, or not a parsable PKCS#10 structure.
    #[error("csr is not a PEM-encoded PKCS#10 certificate request: {0}")]
    Malformed(String),
    /// The request's self-signature does not verify.
    #[error("csr signature does not verify")]
    BadSignature,
    /// The subject common name is not the device id.
    #[error("csr subject CN is {found:?}, but the device id is {expected:?}")]
    SubjectMismatch { expected: String, found: Option<String> },
    /// The key type or size is refused.
    #[error("csr key is refused: {0}; use ECDSA P-256/P-384, Ed25519 or RSA of at least 2048 bits")]
    WeakKey(String),
}

/// A public key taken from a verified CSR, in the shape rcgen signs.
pub(super) struct CsrPublicKey {
    alg: &'static SignatureAlgorithm,
    raw: Vec<u8>,
}

impl PublicKeyData for CsrPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

pub(super) fn parse(pem: &str, device: &DeviceId) -> Result<CsrPublicKey, CsrError> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.trim().as_bytes())
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    if block.label != "CERTIFICATE REQUEST" && block.label != "NEW CERTIFICATE REQUEST" {
        return Err(CsrError::Malformed(format!("PEM label is {:?}", block.label)));
    }
    let (_, csr) = X509CertificationRequest::from_der(&block.contents)
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    let info = &csr.certification_request_info;
    // Key strength first: ring refuses to verify signatures of weak RSA keys, and "weak key" is the truer answer.
    let spki = &info.subject_pki;
    let alg = key_algorithm(
        &spki.algorithm.algorithm,
        spki.algorithm.parameters.as_ref(),
        || spki.parsed().map(|k| k.key_size()).unwrap_or(0),
    )?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let mut cns = info.subject.iter_common_name();
    let cn = cns
        .next()
        .map(|cn| cn.as_str().map(str::to_owned).unwrap_or_default());
    if cn.as_deref() != Some(device.as_str()) || cns.next().is_some() {
        return Err(CsrError::SubjectMismatch {
            expected: device.to_string(),
            found: cn,
        });
    }

    Ok(CsrPublicKey {
        alg,
        raw: spki.subject_public_key.data.to_vec(),
    })
}

fn key_algorithm(
    oid: &Oid<'_>,
    params: Option<&x509_parser::der_parser::asn1_rs::Any<'_>>,
    rsa_bits: impl FnOnce() -> usize,
) -> Result<&'static SignatureAlgorithm, CsrError> {
    if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = params.and_then(|p| p.clone().oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => Ok(&rcgen::PKCS_ECDSA_P256_SHA256),
            Some(c) if c == OID_NIST_EC_P384 => Ok(&rcgen::PKCS_ECDSA_P384_SHA384),
            Some(c) => Err(CsrError::WeakKey(format!("EC curve {c} is not supported"))),
            None => Err(CsrError::WeakKey("EC key without a named curve".into())),
        };
    }
    if *oid == OID_SIG_ED25519 {
        return Ok(&rcgen::PKCS_ED25519);
    }
    if *oid == OID_PKCS1_RSAENCRYPTION {
        let bits = rsa_bits();
        return if bits >= MIN_RSA_BITS {
            Ok(&rcgen::PKCS_RSA_SHA256)
        } else {
            Err(CsrError::WeakKey(format!("RSA key of {bits} bits")))
        };
    }
    Err(CsrError::WeakKey(format!("key algorithm {oid} is not supported")))
}
