//! The operations every transport shares: tenants and config, the registry,
//! backups, tokens, the audit log; and the rules they plan with (who may
//! do what, limits).
//!
//! A gRPC or HTTP handler validates its input, calls one operation here and
//! maps the error; the operation checks the view, plans one transaction,
//! commits and re-plans on conflict. Nothing here depends on a transport.

// The tenant and config operations: validate against the view, plan one transaction, commit, re-plan on conflict.
pub mod api;
// The audit log: typed targets handlers state, the store wrapper that commits an entry with its change, queries, retention.
pub mod audit;
// Roles, token scopes, the one authorization rule (`Principal::allows`) and the in-memory token table.
pub mod auth;
// Export and import of the versioned backup format.
pub mod backup;
// Size, count and byte limits every operation plans with.
pub mod limits;
// Registry operations: register, deregister, drain, heartbeat, branch registration, resolution.
pub mod registry;
// Registry objects to and from protobuf (the services lens pushes them).
pub mod registry_wire;
// The services lens of the watch hub.
pub mod service_watch;
// The token table's loading and following, the first admin token, token management.
pub mod tokens;
