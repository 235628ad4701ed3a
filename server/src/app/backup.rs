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
                value_hex: Some(bytes.iter().map(|b| format!("{b:02x}")).collect()),
            },
        }
    }

    fn decode(&self) -> Result<Vec<u8>, String> {
        match (&self.value, &self.value_hex) {
            (Some(_), Some(_)) => Err("both value and value_hex are set".into()),
            (Some(text), None) => Ok(text.as_bytes().to_vec()),
            (None, Some(hex)) => decode_hex(hex),
            (None, None) => Ok(Vec::new()),
        }
    }
}

fn decode_hex(hex: &str) -> Result<Vec<u8>, String> {
    if !hex.len().is_multiple_of(2) {
        return Err("value_hex has an odd number of digits".into());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| "value_hex holds a non-hex digit".to_owned())
        })
        .collect()
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

/// What to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// One project.
    Project(String),
    /// Every project.
    All,
}

/// A version read from the store.
#[derive(Debug, Clone)]
struct StoredVersion {
    revision: Revision,
    record: VersionRecord,
}

/// The kept versions of each layer of one project: by (tenant, key), then seq.
type ProjectVersions = BTreeMap<(String, String), BTreeMap<u64, StoredVersion>>;

/// Everything an export writes, as of one revision.
#[derive(Debug)]
pub struct Snapshot {
    revision: Revision,
    store: &'static str,
    projects: Vec<(String, ProjectView)>,
    /// By project, then (tenant, key), then seq.
    versions: BTreeMap<String, ProjectVersions>,
}

impl Snapshot {
    /// The revision the snapshot shows.
    pub fn revision(&self) -> Revision {
        self.revision
    }
}

/// Reads a consistent snapshot of the selected projects (see the module
/// documentation for why it is consistent).
pub async fn snapshot(api: &Api, selection: &Selection) -> Result<Snapshot, ApiError> {
    if let Selection::Project(p) = selection {
        names::validate_project(p).map_err(name_error)?;
    }
    for _ in 0..EXPORT_ATTEMPTS {
        let (revision, projects) = {
            let state = api.view.read();
            let projects: Vec<(String, ProjectView)> = state
                .projects
                .iter()
                .filter(|(name, p)| {
                    !p.tenants.is_empty()
                        && match selection {
                            Selection::All => true,
                            Selection::Project(wanted) => *name == wanted,
                        }
                })
                .map(|(name, p)| (name.clone(), p.clone()))
                .collect();
            (state.revision, projects)
        };
        if let Selection::Project(p) = selection
            && projects.is_empty()
        {
            return Err(ApiError::new(
                ErrorReason::NotFound,
                format!("project {p:?} has no tenants; nothing to export"),
            ));
        }
        let mut versions = BTreeMap::new();
        let mut complete = true;
        for (name, view) in &projects {
            let range = api
                .store
                .range(KeyRange::Prefix(format!("h/{name}/").into_bytes()))
                .await?;
            let mut by_layer = ProjectVersions::new();
            for kv in &range.kvs {
                let Some(keyspace::Parsed::Version {
                    tenant, key, seq, ..
                }) = keyspace::parse(&kv.key)
                else {
                    continue;
                };
                if kv.create_revision > revision || !view.tenants.contains_key(tenant) {
                    continue;
                }
                let record = VersionRecord::decode(kv.value.as_slice()).map_err(|e| {
                    ApiError::new(
                        ErrorReason::Internal,
                        format!("a stored version of {key:?} in {tenant:?} does not decode: {e}"),
                    )
                })?;
                by_layer
                    .entry((tenant.to_owned(), key.to_owned()))
                    .or_default()
                    .insert(
                        seq,
                        StoredVersion {
                            revision: kv.create_revision,
                            record,
                        },
                    );
            }
            // Every version the view listed at the snapshot revision must
            // still be there; one pruned since makes us read again.
            'check: for (tenant, keys) in &view.history {
                if !view.tenants.contains_key(tenant) {
                    continue;
                }
                for (key, span) in keys {
                    let held = by_layer.get(&(tenant.clone(), key.clone()));
                    if (span.first..=span.last)
                        .any(|seq| held.is_none_or(|h| !h.contains_key(&seq)))
                    {
                        complete = false;
                        break 'check;
                    }
                }
            }
            // Versions written after the snapshot for keys the view did not
            // know yet were filtered by revision already; drop seqs outside
            // the spans (a layer re-created after R) the same way.
            by_layer.retain(|(tenant, key), seqs| {
                let Some(span) = view.versions(tenant, key) else {
                    return false;
                };
                seqs.retain(|seq, _| (span.first..=span.last).contains(seq));
                !seqs.is_empty()
            });
            versions.insert(name.clone(), by_layer);
            if !complete {
                break;
            }
        }
        if complete {
            return Ok(Snapshot {
                revision,
                store: api.store.kind(),
                projects,
                versions,
            });
        }
    }
    Err(ApiError::new(
        ErrorReason::Unavailable,
        "config history kept changing while the export read it; retry",
    ))
}

/// Writes a snapshot in the backup format, handing out chunks of about
/// [`CHUNK_BYTES`] to `emit` (which returns false to stop early).
pub fn encode(snapshot: &Snapshot, mut emit: impl FnMut(Vec<u8>) -> bool) -> Result<(), ApiError> {
    let created = unix_now_ms();
    let header = Header {
        format: FORMAT_NAME.to_owned(),
        version: FORMAT_VERSION,
        source_revision: snapshot.revision,
        projects: snapshot.projects.iter().map(|(n, _)| n.clone()).collect(),
        created_at_unix_ms: created,
        created_at: humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH
                + std::time::Duration::from_millis(u64::try_from(created).unwrap_or(0)),
        )
        .to_string(),
        store: snapshot.store.to_owned(),
        stratad_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let mut out = Writer {
        buf: Vec::with_capacity(CHUNK_BYTES * 2),
        checksum: Checksum::new(),
        records: 0,
        emit: &mut emit,
        stopped: false,
    };
    out.line(&header)?;
    for (project, view) in &snapshot.projects {
        for tenant in tenants_in_order(view) {
            let Some(entry) = view.tenants.get(tenant) else {
                continue;
            };
            let r = &entry.record;
            out.record(&Record::Tenant {
                project: project.clone(),
                name: tenant.to_owned(),
                parent: r.parent.clone(),
                labels: r
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                ttl_seconds: r.ttl_seconds,
                expires_at_unix_ms: r.expires_at_unix_ms,
                strict: r.strict,
                protected: r.protected,
                revision: entry.mod_revision,
            })?;
        }
        for (tenant, layers) in &view.layers {
            if !view.tenants.contains_key(tenant) {
                continue;
            }
            for (key, layer) in layers {
                out.record(&Record::Layer {
                    project: project.clone(),
                    tenant: tenant.clone(),
                    key: key.clone(),
                    revision: layer.mod_revision,
                    layer: LayerData::new(&LayerRecord::new(
                        layer.value.to_vec(),
                        layer.format,
                        layer.mode,
                    )),
                })?;
            }
        }
        if let Some(versions) = snapshot.versions.get(project) {
            for ((tenant, key), seqs) in versions {
                for (seq, v) in seqs {
                    out.record(&Record::Version {
                        project: project.clone(),
                        tenant: tenant.clone(),
                        key: key.clone(),
                        seq: *seq,
                        revision: v.revision,
                        written_at_unix_ms: v.record.written_at_unix_ms,
                        restored_from: v.record.restored_from,
                        layer: v.record.layer.as_ref().map(LayerData::new),
                    })?;
                }
            }
        }
        for (tenant, services) in &view.instances {
            if !view.tenants.contains_key(tenant) {
                continue;
            }
            for (service, instances) in services {
                for (id, instance) in instances {
                    if instance.record.persistent {
                        out.record(&instance_line(
                            project,
                            tenant,
                            service,
                            id,
                            &instance.record,
                        ))?;
                    }
                }
            }
        }
    }
    let end = Record::End {
        records: out.records,
        checksum: out.checksum.render(),
    };
    out.line(&end)?;
    out.flush(true);
    Ok(())
}

struct Writer<'a, F: FnMut(Vec<u8>) -> bool> {
    buf: Vec<u8>,
    checksum: Checksum,
    records: u64,
    emit: &'a mut F,
    stopped: bool,
}

impl<F: FnMut(Vec<u8>) -> bool> Writer<'_, F> {
    fn line(&mut self, value: &impl Serialize) -> Result<(), ApiError> {
        let start = self.buf.len();
        serde_json::to_writer(&mut self.buf, value).map_err(|e| {
            ApiError::new(
                ErrorReason::Internal,
                format!("cannot encode a record: {e}"),
            )
        })?;
        self.buf.push(b'\n');
        self.checksum.update(&self.buf[start..]);
        self.flush(false);
        Ok(())
    }

    fn record(&mut self, record: &Record) -> Result<(), ApiError> {
        self.records += 1;
        self.line(record)
    }

    fn flush(&mut self, last: bool) {
        if self.stopped || (self.buf.len() < CHUNK_BYTES && !last) || self.buf.is_empty() {
            return;
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES * 2));
        if !(self.emit)(chunk) {
            self.stopped = true;
        }
    }
}

fn instance_line(
    project: &str,
    tenant: &str,
    service: &str,
    id: &str,
    r: &InstanceRecord,
) -> Record {
    Record::Instance {
        project: project.to_owned(),
        tenant: tenant.to_owned(),
        service: service.to_owned(),
        id: id.to_owned(),
        endpoints: r
            .endpoints
            .iter()
            .map(|(name, e)| {
                (
                    name.clone(),
                    EndpointLine {
                        address: e.address.clone(),
                        protocol: e.protocol.clone(),
                    },
                )
            })
            .collect(),
        metadata: r.metadata.clone(),
        weight: r.weight,
        version: r.version.clone(),
        check: r.check.as_ref().map(|c| CheckLine {
            kind: c.kind.clone(),
            http_path: c.http_path.clone(),
            http_status: c.http_status,
            grpc_service: c.grpc_service.clone(),
            endpoint: c.endpoint.clone(),
            interval_ms: c.interval_ms,
            timeout_ms: c.timeout_ms,
            failure_threshold: c.failure_threshold,
            success_threshold: c.success_threshold,
        }),
        draining: r.draining,
        registered_at_unix_ms: r.registered_at_unix_ms,
    }
}

/// A project's tenants, parents before children (roots by name).
fn tenants_in_order(view: &ProjectView) -> Vec<&str> {
    let mut out = Vec::new();
    for (name, entry) in &view.tenants {
        if entry.record.parent.is_empty() || !view.tenants.contains_key(&entry.record.parent) {
            out.extend(view.subtree(name));
        }
    }
    out
}

/// One history version to restore.
#[derive(Debug, Clone)]
struct VersionIn {
    source_revision: Revision,
    written_at_unix_ms: i64,
    restored_from: Revision,
    layer: Option<LayerRecord>,
}

/// One project of a validated backup.
#[derive(Debug, Clone, Default)]
pub struct ProjectIn {
    /// Name in the file.
    source_name: String,
    /// Tenants in file order (parents before children).
    tenants: Vec<(String, TenantRecord)>,
    /// Layers with their source mod revision, by (tenant, key).
    layers: BTreeMap<(String, String), (LayerRecord, Revision)>,
    /// History by (tenant, key), then seq.
    versions: BTreeMap<(String, String), BTreeMap<u64, VersionIn>>,
    /// Persistent instances by (tenant, service, id).
    instances: BTreeMap<(String, String, String), InstanceRecord>,
}

impl ProjectIn {
    /// Tenant names, parents before children.
    pub fn tenant_names(&self) -> Vec<String> {
        self.tenants.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Name in the backup file.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Number of layers.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Number of history versions.
    pub fn version_count(&self) -> usize {
        self.versions.values().map(BTreeMap::len).sum()
    }

    /// Number of persistent instances.
    pub fn instance_count(&self) -> usize {
        self.instances.len()
    }
}

/// A backup file, parsed and validated, with its projects under the names
/// they will be imported as.
#[derive(Debug, Clone)]
pub struct Backup {
    /// The file's header.
    pub header: Header,
    /// Projects by target name.
    pub projects: BTreeMap<String, ProjectIn>,
}

fn bad(line: usize, message: impl std::fmt::Display) -> ApiError {
    invalid(format!(
        "backup file line {line}: {message}; nothing was imported"
    ))
}

/// Parses and validates a whole backup file. `rename_to` imports the file's
/// single project under another name. Nothing is written.
pub fn parse(api: &Api, bytes: &[u8], rename_to: Option<&str>) -> Result<Backup, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        invalid(format!(
            "backup file is not UTF-8 ({e}); nothing was imported"
        ))
    })?;
    let mut lines = text.split_inclusive('\n').enumerate();
    let (_, first) = lines
        .next()
        .ok_or_else(|| invalid("backup file is empty; nothing was imported"))?;
    let header: Header = serde_json::from_str(first)
        .map_err(|e| bad(1, format!("not a strata-backup header ({e})")))?;
    if header.format != FORMAT_NAME {
        return Err(bad(
            1,
            format!("format {:?} is not {FORMAT_NAME:?}", header.format),
        ));
    }
    if header.version != FORMAT_VERSION {
        return Err(bad(
            1,
            format!(
                "format version {} is not supported; this stratad reads version {FORMAT_VERSION}",
                header.version
            ),
        ));
    }
    let mut checksum = Checksum::new();
    checksum.update(first.as_bytes());
    let listed: BTreeSet<&str> = header.projects.iter().map(String::as_str).collect();
    for p in &listed {
        names::validate_project(p).map_err(|e| bad(1, e))?;
    }
    let target =
        |source: &str| -> String { rename_to.map_or_else(|| source.to_owned(), str::to_owned) };
    if let Some(new) = rename_to {
        names::validate_project(new).map_err(name_error)?;
        if header.projects.len() != 1 {
            return Err(invalid(format!(
                "the backup holds {} projects; renaming on import needs exactly one",
                header.projects.len()
            )));
        }
    }
    let mut projects: BTreeMap<String, ProjectIn> = header
        .projects
        .iter()
        .map(|p| {
            (
                target(p),
                ProjectIn {
                    source_name: p.clone(),
                    ..ProjectIn::default()
                },
            )
        })
        .collect();
    let mut records = 0u64;
    let mut ended = false;
    for (index, line) in lines {
        let n = index + 1;
        if ended {
            if line.trim().is_empty() {
                continue;
            }
            return Err(bad(n, "data after the end record"));
        }
        if !line.ends_with('\n') {
            return Err(bad(n, "the line is cut off (truncated file)"));
        }
        let record: Record =
            serde_json::from_str(line).map_err(|e| bad(n, format!("not a valid record ({e})")))?;
        if let Record::End {
            records: count,
            checksum: sum,
        } = &record
        {
            if *count != records {
                return Err(bad(
                    n,
                    format!("the end record counts {count} records, the file holds {records}"),
                ));
            }
            if *sum != checksum.render() {
                return Err(bad(
                    n,
                    "checksum mismatch: the file was altered or damaged".to_owned(),
                ));
            }
            ended = true;
            continue;
        }
        checksum.update(line.as_bytes());
        records += 1;
        let project = match &record {
            Record::Tenant { project, .. }
            | Record::Layer { project, .. }
            | Record::Version { project, .. }
            | Record::Instance { project, .. } => project.clone(),
            Record::End { .. } => continue,
        };
        if !listed.contains(project.as_str()) {
            return Err(bad(
                n,
                format!("project {project:?} is not listed in the header"),
            ));
        }
        let target_name = target(&project);
        let p = projects
            .get_mut(&target_name)
            .ok_or_else(|| bad(n, "project missing"))?;
        add_record(api, &target_name, p, record).map_err(|e| bad(n, e.message))?;
    }
    if !ended {
        return Err(invalid(
            "backup file has no end record (truncated file); nothing was imported",
        ));
    }
    for (name, p) in &projects {
        check_project(name, p)?;
        check_counts(api, name, p)?;
    }
    Ok(Backup { header, projects })
}

fn layer_in(
    api: &Api,
    project: &str,
    tenant: &str,
    key: &str,
    data: &LayerData,
) -> Result<LayerRecord, ApiError> {
    let format: Format = data
        .format
        .parse()
        .map_err(|e: crate::domain::document::DocumentError| invalid(e.to_string()))?;
    let mode: Mode = data
        .mode
        .parse()
        .map_err(|e: crate::domain::document::DocumentError| invalid(e.to_string()))?;
    let value = data.bytes.decode().map_err(invalid)?;
    api.layer_record(&PutLayer {
        project: project.to_owned(),
        tenant: tenant.to_owned(),
        key: key.to_owned(),
        value,
        format: Some(format),
        mode,
        expected_revision: None,
    })
    .map_err(|e| e.prefixed(&format!("key {key:?} of tenant {tenant:?}: ")))
}

fn add_record(api: &Api, project: &str, p: &mut ProjectIn, record: Record) -> Result<(), ApiError> {
    let known = |p: &ProjectIn, tenant: &str| -> Result<(), ApiError> {
        if p.tenants.iter().any(|(n, _)| n == tenant) {
            Ok(())
        } else {
            Err(invalid(format!(
                "tenant {tenant:?} is not defined before its records"
            )))
        }
    };
    match record {
        Record::Tenant {
            name,
            parent,
            labels,
            ttl_seconds,
            expires_at_unix_ms,
            strict,
            protected,
            ..
        } => {
            if p.tenants.iter().any(|(n, _)| *n == name) {
                return Err(invalid(format!("tenant {name:?} appears twice")));
            }
            if !parent.is_empty() {
                known(p, &parent).map_err(|_| {
                    invalid(format!(
                        "tenant {name:?}: parent {parent:?} must appear before it"
                    ))
                })?;
            }
            let mut record = api.new_tenant_record(&NewTenant {
                project: project.to_owned(),
                name: name.clone(),
                parent,
                labels: labels.into_iter().collect::<HashMap<_, _>>(),
                ttl_seconds,
                strict,
                protected,
            })?;
            // The recorded expiry, not one counted from now (a file without
            // one counts the TTL from the import).
            if ttl_seconds > 0 && expires_at_unix_ms > 0 {
                record.expires_at_unix_ms = expires_at_unix_ms;
            }
            p.tenants.push((name, record));
        }
        Record::Layer {
            tenant,
            key,
            revision,
            layer,
            ..
        } => {
            known(p, &tenant)?;
            let record = layer_in(api, project, &tenant, &key, &layer)?;
            if revision <= 0 {
                return Err(invalid(format!("key {key:?}: revision must be positive")));
            }
            if p.layers
                .insert((tenant.clone(), key.clone()), (record, revision))
                .is_some()
            {
                return Err(invalid(format!(
                    "layer {key:?} of tenant {tenant:?} appears twice"
                )));
            }
        }
        Record::Version {
            tenant,
            key,
            seq,
            revision,
            written_at_unix_ms,
            restored_from,
            layer,
            ..
        } => {
            known(p, &tenant)?;
            names::validate_key(&key).map_err(name_error)?;
            if seq == 0 || revision <= 0 || restored_from < 0 {
                return Err(invalid(format!(
                    "version of {key:?}: seq and revision must be positive"
                )));
            }
            let layer = layer
                .map(|l| layer_in(api, project, &tenant, &key, &l))
                .transpose()?;
            let seqs = p.versions.entry((tenant.clone(), key.clone())).or_default();
            if seqs
                .insert(
                    seq,
                    VersionIn {
                        source_revision: revision,
                        written_at_unix_ms,
                        restored_from,
                        layer,
                    },
                )
                .is_some()
            {
                return Err(invalid(format!(
                    "version {seq} of {key:?} in tenant {tenant:?} appears twice"
                )));
            }
        }
        Record::Instance {
            tenant,
            service,
            id,
            endpoints,
            metadata,
            weight,
            version,
            check,
            draining,
            registered_at_unix_ms,
            ..
        } => {
            known(p, &tenant)?;
            names::validate_service(&service).map_err(name_error)?;
            names::validate_id("instance id", &id).map_err(name_error)?;
            if endpoints.is_empty() {
                return Err(invalid(format!("instance {id:?} has no endpoints")));
            }
            let limits = &api.limits.registration;
            let metadata_bytes: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
            if metadata_bytes > limits.max_metadata_bytes {
                return Err(ApiError::new(
                    ErrorReason::LimitExceeded,
                    format!("instance {id:?}: metadata exceeds the limit"),
                ));
            }
            let mut stored = BTreeMap::new();
            for (name, e) in endpoints {
                names::validate_id("endpoint name", &name).map_err(name_error)?;
                registry::validate_address(&e.address).map_err(|e| invalid(e.to_string()))?;
                if !matches!(e.protocol.as_str(), "http" | "grpc" | "tcp" | "udp") {
                    return Err(invalid(format!(
                        "instance {id:?}: protocol {:?} is not http, grpc, tcp or udp",
                        e.protocol
                    )));
                }
                stored.insert(
                    name,
                    EndpointRecord {
                        address: e.address,
                        protocol: e.protocol,
                    },
                );
            }
            let check = match check {
                None => None,
                Some(c) => {
                    if !matches!(c.kind.as_str(), "tcp" | "http" | "grpc") {
                        return Err(invalid(format!(
                            "instance {id:?}: check kind {:?} is not tcp, http or grpc",
                            c.kind
                        )));
                    }
                    if c.interval_ms == 0 || c.timeout_ms == 0 {
                        return Err(invalid(format!(
                            "instance {id:?}: check interval and timeout must be positive"
                        )));
                    }
                    Some(CheckRecord {
                        kind: c.kind,
                        http_path: c.http_path,
                        http_status: c.http_status,
                        grpc_service: c.grpc_service,
                        endpoint: c.endpoint,
                        interval_ms: c.interval_ms,
                        timeout_ms: c.timeout_ms,
                        failure_threshold: c.failure_threshold.max(1),
                        success_threshold: c.success_threshold.max(1),
                    })
                }
            };
            let record = InstanceRecord {
                endpoints: stored,
                metadata,
                weight,
                version,
                persistent: true,
                ttl_seconds: 0,
                check,
                draining,
                registered_at_unix_ms,
            };
            crate::app::registry::validate_imported(&record, limits, api.probe_policy())
                .map_err(|e| e.prefixed(&format!("instance {id:?}: ")))?;
            if p.instances
                .insert((tenant, service, id.clone()), record)
                .is_some()
            {
                return Err(invalid(format!("instance {id:?} appears twice")));
            }
        }
        Record::End { .. } => {}
    }
    Ok(())
}

/// Whole-project rules: chains not deeper than [`MAX_CHAIN`], history in
/// order.
fn check_project(name: &str, p: &ProjectIn) -> Result<(), ApiError> {
    let parents: HashMap<&str, &str> = p
        .tenants
        .iter()
        .map(|(n, r)| (n.as_str(), r.parent.as_str()))
        .collect();
    for (tenant, _) in &p.tenants {
        let mut depth = 1;
        let mut current = tenant.as_str();
        while let Some(parent) = parents.get(current).filter(|p| !p.is_empty()) {
            depth += 1;
            current = parent;
            if depth > MAX_CHAIN {
                return Err(invalid(format!(
                    "project {name:?}: the chain of {tenant:?} is deeper than {MAX_CHAIN}; nothing was imported"
                )));
            }
        }
    }
    for ((tenant, key), seqs) in &p.versions {
        let mut last = 0;
        for v in seqs.values() {
            if v.source_revision <= last {
                return Err(invalid(format!(
                    "project {name:?}: history of {key:?} in {tenant:?} is not in revision order; nothing was imported"
                )));
            }
            last = v.source_revision;
        }
    }
    Ok(())
}

/// The count limits a write would enforce (tenants per project, config
/// keys and instances per tenant), applied to the whole import at once.
fn check_counts(api: &Api, name: &str, p: &ProjectIn) -> Result<(), ApiError> {
    let counts = &api.limits.counts;
    let over = |what: String, count: usize, limit: usize| -> Result<(), ApiError> {
        if limit > 0 && count > limit {
            return Err(ApiError::new(
                ErrorReason::LimitExceeded,
                format!(
                    "project {name:?}: {what} has {count}; the limit is {limit}; nothing was imported"
                ),
            )
            .with("limit", limit));
        }
        Ok(())
    };
    over(
        "the project".to_owned(),
        p.tenants.len(),
        counts.max_tenants_per_project,
    )?;
    let mut layers: HashMap<&str, usize> = HashMap::new();
    for (tenant, _) in p.layers.keys() {
        *layers.entry(tenant).or_default() += 1;
    }
    for (tenant, count) in layers {
        over(
            format!("tenant {tenant:?} (config keys)"),
            count,
            counts.max_config_keys_per_tenant,
        )?;
    }
    let mut instances: HashMap<&str, usize> = HashMap::new();
    for (tenant, _, _) in p.instances.keys() {
        *instances.entry(tenant).or_default() += 1;
    }
    for (tenant, count) in instances {
        over(
            format!("tenant {tenant:?} (instances)"),
            count,
            counts.max_instances_per_tenant,
        )?;
    }
    Ok(())
}

/// Refuses when a target project already has tenants.
pub fn check_targets_absent(api: &Api, backup: &Backup) -> Result<(), ApiError> {
    let state = api.view.read();
    for name in backup.projects.keys() {
        if let Some(p) = state.projects.get(name)
            && !p.tenants.is_empty()
        {
            return Err(ApiError::new(
                ErrorReason::AlreadyExists,
                format!(
                    "project {name:?} already has tenants ({}); import restores only into a \
                     project that does not exist (use --project to import under a new name); \
                     nothing was imported",
                    p.tenants
                        .keys()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
            .with("project", name));
        }
    }
    Ok(())
}

/// Serialises imports on this daemon: two imports of the same project would
/// stage the same keys.
static IMPORT_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One staging transaction's worth of work.
#[derive(Debug)]
enum Unit {
    /// A history version, with the layer itself when this version wrote the
    /// layer as it is now.
    Version {
        project: String,
        tenant: String,
        key: String,
        seq: u64,
        version: VersionIn,
        layer: Option<LayerRecord>,
    },
    /// A layer whose current content has no version in the file.
    Layer {
        project: String,
        tenant: String,
        key: String,
        layer: LayerRecord,
    },
}

impl Unit {
    fn puts(&self) -> usize {
        match self {
            Unit::Version { layer, .. } => 1 + usize::from(layer.is_some()),
            Unit::Layer { .. } => 1,
        }
    }

    fn tenant(&self) -> (&str, &str) {
        match self {
            Unit::Version {
                project, tenant, ..
            }
            | Unit::Layer {
                project, tenant, ..
            } => (project, tenant),
        }
    }
}

/// Where each source revision of a layer's history landed.
type RevisionMap = BTreeMap<(String, String, String), Vec<(Revision, Revision)>>;

/// The new revision standing for source revision `from` in a layer's
/// history: the version written at exactly that revision, else the nearest
/// older one; before the first version, the revision just before it.
fn map_revision(landed: &[(Revision, Revision)], from: Revision) -> Revision {
    match landed.iter().rev().find(|(source, _)| *source <= from) {
        Some((_, new)) => *new,
        None => landed.first().map_or(from, |(_, new)| (new - 1).max(1)),
    }
}

/// Writes a validated backup (see the module documentation). Returns the
/// flip revision.
pub async fn import(api: &Api, backup: &Backup) -> Result<Revision, ApiError> {
    let _guard = IMPORT_LOCK.lock().await;
    check_targets_absent(api, backup)?;
    let all_tenants: Vec<(String, String)> = backup
        .projects
        .iter()
        .flat_map(|(p, data)| {
            data.tenants
                .iter()
                .map(move |(t, _)| (p.clone(), t.clone()))
        })
        .collect();
    // Leftovers of an import that died before its flip would otherwise show
    // up in the restored tenants.
    clean_staged(api, &all_tenants).await?;
    match stage(api, backup).await {
        Ok(()) => {}
        Err(e) => {
            let _ = clean_staged(api, &all_tenants).await;
            return Err(e);
        }
    }
    let mut flip = Txn::new();
    for (project, data) in &backup.projects {
        for (tenant, record) in &data.tenants {
            let key = keyspace::tenant_key(project, tenant);
            flip = flip
                .when(Compare::missing(key.clone()))
                .put(key, record.encode_to_vec());
        }
    }
    let outcome = api.store.txn(flip).await;
    match outcome {
        Ok(r) if r.succeeded => {
            api.view.wait_for(r.revision).await?;
            Ok(r.revision)
        }
        Ok(_) => {
            let _ = clean_staged(api, &all_tenants).await;
            Err(ApiError::new(
                ErrorReason::AlreadyExists,
                "a tenant of the imported projects was created while the import ran; \
                 nothing was imported",
            ))
        }
        Err(e) => {
            let _ = clean_staged(api, &all_tenants).await;
            Err(ApiError::from(e).prefixed("import failed, nothing was imported: "))
        }
    }
}

/// Deletes whatever is stored under tenants that do not exist (staged keys
/// of an unfinished import); never touches a tenant that exists.
async fn clean_staged(api: &Api, tenants: &[(String, String)]) -> Result<(), ApiError> {
    for chunk in tenants.chunks(20) {
        for (project, tenant) in chunk {
            let txn = keyspace::tenant_prefixes(project, tenant).into_iter().fold(
                Txn::new().when(Compare::missing(keyspace::tenant_key(project, tenant))),
                |txn, prefix| txn.delete(KeyRange::Prefix(prefix)),
            );
            api.store.txn(txn).await?;
        }
    }
    Ok(())
}

/// Writes history versions and layers in source revision order, then the
/// persistent instances, all under tenants that do not exist yet.
async fn stage(api: &Api, backup: &Backup) -> Result<(), ApiError> {
    let mut units: Vec<(Revision, Unit)> = Vec::new();
    for (project, data) in &backup.projects {
        for ((tenant, key), seqs) in &data.versions {
            let current = data.layers.get(&(tenant.clone(), key.clone()));
            let newest = seqs.keys().next_back().copied();
            for (seq, v) in seqs {
                // The layer rides with the version that wrote it, so its mod
                // revision is that version's revision, as in the source.
                let layer = current
                    .filter(|(record, revision)| {
                        Some(*seq) == newest
                            && *revision == v.source_revision
                            && v.layer.as_ref() == Some(record)
                    })
                    .map(|(record, _)| record.clone());
                units.push((
                    v.source_revision,
                    Unit::Version {
                        project: project.clone(),
                        tenant: tenant.clone(),
                        key: key.clone(),
                        seq: *seq,
                        version: v.clone(),
                        layer,
                    },
                ));
            }
        }
        for ((tenant, key), (record, revision)) in &data.layers {
            let carried = data
                .versions
                .get(&(tenant.clone(), key.clone()))
                .and_then(|seqs| seqs.values().next_back())
                .is_some_and(|v| {
                    v.source_revision == *revision && v.layer.as_ref() == Some(record)
                });
            if !carried {
                units.push((
                    *revision,
                    Unit::Layer {
                        project: project.clone(),
                        tenant: tenant.clone(),
                        key: key.clone(),
                        layer: record.clone(),
                    },
                ));
            }
        }
    }
    units.sort_by_key(|(revision, _)| *revision);

    let mut landed: RevisionMap = BTreeMap::new();
    let mut i = 0;
    while i < units.len() {
        // One transaction per source revision (split when large), so the
        // versions of a layer get distinct, ordered revisions.
        let source = units[i].0;
        let mut end = i;
        let mut puts = 0;
        while end < units.len()
            && units[end].0 == source
            && puts + units[end].1.puts() <= MAX_PUTS_PER_TXN
        {
            puts += units[end].1.puts();
            end += 1;
        }
        let batch = &units[i..end];
        let mut txn = Txn::new();
        let guarded: BTreeSet<(&str, &str)> = batch.iter().map(|(_, u)| u.tenant()).collect();
        for (project, tenant) in &guarded {
            txn = txn.when(Compare::missing(keyspace::tenant_key(project, tenant)));
        }
        for (_, unit) in batch {
            match unit {
                Unit::Version {
                    project,
                    tenant,
                    key,
                    seq,
                    version,
                    layer,
                } => {
                    let restored_from = if version.restored_from > 0 {
                        landed
                            .get(&(project.clone(), tenant.clone(), key.clone()))
                            .map_or(0, |l| map_revision(l, version.restored_from))
                    } else {
                        0
                    };
                    let record = VersionRecord {
                        layer: version.layer.clone(),
                        written_at_unix_ms: version.written_at_unix_ms,
                        restored_from,
                    };
                    txn = txn.put(
                        keyspace::version_key(project, tenant, key, *seq),
                        record.encode_to_vec(),
                    );
                    if let Some(layer) = layer {
                        txn = txn.put(
                            keyspace::layer_key(project, tenant, key),
                            layer.encode_to_vec(),
                        );
                    }
                }
                Unit::Layer {
                    project,
                    tenant,
                    key,
                    layer,
                } => {
                    txn = txn.put(
                        keyspace::layer_key(project, tenant, key),
                        layer.encode_to_vec(),
                    );
                }
            }
        }
        let response = api.store.txn(txn).await?;
        if !response.succeeded {
            return Err(ApiError::new(
                ErrorReason::AlreadyExists,
                "a tenant of the imported projects was created while the import ran; \
                 nothing was imported",
            ));
        }
        for (_, unit) in batch {
            if let Unit::Version {
                project,
                tenant,
                key,
                version,
                ..
            } = unit
            {
                landed
                    .entry((project.clone(), tenant.clone(), key.clone()))
                    .or_default()
                    .push((version.source_revision, response.revision));
            }
        }
        i = end;
    }

    // (project, tenant, service, id, record)
    let instances: Vec<_> = backup
        .projects
        .iter()
        .flat_map(|(project, data)| {
            data.instances
                .iter()
                .map(move |((tenant, service, id), r)| (project, tenant, service, id, r))
        })
        .collect();
    for chunk in instances.chunks(MAX_PUTS_PER_TXN) {
        let guarded: BTreeSet<(&String, &String)> =
            chunk.iter().map(|(p, t, _, _, _)| (*p, *t)).collect();
        let txn = guarded.into_iter().fold(Txn::new(), |txn, (p, t)| {
            txn.when(Compare::missing(keyspace::tenant_key(p, t)))
        });
        let txn = chunk.iter().fold(txn, |txn, (p, t, service, id, record)| {
            txn.put(
                keyspace::instance_key(p, t, service, id),
                record.encode_to_vec(),
            )
        });
        if !api.store.txn(txn).await?.succeeded {
            return Err(ApiError::new(
                ErrorReason::AlreadyExists,
                "a tenant of the imported projects was created while the import ran; \
                 nothing was imported",
            ));
        }
    }
    Ok(())
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
        assert!(decode_hex("abc").is_err());
        assert!(decode_hex("zz").is_err());
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
