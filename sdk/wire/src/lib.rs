//! Wire types shared by the Antumbra server and its device SDK.
//!
//! One source of truth for what crosses the wire: device identifiers and their rules, MQTT topic names, and the
//! JSON payloads both sides exchange. The server (`antumbra`) and the SDK (`antumbra-sdk`) both depend on this
//! crate, so a topic or a field name is written exactly once.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod device_id;
pub mod ota;
pub mod topics;

pub use device_id::{DeviceId, DeviceIdError};
