//! Bearer API-key extractors. A handler states the scope it needs by the extractor it takes.

use std::future::Future;
use std::pin::Pin;

use actix_web::{web, FromRequest, HttpRequest};
use futures_util::TryFutureExt;

use super::error::{ApiError, ErrorCode};
use super::AppState;
use crate::registry::{ApiKeyRecord, Scope};

/// A request made with an active key of at least `read` scope.
#[derive(Debug)]
pub struct ReadKey(pub ApiKeyRecord);

/// A request made with an active key of `admin` scope.
#[derive(Debug)]
pub struct AdminKey(pub ApiKeyRecord);

async fn authenticate(req: HttpRequest, needed: Scope) -> Result<ApiKeyRecord, ApiError> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .expect("AppState is registered")
        .clone();
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = header
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "send an API key as `Authorization: Bearer <key>`",
            )
        })?;
    let key = crate::access::authenticate(&state.registry, token)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "the API key is unknown or revoked"))?;
    if key.scope < needed {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "this needs a key of scope {:?}; key {} has scope {:?}",
                needed.as_str(),
                key.id,
                key.scope.as_str()
            ),
        ));
    }
    Ok(key)
}

impl FromRequest for ReadKey {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        Box::pin(authenticate(req.clone(), Scope::Read).map_ok(ReadKey))
    }
}

impl FromRequest for AdminKey {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        Box::pin(authenticate(req.clone(), Scope::Admin).map_ok(AdminKey))
    }
}
