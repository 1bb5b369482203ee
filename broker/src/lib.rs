//! Weir: a WebAssembly-extensible message broker for edge and IoT gateways.
//! See ARCHITECTURE.md at the repository root for the map of this crate.

pub mod acl;
pub mod admin;
pub mod auth;
pub mod backoff;
pub mod bench;
pub mod config;
pub mod kafka;
pub mod metrics;
pub mod mqtt;
pub mod names;
pub mod plugins;
pub mod replication;
pub mod server;
pub mod shell;
pub mod status;
pub mod storage;
pub mod tls;
