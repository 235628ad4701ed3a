//! How Strata's domain objects are laid out in the store, and their stored
//! records.
//!
//! | key | value |
//! | --- | --- |
//! | `t/{project}/{tenant}` | [`TenantRecord`] |
//! | `c/{project}/{tenant}/{key}` | [`LayerRecord`] |
//! | `h/{project}/{tenant}/{key}@{seq}` | [`VersionRecord`] |
//! | `i/{project}/{tenant}/{service}/{id}` | [`InstanceRecord`] (ephemeral ones under a lease) |
//! | `ih/{project}/{tenant}/{service}/{id}` | [`HealthRecord`] (probe verdict of a persistent instance) |
//! | `q/{project}`, `q/{project}/{tenant}/{c,i}` | empty: count guards (`limits.rs`) |
//! | `audit/{hour}/{unix_ms}-{nonce}` | audit entry (`audit.rs`; not a domain key) |
//! | `a/tokens/{id}` | token record: name, role, scope, secret hash (`tokens.rs`; not a domain key) |
//! | `a/bootstrap` | id of the admin token of first start (created once per store) |
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

/// Stored form of a service endpoint.
#[derive(Clone, PartialEq, Message)]
pub struct EndpointRecord {
    /// `host:port`.
    #[prost(string, tag = "1")]
    pub address: String,
    /// `http`, `grpc`, `tcp` or `udp`.
    #[prost(string, tag = "2")]
    pub protocol: String,
}

/// Stored form of an active health check.
#[derive(Clone, PartialEq, Message)]
pub struct CheckRecord {
    /// `tcp`, `http` or `grpc`.
    #[prost(string, tag = "1")]
    pub kind: String,
    /// HTTP path.
    #[prost(string, tag = "2")]
    pub http_path: String,
    /// Expected HTTP status; 0 for any 2xx.
    #[prost(uint32, tag = "3")]
    pub http_status: u32,
    /// gRPC health service name ("" for the whole server).
    #[prost(string, tag = "4")]
    pub grpc_service: String,
    /// Name of the endpoint probed.
    #[prost(string, tag = "5")]
    pub endpoint: String,
    /// Probe interval, milliseconds.
    #[prost(uint32, tag = "6")]
    pub interval_ms: u32,
    /// Probe timeout, milliseconds.
    #[prost(uint32, tag = "7")]
    pub timeout_ms: u32,
    /// Consecutive failures that make the instance unhealthy.
    #[prost(uint32, tag = "8")]
    pub failure_threshold: u32,
    /// Consecutive successes that make it healthy again.
    #[prost(uint32, tag = "9")]
    pub success_threshold: u32,
}

/// Stored form of a service instance.
#[derive(Clone, PartialEq, Message)]
pub struct InstanceRecord {
    /// Endpoints by name.
    #[prost(btree_map = "string, message", tag = "1")]
    pub endpoints: std::collections::BTreeMap<String, EndpointRecord>,
    /// Free-form metadata.
    #[prost(btree_map = "string, string", tag = "2")]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Load-balancing weight.
    #[prost(uint32, tag = "3")]
    pub weight: u32,
    /// Version of the software.
    #[prost(string, tag = "4")]
    pub version: String,
    /// Persistent (probed, stays until deregistered) rather than ephemeral
    /// (lease-bound).
    #[prost(bool, tag = "5")]
    pub persistent: bool,
    /// Lease TTL an ephemeral instance was registered with.
    #[prost(int64, tag = "6")]
    pub ttl_seconds: i64,
    /// Active check of a persistent instance.
    #[prost(message, optional, tag = "7")]
    pub check: Option<CheckRecord>,
    /// Listed but not routable.
    #[prost(bool, tag = "8")]
    pub draining: bool,
    /// Wall-clock time of the (last) registration, Unix milliseconds.
    #[prost(int64, tag = "9")]
    pub registered_at_unix_ms: i64,
}

/// Stored verdict of the active checks of a persistent instance.
#[derive(Clone, PartialEq, Message)]
pub struct HealthRecord {
    /// Healthy (routable) or not.
    #[prost(bool, tag = "1")]
    pub healthy: bool,
    /// Last probe failure, for operators.
    #[prost(string, tag = "2")]
    pub detail: String,
    /// When the verdict last changed, Unix milliseconds.
    #[prost(int64, tag = "3")]
    pub since_unix_ms: i64,
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

/// Key of a service instance.
pub fn instance_key(project: &str, tenant: &str, service: &str, id: &str) -> Vec<u8> {
    format!("i/{project}/{tenant}/{service}/{id}").into_bytes()
}

/// Prefix of every instance in a tenant.
pub fn instances_prefix(project: &str, tenant: &str) -> Vec<u8> {
    format!("i/{project}/{tenant}/").into_bytes()
}

/// Key of the health verdict of a service instance.
pub fn health_key(project: &str, tenant: &str, service: &str, id: &str) -> Vec<u8> {
    format!("ih/{project}/{tenant}/{service}/{id}").into_bytes()
}

/// Prefix of every health verdict in a tenant.
pub fn healths_prefix(project: &str, tenant: &str) -> Vec<u8> {
    format!("ih/{project}/{tenant}/").into_bytes()
}

/// Prefix of a tenant's count guards (see `limits.rs`).
pub fn guards_prefix(project: &str, tenant: &str) -> Vec<u8> {
    format!("q/{project}/{tenant}/").into_bytes()
}

/// Every prefix holding objects of a tenant (its own key aside): what
/// deleting the tenant deletes.
pub fn tenant_prefixes(project: &str, tenant: &str) -> [Vec<u8>; 5] {
    [
        layers_prefix(project, tenant),
        history_prefix(project, tenant),
        instances_prefix(project, tenant),
        healths_prefix(project, tenant),
        guards_prefix(project, tenant),
    ]
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
    /// `i/{project}/{tenant}/{service}/{id}`
    Instance {
        /// Project.
        project: &'a str,
        /// Tenant.
        tenant: &'a str,
        /// Service.
        service: &'a str,
        /// Instance id.
        id: &'a str,
    },
    /// `ih/{project}/{tenant}/{service}/{id}`
    Health {
        /// Project.
        project: &'a str,
        /// Tenant.
        tenant: &'a str,
        /// Service.
        service: &'a str,
        /// Instance id.
        id: &'a str,
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
        "i" | "ih" => {
            let mut parts = rest.splitn(4, '/');
            let (project, tenant, service, id) =
                (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
            if id.is_empty() || id.contains('/') {
                return None;
            }
            Some(if kind == "i" {
                Parsed::Instance {
                    project,
                    tenant,
                    service,
                    id,
                }
            } else {
                Parsed::Health {
                    project,
                    tenant,
                    service,
                    id,
                }
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
        assert_eq!(
            parse(&instance_key("vega", "feat-1", "matchmaker", "mm-1")),
            Some(Parsed::Instance {
                project: "vega",
                tenant: "feat-1",
                service: "matchmaker",
                id: "mm-1"
            })
        );
        assert_eq!(
            parse(&health_key("vega", "feat-1", "matchmaker", "mm-1")),
            Some(Parsed::Health {
                project: "vega",
                tenant: "feat-1",
                service: "matchmaker",
                id: "mm-1"
            })
        );
        for prefix in tenant_prefixes("vega", "feat-1") {
            assert!(!prefix.is_empty());
        }
        assert!(instance_key("p", "t", "s", "i").starts_with(&instances_prefix("p", "t")));
        assert!(health_key("p", "t", "s", "i").starts_with(&healths_prefix("p", "t")));
        assert_eq!(parse(b"x/whatever"), None);
        assert!(layer_key("p", "t", "k").starts_with(&layers_prefix("p", "t")));
    }
}
