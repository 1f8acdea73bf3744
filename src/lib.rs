//! Roony: a financial firewall for AI agents.
//!
//! See `ARCHITECTURE.md` for the codemap and the invariants each module keeps.

pub mod domain;
pub mod emulator;
pub mod policy;
pub mod store;
pub mod auth;
pub mod issuer;
pub mod service;
pub mod api;
pub mod cli;
pub mod dev;
pub mod sidecar;
pub mod telemetry;
