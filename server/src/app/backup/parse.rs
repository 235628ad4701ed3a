//! Reading a backup file: every line parsed and checked (names, sizes,
//! counts, parents before children, the checksum) before anything is
//! written.

use super::*;

/// One history version to restore.
#[derive(Debug, Clone)]
pub(super) struct VersionIn {
    pub(super) source_revision: Revision,
    pub(super) written_at_unix_ms: i64,
    pub(super) restored_from: Revision,
    pub(super) layer: Option<LayerRecord>,
}

/// One project of a validated backup.
#[derive(Debug, Clone, Default)]
pub struct ProjectIn {
    /// Name in the file.
    pub(super) source_name: String,
    /// Tenants in file order (parents before children).
    pub(super) tenants: Vec<(String, TenantRecord)>,
    /// Layers with their source mod revision, by (tenant, key).
    pub(super) layers: BTreeMap<(String, String), (LayerRecord, Revision)>,
    /// History by (tenant, key), then seq.
    pub(super) versions: BTreeMap<(String, String), BTreeMap<u64, VersionIn>>,
    /// Persistent instances by (tenant, service, id).
    pub(super) instances: BTreeMap<(String, String, String), InstanceRecord>,
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

pub(super) fn bad(line: usize, message: impl std::fmt::Display) -> ApiError {
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

pub(super) fn layer_in(
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

pub(super) fn add_record(
    api: &Api,
    project: &str,
    p: &mut ProjectIn,
    record: Record,
) -> Result<(), ApiError> {
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
                    if !matches!(c.kind.as_str(), "tcp" | "http" | "grpc" | "udp") {
                        return Err(invalid(format!(
                            "instance {id:?}: check kind {:?} is not tcp, http, grpc or udp",
                            c.kind
                        )));
                    }
                    let hex = |field: &str, text: &str| {
                        crate::domain::hex::decode(text)
                            .map_err(|e| invalid(format!("instance {id:?}: check {field} {e}")))
                    };
                    let udp_send = hex("udp_send_hex", &c.udp_send_hex)?;
                    let udp_expect = hex("udp_expect_hex", &c.udp_expect_hex)?;
                    // Stored as read: what the registration rules would not
                    // build must not come in this way either.
                    let udp_fields = !udp_send.is_empty()
                        || !udp_expect.is_empty()
                        || !c.udp_expect_regex.is_empty();
                    if c.kind != "udp" && udp_fields {
                        return Err(invalid(format!(
                            "instance {id:?}: a {} check has udp_* fields",
                            c.kind
                        )));
                    }
                    if !udp_expect.is_empty() && !c.udp_expect_regex.is_empty() {
                        return Err(invalid(format!(
                            "instance {id:?}: a UDP check has udp_expect_hex or udp_expect_regex, not both"
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
                        udp_send,
                        udp_expect,
                        udp_expect_regex: c.udp_expect_regex,
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
pub(super) fn check_project(name: &str, p: &ProjectIn) -> Result<(), ApiError> {
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
pub(super) fn check_counts(api: &Api, name: &str, p: &ProjectIn) -> Result<(), ApiError> {
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
