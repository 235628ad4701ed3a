//! How Strata's domain objects are laid out in the store, and their stored
//! records.
//!
//! | key | value |
//! | --- | --- |
//! | `t/{project}/{tenant}` | [`TenantRecord`] |
//! | `c/{project}/{tenant}/{key}` | [`LayerRecord`] |
//! | `h/{project}/{tenant}/{key}@{seq}` | [`VersionRecord`] |
//!
//! Project and tenant names cannot contain `/` (they are DNS labels), so the
//! first two segments after the type letter always parse unambiguously and
//! the rest of a `c/` key is the config key. Config keys cannot contain `@`,
//! so the last `@` of an `h/` key starts its version number; the number is
//! zero-padded so a prefix range lists versions in order.

use prost::Message;

use crate::domain::document::{Format, Mode};

/// Stored form of a tenant.
#[derive(Clone, PartialEq, Message)]
pub struct TenantRecord {
    /// Parent tenant; empty for a root.
    #[prost(string, tag = "1")]
    pub parent: String,
    /// Free-form labels.
    #[prost(map = "string, string", tag = "2")]
    pub labels: std::collections::HashMap<String, String>,
    /// TTL in seconds; 0 for none.
    #[prost(int64, tag = "3")]
    pub ttl_seconds: i64,
    /// Expiry as Unix milliseconds; 0 for none.
    #[prost(int64, tag = "4")]
    pub expires_at_unix_ms: i64,
    /// Strict fallback policy (never resolve services outside the tenant).
    #[prost(bool, tag = "5")]
    pub strict: bool,
    /// Cannot be deleted without force.
    #[prost(bool, tag = "6")]
    pub protected: bool,
}

/// Stored form of one tenant's layer of a key.
#[derive(Clone, PartialEq, Message)]
pub struct LayerRecord {
    /// Raw value bytes (empty for a delete layer).
    #[prost(bytes = "vec", tag = "1")]
    pub value: Vec<u8>,
    /// Format name.
    #[prost(string, tag = "2")]
    pub format: String,
    /// Mode name.
    #[prost(string, tag = "3")]
    pub mode: String,
}

impl LayerRecord {
    /// A record for a validated layer.
    pub fn new(value: Vec<u8>, format: Format, mode: Mode) -> Self {
        Self {
            value,
            format: format.name().to_owned(),
            mode: mode.name().to_owned(),
        }
    }
}

/// Stored form of one version in a layer's history: what the layer became
/// at the revision this record was written (the record's create revision).
#[derive(Clone, PartialEq, Message)]
pub struct VersionRecord {
    /// The layer as written; absent when this version removed the layer.
    #[prost(message, optional, tag = "1")]
    pub layer: Option<LayerRecord>,
    /// Wall-clock time of the write, Unix milliseconds (for operators; the
    /// revision is what orders versions).
    #[prost(int64, tag = "2")]
    pub written_at_unix_ms: i64,
    /// When the version was written by a rollback: the revision restored.
    #[prost(int64, tag = "3")]
    pub restored_from: i64,
}

/// Key of a tenant record.
pub fn tenant_key(project: &str, tenant: &str) -> Vec<u8> {
    format!("t/{project}/{tenant}").into_bytes()
}

/// Prefix of every tenant of a project.
pub fn tenants_prefix(project: &str) -> Vec<u8> {
    format!("t/{project}/").into_bytes()
}

/// Key of a config layer.
pub fn layer_key(project: &str, tenant: &str, key: &str) -> Vec<u8> {
    format!("c/{project}/{tenant}/{key}").into_bytes()
}

/// Prefix of every layer of a tenant.
pub fn layers_prefix(project: &str, tenant: &str) -> Vec<u8> {
    format!("c/{project}/{tenant}/").into_bytes()
}

/// Key of version `seq` of a layer's history.
pub fn version_key(project: &str, tenant: &str, key: &str, seq: u64) -> Vec<u8> {
    format!("h/{project}/{tenant}/{key}@{seq:020}").into_bytes()
}

/// Prefix of every version of one layer.
pub fn versions_prefix(project: &str, tenant: &str, key: &str) -> Vec<u8> {
    format!("h/{project}/{tenant}/{key}@").into_bytes()
}

/// Prefix of the history of every layer of a tenant.
pub fn history_prefix(project: &str, tenant: &str) -> Vec<u8> {
    format!("h/{project}/{tenant}/").into_bytes()
}

/// A store key, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// `t/{project}/{tenant}`
    Tenant {
        /// Project.
        project: &'a str,
        /// Tenant.
        tenant: &'a str,
    },
    /// `c/{project}/{tenant}/{key}`
    Layer {
        /// Project.
        project: &'a str,
        /// Tenant.
        tenant: &'a str,
        /// Config key.
        key: &'a str,
    },
    /// `h/{project}/{tenant}/{key}@{seq}`
    Version {
        /// Project.
        project: &'a str,
        /// Tenant.
        tenant: &'a str,
        /// Config key.
        key: &'a str,
        /// Version number within the layer's history.
        seq: u64,
    },
}

/// Parses a store key; `None` for keys that are not Strata domain keys.
pub fn parse(key: &[u8]) -> Option<Parsed<'_>> {
    let key = std::str::from_utf8(key).ok()?;
    let (kind, rest) = key.split_once('/')?;
    match kind {
        "t" => {
            let (project, tenant) = rest.split_once('/')?;
            (!tenant.contains('/')).then_some(Parsed::Tenant { project, tenant })
        }
        "c" => {
            let (project, rest) = rest.split_once('/')?;
            let (tenant, key) = rest.split_once('/')?;
            Some(Parsed::Layer {
                project,
                tenant,
                key,
            })
        }
        "h" => {
            let (project, rest) = rest.split_once('/')?;
            let (tenant, rest) = rest.split_once('/')?;
            let (key, seq) = rest.rsplit_once('@')?;
            Some(Parsed::Version {
                project,
                tenant,
                key,
                seq: seq.parse().ok()?,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        assert_eq!(
            parse(&tenant_key("vega", "feat-1")),
            Some(Parsed::Tenant {
                project: "vega",
                tenant: "feat-1"
            })
        );
        assert_eq!(
            parse(&layer_key("vega", "feat-1", "mm/server.yaml")),
            Some(Parsed::Layer {
                project: "vega",
                tenant: "feat-1",
                key: "mm/server.yaml"
            })
        );
        assert_eq!(
            parse(&version_key("vega", "feat-1", "mm/server.yaml", 42)),
            Some(Parsed::Version {
                project: "vega",
                tenant: "feat-1",
                key: "mm/server.yaml",
                seq: 42
            })
        );
        // Zero-padding keeps byte order equal to version order.
        assert!(version_key("p", "t", "k", 9) < version_key("p", "t", "k", 10));
        assert!(version_key("p", "t", "k", 1).starts_with(&versions_prefix("p", "t", "k")));
        assert!(!version_key("p", "t", "k.x", 1).starts_with(&versions_prefix("p", "t", "k")));
        assert!(version_key("p", "t", "k", 1).starts_with(&history_prefix("p", "t")));
        assert_eq!(parse(b"x/whatever"), None);
        assert!(layer_key("p", "t", "k").starts_with(&layers_prefix("p", "t")));
    }
}
