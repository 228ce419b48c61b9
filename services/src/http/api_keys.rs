//! `/v1/api-keys`: create, list, revoke API keys (admin scope).

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::auth::AdminKey;
use super::devices::method_not_allowed;
use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::registry::{ApiKeyRecord, Scope};

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api-keys")
            .route(web::post().to(create))
            .route(super::get().to(list))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api-keys/{key_id}")
            .route(web::delete().to(revoke))
            .default_service(web::to(method_not_allowed)),
    );
}

/// What a key may do.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScopeBody {
    /// Read anything, change nothing.
    Read,
    /// Everything, including managing keys.
    Admin,
}

impl From<ScopeBody> for Scope {
    fn from(s: ScopeBody) -> Self {
        match s {
            ScopeBody::Read => Scope::Read,
            ScopeBody::Admin => Scope::Admin,
        }
    }
}

/// Creation of an API key.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "dashboard", "scope": "read"}))]
pub struct CreateKeyRequest {
    /// A name to recognise it by, 1–100 characters.
    pub name: String,
    /// `read` or `admin`.
    pub scope: ScopeBody,
}

/// An API key (never its secret, except once in [`CreatedKey`]).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"id": "key_3f9a0c12b4e5", "name": "dashboard", "scope": "read", "created_at": "2026-11-22T10:00:00Z"}))]
pub struct ApiKeyBody {
    /// Identifier, for revocation.
    pub id: String,
    /// Its name.
    pub name: String,
    /// `read` or `admin`.
    pub scope: String,
    /// When it was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it was revoked.
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub revoked_at: Option<OffsetDateTime>,
}

impl From<ApiKeyRecord> for ApiKeyBody {
    fn from(k: ApiKeyRecord) -> Self {
        Self {
            id: k.id,
            name: k.name,
            scope: k.scope.as_str().into(),
            created_at: k.created_at,
            revoked_at: k.revoked_at,
        }
    }
}

/// A key just made, with its token: shown only this once, stored only as a hash.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"key": {"id": "key_3f9a0c12b4e5", "name": "dashboard", "scope": "read", "created_at": "2026-11-22T10:00:00Z"},
    "token": "ant_q3V0c1lD2bXk6Yw8pR4sT7uN9eA1fG5hJ0kL2mZ3xQ"}))]
pub struct CreatedKey {
    /// The key.
    pub key: ApiKeyBody,
    /// The bearer token.
    pub token: String,
}

/// Create an API key.
#[utoipa::path(
    post, path = "/v1/api-keys", tag = "api-keys", request_body = CreateKeyRequest,
    responses(
        (status = 201, description = "Created; the token is shown only now", body = CreatedKey),
        (status = 400, description = "Invalid name or scope", body = ErrorBody, example = json!({"code": "invalid_request", "message": "name must be 1 to 100 characters"})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 403, description = "Not an admin key", body = ErrorBody, example = json!({"code": "forbidden", "message": "this needs a key of scope \"admin\""})),
    ),
    security(("api_key" = []))
)]
pub async fn create(
    _key: AdminKey,
    state: web::Data<AppState>,
    body: web::Json<CreateKeyRequest>,
) -> Result<HttpResponse, ApiError> {
    let (key, token) = crate::access::create_key(&state.registry, &body.name, body.scope.into()).await?;
    Ok(HttpResponse::Created().json(CreatedKey {
        key: key.into(),
        token,
    }))
}

/// List API keys, revoked ones included.
#[utoipa::path(
    get, path = "/v1/api-keys", tag = "api-keys",
    responses(
        (status = 200, description = "Keys", body = [ApiKeyBody]),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 403, description = "Not an admin key", body = ErrorBody, example = json!({"code": "forbidden", "message": "this needs a key of scope \"admin\""})),
    ),
    security(("api_key" = []))
)]
pub async fn list(_key: AdminKey, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let keys = state.registry.api_keys().await?;
    Ok(HttpResponse::Ok().json(keys.into_iter().map(ApiKeyBody::from).collect::<Vec<_>>()))
}

/// Revoke an API key; it stops working at once.
#[utoipa::path(
    delete, path = "/v1/api-keys/{key_id}", tag = "api-keys",
    params(("key_id" = String, Path, description = "Key id", example = "key_3f9a0c12b4e5")),
    responses(
        (status = 200, description = "Revoked", body = ApiKeyBody),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 403, description = "Not an admin key", body = ErrorBody, example = json!({"code": "forbidden", "message": "this needs a key of scope \"admin\""})),
        (status = 404, description = "Unknown key", body = ErrorBody, example = json!({"code": "api_key_not_found", "message": "api key \"key_0\" not found"})),
        (status = 409, description = "Already revoked", body = ErrorBody, example = json!({"code": "api_key_already_revoked", "message": "api key \"key_3f9a0c12b4e5\" is already revoked"})),
    ),
    security(("api_key" = []))
)]
pub async fn revoke(
    _key: AdminKey,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<web::Json<ApiKeyBody>, ApiError> {
    let key = crate::access::revoke_key(&state.registry, &id).await?;
    Ok(web::Json(key.into()))
}
