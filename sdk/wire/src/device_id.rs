use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Longest device id accepted, in bytes (all allowed characters are ASCII).
pub const MAX_LEN: usize = 128;

/// A device identifier: 1–128 characters of `A-Z a-z 0-9 - _ . :`, case-sensitive.
///
/// The rules keep an id safe everywhere it travels: as an MQTT topic level (never `+ # / $`), as a certificate
/// common name, as a URL path segment and as a Redis key part. Once parsed, an id is never checked again.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct DeviceId(String);

/// Why a string is not a valid [`DeviceId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceIdError {
    /// The id is the empty string.
    #[error("device id must not be empty")]
    Empty,
    /// The id is longer than 128 characters.
    #[error("device id is {0} characters long; at most 128 are allowed")]
    TooLong(usize),
    /// The id holds a character outside `A-Z a-z 0-9 - _ . :`.
    #[error("device id contains {0:?}; only A-Z a-z 0-9 - _ . : are allowed")]
    InvalidChar(char),
}

impl DeviceId {
    /// Parses a device id, enforcing the id rules.
    pub fn parse(s: impl Into<String>) -> Result<Self, DeviceIdError> {
        let s = s.into();
        if s.is_empty() {
            return Err(DeviceIdError::Empty);
        }
        let chars = s.chars().count();
        if chars > MAX_LEN {
            return Err(DeviceIdError::TooLong(chars));
        }
        if let Some(bad) = s.chars().find(|c| !is_allowed(*c)) {
            return Err(DeviceIdError::InvalidChar(bad));
        }
        Ok(Self(s))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.0)
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Lets a map keyed by device look up a `&str` (a topic level) without building an id; the derived `Hash` and
/// `Eq` are those of the string, as `Borrow` requires.
impl std::borrow::Borrow<str> for DeviceId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for DeviceId {
    type Err = DeviceIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_allowed_character() {
        let id = DeviceId::parse("Shelf-01_a.b:C9").unwrap();
        assert_eq!(id.as_str(), "Shelf-01_a.b:C9");
        assert!(DeviceId::parse("x".repeat(128)).is_ok());
    }

    #[test]
    fn refuses_empty_long_and_mqtt_specials() {
        assert_eq!(DeviceId::parse(""), Err(DeviceIdError::Empty));
        assert_eq!(DeviceId::parse("x".repeat(129)), Err(DeviceIdError::TooLong(129)));
        for bad in ["a/b", "a+b", "a#b", "$sys", "a b", "é", "a\0b", "a*b"] {
            assert!(
                matches!(DeviceId::parse(bad), Err(DeviceIdError::InvalidChar(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn is_case_sensitive() {
        assert_ne!(DeviceId::parse("abc").unwrap(), DeviceId::parse("ABC").unwrap());
    }

    #[test]
    fn deserializing_enforces_the_rules() {
        assert!(serde_json::from_str::<DeviceId>("\"ok-1\"").is_ok());
        assert!(serde_json::from_str::<DeviceId>("\"no/slash\"").is_err());
    }
}
