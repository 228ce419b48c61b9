//! `/v1/devices/{id}/certificate(s)` and `/v1/ca`: download, list, issue, rotate, revoke.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::auth::{AdminKey, ReadKey};
use super::devices::method_not_allowed;
use super::error::{ApiError, ErrorBody};
use super::{device_id, AppState, OptionalJson};
use crate::provisioning::{Issued, RevocationReason};
use crate::registry::{CertificateRecord, CertificateStatus, KeyOrigin};

/// Media type of PEM downloads.
pub const PEM: &str = "application/x-pem-file";

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/ca")
            .route(super::get().to(ca))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/devices/{id}/certificate")
            .route(super::get().to(current))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/devices/{id}/certificates")
            .route(super::get().to(list))
            .route(web::post().to(issue))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/devices/{id}/certificates/rotate")
            .route(web::post().to(rotate))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/devices/{id}/certificates/{serial}")
            .route(super::get().to(get))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/devices/{id}/certificates/{serial}/revoke")
            .route(web::post().to(revoke))
            .default_service(web::to(method_not_allowed)),
    );
}

/// A device certificate on record.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "serial": "5f0c3e1a9b7d4c2e8f6a1b3c5d7e9f01", "device_id": "shelf-0042",
    "fingerprint_sha256": "9c1e0b4f6a3d2e8b7c5a4f1e0d9c8b7a6f5e4d3c2b1a09f8e7d6c5b4a3f2e1d0",
    "status": "active", "key_origin": "generated",
    "not_before": "2026-11-22T09:55:00Z", "not_after": "2027-11-22T10:00:00Z", "created_at": "2026-11-22T10:00:00Z",
    "pem": "-----BEGIN CERTIFICATE-----\nMIIB…\n-----END CERTIFICATE-----\n"
}))]
pub struct CertificateBody {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// The device it belongs to.
    pub device_id: String,
    /// SHA-256 of the DER encoding, lowercase hex.
    pub fingerprint_sha256: String,
    /// `active` or `revoked`.
    #[schema(example = "active")]
    pub status: String,
    /// `generated` (the platform made the key) or `csr` (the device did).
    #[schema(example = "generated")]
    pub key_origin: String,
    /// Start of validity.
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    /// End of validity.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// When it was issued.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it was revoked.
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub revoked_at: Option<OffsetDateTime>,
    /// Why it was revoked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revocation_reason: Option<String>,
    /// The certificate, PEM.
    pub pem: String,
}

impl From<CertificateRecord> for CertificateBody {
    fn from(c: CertificateRecord) -> Self {
        Self {
            serial: c.serial,
            device_id: c.device_id.to_string(),
            fingerprint_sha256: c.fingerprint_sha256,
            status: match c.status {
                CertificateStatus::Active => "active",
                CertificateStatus::Revoked => "revoked",
            }
            .into(),
            key_origin: match c.key_origin {
                KeyOrigin::Generated => "generated",
                KeyOrigin::Csr => "csr",
            }
            .into(),
            not_before: c.not_before,
            not_after: c.not_after,
            created_at: c.created_at,
            revoked_at: c.revoked_at,
            revocation_reason: c.revocation_reason,
            pem: c.pem,
        }
    }
}

/// Request for a new certificate. Without `csr` the platform generates the key pair.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"csr": "-----BEGIN CERTIFICATE REQUEST-----\nMIH…\n-----END CERTIFICATE REQUEST-----\n"}))]
pub struct IssueRequest {
    /// PKCS#10 CSR, PEM, with subject CN = device id.
    pub csr: Option<String>,
}

/// A certificate just issued.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssueResponse {
    /// The certificate.
    pub certificate: CertificateBody,
    /// The certificate, PEM (the same as `certificate.pem`, beside the CA chain and the key).
    pub certificate_pem: String,
    /// The CA certificate chain, PEM.
    pub ca_chain_pem: String,
    /// The private key, PKCS#8 PEM; only when the platform generated it, shown only this once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key_pem: Option<String>,
    /// On rotation: the device's other certificates that stay valid until revoked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub still_active: Option<Vec<String>>,
}

/// Revocation request.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"reason": "key_compromise"}))]
pub struct RevokeRequest {
    /// Why (default `unspecified`).
    #[serde(default)]
    pub reason: RevocationReason,
}

/// Download format.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FormatQuery {
    /// `pem` (default) or `json`; `Accept: application/json` also selects JSON.
    #[param(example = "pem")]
    pub format: Option<String>,
}

fn issued_response(state: &AppState, issued: Issued, still_active: Option<Vec<String>>) -> HttpResponse {
    let certificate = CertificateBody::from(issued.certificate);
    HttpResponse::Created().json(IssueResponse {
        certificate_pem: certificate.pem.clone(),
        certificate,
        ca_chain_pem: state.provisioning.ca_pem().to_owned(),
        private_key_pem: issued.private_key_pem,
        still_active,
    })
}

fn wants_json(req: &HttpRequest, query: &FormatQuery) -> Result<bool, ApiError> {
    match query.format.as_deref() {
        Some("json") => Ok(true),
        Some("pem") => Ok(false),
        Some(other) => Err(ApiError::new(
            super::error::ErrorCode::InvalidRequest,
            format!("format {other:?} is not one of pem, json"),
        )),
        None => Ok(req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("application/json"))),
    }
}

fn pem_download(filename: &str, pem: String) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(PEM)
        .insert_header((
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{filename}\""),
        ))
        .body(pem)
}

/// Download the platform CA certificate (PEM). Public: it is what devices and clients trust.
#[utoipa::path(
    get, path = "/v1/ca", tag = "certificates",
    responses((status = 200, description = "CA certificate", content_type = "application/x-pem-file", body = String,
        example = "-----BEGIN CERTIFICATE-----\nMIIB…\n-----END CERTIFICATE-----\n")),
    security(())
)]
pub async fn ca(state: web::Data<AppState>) -> HttpResponse {
    pem_download("antumbra-ca.crt", state.provisioning.ca_pem().to_owned())
}

/// Download a device's current certificate: the newest active one, as PEM or JSON.
#[utoipa::path(
    get, path = "/v1/devices/{id}/certificate", tag = "certificates",
    params(("id" = String, Path, description = "Device id", example = "shelf-0042"), FormatQuery),
    responses(
        (status = 200, description = "The certificate", content(
            (String = "application/x-pem-file", example = "-----BEGIN CERTIFICATE-----\nMIIB…\n-----END CERTIFICATE-----\n"),
            (CertificateBody = "application/json"))),
        (status = 400, description = "Invalid device id or format", body = ErrorBody, example = json!({"code": "invalid_request", "message": "format \"der\" is not one of pem, json"})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 404, description = "Unknown device", body = ErrorBody, example = json!({"code": "device_not_found", "message": "device shelf-0042 not found"})),
        (status = 409, description = "Every certificate of the device is revoked", body = ErrorBody, example = json!({"code": "no_active_certificate", "message": "device shelf-0042 has no active certificate to rotate; issue one instead"})),
    ),
    security(("api_key" = []))
)]
pub async fn current(
    _key: ReadKey,
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    query: web::Query<FormatQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = device_id(&id)?;
    let json = wants_json(&req, &query)?;
    let cert = state.provisioning.current_certificate(&id).await?;
    Ok(if json {
        HttpResponse::Ok().json(CertificateBody::from(cert))
    } else {
        pem_download(&format!("{id}.crt"), cert.pem)
    })
}

/// List a device's certificates, newest first, revoked ones included.
#[utoipa::path(
    get, path = "/v1/devices/{id}/certificates", tag = "certificates",
    params(("id" = String, Path, description = "Device id", example = "shelf-0042")),
    responses(
        (status = 200, description = "Certificates", body = [CertificateBody]),
        (status = 400, description = "Invalid device id", body = ErrorBody, example = json!({"code": "invalid_device_id", "message": "device id contains '+'; only A-Z a-z 0-9 - _ . : are allowed"})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 404, description = "Unknown device", body = ErrorBody, example = json!({"code": "device_not_found", "message": "device shelf-0042 not found"})),
    ),
    security(("api_key" = []))
)]
pub async fn list(
    _key: ReadKey,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let certs = state.provisioning.certificates(&device_id(&id)?).await?;
    Ok(HttpResponse::Ok().json(certs.into_iter().map(CertificateBody::from).collect::<Vec<_>>()))
}

/// Get one certificate by serial, as JSON.
#[utoipa::path(
    get, path = "/v1/devices/{id}/certificates/{serial}", tag = "certificates",
    params(("id" = String, Path, description = "Device id", example = "shelf-0042"),
           ("serial" = String, Path, description = "Serial, hex", example = "5f0c3e1a9b7d4c2e8f6a1b3c5d7e9f01")),
    responses(
        (status = 200, description = "The certificate", body = CertificateBody),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 404, description = "Unknown certificate", body = ErrorBody, example = json!({"code": "certificate_not_found", "message": "certificate 5f0c of device shelf-0042 not found"})),
    ),
    security(("api_key" = []))
)]
pub async fn get(
    _key: ReadKey,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<web::Json<CertificateBody>, ApiError> {
    let (id, serial) = path.into_inner();
    let cert = state.provisioning.certificate(&device_id(&id)?, &serial).await?;
    Ok(web::Json(cert.into()))
}

/// Issue another certificate to a device; its other certificates stay valid.
#[utoipa::path(
    post, path = "/v1/devices/{id}/certificates", tag = "certificates", request_body = IssueRequest,
    params(("id" = String, Path, description = "Device id", example = "shelf-0042")),
    responses(
        (status = 201, description = "Issued", body = IssueResponse),
        (status = 400, description = "Invalid CSR or JSON", body = ErrorBody, example = json!({"code": "csr_subject_mismatch", "message": "csr subject CN is \"other\", but the device id is \"shelf-0042\""})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 403, description = "The key is read-only", body = ErrorBody, example = json!({"code": "forbidden", "message": "this needs a key of scope \"admin\""})),
        (status = 404, description = "Unknown device", body = ErrorBody, example = json!({"code": "device_not_found", "message": "device shelf-0042 not found"})),
    ),
    security(("api_key" = []))
)]
pub async fn issue(
    _key: AdminKey,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: OptionalJson<IssueRequest>,
) -> Result<HttpResponse, ApiError> {
    let id = device_id(&id)?;
    let body = body.0;
    let issued = state.provisioning.issue(&id, body.csr.as_deref()).await?;
    Ok(issued_response(&state, issued, None))
}

/// Rotate: issue a new certificate to a device that has an active one. The old ones stay valid until revoked,
/// so the device can switch over without a moment offline.
#[utoipa::path(
    post, path = "/v1/devices/{id}/certificates/rotate", tag = "certificates", request_body = IssueRequest,
    params(("id" = String, Path, description = "Device id", example = "shelf-0042")),
    responses(
        (status = 201, description = "Issued; `still_active` lists the serials that remain valid", body = IssueResponse),
        (status = 400, description = "Invalid CSR or JSON", body = ErrorBody, example = json!({"code": "weak_key", "message": "csr key is refused: RSA key of 1024 bits"})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 403, description = "The key is read-only", body = ErrorBody, example = json!({"code": "forbidden", "message": "this needs a key of scope \"admin\""})),
        (status = 404, description = "Unknown device", body = ErrorBody, example = json!({"code": "device_not_found", "message": "device shelf-0042 not found"})),
        (status = 409, description = "Nothing to rotate", body = ErrorBody, example = json!({"code": "no_active_certificate", "message": "device shelf-0042 has no active certificate to rotate; issue one instead"})),
    ),
    security(("api_key" = []))
)]
pub async fn rotate(
    _key: AdminKey,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: OptionalJson<IssueRequest>,
) -> Result<HttpResponse, ApiError> {
    let id = device_id(&id)?;
    let body = body.0;
    let (issued, still_active) = state.provisioning.rotate(&id, body.csr.as_deref()).await?;
    Ok(issued_response(&state, issued, Some(still_active)))
}

/// Revoke a certificate, with a reason. Revocation is final.
#[utoipa::path(
    post, path = "/v1/devices/{id}/certificates/{serial}/revoke", tag = "certificates", request_body = RevokeRequest,
    params(("id" = String, Path, description = "Device id", example = "shelf-0042"),
           ("serial" = String, Path, description = "Serial, hex", example = "5f0c3e1a9b7d4c2e8f6a1b3c5d7e9f01")),
    responses(
        (status = 200, description = "Revoked", body = CertificateBody),
        (status = 400, description = "Unknown reason", body = ErrorBody, example = json!({"code": "invalid_request", "message": "unknown variant `lost`"})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 403, description = "The key is read-only", body = ErrorBody, example = json!({"code": "forbidden", "message": "this needs a key of scope \"admin\""})),
        (status = 404, description = "Unknown device or certificate", body = ErrorBody, example = json!({"code": "certificate_not_found", "message": "certificate 5f0c of device shelf-0042 not found"})),
        (status = 409, description = "Already revoked", body = ErrorBody, example = json!({"code": "certificate_already_revoked", "message": "certificate 5f0c is already revoked"})),
    ),
    security(("api_key" = []))
)]
pub async fn revoke(
    _key: AdminKey,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    body: OptionalJson<RevokeRequest>,
) -> Result<web::Json<CertificateBody>, ApiError> {
    let (id, serial) = path.into_inner();
    let reason = body.0.reason;
    let cert = state
        .provisioning
        .revoke(&device_id(&id)?, &serial, reason)
        .await?;
    Ok(web::Json(cert.into()))
}
