//! The SQL connection: SQLite file (default) or PostgreSQL, through sqlx's `Any` driver so that one
//! repository layer, one set of migrations and one test suite serve both engines.

use std::fmt::Write as _;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::AnyPool;

/// Migrations under `/migrations`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Which engine a URL points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl Engine {
    /// The engine named by a database URL's scheme, if we support it.
    pub fn of(url: &str) -> Option<Self> {
        if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else {
            None
        }
    }
}

/// Errors opening the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL is neither `sqlite:` nor `postgres://`.
    #[error("unsupported DATABASE_URL scheme (expected sqlite: or postgres://)")]
    UnsupportedUrl,
    /// Connecting or configuring failed.
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    /// A migration failed.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Connects, switches SQLite to WAL, and applies pending migrations.
pub async fn connect(url: &str) -> Result<AnyPool, DbError> {
    sqlx::any::install_default_drivers();
    let engine = Engine::of(url).ok_or(DbError::UnsupportedUrl)?;
    let url = if engine == Engine::Sqlite {
        creating(url)
    } else {
        url.to_owned()
    };
    let options = AnyConnectOptions::from_str(&url)?;
    let pool = AnyPoolOptions::new()
        // SQLite serialises writers anyway; a few connections let readers run beside the writer under WAL.
        .max_connections(if engine == Engine::Sqlite { 4 } else { 16 })
        .acquire_timeout(Duration::from_secs(3))
        // A pooled PostgreSQL connection may have been cut by the server or the network: ping it before use.
        // A SQLite connection is a file handle in this process; the ping is only a round trip to its worker
        // thread (conn-10k: `ConnectionWorker::ping` was 1.4 % of the broker's CPU, one per CONNECT).
        .test_before_acquire(engine != Engine::Sqlite)
        .connect_with(options)
        .await?;
    if engine == Engine::Sqlite {
        // WAL is a property of the database file: set once, every later connection uses it.
        sqlx::query("PRAGMA journal_mode = WAL").execute(&pool).await?;
    }
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// The `VALUES` list of a multi-row statement: `rows` tuples of `columns` placeholders.
///
/// PostgreSQL gets numbered ones, as in `($1, $2), ($3, $4)`. SQLite gets anonymous `?`s, bound in order:
/// a numbered placeholder is a *named* one to SQLite, and both preparing the statement and binding it (sqlx
/// asks `sqlite3_bind_parameter_name` for every parameter) look names up one by one through the list, so a
/// 2,048-parameter batch cost time quadratic in its size (conn-10k: a sixth of the SQLite thread's samples,
/// in `strncmp` and `sqlite3_bind_parameter_name`, while presence batches were written).
pub fn values_list(engine: Engine, rows: usize, columns: usize) -> String {
    let mut sql = String::with_capacity(rows * columns * 5);
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 1..=columns {
            if column > 1 {
                sql.push_str(", ");
            }
            match engine {
                Engine::Sqlite => sql.push('?'),
                Engine::Postgres => {
                    let _ = write!(sql, "${}", row * columns + column);
                }
            }
        }
        sql.push(')');
    }
    sql
}

/// A SQLite URL that creates its file when missing (`mode=rwc`), as the default database does, unless it names
/// a mode or is an in-memory database: sqlx's own default is to refuse a file that does not exist yet.
fn creating(url: &str) -> String {
    if url.contains("mode=") || url.contains(":memory:") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    }
}

/// A SQLite URL for a file, created when missing.
pub fn sqlite_url(path: &std::path::Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_sqlite_url_naming_a_new_file_creates_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("new.db");
        super::connect(&format!("sqlite://{}", file.display()))
            .await
            .unwrap();
        assert!(file.exists());
        assert_eq!(super::creating("sqlite:a.db?mode=ro"), "sqlite:a.db?mode=ro");
        assert_eq!(
            super::creating("sqlite:a.db?cache=shared"),
            "sqlite:a.db?cache=shared&mode=rwc"
        );
        assert_eq!(super::creating("sqlite::memory:"), "sqlite::memory:");
    }

    #[test]
    fn values_list_has_a_placeholder_per_value_in_the_engines_form() {
        use super::{values_list, Engine::*};
        assert_eq!(values_list(Postgres, 1, 1), "($1)");
        assert_eq!(values_list(Postgres, 2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(values_list(Sqlite, 2, 3), "(?, ?, ?), (?, ?, ?)");
        assert_eq!(values_list(Postgres, 0, 4), "");
        assert_eq!(values_list(Sqlite, 0, 4), "");
    }
}
