//! The SDK's error type.

/// Everything that can go wrong talking to Antumbra.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Generating a key or a CSR failed.
    #[error("key or CSR generation failed: {0}")]
    Crypto(String),
    /// The certificate, key or CA could not be read or used.
    #[error("credentials: {0}")]
    Credentials(String),
    /// The platform rejected a request; `code` is the AWS-style status (400, 404, 409, 413, 429, …).
    #[error("rejected ({code}): {message}")]
    Rejected {
        /// Numeric code.
        code: u16,
        /// The platform's explanation.
        message: String,
        /// On a version conflict (409): the shadow's current version.
        version: Option<u64>,
    },
    /// No reply came within the request timeout.
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
    /// The connection dropped while the request was in flight; it is safe to retry after reconnecting.
    #[error("disconnected while the request was in flight")]
    Disconnected,
    /// The device was shut down.
    #[error("the device client is closed")]
    Closed,
    /// A payload was not the JSON expected.
    #[error("unexpected payload: {0}")]
    Payload(String),
}
