//! Operations endpoints: liveness and readiness.

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use super::devices::method_not_allowed;
use super::error::{ApiError, ErrorBody};
use super::AppState;

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(get_or_head("/healthz", healthz))
        .service(get_or_head("/readyz", readyz))
        .service(get_or_head("/metrics", metrics));
}

/// A resource served by `handler` on GET and on HEAD (probes and `curl -I`), and 405 on any other method.
pub(super) fn get_or_head<F, Args>(path: &str, handler: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args>,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    web::resource(path)
        .route(super::get().to(handler))
        .default_service(web::to(method_not_allowed))
}

/// Health or readiness status.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"status": "ok"}))]
pub struct StatusBody {
    /// `ok` or `ready`.
    pub status: &'static str,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = StatusBody)), security(()))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(StatusBody { status: "ok" })
}

/// Readiness: the database and the shadow store both answer.
///
/// Both are asked at once, each with a 2 s limit, so a probe has its answer in about 2 s whatever is down.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = StatusBody, example = json!({"status": "ready"})),
        (status = 503, description = "The database (`database_unavailable`) or the shadow store (`shadow_store_unavailable`) does not answer", body = ErrorBody,
            example = json!({"code": "database_unavailable", "message": "the database does not answer; retry later"})),
    ),
    security(()))]
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let limit = std::time::Duration::from_secs(2);
    let (database, shadows) = tokio::join!(
        tokio::time::timeout(limit, state.registry.ping()),
        tokio::time::timeout(limit, state.shadows.ping()),
    );
    match database {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: the database does not answer");
            return Err(super::error::database_unavailable());
        }
        Err(_) => {
            tracing::warn!("readiness: the database did not answer within 2 s");
            return Err(super::error::database_unavailable());
        }
    }
    if !matches!(shadows, Ok(Ok(()))) {
        return Err(ApiError::new(
            super::error::ErrorCode::ShadowStoreUnavailable,
            "the shadow store does not answer; retry later",
        ));
    }
    Ok(HttpResponse::Ok().json(StatusBody { status: "ready" }))
}

/// Prometheus metrics (text exposition format): MQTT connections, connects and disconnects by reason, messages
/// and bytes in and out, authentication failures by reason, ACL violations.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text", content_type = "text/plain; version=0.0.4", body = String,
        example = "# TYPE antumbra_mqtt_connections gauge\nantumbra_mqtt_connections 3\n")),
    security(()))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.mqtt_metrics.render())
}
