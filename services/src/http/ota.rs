//! `/v1/firmware` and `/v1/deployments`: the firmware catalogue and staged rollouts.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use utoipa::IntoParams;

use super::auth::{AdminKey, ReadKey};
use super::devices::method_not_allowed;
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::AppState;
use crate::ota::model::{Deployment, Firmware, Job, NewDeployment, NewFirmware};
use crate::ota::OtaError;

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/firmware")
            .route(web::post().to(create_firmware))
            .route(super::get().to(list_firmware))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/firmware/{firmware_id}")
            .route(super::get().to(get_firmware))
            .route(web::delete().to(delete_firmware))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/deployments")
            .route(web::post().to(create_deployment))
            .route(super::get().to(list_deployments))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/deployments/{deployment_id}")
            .route(super::get().to(get_deployment))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/deployments/{deployment_id}/jobs")
            .route(super::get().to(jobs))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/deployments/{deployment_id}/pause")
            .route(web::post().to(pause))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/deployments/{deployment_id}/resume")
            .route(web::post().to(resume))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/deployments/{deployment_id}/cancel")
            .route(web::post().to(cancel))
            .default_service(web::to(method_not_allowed)),
    );
}

impl From<OtaError> for ApiError {
    fn from(e: OtaError) -> Self {
        let code = match &e {
            OtaError::Invalid(_) => ErrorCode::InvalidRequest,
            OtaError::FirmwareNotFound(_) => ErrorCode::FirmwareNotFound,
            OtaError::FirmwareVersionExists(_) => ErrorCode::FirmwareVersionExists,
            OtaError::FirmwareInUse(_) => ErrorCode::FirmwareInUse,
            OtaError::DeploymentNotFound(_) => ErrorCode::DeploymentNotFound,
            OtaError::InvalidState(_) => ErrorCode::InvalidDeploymentState,
            OtaError::Registry(_) => {
                let OtaError::Registry(e) = e else { unreachable!() };
                return e.into();
            }
        };
        ApiError::new(code, e.to_string())
    }
}

/// Catalogue filter.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FirmwareQuery {
    /// Only firmware for this hardware model.
    #[param(example = "esl-2.9")]
    pub model: Option<String>,
}

/// Publish a firmware image (metadata: the image itself lives at `url`).
#[utoipa::path(post, path = "/v1/firmware", tag = "ota", request_body = NewFirmware,
    responses(
        (status = 201, description = "Published", body = Firmware),
        (status = 400, description = "A field is invalid", body = ErrorBody, example = json!({"code": "invalid_request", "message": "sha256 must be 64 hex characters"})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 403, description = "The key is read-only", body = ErrorBody, example = json!({"code": "forbidden", "message": "this needs a key of scope \"admin\""})),
        (status = 409, description = "The version exists for a model", body = ErrorBody, example = json!({"code": "firmware_version_exists", "message": "version 2.1.0 already exists for one of the models [\"esl-2.9\"]"})),
    ),
    security(("api_key" = [])))]
pub async fn create_firmware(
    _key: AdminKey,
    state: web::Data<AppState>,
    body: web::Json<NewFirmware>,
) -> Result<HttpResponse, ApiError> {
    let firmware = state.ota.create_firmware(body.into_inner()).await?;
    Ok(HttpResponse::Created().json(firmware))
}

/// List the catalogue, newest first.
#[utoipa::path(get, path = "/v1/firmware", tag = "ota", params(FirmwareQuery),
    responses(
        (status = 200, description = "Firmware images", body = [Firmware]),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
    ),
    security(("api_key" = [])))]
pub async fn list_firmware(
    _key: ReadKey,
    state: web::Data<AppState>,
    query: web::Query<FirmwareQuery>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.ota.firmware_list(query.model.as_deref()).await?))
}

/// Get one firmware image.
#[utoipa::path(get, path = "/v1/firmware/{firmware_id}", tag = "ota",
    params(("firmware_id" = String, Path, description = "Firmware id", example = "fw_6c1f0a2b9d3e")),
    responses(
        (status = 200, description = "The firmware", body = Firmware),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 404, description = "Unknown firmware", body = ErrorBody, example = json!({"code": "firmware_not_found", "message": "firmware fw_0 not found"})),
    ),
    security(("api_key" = [])))]
pub async fn get_firmware(
    _key: ReadKey,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.ota.firmware(&id).await?))
}

/// Delete a firmware image; refused while a deployment uses it.
#[utoipa::path(delete, path = "/v1/firmware/{firmware_id}", tag = "ota",
    params(("firmware_id" = String, Path, description = "Firmware id", example = "fw_6c1f0a2b9d3e")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 403, description = "The key is read-only", body = ErrorBody, example = json!({"code": "forbidden", "message": "this needs a key of scope \"admin\""})),
        (status = 404, description = "Unknown firmware", body = ErrorBody, example = json!({"code": "firmware_not_found", "message": "firmware fw_0 not found"})),
        (status = 409, description = "A deployment uses it", body = ErrorBody, example = json!({"code": "firmware_in_use", "message": "firmware fw_6c1f0a2b9d3e is used by a deployment"})),
    ),
    security(("api_key" = [])))]
pub async fn delete_firmware(
    _key: AdminKey,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    state.ota.delete_firmware(&id).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Start a deployment: the target is resolved now, incompatible devices are refused at once, the first wave is
/// queued; later waves start as the policy allows.
#[utoipa::path(post, path = "/v1/deployments", tag = "ota", request_body = NewDeployment,
    responses(
        (status = 201, description = "Started", body = Deployment),
        (status = 400, description = "Invalid target or policy, unknown firmware or device", body = ErrorBody, example = json!({"code": "invalid_request", "message": "wave_percentages must increase, each in (0, 100]"})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 403, description = "The key is read-only", body = ErrorBody, example = json!({"code": "forbidden", "message": "this needs a key of scope \"admin\""})),
    ),
    security(("api_key" = [])))]
pub async fn create_deployment(
    _key: AdminKey,
    state: web::Data<AppState>,
    body: web::Json<NewDeployment>,
) -> Result<HttpResponse, ApiError> {
    let deployment = state.ota.create_deployment(body.into_inner()).await?;
    Ok(HttpResponse::Created().json(deployment))
}

/// List deployments, newest first, each with its summary.
#[utoipa::path(get, path = "/v1/deployments", tag = "ota",
    responses(
        (status = 200, description = "Deployments", body = [Deployment]),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
    ),
    security(("api_key" = [])))]
pub async fn list_deployments(_key: ReadKey, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.ota.deployments().await?))
}

/// A deployment's summary: status, counts per job state, per wave.
#[utoipa::path(get, path = "/v1/deployments/{deployment_id}", tag = "ota",
    params(("deployment_id" = String, Path, description = "Deployment id", example = "dep_1a2b3c4d5e6f")),
    responses(
        (status = 200, description = "The deployment", body = Deployment),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 404, description = "Unknown deployment", body = ErrorBody, example = json!({"code": "deployment_not_found", "message": "deployment dep_0 not found"})),
    ),
    security(("api_key" = [])))]
pub async fn get_deployment(
    _key: ReadKey,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.ota.deployment(&id).await?))
}

/// The per-device jobs of a deployment, each with every state change and its time.
#[utoipa::path(get, path = "/v1/deployments/{deployment_id}/jobs", tag = "ota",
    params(("deployment_id" = String, Path, description = "Deployment id", example = "dep_1a2b3c4d5e6f")),
    responses(
        (status = 200, description = "Jobs", body = [Job]),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 404, description = "Unknown deployment", body = ErrorBody, example = json!({"code": "deployment_not_found", "message": "deployment dep_0 not found"})),
    ),
    security(("api_key" = [])))]
pub async fn jobs(
    _key: ReadKey,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.ota.jobs(&id).await?))
}

/// Pause: no new wave starts; devices already at work carry on.
#[utoipa::path(post, path = "/v1/deployments/{deployment_id}/pause", tag = "ota",
    params(("deployment_id" = String, Path, description = "Deployment id", example = "dep_1a2b3c4d5e6f")),
    responses(
        (status = 200, description = "Paused", body = Deployment),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 403, description = "The key is read-only", body = ErrorBody, example = json!({"code": "forbidden", "message": "this needs a key of scope \"admin\""})),
        (status = 404, description = "Unknown deployment", body = ErrorBody, example = json!({"code": "deployment_not_found", "message": "deployment dep_0 not found"})),
        (status = 409, description = "Not running", body = ErrorBody, example = json!({"code": "invalid_deployment_state", "message": "deployment dep_1 is completed; it cannot become paused"})),
    ),
    security(("api_key" = [])))]
pub async fn pause(
    _key: AdminKey,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.ota.pause(&id).await?))
}

/// Resume a paused deployment.
#[utoipa::path(post, path = "/v1/deployments/{deployment_id}/resume", tag = "ota",
    params(("deployment_id" = String, Path, description = "Deployment id", example = "dep_1a2b3c4d5e6f")),
    responses(
        (status = 200, description = "Running again", body = Deployment),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 403, description = "The key is read-only", body = ErrorBody, example = json!({"code": "forbidden", "message": "this needs a key of scope \"admin\""})),
        (status = 404, description = "Unknown deployment", body = ErrorBody, example = json!({"code": "deployment_not_found", "message": "deployment dep_0 not found"})),
        (status = 409, description = "Not paused", body = ErrorBody, example = json!({"code": "invalid_deployment_state", "message": "deployment dep_1 is running; it cannot become running"})),
    ),
    security(("api_key" = [])))]
pub async fn resume(
    _key: AdminKey,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.ota.resume(&id).await?))
}

/// Cancel: no further wave starts, unfinished jobs are canceled and their devices told.
#[utoipa::path(post, path = "/v1/deployments/{deployment_id}/cancel", tag = "ota",
    params(("deployment_id" = String, Path, description = "Deployment id", example = "dep_1a2b3c4d5e6f")),
    responses(
        (status = 200, description = "Canceled", body = Deployment),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
        (status = 403, description = "The key is read-only", body = ErrorBody, example = json!({"code": "forbidden", "message": "this needs a key of scope \"admin\""})),
        (status = 404, description = "Unknown deployment", body = ErrorBody, example = json!({"code": "deployment_not_found", "message": "deployment dep_0 not found"})),
        (status = 409, description = "Already finished", body = ErrorBody, example = json!({"code": "invalid_deployment_state", "message": "deployment dep_1 is completed; it cannot become canceled"})),
    ),
    security(("api_key" = [])))]
pub async fn cancel(
    _key: AdminKey,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.ota.cancel(&id).await?))
}
