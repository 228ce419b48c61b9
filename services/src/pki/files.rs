//! CA files in the data directory. Private keys are written with mode 0600 before any byte of them lands.

use std::fs;
use std::io::Write;
use std::path::Path;

use super::PkiError;

pub(super) fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Reads `dir/ca.crt` and `dir/ca.key`, or creates both with `create` when neither exists.
pub(super) fn load_or_create_ca(
    dir: &Path,
    create: impl FnOnce() -> Result<(String, String), PkiError>,
) -> Result<(String, String), PkiError> {
    if let Some(pair) = read_ca(dir)? {
        return Ok(pair);
    }
    let (cert, key) = create()?;
    write_ca(dir, &cert, &key)?;
    tracing::info!(path = %dir.join("ca.crt").display(), "created a new device CA");
    Ok((cert, key))
}

/// Reads `dir/ca.crt` and `dir/ca.key` when both exist; `None` when neither does. One without the other is an
/// error: silently replacing a CA would orphan every certificate it issued.
pub(super) fn read_ca(dir: &Path) -> Result<Option<(String, String)>, PkiError> {
    let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => Ok(Some((read(&cert_path)?, read(&key_path)?))),
        (false, false) => Ok(None),
        (has_cert, _) => Err(PkiError::InvalidCa {
            path: if has_cert { key_path } else { cert_path },
            reason: "missing, while its partner file exists; restore it or remove both to create a new CA"
                .into(),
        }),
    }
}

/// Writes `dir/ca.key` (0600) and then `dir/ca.crt`.
pub(super) fn write_ca(dir: &Path, cert: &str, key: &str) -> Result<(), PkiError> {
    write_secret(&dir.join("ca.key"), key)?;
    write_public(&dir.join("ca.crt"), cert)
}

pub(super) fn write_public(path: &Path, contents: &str) -> Result<(), PkiError> {
    write(path, contents, 0o644)
}

pub(super) fn write_secret(path: &Path, contents: &str) -> Result<(), PkiError> {
    write(path, contents, 0o600)
}

/// Writes through a temporary file and a rename, so a crash never leaves a truncated key behind.
fn write(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io)?;
    let tmp = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}
