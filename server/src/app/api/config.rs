//! Config layer operations: write (replace, merge, delete-marker), read,
//! delete, history, rollback, resolution and explanation; and the plan of
//! one layer write that branch registration and imports share.

use super::*;

impl Api {
    /// Writes a tenant's layer of a key.
    pub async fn put_layer(&self, req: PutLayer) -> Result<(LayerInfo, Revision), ApiError> {
        let record = self.layer_record(&req)?;
        let revision = self
            .commit_layer(
                &req.project,
                &req.tenant,
                &req.key,
                Some(record),
                req.expected_revision,
                None,
            )
            .await?;
        let (info, _) = self.layer(&req.project, &req.tenant, &req.key)?;
        Ok((info, revision))
    }

    /// Validates a layer write and builds its record.
    pub(crate) fn layer_record(&self, req: &PutLayer) -> Result<LayerRecord, ApiError> {
        names::validate_project(&req.project).map_err(name_error)?;
        names::validate_tenant(&req.tenant).map_err(name_error)?;
        if req.key.len() > self.limits.counts.max_key_bytes {
            return Err(ApiError::new(
                ErrorReason::LimitExceeded,
                format!(
                    "key is {} bytes; the limit is {} bytes",
                    req.key.len(),
                    self.limits.counts.max_key_bytes
                ),
            )
            .with("limit_bytes", self.limits.counts.max_key_bytes));
        }
        names::validate_key(&req.key).map_err(name_error)?;
        let format = req
            .format
            .or_else(|| Format::from_extension(&req.key))
            .unwrap_or(Format::Text);
        let value = if req.mode == Mode::Delete {
            Vec::new()
        } else {
            req.value.clone()
        };
        if value.len() > self.limits.max_value_bytes {
            return Err(ApiError::new(
                ErrorReason::LimitExceeded,
                format!(
                    "value is {} bytes; the limit is {} bytes",
                    value.len(),
                    self.limits.max_value_bytes
                ),
            )
            .with("limit_bytes", self.limits.max_value_bytes));
        }
        if req.mode == Mode::Merge && !format.is_mergeable() {
            return Err(invalid(format!(
                "mode merge needs a json, yaml, toml or properties value; {format} values can only be replaced or deleted"
            )));
        }
        if req.mode != Mode::Delete {
            off_runtime(value.len(), || document::validate(format, &value)).map_err(|e| {
                let hint = if format == Format::Text {
                    " (use format=binary for non-text bytes)"
                } else {
                    ""
                };
                invalid(format!("{e}{hint}"))
            })?;
        }
        Ok(LayerRecord::new(value, format, req.mode))
    }

    /// Writes (`Some`) or removes (`None`) a tenant's layer of a key and
    /// records the new version in the layer's history, pruning versions
    /// beyond retention, all in one transaction.
    async fn commit_layer(
        &self,
        project: &str,
        tenant: &str,
        key: &str,
        record: Option<LayerRecord>,
        expected_revision: Option<Revision>,
        restored_from: Option<Revision>,
    ) -> Result<Revision, ApiError> {
        let tenant_key = keyspace::tenant_key(project, tenant);
        let keep = self.limits.history_versions;
        let ((), revision) = self
            .write(|state| {
                let p = project_view(state, project)
                    .filter(|p| p.tenants.contains_key(tenant))
                    .ok_or_else(|| tenant_missing(project, tenant))?;
                let current = p.layer(tenant, key).map_or(0, |l| l.mod_revision);
                if record.is_none() && current == 0 {
                    return Err(not_found(format!(
                        "tenant {tenant:?} has no layer for key {key:?}"
                    )));
                }
                if let Some(expected) = expected_revision {
                    check_expected(expected, current, key)?;
                }
                let txn = Txn::new().when(Compare::exists(tenant_key.clone()));
                let adding = usize::from(record.is_some() && current == 0);
                let keys = p.layers.get(tenant).map_or(0, |l| l.len());
                let txn = crate::app::limits::plan_config_keys(
                    &self.limits.counts,
                    project,
                    tenant,
                    keys,
                    adding,
                    state.revision,
                    txn,
                )?;
                let old_bytes = p.layer(tenant, key).map_or(0, |l| l.value.len());
                let new_bytes = record.as_ref().map_or(0, |r| r.value.len());
                let txn = crate::app::limits::plan_config_bytes(
                    &self.limits.counts,
                    project,
                    p.config_bytes,
                    new_bytes.saturating_sub(old_bytes),
                    state.revision,
                    txn,
                )?;
                let txn = plan_layer(
                    Some(p),
                    project,
                    tenant,
                    key,
                    record.as_ref(),
                    restored_from,
                    keep,
                    txn,
                );
                Ok((txn, ()))
            })
            .await?;
        Ok(revision)
    }

    /// Reads a tenant's own layer of a key.
    pub fn layer(
        &self,
        project: &str,
        tenant: &str,
        key: &str,
    ) -> Result<(LayerInfo, Revision), ApiError> {
        let state = self.view.read();
        let p = project_view(&state, project)
            .filter(|p| p.tenants.contains_key(tenant))
            .ok_or_else(|| tenant_missing(project, tenant))?;
        let entry = p
            .layer(tenant, key)
            .ok_or_else(|| not_found(format!("tenant {tenant:?} has no layer for key {key:?}")))?;
        let info = LayerInfo {
            tenant: tenant.to_owned(),
            key: key.to_owned(),
            entry: entry.clone(),
        };
        Ok((info, state.revision))
    }

    /// Removes a tenant's layer of a key (recorded in its history).
    pub async fn delete_layer(
        &self,
        project: &str,
        tenant: &str,
        key: &str,
        expected_revision: Option<Revision>,
    ) -> Result<Revision, ApiError> {
        self.commit_layer(project, tenant, key, None, expected_revision, None)
            .await
    }

    /// The kept versions of a tenant's layer of a key, newest first, at most
    /// `limit` of them (`None`: all kept).
    pub async fn history(
        &self,
        project: &str,
        tenant: &str,
        key: &str,
        limit: Option<usize>,
    ) -> Result<(Vec<LayerVersion>, Revision), ApiError> {
        names::validate_key(key).map_err(name_error)?;
        let known = {
            let state = self.view.read();
            let p = project_view(&state, project)
                .filter(|p| p.tenants.contains_key(tenant))
                .ok_or_else(|| tenant_missing(project, tenant))?;
            p.versions(tenant, key).is_some() || p.layer(tenant, key).is_some()
        };
        if !known {
            return Err(not_found(format!(
                "tenant {tenant:?} has no layer or history for key {key:?}"
            )));
        }
        let range = self
            .store
            .range(KeyRange::Prefix(keyspace::versions_prefix(
                project, tenant, key,
            )))
            .await?;
        let mut versions = Vec::with_capacity(range.kvs.len());
        for kv in range.kvs.iter().rev() {
            let Some(keyspace::Parsed::Version { seq, .. }) = keyspace::parse(&kv.key) else {
                continue;
            };
            let record = keyspace::VersionRecord::decode(kv.value.as_slice()).map_err(|e| {
                ApiError::new(
                    ErrorReason::Internal,
                    format!("a stored version of {key:?} does not decode: {e}"),
                )
            })?;
            let layer = record
                .layer
                .map(|l| layer_entry(l, kv.create_revision))
                .transpose()?;
            versions.push(LayerVersion {
                revision: kv.create_revision,
                seq,
                layer,
                written_at_unix_ms: record.written_at_unix_ms,
                restored_from: (record.restored_from > 0).then_some(record.restored_from),
            });
            if limit.is_some_and(|l| versions.len() >= l) {
                break;
            }
        }
        Ok((versions, range.revision))
    }

    /// Restores a tenant's layer of a key to what it was at `revision`,
    /// writing that as a new version (or removing the layer, if it did not
    /// exist then).
    pub async fn rollback(
        &self,
        project: &str,
        tenant: &str,
        key: &str,
        to_revision: Revision,
        expected_revision: Option<Revision>,
    ) -> Result<(RolledBack, Revision), ApiError> {
        if to_revision <= 0 {
            return Err(invalid(format!(
                "revision to roll back to must be positive, got {to_revision}"
            )));
        }
        let (versions, _) = self.history(project, tenant, key, None).await?;
        let target = match versions.iter().find(|v| v.revision <= to_revision) {
            Some(v) => v.clone(),
            // Version 1 created the layer, so before it the layer was absent.
            None if versions.last().is_some_and(|v| v.seq == 1) => LayerVersion {
                revision: to_revision,
                seq: 0,
                layer: None,
                written_at_unix_ms: 0,
                restored_from: None,
            },
            None => {
                let oldest = versions.last().ok_or_else(|| {
                    not_found(format!(
                        "tenant {tenant:?} keeps no history for key {key:?}"
                    ))
                })?;
                return Err(precondition(format!(
                    "revision {to_revision} is older than the oldest kept version of {key:?} \
                     (revision {}); history keeps the last {} versions of each key",
                    oldest.revision, self.limits.history_versions
                )));
            }
        };
        let currently = self.layer(project, tenant, key).ok().map(|(l, _)| l.entry);
        if target.layer.is_none() && currently.is_none() {
            return Err(precondition(format!(
                "key {key:?} had no layer in tenant {tenant:?} at revision {to_revision}, \
                 and has none now; nothing to roll back"
            )));
        }
        let record = target
            .layer
            .as_ref()
            .map(|l| LayerRecord::new(l.value.to_vec(), l.format, l.mode));
        let revision = self
            .commit_layer(
                project,
                tenant,
                key,
                record,
                expected_revision,
                Some(target.revision),
            )
            .await?;
        let layer = self.layer(project, tenant, key).ok().map(|(l, _)| l);
        Ok((
            RolledBack {
                restored: target,
                layer,
            },
            revision,
        ))
    }

    /// Resolves the selected keys for a tenant (keys that do not exist are
    /// left out).
    pub fn resolve(
        &self,
        project: &str,
        tenant: &str,
        keys: &[String],
        prefixes: &[String],
    ) -> Result<(Vec<(String, Resolved)>, Revision), ApiError> {
        let (selected, revision) = {
            let state = self.view.read();
            let p = project_view(&state, project).ok_or_else(|| tenant_missing(project, tenant))?;
            let chain = p
                .chain(tenant)
                .ok_or_else(|| tenant_missing(project, tenant))?;
            let selected: Vec<(String, Vec<OwnedLayer>)> = p
                .selected_keys(&chain, keys, prefixes)
                .into_iter()
                .map(|key| {
                    let layers = OwnedLayer::along(p, &chain, &key);
                    (key, layers)
                })
                .collect();
            (selected, state.revision)
        };
        // Merging parses every merge layer; that happens after the view's
        // lock is released, so a large document stalls neither other
        // readers' writers-in-waiting nor the view's updater.
        let bytes: usize = selected
            .iter()
            .flat_map(|(_, layers)| layers.iter().map(|l| l.value.len()))
            .sum();
        let out = off_runtime(bytes, || {
            let mut out = Vec::new();
            for (key, layers) in selected {
                match resolve::resolve(layers.iter().map(OwnedLayer::borrowed)) {
                    Ok(Some(resolved)) => out.push((key, resolved)),
                    Ok(None) => {}
                    Err(e) => {
                        return Err(invalid(format!("key {key:?} cannot be resolved: {e}")));
                    }
                }
            }
            Ok(out)
        })?;
        Ok((out, revision))
    }

    /// Resolves one key and says which tenant supplied each field.
    pub fn explain(
        &self,
        project: &str,
        tenant: &str,
        key: &str,
    ) -> Result<(Explained, Revision), ApiError> {
        let (layers, revision) = {
            let state = self.view.read();
            let p = project_view(&state, project).ok_or_else(|| tenant_missing(project, tenant))?;
            let chain = p
                .chain(tenant)
                .ok_or_else(|| tenant_missing(project, tenant))?;
            (OwnedLayer::along(p, &chain, key), state.revision)
        };
        let bytes = layers.iter().map(|l| l.value.len()).sum();
        let explained = off_runtime(bytes, || {
            resolve::explain(layers.iter().map(OwnedLayer::borrowed))
        })
        .map_err(|e| invalid(format!("key {key:?} cannot be resolved: {e}")))?
        .ok_or_else(|| not_found(format!("key {key:?} does not exist for tenant {tenant:?}")))?;
        Ok((explained, revision))
    }
}

/// Adds a write (`Some`) or removal (`None`) of a tenant's layer of a key to
/// `txn`, with the new version in the layer's history and the pruning of
/// versions beyond `keep`. `p` is the project as planned against (`None`
/// or a missing tenant: the layer has no history yet).
#[allow(clippy::too_many_arguments)]
pub(crate) fn plan_layer(
    p: Option<&ProjectView>,
    project: &str,
    tenant: &str,
    key: &str,
    record: Option<&LayerRecord>,
    restored_from: Option<Revision>,
    keep: u64,
    txn: Txn,
) -> Txn {
    let layer_key = keyspace::layer_key(project, tenant, key);
    let current = p
        .and_then(|p| p.layer(tenant, key))
        .map_or(0, |l| l.mod_revision);
    let span = p.and_then(|p| p.versions(tenant, key));
    let seq = span.map_or(1, |s| s.last + 1);
    let version = keyspace::VersionRecord {
        layer: record.cloned(),
        written_at_unix_ms: unix_now_ms(),
        restored_from: restored_from.unwrap_or(0),
    };
    // The layer compare orders concurrent writers of the key; the version
    // compare makes sure no one else took this number.
    let version_key = keyspace::version_key(project, tenant, key, seq);
    let mut txn = txn
        .when(Compare::mod_revision(
            layer_key.clone(),
            CompareOp::Equal,
            current,
        ))
        .when(Compare::missing(version_key.clone()))
        .put(version_key, version.encode_to_vec());
    txn = match record {
        Some(record) => txn.put(layer_key, record.encode_to_vec()),
        None => txn.delete(KeyRange::Key(layer_key)),
    };
    if let Some(span) = span {
        // After this write the newest kept version is `seq`.
        let oldest_kept = (seq + 1).saturating_sub(keep.max(1));
        let prune_end = oldest_kept.min(span.first + MAX_PRUNE_PER_WRITE);
        for old in span.first..prune_end {
            txn = txn.delete(KeyRange::Key(keyspace::version_key(
                project, tenant, key, old,
            )));
        }
    }
    txn
}

fn layer_entry(record: LayerRecord, revision: Revision) -> Result<LayerEntry, ApiError> {
    let corrupt = |e: String| {
        ApiError::new(
            ErrorReason::Internal,
            format!("a stored layer does not decode: {e}"),
        )
    };
    Ok(LayerEntry {
        value: record.value.into(),
        format: record
            .format
            .parse()
            .map_err(|e: document::DocumentError| corrupt(e.to_string()))?,
        mode: record
            .mode
            .parse()
            .map_err(|e: document::DocumentError| corrupt(e.to_string()))?,
        mod_revision: revision,
    })
}

fn check_expected(expected: Revision, current: Revision, key: &str) -> Result<(), ApiError> {
    let holds = match expected {
        -1 => current == 0,
        r if r > 0 => current == r,
        other => {
            return Err(invalid(format!(
                "expected_revision must be -1 (absent), 0 (any) or positive, got {other}"
            )));
        }
    };
    if holds {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorReason::RevisionMismatch,
            format!("layer {key:?} is at revision {current}, not the expected {expected}"),
        )
        .with("current_revision", current))
    }
}
