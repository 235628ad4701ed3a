//! The store conformance suite: one set of behavioural tests every backend
//! must pass (see `tests/tests/store_conformance.rs`).
