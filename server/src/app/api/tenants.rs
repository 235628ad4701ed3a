//! Tenant operations: create (with placement rules), read, list, update,
//! delete; and the plan of a new tenant that branch registration and
//! imports share.

use super::*;

impl Api {
    /// Creates a tenant.
    pub async fn create_tenant(&self, req: NewTenant) -> Result<(TenantInfo, Revision), ApiError> {
        let record = self.new_tenant_record(&req)?;
        let ((), revision) = self
            .write(|state| {
                let project = project_view(state, &req.project);
                if project.is_some_and(|p| p.tenants.contains_key(&req.name)) {
                    return Err(ApiError::new(
                        ErrorReason::AlreadyExists,
                        format!(
                            "tenant {:?} already exists in project {:?}",
                            req.name, req.project
                        ),
                    ));
                }
                let txn = crate::app::limits::plan_tenants(
                    &self.limits.counts,
                    &req.project,
                    project.map_or(0, |p| p.tenants.len()),
                    1,
                    state.revision,
                    Txn::new(),
                )?;
                Ok((plan_new_tenant(project, &req, &record, txn)?, ()))
            })
            .await?;
        let info = self.tenant(&req.project, &req.name)?.0;
        Ok((info, revision))
    }

    /// Validates a tenant creation and builds its record.
    pub(crate) fn new_tenant_record(&self, req: &NewTenant) -> Result<TenantRecord, ApiError> {
        names::validate_project(&req.project).map_err(name_error)?;
        names::validate_tenant(&req.name).map_err(name_error)?;
        if !req.parent.is_empty() {
            names::validate_tenant(&req.parent).map_err(name_error)?;
        }
        if req.parent == req.name {
            return Err(invalid(format!(
                "tenant {:?} cannot be its own parent",
                req.name
            )));
        }
        if req.ttl_seconds < 0 {
            return Err(invalid(format!(
                "ttl_seconds must be 0 (none) or positive, got {}",
                req.ttl_seconds
            )));
        }
        self.check_labels(&req.labels)?;
        Ok(TenantRecord {
            parent: req.parent.clone(),
            labels: req.labels.clone(),
            ttl_seconds: req.ttl_seconds,
            expires_at_unix_ms: if req.ttl_seconds > 0 {
                unix_now_ms() + req.ttl_seconds * 1000
            } else {
                0
            },
            strict: req.strict,
            protected: req.protected,
        })
    }

    /// The revision the view has applied.
    pub fn revision(&self) -> Revision {
        self.view.revision()
    }

    /// Reads a tenant.
    pub fn tenant(&self, project: &str, name: &str) -> Result<(TenantInfo, Revision), ApiError> {
        let state = self.view.read();
        project_view(&state, project)
            .and_then(|p| tenant_info(project, p, name))
            .map(|info| (info, state.revision))
            .ok_or_else(|| tenant_missing(project, name))
    }

    /// Whether `principal` may hang a new tenant `name` under `parent`.
    ///
    /// Naming the child is not enough: a tenant with children cannot be
    /// deleted without force and its TTL would take them along, so a child
    /// placed under someone else's branch takes that branch from its owner.
    /// A caller may therefore place a tenant under a parent it may itself
    /// create, or under a *shared* parent: a root or a protected tenant,
    /// either without a TTL (the tenants every branch hangs under, such as
    /// `integration`). Nothing is checked when `name` exists already (its
    /// parent is not changed then).
    pub fn authorize_placement(
        &self,
        principal: &Principal,
        project: &str,
        name: &str,
        parent: &str,
    ) -> Result<(), ApiError> {
        if parent.is_empty()
            || principal.allows(Action::CreateTenant { protected: false }, project, parent)
        {
            return Ok(());
        }
        let state = self.view.read();
        let Some(p) = project_view(&state, project) else {
            return Ok(());
        };
        if p.tenants.contains_key(name) {
            return Ok(());
        }
        // A missing parent is refused later, with its own error.
        let Some(entry) = p.tenants.get(parent) else {
            return Ok(());
        };
        let record = &entry.record;
        let shared = (record.parent.is_empty() || record.protected) && record.ttl_seconds == 0;
        if shared {
            return Ok(());
        }
        Err(ApiError::new(
            ErrorReason::PermissionDenied,
            format!(
                "token {:?} ({}) may not create tenants under {project}/{parent}: a child may \
                 only be placed under a tenant the token may create itself, or under a root or \
                 protected tenant without a TTL",
                &*principal.name,
                principal.scope()
            ),
        )
        .with("token_id", &*principal.token_id)
        .with("role", principal.role))
    }

    /// Whether `principal` may give `tenant` a TTL: when it expires the
    /// whole subtree goes, so a TTL is a deferred forced delete, and the
    /// caller must be allowed to delete every descendant.
    pub fn authorize_ttl(
        &self,
        principal: &Principal,
        project: &str,
        tenant: &str,
    ) -> Result<(), ApiError> {
        let descendants: Vec<String> = {
            let state = self.view.read();
            project_view(&state, project).map_or_else(Vec::new, |p| {
                p.subtree(tenant)
                    .into_iter()
                    .filter(|t| *t != tenant)
                    .map(str::to_owned)
                    .collect()
            })
        };
        for descendant in descendants {
            principal
                .authorize(Action::DeleteTenant { force: false }, project, &descendant)
                .map_err(|e| {
                    e.prefixed(&format!(
                        "a TTL on {tenant} would delete its descendant {descendant} when it \
                         expires: "
                    ))
                })?;
        }
        Ok(())
    }

    /// Lists a project's tenants, parents before children (roots by name).
    pub fn list_tenants(&self, project: &str) -> (Vec<TenantInfo>, Revision) {
        let state = self.view.read();
        let Some(p) = project_view(&state, project) else {
            return (Vec::new(), state.revision);
        };
        let mut out = Vec::new();
        for (name, entry) in &p.tenants {
            if entry.record.parent.is_empty() || !p.tenants.contains_key(&entry.record.parent) {
                out.extend(
                    p.subtree(name)
                        .into_iter()
                        .filter_map(|t| tenant_info(project, p, t)),
                );
            }
        }
        (out, state.revision)
    }

    /// Replaces labels and/or TTL.
    pub async fn update_tenant(
        &self,
        project: &str,
        name: &str,
        labels: Option<HashMap<String, String>>,
        ttl_seconds: Option<i64>,
    ) -> Result<(TenantInfo, Revision), ApiError> {
        if let Some(labels) = &labels {
            self.check_labels(labels)?;
        }
        if let Some(ttl) = ttl_seconds
            && ttl < 0
        {
            return Err(invalid(format!(
                "ttl_seconds must be 0 (none) or positive, got {ttl}"
            )));
        }
        let key = keyspace::tenant_key(project, name);
        let ((), revision) = self
            .write(|state| {
                let entry = project_view(state, project)
                    .and_then(|p| p.tenants.get(name))
                    .ok_or_else(|| tenant_missing(project, name))?;
                let mut record = entry.record.clone();
                if let Some(labels) = &labels {
                    record.labels = labels.clone();
                }
                if let Some(ttl) = ttl_seconds {
                    record.ttl_seconds = ttl;
                    record.expires_at_unix_ms = if ttl > 0 {
                        unix_now_ms() + ttl * 1000
                    } else {
                        0
                    };
                }
                let txn = Txn::new()
                    .when(Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        entry.mod_revision,
                    ))
                    .put(key.clone(), record.encode_to_vec());
                Ok((txn, ()))
            })
            .await?;
        Ok((self.tenant(project, name)?.0, revision))
    }

    /// Deletes a tenant with all its layers at one revision. Without
    /// `force`, refuses protected tenants and tenants with children; with
    /// `force`, deletes the whole subtree.
    pub async fn delete_tenant(
        &self,
        project: &str,
        name: &str,
        force: bool,
    ) -> Result<(i64, Revision), ApiError> {
        self.write(|state| {
            let p = project_view(state, project).ok_or_else(|| tenant_missing(project, name))?;
            let entry = p
                .tenants
                .get(name)
                .ok_or_else(|| tenant_missing(project, name))?;
            if entry.record.protected && !force {
                return Err(precondition(format!(
                    "tenant {name:?} is protected; deleting it needs force"
                )));
            }
            let children = p.children(name);
            if !children.is_empty() && !force {
                return Err(precondition(format!(
                    "tenant {name:?} has children ({}); delete them first or use force",
                    children.join(", ")
                )));
            }
            let mut txn = Txn::new();
            let mut layers = 0;
            for tenant in p.subtree(name) {
                let seen = p.tenants.get(tenant).map_or(0, |e| e.mod_revision);
                let key = keyspace::tenant_key(project, tenant);
                layers += p.layers.get(tenant).map_or(0, |l| l.len() as i64);
                txn = txn
                    .when(Compare::mod_revision(key.clone(), CompareOp::Equal, seen))
                    .delete(KeyRange::Key(key));
                for prefix in keyspace::tenant_prefixes(project, tenant) {
                    txn = txn.delete(KeyRange::Prefix(prefix));
                }
            }
            Ok((txn, layers))
        })
        .await
    }
}

/// Adds the creation of a tenant that does not exist yet to `txn`: the
/// tenant must still be missing and its parent unchanged when it commits.
pub(crate) fn plan_new_tenant(
    project: Option<&ProjectView>,
    req: &NewTenant,
    record: &TenantRecord,
    txn: Txn,
) -> Result<Txn, ApiError> {
    let key = keyspace::tenant_key(&req.project, &req.name);
    let mut txn = txn.when(Compare::missing(key.clone()));
    if !req.parent.is_empty() {
        let parent = project
            .and_then(|p| p.tenants.get(&req.parent).map(|e| (p, e)))
            .ok_or_else(|| {
                not_found(format!(
                    "parent tenant {:?} not found in project {:?}",
                    req.parent, req.project
                ))
            })?;
        let depth = parent.0.chain(&req.parent).map_or(0, |c| c.len()) + 1;
        if depth > MAX_CHAIN {
            return Err(invalid(format!(
                "chain of {:?} would be {depth} tenants deep; the limit is {MAX_CHAIN}",
                req.name
            )));
        }
        // Re-writing the parent bumps its mod revision, so a concurrent
        // delete of the parent (which pins it) fails.
        let parent_key = keyspace::tenant_key(&req.project, &req.parent);
        txn = txn
            .when(Compare::mod_revision(
                parent_key.clone(),
                CompareOp::Equal,
                parent.1.mod_revision,
            ))
            .put(parent_key, parent.1.record.encode_to_vec());
    }
    Ok(txn.put(key, record.encode_to_vec()))
}
