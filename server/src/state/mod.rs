//! The in-memory picture of the store and its pushes: the view every read
//! is answered from, the keys objects live under, and the watch hub that
//! turns committed changes into resolved pushes to subscribers.
//!
//! Imports only the ground (`store`, `domain`, `error`): nothing here knows
//! about operations, transports or the daemon's wiring.

// The watch hub: groups of subscribers, resolved pushes, resumes from the journal.
pub mod hub;
// Where each object lives in the store, and parsing store keys back.
pub mod keyspace;
// The in-memory view of the store: projects, tenants, layers, instances, the journal.
pub mod view;
