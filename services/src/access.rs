//! API keys: bootstrap of the admin key, creation, verification, revocation.
//!
//! A token is `ant_` followed by 43 URL-safe characters (256 random bits). Only its SHA-256 is stored; the
//! token itself is shown once, when it is made.

use std::path::Path;

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::registry::{self, ApiKeyRecord, Registry, RegistryError, Scope};

/// Id of the key that `ANTUMBRA_ADMIN_TOKEN` (or the first start) provides.
pub const BOOTSTRAP_KEY_ID: &str = "admin";
/// Shortest operator-chosen admin token accepted.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// Errors of API key management.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The key does not exist.
    #[error("api key {0:?} not found")]
    NotFound(String),
    /// The key is already revoked.
    #[error("api key {0:?} is already revoked")]
    AlreadyRevoked(String),
    /// Invalid input, with the reason.
    #[error("{0}")]
    Invalid(String),
    /// The registry failed.
    #[error(transparent)]
    Registry(RegistryError),
}

/// What the first start did about the admin key.
#[derive(Debug, PartialEq, Eq)]
pub enum AdminBootstrap {
    /// `ANTUMBRA_ADMIN_TOKEN` was set; its hash is stored as the admin key.
    FromEnvironment,
    /// An admin key existed already.
    Existing,
    /// A new admin token was generated: this is the only time it exists in clear.
    Generated(String),
}

/// Hex SHA-256 of a token, as stored.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("ant_{}", base64url(&bytes))
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 1);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Ensures an admin key exists: from the configured token, else the existing one, else a generated one.
pub async fn bootstrap_admin(
    registry: &Registry,
    configured: Option<&str>,
) -> Result<AdminBootstrap, AccessError> {
    let record = |name: &str| ApiKeyRecord {
        id: BOOTSTRAP_KEY_ID.into(),
        name: name.into(),
        scope: Scope::Admin,
        created_at: registry::now(),
        revoked_at: None,
    };
    if let Some(token) = configured {
        if token.trim().is_empty() {
            return Err(AccessError::Invalid(
                "ANTUMBRA_ADMIN_TOKEN is empty; unset it to have one generated".into(),
            ));
        }
        if token.len() < MIN_ADMIN_TOKEN_LEN {
            // The operator chose it; a refusal would stop the platform over a guessable but working secret.
            tracing::warn!(
                length = token.len(),
                "ANTUMBRA_ADMIN_TOKEN is shorter than {MIN_ADMIN_TOKEN_LEN} characters and easy to guess; \
                 use a long random one (or unset it to have one generated)"
            );
        }
        let hash = hash_token(token);
        let current = registry
            .active_api_key_by_hash(&hash)
            .await
            .map_err(AccessError::Registry)?;
        if current.is_none_or(|k| k.id != BOOTSTRAP_KEY_ID) {
            registry
                .upsert_api_key(&record("admin (ANTUMBRA_ADMIN_TOKEN)"), &hash)
                .await
                .map_err(AccessError::Registry)?;
        }
        return Ok(AdminBootstrap::FromEnvironment);
    }
    match registry.api_key(BOOTSTRAP_KEY_ID).await {
        Ok(_) => Ok(AdminBootstrap::Existing),
        Err(RegistryError::NotFound) => {
            let token = new_token();
            match registry
                .insert_api_key(&record("admin (generated on first start)"), &hash_token(&token))
                .await
            {
                Ok(()) => Ok(AdminBootstrap::Generated(token)),
                // Another instance on the same database generated it between the lookup and the insert (a cluster's
                // first start): its token, shown in its log, is the admin token.
                Err(RegistryError::Conflict) => Ok(AdminBootstrap::Existing),
                Err(e) => Err(AccessError::Registry(e)),
            }
        }
        Err(e) => Err(AccessError::Registry(e)),
    }
}

/// Writes a generated admin token to `path` with mode 0600, so the operator can pick it up once.
pub fn write_token_file(path: &Path, token: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    writeln!(file, "{token}")
}

/// The key a bearer token belongs to, if it is active.
pub async fn authenticate(registry: &Registry, token: &str) -> Result<Option<ApiKeyRecord>, RegistryError> {
    registry.active_api_key_by_hash(&hash_token(token)).await
}

/// Creates a key; returns its record and the token, shown this once.
#[tracing::instrument(skip(registry))]
pub async fn create_key(
    registry: &Registry,
    name: &str,
    scope: Scope,
) -> Result<(ApiKeyRecord, String), AccessError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(AccessError::Invalid("name must be 1 to 100 characters".into()));
    }
    let mut id = [0u8; 6];
    rand::thread_rng().fill_bytes(&mut id);
    let record = ApiKeyRecord {
        id: format!("key_{}", hex::encode(id)),
        name: name.to_owned(),
        scope,
        created_at: registry::now(),
        revoked_at: None,
    };
    let token = new_token();
    registry
        .insert_api_key(&record, &hash_token(&token))
        .await
        .map_err(AccessError::Registry)?;
    Ok((record, token))
}

/// Revokes a key. Revoking the key you are using is allowed; it stops working at once.
#[tracing::instrument(skip(registry))]
pub async fn revoke_key(registry: &Registry, id: &str) -> Result<ApiKeyRecord, AccessError> {
    registry
        .revoke_api_key(id, registry::now())
        .await
        .map_err(|e| match e {
            RegistryError::NotFound => AccessError::NotFound(id.into()),
            RegistryError::Conflict => AccessError::AlreadyRevoked(id.into()),
            e => AccessError::Registry(e),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_url_safe() {
        let a = new_token();
        assert_eq!(a.len(), 4 + 43);
        assert!(
            a[4..]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{a}"
        );
        assert_ne!(a, new_token());
    }

    #[tokio::test]
    async fn instances_starting_together_generate_one_admin_token() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::sqlite_in(dir.path()).await;
        let starts: Vec<_> = (0..8).map(|_| bootstrap_admin(&registry, None)).collect();
        let outcomes: Vec<_> = futures_util::future::join_all(starts)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let generated: Vec<_> = outcomes
            .iter()
            .filter_map(|o| match o {
                AdminBootstrap::Generated(token) => Some(token),
                _ => None,
            })
            .collect();
        assert_eq!(generated.len(), 1, "{outcomes:?}");
        let key = registry
            .active_api_key_by_hash(&hash_token(generated[0]))
            .await
            .unwrap();
        assert_eq!(key.map(|k| k.id), Some(BOOTSTRAP_KEY_ID.to_owned()));
        assert_eq!(
            bootstrap_admin(&registry, None).await.unwrap(),
            AdminBootstrap::Existing
        );
    }

    #[tokio::test]
    async fn a_configured_token_is_the_admin_key_even_when_short_but_not_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::sqlite_in(dir.path()).await;
        assert!(matches!(
            bootstrap_admin(&registry, Some("  ")).await,
            Err(AccessError::Invalid(_))
        ));
        assert_eq!(
            bootstrap_admin(&registry, Some("admin")).await.unwrap(),
            AdminBootstrap::FromEnvironment
        );
        let key = registry
            .active_api_key_by_hash(&hash_token("admin"))
            .await
            .unwrap();
        assert_eq!(key.map(|k| k.id), Some(BOOTSTRAP_KEY_ID.to_owned()));
    }

    #[test]
    fn base64url_matches_known_vectors() {
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }
}
