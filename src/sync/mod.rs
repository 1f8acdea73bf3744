//! Sync between the control plane and sidecars. `wire` holds the versioned wire types
//! shared by both sides; `client` is the sidecar's bundle long-poll (policies, keys, budgets,
//! approvals down); `upstream` delivers the outbox (events up) and holds shared-budget
//! leases. The protocol is described in docs/design.md ("Sync protocol").

pub mod client;
pub mod upstream;
pub mod wire;
