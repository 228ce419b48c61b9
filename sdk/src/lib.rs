//! # antumbra-sdk
//!
//! The device side of [Antumbra](https://example.invalid/antumbra): everything a device needs to join the
//! platform and stay in sync with it.
//!
//! Today the crate provides **provisioning**: a device makes its own key pair and a PKCS#10 certificate
//! signing request, sends only the CSR to the platform (`POST /v1/devices` with `"csr"`), and gets back a
//! certificate for a key that never left it. Shadow sync and OTA over MQTT follow in this crate as the
//! platform's broker lands.
//!
//! ```no_run
//! use antumbra_sdk::{provisioning, DeviceId};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let id = DeviceId::parse("thermostat-17")?;
//! let request = provisioning::KeyAndCsr::generate(&id)?;
//! std::fs::write("device.key", request.private_key_pem())?; // stays on the device
//! // Send `request.csr_pem()` to the platform; store the certificate it returns beside the key.
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod provisioning;

pub use antumbra_wire::{topics, DeviceId, DeviceIdError};

/// Errors of the SDK.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Generating a key or a CSR failed.
    #[error("key or CSR generation failed: {0}")]
    Crypto(String),
}
