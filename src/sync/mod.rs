//! Control plane → sidecar sync (issue 4, item 4: policy distribution). `wire` holds the
//! versioned wire types shared by both sides; `client` is the sidecar's long-poll loop.
//! The protocol is described in docs/design.md ("Sync protocol").

pub mod client;
pub mod wire;
