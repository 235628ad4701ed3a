//! Strata's domain rules, free of I/O: names of projects, tenants and keys;
//! configuration documents (formats, parsing with precise errors, RFC 7396
//! merge, rendering); layered resolution along a tenant chain exactly as
//! docs/ARCHITECTURE.md defines it; and the stored forms of the objects
//! (`records`).

pub mod credentials;
pub mod document;
pub mod hex;
pub mod names;
pub mod records;
pub mod registry;
pub mod resolve;
