//! Device certificates on record: what was issued, to whom, and whether it is still good.

use antumbra_wire::DeviceId;
use sqlx::any::AnyRow;
use sqlx::Row;
use time::OffsetDateTime;

use super::{from_millis, to_millis, Registry, RegistryError, Tx};

/// Whether a certificate may still be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateStatus {
    /// Valid until it expires.
    Active,
    /// Revoked; never valid again.
    Revoked,
}

impl CertificateStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Revoked => "revoked",
        }
    }
}

/// Where a certificate's private key was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    /// By the platform, handed out once, never stored.
    Generated,
    /// On the device; the platform saw only its CSR.
    Csr,
}

impl KeyOrigin {
    fn as_str(self) -> &'static str {
        match self {
            Self::Generated => "generated",
            Self::Csr => "csr",
        }
    }
}

/// A certificate to record.
#[derive(Debug, Clone)]
pub struct NewCertificate {
    /// The device it was issued to.
    pub device_id: DeviceId,
    /// Serial, lowercase hex.
    pub serial: String,
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint_sha256: String,
    /// The certificate, PEM.
    pub pem: String,
    /// Where its key was made.
    pub key_origin: KeyOrigin,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// SHA-256 of the issuing CA certificate's DER, lowercase hex.
    pub issuer_sha256: String,
}

/// An active certificate as the MQTT front door keeps it in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveCertificate {
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint_sha256: String,
    /// The device it was issued to.
    pub device_id: DeviceId,
    /// Serial, lowercase hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// A certificate on record.
#[derive(Debug, Clone, PartialEq)]
pub struct CertificateRecord {
    /// Serial, lowercase hex.
    pub serial: String,
    /// The device it was issued to.
    pub device_id: DeviceId,
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint_sha256: String,
    /// The certificate, PEM.
    pub pem: String,
    /// Where its key was made.
    pub key_origin: KeyOrigin,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Active or revoked.
    pub status: CertificateStatus,
    /// When it was issued.
    pub created_at: OffsetDateTime,
    /// When it was revoked.
    pub revoked_at: Option<OffsetDateTime>,
    /// Why it was revoked (RFC 5280 reason name).
    pub revocation_reason: Option<String>,
}

const COLUMNS: &str =
    "serial, device_id, fingerprint_sha256, pem, key_origin, not_before, not_after, status, \
                       created_at, revoked_at, revocation_reason";

impl Registry {
    /// Records a newly issued certificate as active.
    pub async fn insert_certificate(
        &self,
        tx: &mut Tx,
        cert: &NewCertificate,
        at: OffsetDateTime,
    ) -> Result<CertificateRecord, RegistryError> {
        sqlx::query(&format!(
            "INSERT INTO certificates ({COLUMNS}, issuer_sha256) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, NULL, $10)"
        ))
        .bind(cert.serial.clone())
        .bind(cert.device_id.as_str())
        .bind(cert.fingerprint_sha256.clone())
        .bind(cert.pem.clone())
        .bind(cert.key_origin.as_str())
        .bind(to_millis(cert.not_before))
        .bind(to_millis(cert.not_after))
        .bind(CertificateStatus::Active.as_str())
        .bind(to_millis(at))
        .bind(cert.issuer_sha256.clone())
        .execute(&mut **tx)
        .await?;
        Ok(CertificateRecord {
            serial: cert.serial.clone(),
            device_id: cert.device_id.clone(),
            fingerprint_sha256: cert.fingerprint_sha256.clone(),
            pem: cert.pem.clone(),
            key_origin: cert.key_origin,
            not_before: cert.not_before,
            not_after: cert.not_after,
            status: CertificateStatus::Active,
            created_at: at,
            revoked_at: None,
            revocation_reason: None,
        })
    }

    /// Every certificate issued to a device id, newest first.
    pub async fn certificates_of(&self, device: &DeviceId) -> Result<Vec<CertificateRecord>, RegistryError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM certificates WHERE device_id = $1 ORDER BY created_at DESC, serial"
        ))
        .bind(device.as_str())
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(certificate_from_row).collect()
    }

    /// One certificate of a device, by serial.
    pub async fn certificate(
        &self,
        device: &DeviceId,
        serial: &str,
    ) -> Result<CertificateRecord, RegistryError> {
        certificate_from_row(&self.certificate_row(COLUMNS, device, serial).await?)
    }

    /// `columns` of one certificate of `device`; [`RegistryError::NotFound`] when there is none with `serial`.
    async fn certificate_row(
        &self,
        columns: &str,
        device: &DeviceId,
        serial: &str,
    ) -> Result<AnyRow, RegistryError> {
        sqlx::query(&format!(
            "SELECT {columns} FROM certificates WHERE device_id = $1 AND serial = $2"
        ))
        .bind(device.as_str())
        .bind(serial.to_ascii_lowercase())
        .fetch_optional(self.pool())
        .await?
        .ok_or(RegistryError::NotFound)
    }

    /// Every active certificate issued by the CA with SHA-256 `issuer_sha256` that has not expired at `now`.
    pub async fn active_certificates(
        &self,
        issuer_sha256: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<ActiveCertificate>, RegistryError> {
        let rows = sqlx::query(
            "SELECT fingerprint_sha256, device_id, serial, not_before, not_after FROM certificates \
             WHERE status = $1 AND issuer_sha256 = $2 AND not_after > $3",
        )
        .bind(CertificateStatus::Active.as_str())
        .bind(issuer_sha256.to_owned())
        .bind(to_millis(now))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                let device: String = row.try_get("device_id")?;
                Ok(ActiveCertificate {
                    fingerprint_sha256: row.try_get("fingerprint_sha256")?,
                    device_id: DeviceId::parse(device.as_str())
                        .map_err(|_| RegistryError::Corrupt(format!("device id {device:?}")))?,
                    serial: row.try_get("serial")?,
                    not_before: from_millis(row.try_get("not_before")?)?,
                    not_after: from_millis(row.try_get("not_after")?)?,
                })
            })
            .collect()
    }

    /// The status of one certificate of `device` ([`RegistryError::NotFound`] when there is none with `serial`):
    /// what every MQTT CONNECT asks, so it reads one column rather than the whole record with its PEM.
    pub async fn certificate_status(
        &self,
        device: &DeviceId,
        serial: &str,
    ) -> Result<CertificateStatus, RegistryError> {
        status_from_row(&self.certificate_row("status", device, serial).await?)
    }

    /// Revokes one active certificate; [`RegistryError::Conflict`] when it already is revoked.
    pub async fn revoke_certificate(
        &self,
        device: &DeviceId,
        serial: &str,
        reason: &str,
        at: OffsetDateTime,
    ) -> Result<CertificateRecord, RegistryError> {
        let current = self.certificate(device, serial).await?;
        let done = sqlx::query(
            "UPDATE certificates SET status = 'revoked', revoked_at = $3, revocation_reason = $4 \
             WHERE device_id = $1 AND serial = $2 AND status = 'active'",
        )
        .bind(device.as_str())
        .bind(current.serial.clone())
        .bind(to_millis(at))
        .bind(reason.to_owned())
        .execute(self.pool())
        .await?;
        if done.rows_affected() == 0 {
            return Err(RegistryError::Conflict);
        }
        self.certificate(device, &current.serial).await
    }

    /// Revokes every active certificate of a device (inside the caller's transaction); returns how many.
    pub async fn revoke_all_certificates(
        &self,
        tx: &mut Tx,
        device: &DeviceId,
        reason: &str,
        at: OffsetDateTime,
    ) -> Result<u64, RegistryError> {
        let done = sqlx::query(
            "UPDATE certificates SET status = 'revoked', revoked_at = $2, revocation_reason = $3 \
             WHERE device_id = $1 AND status = 'active'",
        )
        .bind(device.as_str())
        .bind(to_millis(at))
        .bind(reason.to_owned())
        .execute(&mut **tx)
        .await?;
        Ok(done.rows_affected())
    }
}

fn certificate_from_row(row: &AnyRow) -> Result<CertificateRecord, RegistryError> {
    let status = status_from_row(row)?;
    let key_origin = match row.try_get::<String, _>("key_origin")?.as_str() {
        "generated" => KeyOrigin::Generated,
        "csr" => KeyOrigin::Csr,
        other => return Err(RegistryError::Corrupt(format!("key origin {other:?}"))),
    };
    let device_id: String = row.try_get("device_id")?;
    Ok(CertificateRecord {
        serial: row.try_get("serial")?,
        device_id: DeviceId::parse(device_id).map_err(|e| RegistryError::Corrupt(e.to_string()))?,
        fingerprint_sha256: row.try_get("fingerprint_sha256")?,
        pem: row.try_get("pem")?,
        key_origin,
        not_before: from_millis(row.try_get("not_before")?)?,
        not_after: from_millis(row.try_get("not_after")?)?,
        status,
        created_at: from_millis(row.try_get("created_at")?)?,
        revoked_at: row
            .try_get::<Option<i64>, _>("revoked_at")?
            .map(from_millis)
            .transpose()?,
        revocation_reason: row.try_get("revocation_reason")?,
    })
}

fn status_from_row(row: &AnyRow) -> Result<CertificateStatus, RegistryError> {
    match row.try_get::<String, _>("status")?.as_str() {
        "active" => Ok(CertificateStatus::Active),
        "revoked" => Ok(CertificateStatus::Revoked),
        other => Err(RegistryError::Corrupt(format!("certificate status {other:?}"))),
    }
}
