//! The OpenAPI document, `/openapi.json`, and the docs UI at `/docs`.
//!
//! The committed `openapi/openapi.json` is written by `antumbra openapi --out openapi/openapi.json`; a test
//! fails when it differs from what this module generates.

use actix_web::{web, HttpResponse};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_scalar::{Scalar, Servable};

use super::{api_keys, certificates, devices, error, events, ops, ota, shadow};

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Antumbra API",
        description = "Device registry, X.509 provisioning and device shadows. Every error answers \
                       `{\"code\": \"…\", \"message\": \"…\"}` with a stable `code` (see `ErrorCode`).",
        license(name = "Apache-2.0")
    ),
    paths(
        devices::register, devices::list, devices::get, devices::update, devices::delete,
        certificates::ca, certificates::current, certificates::list, certificates::get, certificates::issue,
        certificates::rotate, certificates::revoke,
        api_keys::create, api_keys::list, api_keys::revoke,
        devices::status, events::stream, shadow::get, shadow::patch, shadow::delete,
        ota::create_firmware, ota::list_firmware, ota::get_firmware, ota::delete_firmware,
        ota::create_deployment, ota::list_deployments, ota::get_deployment, ota::jobs, ota::pause, ota::resume, ota::cancel,
        ops::healthz, ops::readyz, ops::metrics,
    ),
    components(schemas(error::ErrorCode, error::ErrorBody, crate::provisioning::RevocationReason, crate::events::DisconnectReason)),
    modifiers(&BearerAuth),
    tags(
        (name = "devices", description = "Device registry"),
        (name = "certificates", description = "Device certificates and the platform CA"),
        (name = "api-keys", description = "API keys for this REST API"),
        (name = "shadows", description = "Device shadows: desired, reported, delta"),
        (name = "ota", description = "Firmware catalogue and staged deployments"),
        (name = "events", description = "Live platform events (server-sent events)"),
        (name = "operations", description = "Health and readiness"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key: `Authorization: Bearer ant_…`"))
                    .build(),
            ),
        );
    }
}

/// The document as committed: pretty JSON with a trailing newline.
pub fn document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
        + "\n"
}

const DOCS_HTML: &str = r#"<!doctype html>
<html>
<head>
  <title>Antumbra API</title>
  <meta charset="utf-8"/>
  <meta name="viewport" content="width=device-width, initial-scale=1"/>
</head>
<body>
<script id="api-reference" type="application/json">
$spec
</script>
<script src="https://cdn.jsdelivr.net/npm/@scalar/api-reference"></script>
</body>
</html>
"#;

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    let spec = document();
    let serve = move || {
        let spec = spec.clone();
        async move { HttpResponse::Ok().content_type("application/json").body(spec) }
    };
    cfg.service(super::ops::get_or_head("/openapi.json", serve))
        .service(Scalar::with_url("/docs", ApiDoc::openapi()).custom_html(DOCS_HTML));
}
