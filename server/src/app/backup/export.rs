//! Export: a snapshot of the selected projects at one revision (history
//! re-read until it matches), encoded as `strata-backup` lines.

use super::*;

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
pub(super) struct StoredVersion {
    pub(super) revision: Revision,
    pub(super) record: VersionRecord,
}

/// The kept versions of each layer of one project: by (tenant, key), then seq.
pub(super) type ProjectVersions = BTreeMap<(String, String), BTreeMap<u64, StoredVersion>>;

/// Everything an export writes, as of one revision.
#[derive(Debug)]
pub struct Snapshot {
    pub(super) revision: Revision,
    pub(super) store: &'static str,
    pub(super) projects: Vec<(String, ProjectView)>,
    /// By project, then (tenant, key), then seq.
    pub(super) versions: BTreeMap<String, ProjectVersions>,
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

pub(super) struct Writer<'a, F: FnMut(Vec<u8>) -> bool> {
    pub(super) buf: Vec<u8>,
    pub(super) checksum: Checksum,
    pub(super) records: u64,
    pub(super) emit: &'a mut F,
    pub(super) stopped: bool,
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

pub(super) fn instance_line(
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
            udp_send_hex: crate::domain::hex::encode(&c.udp_send),
            udp_expect_hex: crate::domain::hex::encode(&c.udp_expect),
            udp_expect_regex: c.udp_expect_regex.clone(),
        }),
        draining: r.draining,
        registered_at_unix_ms: r.registered_at_unix_ms,
    }
}

/// A project's tenants, parents before children (roots by name).
pub(super) fn tenants_in_order(view: &ProjectView) -> Vec<&str> {
    let mut out = Vec::new();
    for (name, entry) in &view.tenants {
        if entry.record.parent.is_empty() || !view.tenants.contains_key(&entry.record.parent) {
            out.extend(view.subtree(name));
        }
    }
    out
}
