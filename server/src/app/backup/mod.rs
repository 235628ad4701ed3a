//! Backup and restore: the `strata-backup` file format, consistent export,
//! and all-or-nothing import (docs/backup.md).
//!
//! **Format** (version [`FORMAT_VERSION`]): JSON lines. The first line is a
//! [`Header`] (format name and version, source revision, projects, creation
//! time); then one line per tenant (parents before children), config layer,
//! history version and persistent service instance; the last line is an
//! `end` record with the number of records and a checksum of every byte
//! before it, so a truncated or altered file is refused as a whole.
//!
//! **Export** reads one revision: tenants, layers and instances come from
//! the view as it stood at revision R; history versions are read from the
//! store and kept only if they existed at R (a version key is written once
//! and never changed, so `create_revision <= R` plus "every version the view
//! listed at R is present" proves the set is the one at R; otherwise the
//! export is retried).
//!
//! **Import** validates the whole file first, then *stages* history versions
//! and layers (one transaction per source revision, in source order, so each
//! version gets its own new revision and versions keep their order), then
//! persistent instances, and finally writes every tenant record in one
//! transaction guarded by "tenant absent" — the *flip*. Layers, versions and
//! instances of a tenant that does not exist are invisible through every
//! API (reads, resolution and history all start from the tenant), so the
//! imported projects appear complete at the flip revision or not at all. If
//! anything fails before the flip, the staged keys are deleted again.
//!
//! Ephemeral (lease-bound) instances are not backed up: their owners keep
//! them alive and register again when their lease is gone, and a restored
//! copy would either outlive its process or expire within one TTL. Probe
//! verdicts are not backed up either; the daemon probes again.

// Consistent export: one revision, streamed in chunks.
mod export;
// All-or-nothing import: stage, then flip.
mod import;
// Reading and checking a whole backup file before anything is written.
mod parse;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prost::Message;
use serde::{Deserialize, Serialize};
use strata_proto::v1::ErrorReason;

use crate::app::api::{Api, NewTenant, PutLayer, invalid, name_error};
use crate::domain::document::{Format, Mode};
use crate::domain::{names, registry};
use crate::error::ApiError;
use crate::state::keyspace::{
    self, CheckRecord, EndpointRecord, InstanceRecord, LayerRecord, TenantRecord, VersionRecord,
};
use crate::state::view::{MAX_CHAIN, ProjectView};
use crate::store::{Compare, KeyRange, Revision, Txn, unix_now_ms};

pub use export::*;
pub use import::*;
pub use parse::*;

/// Name in the header's `format` field.
pub const FORMAT_NAME: &str = "strata-backup";

/// Version of the file format this daemon writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Largest backup file an import accepts (it is held in memory while it is
/// validated).
pub const MAX_IMPORT_BYTES: usize = 256 * 1024 * 1024;

/// Size of the chunks an export is streamed in.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// Most puts in one staging transaction (etcd refuses more than 128
/// operations per transaction; compares count separately).
const MAX_PUTS_PER_TXN: usize = 100;

/// How often an export re-reads when history changed under it.
const EXPORT_ATTEMPTS: usize = 5;

/// First line of a backup file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Format version; readers refuse versions they do not know.
    pub version: u32,
    /// The store revision the snapshot shows.
    pub source_revision: Revision,
    /// Projects in the file.
    pub projects: Vec<String>,
    /// When the export was taken, Unix milliseconds.
    pub created_at_unix_ms: i64,
    /// The same, RFC 3339 (for people).
    pub created_at: String,
    /// Backend of the source store.
    #[serde(default)]
    pub store: String,
    /// Version of the stratad that wrote the file.
    #[serde(default)]
    pub stratad_version: String,
}

/// A value's bytes: UTF-8 text as `value`, anything else as `value_hex`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Bytes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_hex: Option<String>,
}

impl Bytes {
    fn new(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => Self {
                value: Some(text.to_owned()),
                value_hex: None,
            },
            Err(_) => Self {
                value: None,
                value_hex: Some(crate::domain::hex::encode(bytes)),
            },
        }
    }

    fn decode(&self) -> Result<Vec<u8>, String> {
        match (&self.value, &self.value_hex) {
            (Some(_), Some(_)) => Err("both value and value_hex are set".into()),
            (Some(text), None) => Ok(text.as_bytes().to_vec()),
            (None, Some(hex)) => {
                crate::domain::hex::decode(hex).map_err(|e| format!("value_hex {e}"))
            }
            (None, None) => Ok(Vec::new()),
        }
    }
}

/// A layer's content in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LayerData {
    format: String,
    mode: String,
    #[serde(flatten)]
    bytes: Bytes,
}

impl LayerData {
    fn new(record: &LayerRecord) -> Self {
        Self {
            format: record.format.clone(),
            mode: record.mode.clone(),
            bytes: Bytes::new(&record.value),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct EndpointLine {
    address: String,
    protocol: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CheckLine {
    kind: String,
    #[serde(default)]
    http_path: String,
    #[serde(default)]
    http_status: u32,
    #[serde(default)]
    grpc_service: String,
    #[serde(default)]
    endpoint: String,
    interval_ms: u32,
    timeout_ms: u32,
    failure_threshold: u32,
    success_threshold: u32,
    /// UDP checks: the datagram, the expected reply (hex), the expression.
    /// Absent for other kinds, so their lines are as before.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    udp_send_hex: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    udp_expect_hex: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    udp_expect_regex: String,
}

/// One line after the header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Record {
    Tenant {
        project: String,
        name: String,
        #[serde(default)]
        parent: String,
        #[serde(default)]
        labels: BTreeMap<String, String>,
        #[serde(default)]
        ttl_seconds: i64,
        #[serde(default)]
        expires_at_unix_ms: i64,
        #[serde(default)]
        strict: bool,
        #[serde(default)]
        protected: bool,
        revision: Revision,
    },
    Layer {
        project: String,
        tenant: String,
        key: String,
        revision: Revision,
        #[serde(flatten)]
        layer: LayerData,
    },
    Version {
        project: String,
        tenant: String,
        key: String,
        seq: u64,
        revision: Revision,
        written_at_unix_ms: i64,
        #[serde(default)]
        restored_from: Revision,
        /// `null`: this version removed the layer.
        layer: Option<LayerData>,
    },
    Instance {
        project: String,
        tenant: String,
        service: String,
        id: String,
        endpoints: BTreeMap<String, EndpointLine>,
        #[serde(default)]
        metadata: BTreeMap<String, String>,
        weight: u32,
        #[serde(default)]
        version: String,
        #[serde(default)]
        check: Option<CheckLine>,
        #[serde(default)]
        draining: bool,
        #[serde(default)]
        registered_at_unix_ms: i64,
    },
    End {
        records: u64,
        checksum: String,
    },
}

/// 64-bit FNV-1a: detects truncation and accidental damage (not tampering).
#[derive(Debug, Clone, Copy)]
struct Checksum(u64);

impl Checksum {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn render(self) -> String {
        format!("fnv1a64:{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_text_and_binary() {
        for value in [b"a: 1\n".to_vec(), vec![0, 159, 146, 150, 255]] {
            let encoded = Bytes::new(&value);
            assert_eq!(encoded.decode(), Ok(value));
        }
        assert!(Bytes::new(&[0xff]).value_hex.is_some());
        assert!(
            Bytes {
                value: None,
                value_hex: Some("abc".into())
            }
            .decode()
            .is_err()
        );
        assert!(
            Bytes {
                value: None,
                value_hex: Some("zz".into())
            }
            .decode()
            .is_err()
        );
    }

    #[test]
    fn revisions_map_to_the_version_restored_or_the_one_before() {
        let landed = [(10, 3), (20, 4), (30, 7)];
        assert_eq!(map_revision(&landed, 20), 4);
        assert_eq!(map_revision(&landed, 25), 4);
        assert_eq!(map_revision(&landed, 5), 2);
    }

    #[test]
    fn records_round_trip_through_json() {
        let record = Record::Version {
            project: "vega".into(),
            tenant: "integration".into(),
            key: "a.json".into(),
            seq: 2,
            revision: 7,
            written_at_unix_ms: 1,
            restored_from: 0,
            layer: Some(LayerData {
                format: "json".into(),
                mode: "merge".into(),
                bytes: Bytes::new(b"{\"a\":1}"),
            }),
        };
        let line = serde_json::to_string(&record).unwrap_or_default();
        assert!(line.contains("\"kind\":\"version\""), "{line}");
        let back: Record = serde_json::from_str(&line).unwrap_or(Record::End {
            records: 0,
            checksum: String::new(),
        });
        assert_eq!(back, record);
    }
}
