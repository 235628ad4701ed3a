//! Import: staging history, layers and instances, then the one
//! transaction that writes every tenant record (the flip); staged keys are
//! deleted again if anything fails before it.

use super::*;

/// Serialises imports on this daemon: two imports of the same project would
/// stage the same keys.
pub(super) static IMPORT_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One staging transaction's worth of work.
#[derive(Debug)]
pub(super) enum Unit {
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
pub(super) type RevisionMap = BTreeMap<(String, String, String), Vec<(Revision, Revision)>>;

/// The new revision standing for source revision `from` in a layer's
/// history: the version written at exactly that revision, else the nearest
/// older one; before the first version, the revision just before it.
pub(super) fn map_revision(landed: &[(Revision, Revision)], from: Revision) -> Revision {
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
pub(super) async fn clean_staged(api: &Api, tenants: &[(String, String)]) -> Result<(), ApiError> {
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
pub(super) async fn stage(api: &Api, backup: &Backup) -> Result<(), ApiError> {
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
