//! # antumbra-sdk
//!
//! The device side of Antumbra: connect with the device's certificate, stay in sync with its shadow through
//! every reconnect, and provision keys on the device.
//!
//! ## A shadow-synced device
//!
//! ```no_run
//! use antumbra_sdk::{Config, Credentials, Device};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Desired { target: Option<f64> }
//!
//! # async fn run() -> Result<(), antumbra_sdk::Error> {
//! let credentials = Credentials::from_files("device.crt", "device.key", "ca.crt")?;
//! let device = Device::connect(Config::new("localhost", 8883, credentials))?; // client id = certificate CN
//! let shadow = device.shadow();
//! let mut deltas = shadow.deltas();
//! shadow.report(serde_json::json!({ "temperature": 19.5 })).await?;
//! while let Some(Ok((desired, _version))) = deltas.next_as::<Desired>().await {
//!     if let Some(target) = desired.target {
//!         // … apply it, then say so:
//!         shadow.report(serde_json::json!({ "target": target })).await?;
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! The connection reconnects by itself (jittered exponential backoff). After every (re)connect the SDK
//! resubscribes and asks for every shadow in use, so a delta set while the device was away arrives on the same
//! stream — application code never has to think about reconnects. Deltas older than the last one delivered are
//! dropped. Requests carry a `clientToken`, time out with [`Error::Timeout`], and a rejection is a typed
//! [`Error::Rejected`] (a version conflict carries the current version).
//!
//! ## Provisioning
//!
//! A device can make its own key pair and a CSR, send only the CSR to the platform (`POST /v1/devices` with
//! `"csr"`), and get back a certificate for a key that never left it:
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

mod client;
mod config;
mod error;
mod ota;
pub mod provisioning;
mod shadow;

pub use antumbra_wire::ota::{FirmwareRef, JobDocument, JobStatus, JobStep};
pub use antumbra_wire::{topics, DeviceId, DeviceIdError};
pub use client::Device;
pub use config::{Config, Credentials};
pub use error::Error;
pub use ota::{Jobs, Ota};
pub use shadow::{Delta, Deltas, Document, Shadow};
