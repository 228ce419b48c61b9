//! The REST API (actix-web). Handlers extract, call one service function, and map the result.

pub mod api_keys;
pub mod auth;
pub mod certificates;
pub mod devices;
pub mod error;
pub mod events;
pub mod openapi;
pub mod ops;
pub mod ota;
pub mod shadow;

use actix_web::web;

use std::sync::Arc;

use crate::events::EventBus;
use crate::mqtt::Metrics;
use crate::presence::Presence;
use crate::provisioning::Provisioning;
use crate::registry::Registry;
use error::{ApiError, ErrorCode};

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The registry, for authentication and readiness.
    pub registry: Registry,
    /// Devices and certificates.
    pub provisioning: Provisioning,
    /// Online status.
    pub presence: Arc<Presence>,
    /// The event bus, for `/v1/events`.
    pub events: EventBus,
    /// Broker counters, for `/metrics`.
    pub mqtt_metrics: Arc<Metrics>,
    /// Device shadows.
    pub shadows: crate::shadow::Shadows,
    /// OTA firmware and deployments.
    pub ota: crate::ota::Ota,
}

/// Registers every route, the extractor error mappings and the body limit.
pub fn configure(cfg: &mut web::ServiceConfig, state: AppState, max_body_bytes: usize) {
    cfg.app_data(web::Data::new(state))
        .app_data(
            web::JsonConfig::default()
                .limit(max_body_bytes)
                .error_handler(error::json_error),
        )
        .app_data(web::QueryConfig::default().error_handler(error::query_error))
        .app_data(web::PathConfig::default().error_handler(error::path_error))
        .configure(ops::configure)
        .configure(openapi::configure)
        .service(
            web::scope("/v1")
                .configure(devices::configure)
                .configure(certificates::configure)
                .configure(api_keys::configure)
                .configure(events::configure)
                .configure(shadow::configure)
                .configure(ota::configure),
        );
}

/// A route for GET that answers HEAD too: the same status and headers, no body (actix leaves the body out), as
/// `curl -I` and HTTP caches expect. Not for streams (`/v1/events`), which would stay open for nothing.
pub(crate) fn get() -> actix_web::Route {
    use actix_web::guard;
    web::route().guard(guard::Any(guard::Get()).or(guard::Head()))
}

/// Answer for routes that do not exist: JSON, like every other error.
pub async fn not_found() -> actix_web::HttpResponse {
    actix_web::ResponseError::error_response(&ApiError::new(ErrorCode::NotFound, "no such route"))
}

/// Parses a device id from the path.
pub fn device_id(raw: &str) -> Result<antumbra_wire::DeviceId, ApiError> {
    antumbra_wire::DeviceId::parse(raw).map_err(|e| ApiError::new(ErrorCode::InvalidDeviceId, e.to_string()))
}

/// A JSON body that may be left out entirely (no body, or `Content-Length: 0`), then `T::default()`.
///
/// actix's `Option<Json<T>>` would turn a malformed body into `None` silently; this keeps every error a 4xx.
#[derive(Debug)]
pub struct OptionalJson<T>(pub T);

impl<T: serde::de::DeserializeOwned + Default + 'static> actix_web::FromRequest for OptionalJson<T> {
    type Error = actix_web::Error;
    type Future = futures_util::future::LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &actix_web::HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        use actix_web::http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
        use futures_util::FutureExt;
        let headers = req.headers();
        let length = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let empty = length == Some(0) || (length.is_none() && !headers.contains_key(TRANSFER_ENCODING));
        if empty {
            return async { Ok(OptionalJson(T::default())) }.boxed_local();
        }
        web::Json::<T>::from_request(req, payload)
            .map(|r| r.map(|j| OptionalJson(j.into_inner())))
            .boxed_local()
    }
}
