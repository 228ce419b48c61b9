//! The platform CA's record: at most one row, written once by whichever instance gets there first.

use sqlx::Row;

use super::{now, to_millis, Registry, RegistryError};

/// A CA certificate and its private key, both PEM, as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredCa {
    /// The CA certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl std::fmt::Debug for StoredCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key, not even in a debug log.
        f.debug_struct("StoredCa")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// How the stored CA came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaOrigin {
    /// Created by an instance on its first start.
    Generated,
    /// Taken from an instance's data directory (`pki/ca.crt`, `pki/ca.key`), where older versions kept it.
    Imported,
}

impl CaOrigin {
    fn as_str(self) -> &'static str {
        match self {
            Self::Generated => "generated",
            Self::Imported => "imported",
        }
    }
}

impl Registry {
    /// The CA on record, if one is.
    pub async fn stored_ca(&self) -> Result<Option<StoredCa>, RegistryError> {
        let row = sqlx::query("SELECT cert_pem, key_pem FROM certificate_authority WHERE id = 1")
            .fetch_optional(self.pool())
            .await?;
        row.map(|row| {
            Ok(StoredCa {
                cert_pem: row.try_get("cert_pem")?,
                key_pem: row.try_get("key_pem")?,
            })
        })
        .transpose()
        .map_err(|e: sqlx::Error| RegistryError::Corrupt(format!("certificate_authority: {e}")))
    }

    /// Stores `ca` unless a CA is on record already, and returns the one on record: `ca` itself, or the one
    /// another instance stored first. Two instances racing here both end with the same CA.
    pub async fn store_ca_if_absent(
        &self,
        ca: &StoredCa,
        origin: CaOrigin,
    ) -> Result<StoredCa, RegistryError> {
        sqlx::query(
            "INSERT INTO certificate_authority (id, cert_pem, key_pem, origin, created_at) \
             VALUES (1, $1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
        )
        .bind(ca.cert_pem.clone())
        .bind(ca.key_pem.clone())
        .bind(origin.as_str())
        .bind(to_millis(now()))
        .execute(self.pool())
        .await?;
        self.stored_ca().await?.ok_or_else(|| {
            RegistryError::Corrupt("certificate_authority: the row written is not there".into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(n: u8) -> StoredCa {
        StoredCa {
            cert_pem: format!("cert {n}"),
            key_pem: format!("key {n}"),
        }
    }

    #[tokio::test]
    async fn the_first_ca_stored_wins_and_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::sqlite_in(dir.path()).await;
        assert_eq!(reg.stored_ca().await.unwrap(), None);
        assert_eq!(
            reg.store_ca_if_absent(&ca(1), CaOrigin::Generated).await.unwrap(),
            ca(1)
        );
        assert_eq!(
            reg.store_ca_if_absent(&ca(2), CaOrigin::Imported).await.unwrap(),
            ca(1),
            "a second instance gets the first one's CA"
        );
        assert_eq!(reg.stored_ca().await.unwrap(), Some(ca(1)));
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        assert!(!format!("{:?}", ca(7)).contains("key 7"));
    }
}
