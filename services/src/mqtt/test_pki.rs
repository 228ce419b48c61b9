//! Certificates for this module's TLS tests: a CA (rcgen) and the leaves it signs.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

/// A CA that signs leaves.
pub struct Ca {
    /// Its certificate, DER.
    pub der: CertificateDer<'static>,
    /// Its certificate, PEM.
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A fresh self-signed CA.
pub fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        der: cert.der().clone(),
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

impl Ca {
    /// A leaf for `cn` (also its DNS name) for `usage`, valid from an hour ago until `not_after`, with its key.
    pub fn leaf(
        &self,
        cn: &str,
        usage: ExtendedKeyUsagePurpose,
        not_after: OffsetDateTime,
    ) -> (Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![cn.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        params.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
        params.not_after = not_after;
        (params.signed_by(&key, &self.issuer).unwrap(), key)
    }
}
