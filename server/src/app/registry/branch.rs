//! Branch registration: the tenant (created when missing), its instances
//! and config layers, all at one revision or nothing.

use super::*;

impl Api {
    /// Registers a service in a branch tenant in one transaction: creates
    /// the tenant when missing, registers the instances and writes the
    /// config layers — all at one revision, or nothing.
    pub async fn register_branch(
        &self,
        req: BranchRegistration,
    ) -> Result<(BranchRegistered, Revision), ApiError> {
        let project = req.tenant.project.clone();
        let tenant = req.tenant.name.clone();
        self.validate_names(&project, &tenant, &req.service)?;
        let tenant_record = self.new_tenant_record(&req.tenant)?;
        if req.instances.len() > MAX_BRANCH_ITEMS || req.config.len() > MAX_BRANCH_ITEMS {
            return Err(ApiError::new(
                ErrorReason::LimitExceeded,
                format!(
                    "a branch registration takes at most {MAX_BRANCH_ITEMS} instances and {MAX_BRANCH_ITEMS} config layers"
                ),
            ));
        }
        let now = unix_now_ms();
        let mut instances = Vec::new();
        let mut ids = BTreeSet::new();
        for (i, (id, spec)) in req.instances.iter().enumerate() {
            if let Some(id) = id {
                names::validate_id("instance id", id).map_err(name_error)?;
            }
            let record = instance_record(spec, &self.limits.registration, &self.probes, now)
                .map_err(|e| e.prefixed(&format!("instance {i}: ")))?;
            let id = id.clone().unwrap_or_else(|| generate_id(&req.service));
            if !ids.insert(id.clone()) {
                return Err(invalid(format!("instance id {id:?} is given twice")));
            }
            instances.push((id, record));
        }
        let mut layers: BTreeMap<String, LayerRecord> = BTreeMap::new();
        for layer in &req.config {
            let layer = PutLayer {
                project: project.clone(),
                tenant: tenant.clone(),
                ..layer.clone()
            };
            let record = self
                .layer_record(&layer)
                .map_err(|e| e.prefixed(&format!("config {:?}: ", layer.key)))?;
            if layers.insert(layer.key.clone(), record).is_some() {
                return Err(invalid(format!(
                    "config key {:?} is given twice",
                    layer.key
                )));
            }
        }
        let ttl = instances
            .iter()
            .filter(|(_, r)| !r.persistent)
            .map(|(_, r)| r.ttl_seconds)
            .min();
        let lease = match ttl {
            Some(ttl) => self.store.lease_grant(ttl).await?.id,
            None => 0,
        };
        let keep = self.limits.history_versions;
        let tenant_key = keyspace::tenant_key(&project, &tenant);
        let written = self
            .write(|state| {
                let p = project_view(state, &project);
                let existing = p.and_then(|p| p.tenants.get(&tenant));
                let mut txn = Txn::new();
                match existing {
                    Some(entry) => {
                        if !req.tenant.parent.is_empty() && entry.record.parent != req.tenant.parent
                        {
                            return Err(precondition(format!(
                                "tenant {tenant:?} exists with parent {:?}, not {:?}",
                                entry.record.parent, req.tenant.parent
                            )));
                        }
                        txn = txn.when(Compare::mod_revision(
                            tenant_key.clone(),
                            CompareOp::Equal,
                            entry.mod_revision,
                        ));
                    }
                    None => {
                        txn = crate::app::limits::plan_tenants(
                            &self.limits.counts,
                            &project,
                            p.map_or(0, |p| p.tenants.len()),
                            1,
                            state.revision,
                            txn,
                        )?;
                        txn = plan_new_tenant(p, &req.tenant, &tenant_record, txn)?;
                    }
                }
                // A tenant being created has nothing yet: plan as if empty.
                let planned = p.filter(|_| existing.is_some());
                let new_instances = instances
                    .iter()
                    .filter(|(id, _)| {
                        planned.is_none_or(|p| p.instance(&tenant, &req.service, id).is_none())
                    })
                    .count();
                txn = crate::app::limits::plan_instances(
                    &self.limits.counts,
                    &project,
                    &tenant,
                    planned.map_or(0, |p| instance_count(p, &tenant)),
                    new_instances,
                    state.revision,
                    txn,
                )?;
                let new_keys = layers
                    .keys()
                    .filter(|key| planned.is_none_or(|p| p.layer(&tenant, key).is_none()))
                    .count();
                txn = crate::app::limits::plan_config_keys(
                    &self.limits.counts,
                    &project,
                    &tenant,
                    planned.map_or(0, |p| p.layers.get(&tenant).map_or(0, |l| l.len())),
                    new_keys,
                    state.revision,
                    txn,
                )?;
                let growth: usize = layers
                    .iter()
                    .map(|(key, record)| {
                        let old = planned
                            .and_then(|p| p.layer(&tenant, key))
                            .map_or(0, |l| l.value.len());
                        record.value.len().saturating_sub(old)
                    })
                    .sum();
                txn = crate::app::limits::plan_config_bytes(
                    &self.limits.counts,
                    &project,
                    p.map_or(0, |p| p.config_bytes),
                    growth,
                    state.revision,
                    txn,
                )?;
                for (id, record) in &instances {
                    let lease = if record.persistent { 0 } else { lease };
                    txn = plan_instance(
                        planned,
                        &project,
                        &tenant,
                        &req.service,
                        id,
                        record,
                        lease,
                        txn,
                    );
                }
                for (key, record) in &layers {
                    txn = plan_layer(
                        planned,
                        &project,
                        &tenant,
                        key,
                        Some(record),
                        None,
                        keep,
                        txn,
                    );
                }
                Ok((txn, existing.is_none()))
            })
            .await;
        match written {
            Ok((tenant_created, revision)) => {
                metrics::counter!("strata_registry_branch_registrations_total", "project" => project.clone())
                    .increment(1);
                Ok((
                    BranchRegistered {
                        tenant_created,
                        instance_ids: instances.into_iter().map(|(id, _)| id).collect(),
                        lease,
                    },
                    revision,
                ))
            }
            Err(e) => {
                if lease != 0 {
                    self.revoke_quietly(lease).await;
                }
                Err(e)
            }
        }
    }
}
