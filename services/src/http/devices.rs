//! `/v1/devices`: register, read, list, update, delete.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Deserializer, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::auth::{AdminKey, ReadKey};
use super::certificates::CertificateBody;
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::{device_id, AppState};
use crate::provisioning::Registration;
use crate::registry::{Device, DeviceChanges, DeviceQuery};

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/devices")
            .route(web::post().to(register))
            .route(super::get().to(list))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/devices/{id}")
            .route(super::get().to(get))
            .route(web::patch().to(update))
            .route(web::delete().to(delete))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/devices/{id}/status")
            .route(super::get().to(status))
            .default_service(web::to(method_not_allowed)),
    );
}

/// 405 as JSON.
pub async fn method_not_allowed() -> HttpResponse {
    actix_web::ResponseError::error_response(&ApiError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this route",
    ))
}

/// A registered device.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "id": "shelf-0042", "name": "Aisle 4 label", "attributes": {"model": "esl-2.9", "store": "berlin-1"},
    "tags": ["berlin", "esl"], "created_at": "2026-11-22T10:00:00Z", "updated_at": "2026-11-22T10:00:00Z"
}))]
pub struct DeviceBody {
    /// Device id: 1–128 of `A-Z a-z 0-9 - _ . :`.
    pub id: String,
    /// Display name.
    pub name: Option<String>,
    /// Free-form attributes.
    #[schema(value_type = Object)]
    pub attributes: serde_json::Map<String, serde_json::Value>,
    /// Tags, sorted.
    pub tags: Vec<String>,
    /// Registration time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl From<Device> for DeviceBody {
    fn from(d: Device) -> Self {
        Self {
            id: d.id.to_string(),
            name: d.name,
            attributes: d.attributes,
            tags: d.tags,
            created_at: d.created_at,
            updated_at: d.updated_at,
        }
    }
}

/// Registration of a device. Without `csr` the platform generates the key pair and returns the private key
/// once; with `csr` the key never leaves the device.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"id": "shelf-0042", "name": "Aisle 4 label", "attributes": {"model": "esl-2.9"}, "tags": ["esl"]}))]
pub struct RegisterRequest {
    /// Device id: 1–128 of `A-Z a-z 0-9 - _ . :`.
    pub id: String,
    /// Display name, up to 256 characters.
    pub name: Option<String>,
    /// Free-form attributes, a JSON object up to 16 KiB.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub attributes: serde_json::Map<String, serde_json::Value>,
    /// Up to 64 tags of 1–64 characters from the device id alphabet.
    #[serde(default)]
    pub tags: Vec<String>,
    /// PKCS#10 certificate signing request, PEM; its subject CN must be the device id.
    pub csr: Option<String>,
}

/// A registered device with its first certificate.
#[derive(Debug, Serialize, ToSchema)]
pub struct RegisterResponse {
    /// The device.
    pub device: DeviceBody,
    /// Its certificate.
    pub certificate: CertificateBody,
    /// The certificate, PEM (the same as `certificate.pem`, beside the CA chain and the key).
    pub certificate_pem: String,
    /// The CA certificate chain, PEM: what the device and the broker trust.
    pub ca_chain_pem: String,
    /// The private key, PKCS#8 PEM; present only when the platform generated it, and shown only this once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key_pem: Option<String>,
}

/// A page of devices.
#[derive(Debug, Serialize, ToSchema)]
pub struct DevicePage {
    /// Devices, ordered by id.
    pub items: Vec<DeviceBody>,
    /// Pass as `after` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Paging and filters for the device list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Page size, 1–1000 (default 100).
    #[param(example = 100)]
    pub limit: Option<u32>,
    /// Cursor from the previous page's `next_cursor`.
    #[param(example = "shelf-0042")]
    pub after: Option<String>,
    /// Only devices with this tag.
    #[param(example = "esl")]
    pub tag: Option<String>,
    /// Only devices that are (`true`) or are not (`false`) connected over MQTT now.
    #[param(example = true)]
    pub online: Option<bool>,
}

/// Changes to a device. Absent fields stay; `name: null` clears the name; `attributes` and `tags` replace
/// the old values whole.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "Aisle 5 label", "tags": ["esl", "moved"]}))]
pub struct UpdateDeviceRequest {
    /// New display name, or null to clear it.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub name: Option<Option<String>>,
    /// New attributes.
    #[schema(value_type = Option<Object>)]
    pub attributes: Option<serde_json::Map<String, serde_json::Value>>,
    /// New tags.
    pub tags: Option<Vec<String>>,
}

/// Tells a field given as `null` (`Some(None)`) from an absent one (`None`, via `#[serde(default)]`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Register a device and issue its first certificate.
#[utoipa::path(
    post, path = "/v1/devices", tag = "devices", request_body = RegisterRequest,
    responses(
        (status = 201, description = "Registered; the private key is included only when the platform made it", body = RegisterResponse),
        (status = 400, description = "Invalid JSON, fields, device id or CSR", body = ErrorBody,
            example = json!({"code": "invalid_device_id", "message": "device id contains '/'; only A-Z a-z 0-9 - _ . : are allowed"})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 403, description = "The key is read-only", body = ErrorBody, example = json!({"code": "forbidden", "message": "this needs a key of scope \"admin\""})),
        (status = 409, description = "The id is taken", body = ErrorBody, example = json!({"code": "device_already_exists", "message": "device shelf-0042 already exists"})),
        (status = 413, description = "Body too large", body = ErrorBody, example = json!({"code": "payload_too_large", "message": "body exceeds the limit of 65536 bytes"})),
    ),
    security(("api_key" = []))
)]
pub async fn register(
    _key: AdminKey,
    state: web::Data<AppState>,
    body: web::Json<RegisterRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let registration = Registration {
        id: device_id(&body.id)?,
        name: body.name,
        attributes: body.attributes,
        tags: body.tags,
        csr: body.csr,
    };
    let (device, issued) = state.provisioning.register(registration).await?;
    let location = format!("/v1/devices/{}", device.id);
    let certificate = CertificateBody::from(issued.certificate);
    Ok(HttpResponse::Created()
        .insert_header(("Location", location))
        .json(RegisterResponse {
            device: device.into(),
            certificate_pem: certificate.pem.clone(),
            certificate,
            ca_chain_pem: state.provisioning.ca_pem().to_owned(),
            private_key_pem: issued.private_key_pem,
        }))
}

/// List devices, by id, a page at a time.
#[utoipa::path(
    get, path = "/v1/devices", tag = "devices", params(ListQuery),
    responses(
        (status = 200, description = "A page of devices", body = DevicePage),
        (status = 400, description = "Bad limit or tag", body = ErrorBody, example = json!({"code": "invalid_request", "message": "limit must be between 1 and 1000"})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "send an API key as `Authorization: Bearer <key>`"})),
    ),
    security(("api_key" = []))
)]
pub async fn list(
    _key: ReadKey,
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<web::Json<DevicePage>, ApiError> {
    let query = query.into_inner();
    let (devices, next_cursor) = state
        .provisioning
        .devices(DeviceQuery {
            tag: query.tag,
            online: query.online,
            after: query.after,
            limit: query.limit.unwrap_or(100),
        })
        .await?;
    Ok(web::Json(DevicePage {
        items: devices.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}

/// Get one device.
#[utoipa::path(
    get, path = "/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path, description = "Device id", example = "shelf-0042")),
    responses(
        (status = 200, description = "The device", body = DeviceBody),
        (status = 400, description = "Invalid device id", body = ErrorBody, example = json!({"code": "invalid_device_id", "message": "device id contains '#'; only A-Z a-z 0-9 - _ . : are allowed"})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 404, description = "Unknown device", body = ErrorBody, example = json!({"code": "device_not_found", "message": "device shelf-0042 not found"})),
    ),
    security(("api_key" = []))
)]
pub async fn get(
    _key: ReadKey,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<web::Json<DeviceBody>, ApiError> {
    let device = state.provisioning.device(&device_id(&id)?).await?;
    Ok(web::Json(device.into()))
}

/// Change a device's name, attributes or tags.
#[utoipa::path(
    patch, path = "/v1/devices/{id}", tag = "devices", request_body = UpdateDeviceRequest,
    params(("id" = String, Path, description = "Device id", example = "shelf-0042")),
    responses(
        (status = 200, description = "The device as it now is", body = DeviceBody),
        (status = 400, description = "Invalid JSON or fields", body = ErrorBody, example = json!({"code": "invalid_request", "message": "tag \"a b\" is invalid"})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 403, description = "The key is read-only", body = ErrorBody, example = json!({"code": "forbidden", "message": "this needs a key of scope \"admin\""})),
        (status = 404, description = "Unknown device", body = ErrorBody, example = json!({"code": "device_not_found", "message": "device shelf-0042 not found"})),
    ),
    security(("api_key" = []))
)]
pub async fn update(
    _key: AdminKey,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<UpdateDeviceRequest>,
) -> Result<web::Json<DeviceBody>, ApiError> {
    let body = body.into_inner();
    let changes = DeviceChanges {
        name: body.name,
        attributes: body.attributes,
        tags: body.tags,
    };
    let device = state.provisioning.update(&device_id(&id)?, changes).await?;
    Ok(web::Json(device.into()))
}

/// Delete a device; all its certificates are revoked.
#[utoipa::path(
    delete, path = "/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path, description = "Device id", example = "shelf-0042")),
    responses(
        (status = 204, description = "Deleted; its certificates are revoked"),
        (status = 400, description = "Invalid device id", body = ErrorBody, example = json!({"code": "invalid_device_id", "message": "device id must not be empty"})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 403, description = "The key is read-only", body = ErrorBody, example = json!({"code": "forbidden", "message": "this needs a key of scope \"admin\""})),
        (status = 404, description = "Unknown device", body = ErrorBody, example = json!({"code": "device_not_found", "message": "device shelf-0042 not found"})),
    ),
    security(("api_key" = []))
)]
pub async fn delete(
    _key: AdminKey,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = device_id(&id)?;
    state.provisioning.delete(&id).await?;
    // Here, once, before answering: a device registered again under this id right after never sees the old
    // documents, and no late purge can wipe its new ones (the other instances only forget on the event).
    if let Err(e) = state.shadows.purge(&id).await {
        tracing::warn!(device_id = %id, error = %e, "could not purge the deleted device's shadows");
    }
    Ok(HttpResponse::NoContent().finish())
}

/// A device's MQTT presence.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "device_id": "shelf-0042", "online": true, "session": 7, "connected_at": "2026-11-22T10:00:00Z",
    "last_seen_at": "2026-11-22T10:04:10Z", "disconnected_at": "2026-11-22T09:59:58Z",
    "last_disconnect_reason": "keep_alive_timeout", "remote_addr": "127.0.0.1:50412"
}))]
pub struct StatusBody {
    /// The device.
    pub device_id: String,
    /// Whether an MQTT session holds the device now.
    pub online: bool,
    /// Number of the latest session; only ever increases (0: never connected).
    pub session: u64,
    /// Start of the latest session.
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub connected_at: Option<OffsetDateTime>,
    /// End of the last session that ended.
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub disconnected_at: Option<OffsetDateTime>,
    /// Last time the device sent anything.
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub last_seen_at: Option<OffsetDateTime>,
    /// Why the last session ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_disconnect_reason: Option<crate::events::DisconnectReason>,
    /// Remote address of the latest session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_addr: Option<String>,
}

/// Get a device's online status: connected since when, last seen, why its last session ended.
#[utoipa::path(
    get, path = "/v1/devices/{id}/status", tag = "devices",
    params(("id" = String, Path, description = "Device id", example = "shelf-0042")),
    responses(
        (status = 200, description = "Presence", body = StatusBody),
        (status = 400, description = "Invalid device id", body = ErrorBody, example = json!({"code": "invalid_device_id", "message": "device id must not be empty"})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 404, description = "Unknown device", body = ErrorBody, example = json!({"code": "device_not_found", "message": "device shelf-0042 not found"})),
    ),
    security(("api_key" = []))
)]
pub async fn status(
    _key: ReadKey,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<web::Json<StatusBody>, ApiError> {
    let id = device_id(&id)?;
    state.provisioning.device(&id).await?;
    let s = state.presence.status(&id);
    Ok(web::Json(StatusBody {
        device_id: id.to_string(),
        online: s.online,
        session: s.session,
        connected_at: s.connected_at,
        disconnected_at: s.disconnected_at,
        last_seen_at: s.last_seen_at,
        last_disconnect_reason: s.last_disconnect_reason,
        remote_addr: s.remote_addr,
    }))
}
