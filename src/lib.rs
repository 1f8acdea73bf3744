//! Roony: a financial firewall for AI agents.
//!
//! See `ARCHITECTURE.md` for the codemap and the invariants each module keeps.

pub mod api;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod control;
pub mod dev;
pub mod domain;
pub mod emulator;
pub mod issuer;
pub mod mcp;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod service;
pub mod sidecar;
pub mod simulate;
pub mod store;
pub mod sync;
pub mod telemetry;
