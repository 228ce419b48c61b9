//! `/v1/devices/{id}/shadow`: read, change (desired state) and delete a device's shadow, classic or named.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::IntoParams;

use super::auth::{AdminKey, ReadKey};
use super::devices::method_not_allowed;
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::{device_id, AppState};
use crate::shadow::request::{self, PlainRequest, ShadowError};
use crate::shadow::Shadows;

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/devices/{id}/shadow")
            .route(super::get().to(get))
            .route(web::patch().to(patch))
            .route(web::delete().to(delete))
            .default_service(web::to(method_not_allowed)),
    );
}

/// Which shadow.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ShadowQuery {
    /// A named shadow (1–64 of `A-Z a-z 0-9 - _ :`); omitted for the classic shadow.
    #[param(example = "config")]
    pub name: Option<String>,
}

fn etag(version: u64) -> String {
    format!("\"{version}\"")
}

/// The version an `If-Match` header names: `"7"`, `W/"7"` or `7`; `*` (or no header) names none.
fn if_match(req: &HttpRequest) -> Result<Option<u64>, ApiError> {
    let Some(value) = req.headers().get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    if text == "*" {
        return Ok(None);
    }
    let bare = text.trim_start_matches("W/").trim_matches('"');
    bare.parse::<u64>().map(Some).map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("If-Match {text:?} is not a shadow version ETag"),
        )
    })
}

/// 409 (or 412 for If-Match) with the current version and document.
async fn conflict(
    state: &AppState,
    key: &crate::shadow::store::ShadowKey,
    current: u64,
    code: ErrorCode,
) -> HttpResponse {
    let document = state
        .shadows
        .get_shared(key, true)
        .await
        .map(|d| d.to_json())
        .unwrap_or(Value::Null);
    let body = json!({
        "code": code,
        "message": format!("version conflict: the current version is {current}"),
        "version": current,
        "document": document,
    });
    HttpResponse::build(code.status())
        .insert_header((header::ETAG, etag(current)))
        .json(body)
}

/// Get a device's shadow document.
#[utoipa::path(
    get, path = "/v1/devices/{id}/shadow", tag = "shadows",
    params(("id" = String, Path, description = "Device id", example = "thermostat-17"), ShadowQuery),
    responses(
        (status = 200, description = "The document; `ETag` is its version", body = Object, example = json!({"state": {"desired": {"target": 21}, "reported": {"target": 19}, "delta": {"target": 21}}, "metadata": {"desired": {"target": {"timestamp": 1795340000}}, "reported": {"target": {"timestamp": 1795339990}}}, "version": 7, "timestamp": 1795340000})),
        (status = 400, description = "Invalid device id or shadow name", body = ErrorBody, example = json!({"code": "invalid_request", "message": "shadow name \"a b\" is invalid: 1 to 64 characters of A-Z a-z 0-9 - _ :"})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 404, description = "Unknown device, or no shadow", body = ErrorBody, example = json!({"code": "shadow_not_found", "message": "no shadow for device thermostat-17"})),
        (status = 503, description = "The shadow store does not answer", body = ErrorBody, example = json!({"code": "shadow_store_unavailable", "message": "the shadow store does not answer; retry later"})),
    ),
    security(("api_key" = []))
)]
pub async fn get(
    _key: ReadKey,
    state: web::Data<AppState>,
    id: web::Path<String>,
    query: web::Query<ShadowQuery>,
) -> Result<HttpResponse, ApiError> {
    let key = Shadows::key(&device_id(&id)?, query.name.as_deref())?;
    let document = state.shadows.get_shared(&key, false).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::ETAG, etag(document.version)))
        .content_type(actix_web::http::header::ContentType::json())
        .body(document.to_json_bytes(None)))
}

/// Change a device's shadow (usually its desired state). The device gets the resulting delta at once if it is
/// connected, or the moment it reconnects and subscribes to its delta topic.
#[utoipa::path(
    patch, path = "/v1/devices/{id}/shadow", tag = "shadows", request_body(content = Object, description = "As on MQTT: state.desired (and state.reported) merge, null deletes a field, a section set to null is removed; version makes it conditional", example = json!({"state": {"desired": {"target": 21, "mode": null}}, "version": 7})),
    params(("id" = String, Path, description = "Device id", example = "thermostat-17"), ShadowQuery,
        ("If-Match" = Option<String>, Header, description = "Apply only to this version (an ETag from GET)", example = "\"7\"")),
    responses(
        (status = 200, description = "Accepted; `ETag` is the new version", body = Object, example = json!({"state": {"desired": {"target": 21, "mode": null}}, "metadata": {"desired": {"target": {"timestamp": 1795340000}, "mode": {"timestamp": 1795340000}}}, "version": 8, "timestamp": 1795340000})),
        (status = 400, description = "Invalid JSON or update", body = ErrorBody, example = json!({"code": "invalid_request", "message": "arrays may not contain null (at state.desired.list[1])"})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 403, description = "The key is read-only", body = ErrorBody, example = json!({"code": "forbidden", "message": "this needs a key of scope \"admin\""})),
        (status = 404, description = "Unknown device", body = ErrorBody, example = json!({"code": "device_not_found", "message": "device thermostat-17 not found"})),
        (status = 409, description = "`version` is not the current one; the body carries the current version and document", body = ErrorBody, example = json!({"code": "version_conflict", "message": "version conflict: the current version is 8", "version": 8, "document": {"state": {"desired": {"target": 21}}, "metadata": {"desired": {"target": {"timestamp": 1795340000}}}, "version": 8, "timestamp": 1795340000}})),
        (status = 412, description = "`If-Match` is not the current version; the body carries the current version and document", body = ErrorBody, example = json!({"code": "precondition_failed", "message": "version conflict: the current version is 8", "version": 8, "document": null})),
        (status = 413, description = "State too large", body = ErrorBody, example = json!({"code": "payload_too_large", "message": "state of 70000 bytes exceeds the limit of 65536 bytes"})),
        (status = 429, description = "Too many writers on this shadow", body = ErrorBody, example = json!({"code": "too_many_requests", "message": "too many requests; retry"})),
        (status = 503, description = "The shadow store does not answer", body = ErrorBody, example = json!({"code": "shadow_store_unavailable", "message": "the shadow store does not answer; retry later"})),
    ),
    security(("api_key" = []))
)]
pub async fn patch(
    _key: AdminKey,
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    query: web::Query<ShadowQuery>,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    let key = Shadows::key(&device_id(&id)?, query.name.as_deref())?;
    let mut update = request::update_from_value(body.into_inner(), state.shadows.limits())?;
    let expected = if_match(&req)?;
    if let (Some(header), Some(body)) = (expected, update.version) {
        if header != body {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                "If-Match and version name different versions",
            ));
        }
    }
    let precondition = expected.is_some() && update.version.is_none();
    update.version = update.version.or(expected);
    match state.shadows.update(&key, &update, false).await {
        Ok(updated) => Ok(HttpResponse::Ok()
            .insert_header((header::ETAG, etag(updated.document.version)))
            .content_type(header::ContentType::json())
            .body(updated.accepted)),
        Err(ShadowError::VersionConflict { current }) => {
            let code = if precondition {
                ErrorCode::PreconditionFailed
            } else {
                ErrorCode::VersionConflict
            };
            Ok(conflict(&state, &key, current, code).await)
        }
        Err(e) => Ok(ApiError::from(e).error_response()),
    }
}

/// Delete a device's shadow. Its version number is kept: a new document continues from it.
#[utoipa::path(
    delete, path = "/v1/devices/{id}/shadow", tag = "shadows",
    params(("id" = String, Path, description = "Device id", example = "thermostat-17"), ShadowQuery,
        ("If-Match" = Option<String>, Header, description = "Delete only this version", example = "\"7\"")),
    responses(
        (status = 200, description = "Deleted", body = Object, example = json!({"version": 8, "timestamp": 1795340000})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 403, description = "The key is read-only", body = ErrorBody, example = json!({"code": "forbidden", "message": "this needs a key of scope \"admin\""})),
        (status = 404, description = "Unknown device, or no shadow", body = ErrorBody, example = json!({"code": "shadow_not_found", "message": "no shadow for device thermostat-17"})),
        (status = 412, description = "`If-Match` is not the current version; the body carries the current version and document", body = ErrorBody, example = json!({"code": "precondition_failed", "message": "version conflict: the current version is 8", "version": 8, "document": null})),
        (status = 503, description = "The shadow store does not answer", body = ErrorBody, example = json!({"code": "shadow_store_unavailable", "message": "the shadow store does not answer; retry later"})),
    ),
    security(("api_key" = []))
)]
pub async fn delete(
    _key: AdminKey,
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
    query: web::Query<ShadowQuery>,
) -> Result<HttpResponse, ApiError> {
    let key = Shadows::key(&device_id(&id)?, query.name.as_deref())?;
    let request = PlainRequest {
        client_token: None,
        version: if_match(&req)?,
    };
    match state.shadows.delete(&key, &request, false).await {
        Ok(reply) => Ok(HttpResponse::Ok().json(reply)),
        Err(ShadowError::VersionConflict { current }) => {
            Ok(conflict(&state, &key, current, ErrorCode::PreconditionFailed).await)
        }
        Err(e) => Err(e.into()),
    }
}
