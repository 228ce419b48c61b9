//! The one HTTP error type and its table of stable error codes.
//!
//! Domain errors know nothing of HTTP; this module alone maps them to a status and a `code` that clients can
//! match on. Codes never change meaning once published; new ones are added at the end.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

use crate::access::AccessError;
use crate::provisioning::ProvisioningError;
use crate::registry::RegistryError;

/// Stable error codes, each with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body is not valid JSON.
    InvalidJson,
    /// 400: valid JSON, but a field is missing, unknown, of the wrong type or out of range.
    InvalidRequest,
    /// 400: a device id breaks the id rules (1–128 of `A-Z a-z 0-9 - _ . :`).
    InvalidDeviceId,
    /// 400: the CSR is not a PEM PKCS#10 request, or its signature does not verify.
    InvalidCsr,
    /// 400: the CSR's subject CN is not the device id.
    CsrSubjectMismatch,
    /// 400: the CSR's key is of a refused type or too small.
    WeakKey,
    /// 401: no API key, or not a valid one.
    Unauthorized,
    /// 403: the API key's scope does not allow this.
    Forbidden,
    /// 404: no device with that id.
    DeviceNotFound,
    /// 404: no such certificate for that device.
    CertificateNotFound,
    /// 404: no API key with that id.
    ApiKeyNotFound,
    /// 404: no such route.
    NotFound,
    /// 405: the route exists but not with this method.
    MethodNotAllowed,
    /// 409: a device with that id exists.
    DeviceAlreadyExists,
    /// 409: the certificate is revoked already.
    CertificateAlreadyRevoked,
    /// 409: the device has no active certificate (to rotate or download).
    NoActiveCertificate,
    /// 409: the API key is revoked already.
    ApiKeyAlreadyRevoked,
    /// 413: the body is larger than the configured limit.
    PayloadTooLarge,
    /// 415: the body is not `application/json`.
    UnsupportedMediaType,
    /// 500: an unexpected failure; details are in the server log.
    Internal,
    /// 503: the database does not answer; retry later.
    DatabaseUnavailable,
    /// 404: the device has no such shadow (or it was deleted).
    ShadowNotFound,
    /// 409: the request's `version` is not the shadow's current version (the body carries both).
    VersionConflict,
    /// 412: `If-Match` names another version than the current one (the body carries the current one).
    PreconditionFailed,
    /// 429: too many concurrent writers on one shadow; retry.
    TooManyRequests,
    /// 503: the shadow store (Redis) does not answer; retry later.
    ShadowStoreUnavailable,
    /// 404: no such firmware.
    FirmwareNotFound,
    /// 409: that version exists already for one of the models.
    FirmwareVersionExists,
    /// 409: a deployment uses the firmware.
    FirmwareInUse,
    /// 404: no such deployment.
    DeploymentNotFound,
    /// 409: the deployment cannot do that in its current state.
    InvalidDeploymentState,
}

impl ErrorCode {
    /// The HTTP status of this code.
    pub fn status(self) -> StatusCode {
        use ErrorCode::*;
        match self {
            InvalidJson | InvalidRequest | InvalidDeviceId | InvalidCsr | CsrSubjectMismatch | WeakKey => {
                StatusCode::BAD_REQUEST
            }
            Unauthorized => StatusCode::UNAUTHORIZED,
            Forbidden => StatusCode::FORBIDDEN,
            DeviceNotFound | CertificateNotFound | ApiKeyNotFound | NotFound | ShadowNotFound
            | FirmwareNotFound | DeploymentNotFound => StatusCode::NOT_FOUND,
            FirmwareVersionExists | FirmwareInUse | InvalidDeploymentState => StatusCode::CONFLICT,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            DeviceAlreadyExists
            | CertificateAlreadyRevoked
            | NoActiveCertificate
            | ApiKeyAlreadyRevoked
            | VersionConflict => StatusCode::CONFLICT,
            PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
            DatabaseUnavailable | ShadowStoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The body of every error response.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({"code": "device_not_found", "message": "device shelf-1 not found"}))]
pub struct ErrorBody {
    /// Stable, machine-readable code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
}

/// An error answered over HTTP.
#[derive(Debug, Clone)]
pub struct ApiError(pub ErrorBody);

impl ApiError {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(ErrorBody {
            code,
            message: message.into(),
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.0.code, self.0.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.0.code.status()
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if self.0.code == ErrorCode::Unauthorized {
            response.insert_header(("WWW-Authenticate", "Bearer realm=\"antumbra\""));
        }
        response.json(&self.0)
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "database unavailable");
            return database_unavailable();
        }
        internal(e)
    }
}

/// 503 `database_unavailable`: the database is down, unreachable or restarting; the client should retry.
pub fn database_unavailable() -> ApiError {
    ApiError::new(
        ErrorCode::DatabaseUnavailable,
        "the database does not answer; retry later",
    )
}

impl From<ProvisioningError> for ApiError {
    fn from(e: ProvisioningError) -> Self {
        use crate::pki::CsrError;
        use ProvisioningError as P;
        let code = match &e {
            P::DeviceNotFound(_) => ErrorCode::DeviceNotFound,
            P::DeviceExists(_) => ErrorCode::DeviceAlreadyExists,
            P::CertificateNotFound { .. } => ErrorCode::CertificateNotFound,
            P::AlreadyRevoked(_) => ErrorCode::CertificateAlreadyRevoked,
            P::NoActiveCertificate(_) => ErrorCode::NoActiveCertificate,
            P::Invalid(_) => ErrorCode::InvalidRequest,
            P::Csr(CsrError::SubjectMismatch { .. }) => ErrorCode::CsrSubjectMismatch,
            P::Csr(CsrError::WeakKey(_)) => ErrorCode::WeakKey,
            P::Csr(_) => ErrorCode::InvalidCsr,
            P::Issuance(_) => return internal(e),
            P::Registry(_) => {
                let P::Registry(e) = e else { unreachable!() };
                return e.into();
            }
        };
        Self::new(code, e.to_string())
    }
}

impl From<AccessError> for ApiError {
    fn from(e: AccessError) -> Self {
        match e {
            AccessError::NotFound(_) => Self::new(ErrorCode::ApiKeyNotFound, e.to_string()),
            AccessError::AlreadyRevoked(_) => Self::new(ErrorCode::ApiKeyAlreadyRevoked, e.to_string()),
            AccessError::Invalid(_) => Self::new(ErrorCode::InvalidRequest, e.to_string()),
            AccessError::Registry(e) => e.into(),
        }
    }
}

impl From<crate::shadow::request::ShadowError> for ApiError {
    fn from(e: crate::shadow::request::ShadowError) -> Self {
        use crate::shadow::request::ShadowError as S;
        let code = match &e {
            S::InvalidJson(_) => ErrorCode::InvalidJson,
            S::BadRequest(_) => ErrorCode::InvalidRequest,
            S::NotFound(_) => ErrorCode::ShadowNotFound,
            S::UnknownDevice(_) => ErrorCode::DeviceNotFound,
            S::VersionConflict { .. } => ErrorCode::VersionConflict,
            S::TooLarge(_) => ErrorCode::PayloadTooLarge,
            S::TooManyRequests => ErrorCode::TooManyRequests,
            S::Unavailable(_) => {
                tracing::warn!(error = %e, "shadow store unavailable");
                return Self::new(
                    ErrorCode::ShadowStoreUnavailable,
                    "the shadow store does not answer; retry later",
                );
            }
            S::DatabaseUnavailable(_) => {
                tracing::warn!(error = %e, "database unavailable");
                return database_unavailable();
            }
            S::Internal(_) => return internal(e),
        };
        Self::new(code, e.to_string())
    }
}

/// Logs the cause and answers 500 without leaking it.
fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "internal error");
    ApiError::new(ErrorCode::Internal, "internal error; see the server log")
}

/// Maps actix's JSON extractor errors: syntax → `invalid_json`, shape → `invalid_request`, size → 413.
pub fn json_error(
    err: actix_web::error::JsonPayloadError,
    _req: &actix_web::HttpRequest,
) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as J;
    let api = match &err {
        J::OverflowKnownLength { length, limit } => ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("body of {length} bytes exceeds the limit of {limit}"),
        ),
        J::Overflow { limit } => ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("body exceeds the limit of {limit} bytes"),
        ),
        J::ContentType => ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "send the body as application/json",
        ),
        J::Deserialize(e) if e.is_data() => ApiError::new(ErrorCode::InvalidRequest, e.to_string()),
        J::Deserialize(e) => ApiError::new(ErrorCode::InvalidJson, format!("body is not valid JSON: {e}")),
        other => ApiError::new(ErrorCode::InvalidJson, other.to_string()),
    };
    api.into()
}

/// Maps query-string errors to `invalid_request`.
pub fn query_error(
    err: actix_web::error::QueryPayloadError,
    _req: &actix_web::HttpRequest,
) -> actix_web::Error {
    ApiError::new(ErrorCode::InvalidRequest, format!("invalid query string: {err}")).into()
}

/// Maps path errors to `invalid_request`.
pub fn path_error(err: actix_web::error::PathError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    ApiError::new(ErrorCode::InvalidRequest, format!("invalid path: {err}")).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shadow::request::ShadowError;

    #[test]
    fn a_shadow_request_that_finds_the_database_away_answers_database_unavailable() {
        let store = ApiError::from(ShadowError::Unavailable("redis".into()));
        let database = ApiError::from(ShadowError::DatabaseUnavailable("pool timed out".into()));
        assert_eq!(store.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(database.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        let code = |e: &ApiError| serde_json::to_value(&e.0).unwrap()["code"].clone();
        assert_eq!(code(&store), "shadow_store_unavailable");
        assert_eq!(code(&database), "database_unavailable");
    }
}
