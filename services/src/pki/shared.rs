//! One CA for every instance on a database: without CA files from the operator, the CA lives in the database.
//!
//! Which CA an instance uses, first match wins:
//! 1. the operator's files (`--ca-cert`/`--ca-key`), used as they are and never copied into the database;
//! 2. the CA on record in the database;
//! 3. the CA in the data directory (`pki/ca.crt`, `pki/ca.key`, where single-node installs have always kept
//!    it), imported into the database;
//! 4. a new CA, stored in the database.
//!
//! Steps 3 and 4 store insert-if-absent and then use whatever is on record, so instances that start at once
//! still agree on one CA. When the database is a local file (SQLite) the data directory also keeps a copy of
//! the CA, as it always has; with a shared database the key stays in the database only, rather than on every
//! instance's disk.

use time::Duration;

use super::{create_ca, files, CaSource, CertificateAuthority, PkiError};
use crate::registry::{CaOrigin, Registry, StoredCa};

/// Where the CA in use came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaProvenance {
    /// The operator's `--ca-cert`/`--ca-key` files.
    OperatorFiles,
    /// The database, where this or another instance stored it earlier.
    Database,
    /// This instance's data directory, imported into the database now.
    ImportedFromDataDir,
    /// Created now and stored in the database.
    Generated,
}

impl std::fmt::Display for CaProvenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::OperatorFiles => "the operator's CA files",
            Self::Database => "the database",
            Self::ImportedFromDataDir => "the data directory, imported into the database",
            Self::Generated => "created now and stored in the database",
        })
    }
}

impl CertificateAuthority {
    /// Loads the CA every instance on `registry`'s database shares (see the module documentation).
    pub async fn load_shared(
        source: &CaSource,
        registry: &Registry,
        device_validity: Duration,
    ) -> Result<(Self, CaProvenance), PkiError> {
        if source.provided.is_some() {
            let ca = Self::load_or_create(source, device_validity)?;
            if let Ok(Some(stored)) = registry.stored_ca().await {
                if !same_certificate(&stored.cert_pem, ca.ca_pem()) {
                    tracing::warn!(
                        "the database holds another CA than the one in the operator's files: instances started \
                         without --ca-cert use the database's, and devices of one cannot connect to the other"
                    );
                }
            }
            return Ok((ca, CaProvenance::OperatorFiles));
        }
        let on_record = registry.stored_ca().await?;
        let local = match (&on_record, files::read_ca(&source.dir)) {
            (_, Ok(local)) => local,
            // Nothing on record and half a CA here: refuse, rather than replace a CA that issued certificates.
            (None, Err(e)) => return Err(e),
            (Some(_), Err(e)) => {
                tracing::warn!(error = %e, "ignoring the data directory's incomplete CA: the database holds the CA");
                None
            }
        };
        let (stored, provenance) = match on_record {
            Some(stored) => (stored, CaProvenance::Database),
            None => {
                let (offer, origin, provenance) = match &local {
                    Some((cert, key)) => (
                        StoredCa {
                            cert_pem: cert.clone(),
                            key_pem: key.clone(),
                        },
                        CaOrigin::Imported,
                        CaProvenance::ImportedFromDataDir,
                    ),
                    None => {
                        let (cert_pem, key_pem) = create_ca()?;
                        (
                            StoredCa { cert_pem, key_pem },
                            CaOrigin::Generated,
                            CaProvenance::Generated,
                        )
                    }
                };
                // A CA that cannot sign must not become every instance's CA.
                Self::from_pem(&offer.cert_pem, &offer.key_pem, device_validity).map_err(|reason| {
                    PkiError::InvalidCa {
                        path: source.dir.join("ca.crt"),
                        reason,
                    }
                })?;
                let winner = registry.store_ca_if_absent(&offer, origin).await?;
                let provenance = if winner == offer {
                    provenance
                } else {
                    CaProvenance::Database // another instance stored its CA first
                };
                (winner, provenance)
            }
        };
        if let Some((cert, _)) = &local {
            if !same_certificate(cert, &stored.cert_pem) {
                tracing::warn!(
                    path = %source.dir.join("ca.crt").display(),
                    "this data directory holds another CA than the database; it is not used (certificates it \
                     issued do not verify any more)"
                );
            }
        }
        let ca = Self::from_pem(&stored.cert_pem, &stored.key_pem, device_validity)
            .map_err(PkiError::InvalidStoredCa)?;
        if source.keep_files && local.is_none() {
            files::write_ca(&source.dir, &stored.cert_pem, &stored.key_pem)?;
        }
        Ok((ca, provenance))
    }
}

fn same_certificate(a: &str, b: &str) -> bool {
    a.trim() == b.trim()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn source(dir: &Path, keep_files: bool) -> CaSource {
        CaSource {
            dir: dir.to_owned(),
            provided: None,
            keep_files,
        }
    }

    async fn load(source: &CaSource, registry: &Registry) -> (CertificateAuthority, CaProvenance) {
        CertificateAuthority::load_shared(source, registry, Duration::days(1))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn the_first_instance_creates_the_ca_in_the_database_and_the_others_load_it() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::sqlite_in(dir.path()).await;
        let (a, made) = load(&source(&dir.path().join("a"), false), &registry).await;
        let (b, found) = load(&source(&dir.path().join("b"), false), &registry).await;
        assert_eq!((made, found), (CaProvenance::Generated, CaProvenance::Database));
        assert_eq!(a.ca_pem(), b.ca_pem());
        assert!(
            !dir.path().join("a/ca.key").exists() && !dir.path().join("b/ca.key").exists(),
            "with a shared database the key stays in the database"
        );
    }

    #[tokio::test]
    async fn instances_starting_at_once_agree_on_one_ca() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::sqlite_in(dir.path()).await;
        let sources: Vec<_> = (0..4)
            .map(|i| source(&dir.path().join(i.to_string()), false))
            .collect();
        let loaded = futures_util::future::join_all(sources.iter().map(|s| load(s, &registry))).await;
        assert!(loaded.iter().all(|(ca, _)| ca.ca_pem() == loaded[0].0.ca_pem()));
        let stored = registry.stored_ca().await.unwrap().unwrap();
        assert_eq!(stored.cert_pem.trim(), loaded[0].0.ca_pem().trim());
    }

    #[tokio::test]
    async fn a_data_directory_ca_is_imported_into_an_empty_database_and_kept_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let old = CertificateAuthority::load_or_create(&source(dir.path(), true), Duration::days(1)).unwrap();
        let registry = Registry::sqlite_in(dir.path()).await;
        let (ca, provenance) = load(&source(dir.path(), true), &registry).await;
        assert_eq!(provenance, CaProvenance::ImportedFromDataDir);
        assert_eq!(
            ca.ca_pem(),
            old.ca_pem(),
            "certificates issued before still verify"
        );
        let stored = registry.stored_ca().await.unwrap().unwrap();
        assert_eq!(stored.cert_pem.trim(), old.ca_pem().trim());
        let (again, provenance) = load(&source(dir.path(), true), &registry).await;
        assert_eq!(provenance, CaProvenance::Database);
        assert_eq!(again.ca_pem(), old.ca_pem());
    }

    #[tokio::test]
    async fn a_local_database_keeps_a_copy_of_the_ca_in_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::sqlite_in(dir.path()).await;
        let (ca, _) = load(&source(&dir.path().join("pki"), true), &registry).await;
        let file = std::fs::read_to_string(dir.path().join("pki/ca.crt")).unwrap();
        assert_eq!(file.trim(), ca.ca_pem().trim());
        assert!(dir.path().join("pki/ca.key").exists());
    }

    #[tokio::test]
    async fn the_database_ca_wins_over_another_in_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::sqlite_in(dir.path()).await;
        let (shared, _) = load(&source(&dir.path().join("first"), false), &registry).await;
        let other = dir.path().join("other");
        CertificateAuthority::load_or_create(&source(&other, true), Duration::days(1)).unwrap();
        let (ca, provenance) = load(&source(&other, true), &registry).await;
        assert_eq!(provenance, CaProvenance::Database);
        assert_eq!(ca.ca_pem(), shared.ca_pem());
    }

    #[tokio::test]
    async fn half_a_ca_in_the_data_directory_is_refused_while_the_database_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        CertificateAuthority::load_or_create(&source(&pki, true), Duration::days(1)).unwrap();
        std::fs::remove_file(pki.join("ca.key")).unwrap();
        let registry = Registry::sqlite_in(dir.path()).await;
        let err = CertificateAuthority::load_shared(&source(&pki, true), &registry, Duration::days(1))
            .await
            .unwrap_err();
        assert!(matches!(err, PkiError::InvalidCa { .. }), "{err}");
        assert_eq!(registry.stored_ca().await.unwrap(), None, "nothing stored");
    }

    #[tokio::test]
    async fn operator_files_take_precedence_and_are_not_copied_into_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let operator = dir.path().join("operator");
        let theirs =
            CertificateAuthority::load_or_create(&source(&operator, true), Duration::days(1)).unwrap();
        let registry = Registry::sqlite_in(dir.path()).await;
        let provided = CaSource {
            dir: dir.path().join("pki"),
            provided: Some((operator.join("ca.crt"), operator.join("ca.key"))),
            keep_files: true,
        };
        let (ca, provenance) = load(&provided, &registry).await;
        assert_eq!(provenance, CaProvenance::OperatorFiles);
        assert_eq!(ca.ca_pem(), theirs.ca_pem());
        assert_eq!(registry.stored_ca().await.unwrap(), None);
        assert!(!dir.path().join("pki/ca.key").exists());
    }

    #[tokio::test]
    async fn an_unusable_ca_on_record_is_an_error_not_a_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::sqlite_in(dir.path()).await;
        let junk = StoredCa {
            cert_pem: "not a certificate".into(),
            key_pem: "not a key".into(),
        };
        registry
            .store_ca_if_absent(&junk, CaOrigin::Imported)
            .await
            .unwrap();
        let err = CertificateAuthority::load_shared(&source(dir.path(), false), &registry, Duration::days(1))
            .await
            .unwrap_err();
        assert!(matches!(err, PkiError::InvalidStoredCa(_)), "{err}");
    }
}
