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
//! | `q/{project}`, `q/{project}/{tenant}/{c,i}` | empty: count guards (`app::limits`) |
//! | `audit/{hour}/{unix_ms}-{nonce}` | audit entry (`app::audit`; not a domain key) |
//! | `a/tokens/{id}` | token record: name, role, scope, secret hash (`app::tokens`; not a domain key) |
//! | `a/bootstrap` | id of the admin token of first start (created once per store) |
//!
//! Project and tenant names cannot contain `/` (they are DNS labels), so the
//! first two segments after the type letter always parse unambiguously and
//! the rest of a `c/` key is the config key. Config keys cannot contain `@`,
//! so the last `@` of an `h/` key starts its version number; the number is
//! zero-padded so a prefix range lists versions in order.

pub use crate::domain::records::{
    CheckRecord, EndpointRecord, HealthRecord, InstanceRecord, LayerRecord, TenantRecord,
    VersionRecord,
};

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

/// Prefix of a tenant's count guards (see `app::limits`).
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
