//! Device provisioning: register, update, delete devices; issue, rotate and revoke their certificates.
//!
//! The rules live here and both transports call them. Certificates are made (pure CPU, no I/O) before anything
//! is written, and every write that belongs together happens in one transaction, so a failure at any step leaves
//! the registry as it was.

use std::sync::Arc;

use antumbra_wire::DeviceId;
use serde::{Deserialize, Serialize};

use crate::events::{EventBus, PlatformEvent};
use crate::pki::known::KnownCertificates;
use crate::pki::{CertificateAuthority, CsrError, IssuedCertificate, PkiError};
use crate::registry::{
    self, CertificateRecord, Device, DeviceChanges, DeviceQuery, KeyOrigin, NewCertificate, NewDevice,
    Registry, RegistryError,
};

/// Longest display name, in characters.
pub const MAX_NAME_CHARS: usize = 256;
/// Largest attributes object, serialized, in bytes.
pub const MAX_ATTRIBUTES_BYTES: usize = 16 * 1024;
/// Most tags a device may carry.
pub const MAX_TAGS: usize = 64;
/// Longest tag, in characters.
pub const MAX_TAG_CHARS: usize = 64;
/// Largest page of devices.
pub const MAX_PAGE: u32 = 1000;

/// Why a certificate is revoked (RFC 5280 §5.3.1 reasons that apply to device certificates).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RevocationReason {
    /// No reason given.
    #[default]
    Unspecified,
    /// The private key is known or suspected to be exposed.
    KeyCompromise,
    /// The device changed owner or role.
    AffiliationChanged,
    /// A newer certificate replaces it.
    Superseded,
    /// The device is retired (also used when a device is deleted).
    CessationOfOperation,
    /// The device is no longer allowed on the platform.
    PrivilegeWithdrawn,
}

impl RevocationReason {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::KeyCompromise => "key_compromise",
            Self::AffiliationChanged => "affiliation_changed",
            Self::Superseded => "superseded",
            Self::CessationOfOperation => "cessation_of_operation",
            Self::PrivilegeWithdrawn => "privilege_withdrawn",
        }
    }
}

/// Errors of provisioning, free of any transport.
#[derive(Debug, thiserror::Error)]
pub enum ProvisioningError {
    /// No device with that id.
    #[error("device {0} not found")]
    DeviceNotFound(DeviceId),
    /// A device with that id exists.
    #[error("device {0} already exists")]
    DeviceExists(DeviceId),
    /// No certificate with that serial for that device.
    #[error("certificate {serial} of device {device} not found")]
    CertificateNotFound { device: DeviceId, serial: String },
    /// The certificate is revoked already.
    #[error("certificate {0} is already revoked")]
    AlreadyRevoked(String),
    /// Rotation needs a certificate to rotate from.
    #[error("device {0} has no active certificate to rotate; issue one instead")]
    NoActiveCertificate(DeviceId),
    /// A field is invalid; the message names it.
    #[error("{0}")]
    Invalid(String),
    /// The CSR is refused.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// The CA failed to produce a certificate.
    #[error("certificate issuance failed: {0}")]
    Issuance(String),
    /// The registry failed.
    #[error(transparent)]
    Registry(RegistryError),
}

impl From<PkiError> for ProvisioningError {
    fn from(e: PkiError) -> Self {
        match e {
            PkiError::Csr(e) => Self::Csr(e),
            e => Self::Issuance(e.to_string()),
        }
    }
}

impl From<RegistryError> for ProvisioningError {
    fn from(e: RegistryError) -> Self {
        Self::Registry(e)
    }
}

/// A registration request, as received.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Device id.
    pub id: DeviceId,
    /// Display name.
    pub name: Option<String>,
    /// Attributes (a JSON object).
    pub attributes: serde_json::Map<String, serde_json::Value>,
    /// Tags.
    pub tags: Vec<String>,
    /// A PKCS#10 CSR (PEM) when the device made its own key.
    pub csr: Option<String>,
}

/// A certificate just issued, with the private key when the platform generated it (shown this once).
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate on record.
    pub certificate: CertificateRecord,
    /// The private key, PKCS#8 PEM, only when generated here.
    pub private_key_pem: Option<String>,
}

/// The device-facing service: registry plus CA.
#[derive(Debug, Clone)]
pub struct Provisioning {
    registry: Registry,
    ca: Arc<CertificateAuthority>,
    events: EventBus,
    /// The MQTT front door's table of active certificates: kept current as certificates are issued and revoked.
    known: Arc<KnownCertificates>,
}

impl Provisioning {
    /// Builds the service.
    pub fn new(
        registry: Registry,
        ca: Arc<CertificateAuthority>,
        events: EventBus,
        known: Arc<KnownCertificates>,
    ) -> Self {
        Self {
            registry,
            ca,
            events,
            known,
        }
    }

    fn remember(&self, cert: &CertificateRecord) {
        self.known.insert(
            &cert.fingerprint_sha256,
            cert.device_id.clone(),
            cert.serial.clone(),
            cert.not_before,
            cert.not_after,
        );
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        self.ca.ca_pem()
    }

    /// Registers a device and issues its first certificate, all or nothing.
    #[tracing::instrument(skip_all, fields(device_id = %reg.id))]
    pub async fn register(&self, reg: Registration) -> Result<(Device, Issued), ProvisioningError> {
        let new = NewDevice {
            name: valid_name(reg.name)?,
            attributes: valid_attributes(reg.attributes)?,
            tags: valid_tags(reg.tags)?,
            id: reg.id,
        };
        if self.registry.device_exists(&new.id).await? {
            return Err(ProvisioningError::DeviceExists(new.id));
        }
        let (cert, key) = self.make_certificate(&new.id, reg.csr.as_deref())?;
        let at = registry::now();
        let mut tx = self.registry.begin().await?;
        let device = match self.registry.insert_device(&mut tx, &new, at).await {
            Err(RegistryError::Conflict) => return Err(ProvisioningError::DeviceExists(new.id)),
            other => other?,
        };
        let certificate = self.registry.insert_certificate(&mut tx, &cert, at).await?;
        tx.commit().await.map_err(RegistryError::from)?;
        self.remember(&certificate);
        tracing::info!(serial = %certificate.serial, "device registered");
        Ok((
            device,
            Issued {
                certificate,
                private_key_pem: key,
            },
        ))
    }

    fn make_certificate(
        &self,
        id: &DeviceId,
        csr: Option<&str>,
    ) -> Result<(NewCertificate, Option<String>), ProvisioningError> {
        let (issued, key, origin): (IssuedCertificate, _, _) = match csr {
            Some(csr) => (self.ca.issue_from_csr(id, csr)?, None, KeyOrigin::Csr),
            None => {
                let (cert, key) = self.ca.issue_with_new_key(id)?;
                (cert, Some(key), KeyOrigin::Generated)
            }
        };
        let cert = NewCertificate {
            device_id: id.clone(),
            serial: issued.serial,
            fingerprint_sha256: issued.fingerprint_sha256,
            pem: issued.pem,
            key_origin: origin,
            not_before: issued.not_before,
            not_after: issued.not_after,
            issuer_sha256: self.ca.fingerprint_sha256().to_owned(),
        };
        Ok((cert, key))
    }

    /// One device.
    pub async fn device(&self, id: &DeviceId) -> Result<Device, ProvisioningError> {
        self.registry.device(id).await.map_err(|e| not_found_as(e, id))
    }

    /// A page of devices and the cursor of the next page, if any.
    pub async fn devices(
        &self,
        mut query: DeviceQuery,
    ) -> Result<(Vec<Device>, Option<String>), ProvisioningError> {
        if query.limit == 0 || query.limit > MAX_PAGE {
            return Err(ProvisioningError::Invalid(format!(
                "limit must be between 1 and {MAX_PAGE}"
            )));
        }
        if let Some(tag) = &query.tag {
            query.tag = Some(valid_tag(tag.clone())?);
        }
        let mut devices = self.registry.devices(&query).await?;
        let next = if devices.len() > query.limit as usize {
            devices.truncate(query.limit as usize);
            devices.last().map(|d| d.id.to_string())
        } else {
            None
        };
        Ok((devices, next))
    }

    /// Changes name, attributes or tags.
    #[tracing::instrument(skip_all, fields(device_id = %id))]
    pub async fn update(&self, id: &DeviceId, changes: DeviceChanges) -> Result<Device, ProvisioningError> {
        let changes = DeviceChanges {
            name: changes.name.map(valid_name).transpose()?,
            attributes: changes.attributes.map(valid_attributes).transpose()?,
            tags: changes.tags.map(valid_tags).transpose()?,
        };
        self.registry
            .update_device(id, &changes, registry::now())
            .await
            .map_err(|e| not_found_as(e, id))
    }

    /// Deletes a device and revokes all its certificates, in one transaction.
    #[tracing::instrument(skip_all, fields(device_id = %id))]
    pub async fn delete(&self, id: &DeviceId) -> Result<u64, ProvisioningError> {
        // Out of the front door's table first, as in `revoke`.
        self.known.forget(id, None);
        let mut tx = self.registry.begin().await?;
        let at = registry::now();
        let revoked = self
            .registry
            .revoke_all_certificates(&mut tx, id, RevocationReason::CessationOfOperation.as_str(), at)
            .await?;
        self.registry
            .delete_device(&mut tx, id)
            .await
            .map_err(|e| not_found_as(e, id))?;
        tx.commit().await.map_err(RegistryError::from)?;
        tracing::info!(revoked, "device deleted");
        self.events.publish(PlatformEvent::DeviceDeleted {
            device_id: id.to_string(),
            at,
        });
        Ok(revoked)
    }

    /// Every certificate of a device, newest first.
    pub async fn certificates(&self, id: &DeviceId) -> Result<Vec<CertificateRecord>, ProvisioningError> {
        self.device(id).await?;
        Ok(self.registry.certificates_of(id).await?)
    }

    /// The newest active certificate of a device.
    pub async fn current_certificate(&self, id: &DeviceId) -> Result<CertificateRecord, ProvisioningError> {
        self.certificates(id)
            .await?
            .into_iter()
            .find(|c| c.status == registry::CertificateStatus::Active)
            .ok_or_else(|| ProvisioningError::NoActiveCertificate(id.clone()))
    }

    /// One certificate of a device.
    pub async fn certificate(
        &self,
        id: &DeviceId,
        serial: &str,
    ) -> Result<CertificateRecord, ProvisioningError> {
        self.registry.certificate(id, serial).await.map_err(|e| match e {
            RegistryError::NotFound => ProvisioningError::CertificateNotFound {
                device: id.clone(),
                serial: serial.to_owned(),
            },
            e => e.into(),
        })
    }

    /// Issues another certificate to an existing device; earlier ones stay valid.
    #[tracing::instrument(skip_all, fields(device_id = %id))]
    pub async fn issue(&self, id: &DeviceId, csr: Option<&str>) -> Result<Issued, ProvisioningError> {
        self.device(id).await?;
        let (cert, key) = self.make_certificate(id, csr)?;
        let mut tx = self.registry.begin().await?;
        let certificate = self
            .registry
            .insert_certificate(&mut tx, &cert, registry::now())
            .await?;
        tx.commit().await.map_err(RegistryError::from)?;
        self.remember(&certificate);
        tracing::info!(serial = %certificate.serial, "certificate issued");
        Ok(Issued {
            certificate,
            private_key_pem: key,
        })
    }

    /// Rotation: a new certificate for a device that has an active one. The old ones stay valid until they are
    /// revoked, so a fleet can roll over without a moment offline. Returns the new certificate and the serials
    /// that are still active beside it.
    pub async fn rotate(
        &self,
        id: &DeviceId,
        csr: Option<&str>,
    ) -> Result<(Issued, Vec<String>), ProvisioningError> {
        self.current_certificate(id).await?;
        let issued = self.issue(id, csr).await?;
        let still_active = self
            .registry
            .certificates_of(id)
            .await?
            .into_iter()
            .filter(|c| {
                c.status == registry::CertificateStatus::Active && c.serial != issued.certificate.serial
            })
            .map(|c| c.serial)
            .collect();
        Ok((issued, still_active))
    }

    /// Revokes one certificate, recording why.
    #[tracing::instrument(skip_all, fields(device_id = %id, serial))]
    pub async fn revoke(
        &self,
        id: &DeviceId,
        serial: &str,
        reason: RevocationReason,
    ) -> Result<CertificateRecord, ProvisioningError> {
        self.device(id).await?;
        // Out of the front door's table first: from here on a CONNECT with it asks the registry, which the
        // revocation below updates (a failed revocation only costs that certificate the fast path).
        self.known.forget(id, Some(serial));
        match self
            .registry
            .revoke_certificate(id, serial, reason.as_str(), registry::now())
            .await
        {
            Ok(cert) => {
                tracing::info!(reason = reason.as_str(), "certificate revoked");
                self.events.publish(PlatformEvent::CertificateRevoked {
                    device_id: id.to_string(),
                    serial: cert.serial.clone(),
                    at: registry::now(),
                });
                Ok(cert)
            }
            Err(RegistryError::NotFound) => Err(ProvisioningError::CertificateNotFound {
                device: id.clone(),
                serial: serial.to_owned(),
            }),
            Err(RegistryError::Conflict) => Err(ProvisioningError::AlreadyRevoked(serial.to_owned())),
            Err(e) => Err(e.into()),
        }
    }
}

fn not_found_as(e: RegistryError, id: &DeviceId) -> ProvisioningError {
    match e {
        RegistryError::NotFound => ProvisioningError::DeviceNotFound(id.clone()),
        e => e.into(),
    }
}

fn valid_name(name: Option<String>) -> Result<Option<String>, ProvisioningError> {
    match name {
        Some(n) if n.chars().count() > MAX_NAME_CHARS => Err(ProvisioningError::Invalid(format!(
            "name is longer than {MAX_NAME_CHARS} characters"
        ))),
        Some(n) if n.chars().any(char::is_control) => Err(ProvisioningError::Invalid(
            "name must not contain control characters".into(),
        )),
        other => Ok(other),
    }
}

fn valid_attributes(
    attributes: serde_json::Map<String, serde_json::Value>,
) -> Result<serde_json::Map<String, serde_json::Value>, ProvisioningError> {
    let size = serde_json::to_vec(&attributes)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_ATTRIBUTES_BYTES {
        return Err(ProvisioningError::Invalid(format!(
            "attributes take {size} bytes as JSON; at most {MAX_ATTRIBUTES_BYTES} are allowed"
        )));
    }
    Ok(attributes)
}

fn valid_tags(tags: Vec<String>) -> Result<Vec<String>, ProvisioningError> {
    if tags.len() > MAX_TAGS {
        return Err(ProvisioningError::Invalid(format!(
            "at most {MAX_TAGS} tags are allowed"
        )));
    }
    tags.into_iter().map(valid_tag).collect()
}

/// Tags follow the device id alphabet, so they are safe in URLs and query strings as they are.
fn valid_tag(tag: String) -> Result<String, ProvisioningError> {
    let ok = !tag.is_empty()
        && tag.chars().count() <= MAX_TAG_CHARS
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(tag)
    } else {
        Err(ProvisioningError::Invalid(format!(
            "tag {tag:?} is invalid: 1 to {MAX_TAG_CHARS} characters of A-Z a-z 0-9 - _ . :"
        )))
    }
}
