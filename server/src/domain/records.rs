//! The stored forms of Strata's domain objects (protobuf messages): what a
//! tenant, a config layer and its history versions, a service instance and
//! its probe verdict are in the store. `keyspace.rs` says under which keys
//! they live.

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
    /// `tcp`, `http`, `grpc` or `udp`.
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
    /// UDP: the datagram sent.
    #[prost(bytes = "vec", tag = "10")]
    pub udp_send: Vec<u8>,
    /// UDP: the reply expected, byte for byte (empty: see `udp_expect_regex`).
    #[prost(bytes = "vec", tag = "11")]
    pub udp_expect: Vec<u8>,
    /// UDP: a regular expression the reply must match (empty: any reply, or
    /// `udp_expect`).
    #[prost(string, tag = "12")]
    pub udp_expect_regex: String,
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
