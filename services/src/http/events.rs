//! `/v1/events`: a server-sent-events stream of platform events (device connects and disconnects,
//! revocations, deletions), optionally for one device.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;
use utoipa::IntoParams;

use super::auth::ReadKey;
use super::error::{ApiError, ErrorBody};
use super::{device_id, AppState};
use crate::events::PlatformEvent;

/// A comment line every this often keeps proxies from closing an idle stream.
const HEARTBEAT: Duration = Duration::from_secs(15);

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/events")
            .route(web::get().to(stream))
            .default_service(web::to(super::devices::method_not_allowed)),
    );
}

/// Filter for the event stream.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only events about this device.
    #[param(example = "shelf-0042")]
    pub device_id: Option<String>,
}

/// Stream platform events as server-sent events. Each event has `event: <type>` (`device.connected`,
/// `device.disconnected`, `certificate.revoked`, `device.deleted`, `shadow.updated`, `shadow.deleted`) and
/// `data: <JSON>`; a subscriber that falls behind gets `event: lagged` with the number of events it missed. In a
/// cluster, the stream of any instance carries the events of every instance.
#[utoipa::path(
    get, path = "/v1/events", tag = "events", params(EventsQuery),
    responses(
        (status = 200, description = "An endless `text/event-stream`", content_type = "text/event-stream", body = PlatformEvent,
            example = json!({"type": "device.connected", "device_id": "shelf-0042", "session": 7, "remote_addr": "127.0.0.1:50412", "at": "2026-11-22T10:00:00Z"})),
        (status = 400, description = "Invalid device id", body = ErrorBody, example = json!({"code": "invalid_device_id", "message": "device id contains '#'; only A-Z a-z 0-9 - _ . : are allowed"})),
        (status = 401, description = "No valid API key", body = ErrorBody, example = json!({"code": "unauthorized", "message": "the API key is unknown or revoked"})),
    ),
    security(("api_key" = []))
)]
pub async fn stream(
    _key: ReadKey,
    state: web::Data<AppState>,
    query: web::Query<EventsQuery>,
) -> Result<HttpResponse, ApiError> {
    let filter = query
        .into_inner()
        .device_id
        .map(|d| device_id(&d))
        .transpose()?
        .map(|d| d.to_string());
    let rx = state.events.watch();
    let events = futures_util::stream::unfold((rx, filter), |(mut rx, filter)| async move {
        loop {
            let chunk = match tokio::time::timeout(HEARTBEAT, rx.recv()).await {
                Err(_) => Bytes::from_static(b": heartbeat\n\n"),
                // How an instance tells its sessions that the device moved: nothing an application acts on.
                Ok(Ok(PlatformEvent::SessionMoved { .. })) => continue,
                Ok(Ok(event)) if filter.as_deref().is_none_or(|f| f == event.device_id()) => sse(&event),
                Ok(Ok(_)) => continue,
                Ok(Err(RecvError::Lagged(missed))) => {
                    Bytes::from(format!("event: lagged\ndata: {{\"missed\":{missed}}}\n\n"))
                }
                Ok(Err(RecvError::Closed)) => return None,
            };
            return Some((Ok::<_, actix_web::Error>(chunk), (rx, filter)));
        }
    });
    let opening = futures_util::stream::once(async { Ok(Bytes::from_static(b": connected\n\n")) });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(opening.chain(events)))
}

fn sse(event: &PlatformEvent) -> Bytes {
    let data = serde_json::to_value(event).unwrap_or_default();
    let kind = data["type"].as_str().unwrap_or("event").to_owned();
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}
