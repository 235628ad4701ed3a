//! `stratad`, the Strata daemon, as a library.
//!
//! This crate owns the store layer ([`store`]: the trait and its backends)
//! and the daemon around it ([`config`], [`server`]). The binary in
//! `main.rs` only parses the command line and calls [`server::run`]; tests
//! and benchmarks use the same pieces in-process.

pub mod store;
