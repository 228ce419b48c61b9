//! Antumbra: a self-hosted device-shadow IoT platform.
//!
//! A tour of the crate:
//! - [`config`]: the operator contract — defaults, an optional TOML file, environment, flags.
//! - [`startup`]: [`startup::Application`] builds everything from a [`config::Settings`] and runs it until a
//!   shutdown signal; `main.rs` only wires telemetry, configuration and this together.
//! - [`pki`]: the certificate authority (create or load, issue from a generated key or a CSR, server certs).
//! - [`registry`]: SQL repository for devices, certificates and API keys (SQLite or PostgreSQL via [`db`]).
//! - [`provisioning`] and [`access`]: the service layer that REST (and later MQTT) call — business rules live
//!   here, not in handlers.
//! - [`http`]: actix-web handlers, the error-code table, authentication extractors, the OpenAPI document.
#![deny(unsafe_code)]

pub mod access;
pub mod cluster;
pub mod config;
pub mod db;
pub mod events;
pub mod http;
pub mod liveness;
pub mod memory;
pub mod mqtt;
pub mod ota;
pub mod pki;
pub mod presence;
pub mod provisioning;
pub mod registry;
pub mod shadow;
pub mod startup;
pub mod telemetry;
