//! Tenant and configuration operations, shared by the gRPC and HTTP
//! handlers: validate against the view → build one store transaction whose
//! compares pin what was validated → commit → wait until the view has the
//! revision → answer. A transaction whose compares fail (someone else wrote
//! in between) is re-planned against the newer view, so the caller gets the
//! precise domain error (already exists, not found, …) rather than a retry
//! hint.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;
use strata_proto::v1::ErrorReason;

use crate::app::auth::{Action, Principal};
pub use crate::app::limits::Limits;
use crate::domain::document::{self, Format, Mode};
use crate::domain::names;
use crate::domain::resolve::{self, Explained, Resolved};
use crate::error::ApiError;
use crate::state::keyspace::{self, LayerRecord, TenantRecord};
use crate::state::view::{LayerEntry, MAX_CHAIN, ProjectView, TenantEntry, View, ViewState};
use crate::store::{Compare, CompareOp, KeyRange, Revision, Store, Txn, unix_now_ms};

/// Most pruned versions deleted by one write: keeps each transaction small
/// (etcd caps operations per transaction) after retention was lowered; the
/// following writes of the key prune the rest.
const MAX_PRUNE_PER_WRITE: u64 = 32;

/// A tenant with its place in the tree.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantInfo {
    /// Project.
    pub project: String,
    /// Name.
    pub name: String,
    /// Stored state.
    pub entry: TenantEntry,
    /// Itself first, then ancestors to the root.
    pub chain: Vec<String>,
}

/// Request to create a tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewTenant {
    /// Project.
    pub project: String,
    /// Tenant name.
    pub name: String,
    /// Parent tenant (empty: a root).
    pub parent: String,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// TTL in seconds, 0 for none.
    pub ttl_seconds: i64,
    /// Strict fallback policy.
    pub strict: bool,
    /// Protected from deletion without force.
    pub protected: bool,
}

/// Request to write a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutLayer {
    /// Project.
    pub project: String,
    /// Tenant.
    pub tenant: String,
    /// Config key.
    pub key: String,
    /// Raw value (ignored for `delete`).
    pub value: Vec<u8>,
    /// Format; `None` guesses from the key's extension, else `text`.
    pub format: Option<Format>,
    /// Mode.
    pub mode: Mode,
    /// Compare-and-set: `Some(r > 0)` the layer's mod revision must be `r`;
    /// `Some(-1)` the layer must not exist; `None` unconditional.
    pub expected_revision: Option<Revision>,
}

/// A tenant's own layer of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Tenant.
    pub tenant: String,
    /// Key.
    pub key: String,
    /// Stored layer.
    pub entry: LayerEntry,
}

/// One version from a layer's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerVersion {
    /// Revision that wrote this version.
    pub revision: Revision,
    /// Number of the version in the layer's history (1 for the write that
    /// first created the layer in this tenant).
    pub seq: u64,
    /// The layer as written (its `mod_revision` is `revision`); `None` when
    /// this version removed the layer.
    pub layer: Option<LayerEntry>,
    /// Wall-clock time of the write, Unix milliseconds.
    pub written_at_unix_ms: i64,
    /// For a version written by a rollback: the revision it restored.
    pub restored_from: Option<Revision>,
}

/// What a rollback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolledBack {
    /// The version restored.
    pub restored: LayerVersion,
    /// The layer now (`None`: the rollback removed it).
    pub layer: Option<LayerInfo>,
}

/// The operations, over a store and the view that follows it.
#[derive(Debug, Clone)]
pub struct Api {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) view: Arc<View>,
    pub(crate) limits: Limits,
    pub(crate) probes: Arc<crate::probe::policy::ProbePolicy>,
}

/// How many times a write is re-planned after losing a race.
const MAX_ATTEMPTS: usize = 8;

/// A layer copied out of the view (its value shared, not copied), so a key
/// can be resolved after the view's lock is released.
struct OwnedLayer {
    tenant: String,
    value: Arc<[u8]>,
    format: Format,
    mode: Mode,
    revision: Revision,
}

impl OwnedLayer {
    /// The layers of `key` along `chain`, nearest first.
    fn along(p: &ProjectView, chain: &[&str], key: &str) -> Vec<Self> {
        chain
            .iter()
            .filter_map(|tenant| {
                p.layer(tenant, key).map(|l| Self {
                    tenant: (*tenant).to_owned(),
                    value: Arc::clone(&l.value),
                    format: l.format,
                    mode: l.mode,
                    revision: l.mod_revision,
                })
            })
            .collect()
    }

    fn borrowed(&self) -> resolve::Layer<'_> {
        resolve::Layer {
            tenant: &self.tenant,
            value: &self.value,
            format: self.format,
            mode: self.mode,
            revision: self.revision,
        }
    }
}

/// Values at least this large are parsed with [`off_runtime`].
const HEAVY_PARSE_BYTES: usize = 64 << 10;

/// Runs a parse of `len` bytes. A large one runs with the worker thread
/// handed over to the runtime's other tasks (`block_in_place`), so that a
/// client sending megabyte documents cannot stall every request sharing its
/// worker; small ones, and runtimes without spare workers, run inline.
pub(crate) fn off_runtime<T>(len: usize, parse: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let multi_thread = Handle::try_current()
        .is_ok_and(|h| matches!(h.runtime_flavor(), RuntimeFlavor::MultiThread));
    if len >= HEAVY_PARSE_BYTES && multi_thread {
        tokio::task::block_in_place(parse)
    } else {
        parse()
    }
}

pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorReason::InvalidArgument, message)
}

pub(crate) fn not_found(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorReason::NotFound, message)
}

pub(crate) fn precondition(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorReason::FailedPrecondition, message)
}

pub(crate) fn name_error(e: names::NameError) -> ApiError {
    invalid(e.to_string())
}

pub(crate) fn project_view<'a>(state: &'a ViewState, project: &str) -> Option<&'a ProjectView> {
    state.projects.get(project)
}

fn tenant_info(project: &str, view: &ProjectView, name: &str) -> Option<TenantInfo> {
    let entry = view.tenants.get(name)?.clone();
    let chain = view.chain(name)?.into_iter().map(str::to_owned).collect();
    Some(TenantInfo {
        project: project.to_owned(),
        name: name.to_owned(),
        entry,
        chain,
    })
}

pub(crate) fn tenant_missing(project: &str, tenant: &str) -> ApiError {
    not_found(format!(
        "tenant {tenant:?} not found in project {project:?}"
    ))
}

impl Api {
    /// Operations over `store`, reading from `view`.
    pub fn new(store: Arc<dyn Store>, view: Arc<View>, limits: Limits) -> Self {
        Self {
            store,
            view,
            limits,
            probes: Arc::new(crate::probe::policy::ProbePolicy::default()),
        }
    }

    /// Health checks of persistent instances may connect only where
    /// `policy` allows; registrations of literal addresses it denies are
    /// refused.
    #[must_use]
    pub fn with_probe_policy(mut self, policy: crate::probe::policy::ProbePolicy) -> Self {
        self.probes = Arc::new(policy);
        self
    }

    /// Where health checks may connect.
    pub fn probe_policy(&self) -> &crate::probe::policy::ProbePolicy {
        &self.probes
    }

    /// Plans against the view, commits, waits for the view; re-plans when the
    /// transaction's compares fail.
    pub(crate) async fn write<T>(
        &self,
        mut plan: impl FnMut(&ViewState) -> Result<(Txn, T), ApiError>,
    ) -> Result<(T, Revision), ApiError> {
        for _ in 0..MAX_ATTEMPTS {
            let (txn, out) = plan(&self.view.read())?;
            let response = self.store.txn(txn).await?;
            self.view.wait_for(response.revision).await?;
            if response.succeeded {
                return Ok((out, response.revision));
            }
        }
        Err(ApiError::new(
            ErrorReason::Unavailable,
            "too many concurrent writers on the same objects; retry",
        ))
    }

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

    fn check_labels(&self, labels: &HashMap<String, String>) -> Result<(), ApiError> {
        if labels.len() > self.limits.max_labels {
            return Err(ApiError::new(
                ErrorReason::LimitExceeded,
                format!(
                    "{} labels; the limit is {}",
                    labels.len(),
                    self.limits.max_labels
                ),
            ));
        }
        for (k, v) in labels {
            if k.is_empty() || k.len() > 63 {
                return Err(invalid(format!("label {k:?}: keys must be 1-63 bytes")));
            }
            let max = self.limits.counts.max_label_value_bytes;
            if v.len() > max {
                return Err(ApiError::new(
                    ErrorReason::LimitExceeded,
                    format!(
                        "label {k:?}: the value is {} bytes; the limit is {max} bytes",
                        v.len()
                    ),
                )
                .with("limit_bytes", max));
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::auth::{Role, TenantPattern};
    use crate::state::view::JournalLimits;
    use crate::store::embedded::EmbeddedStore;

    async fn api() -> (Api, tempfile::TempDir, tokio_util::sync::CancellationToken) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let view = View::load(store.as_ref(), JournalLimits::default())
            .await
            .unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(Arc::clone(&view).follow(Arc::clone(&store), stop.clone()));
        (Api::new(store, view, Limits::default()), dir, stop)
    }

    async fn tenant(api: &Api, name: &str, parent: &str, ttl_seconds: i64, protected: bool) {
        api.create_tenant(NewTenant {
            project: "p".into(),
            name: name.into(),
            parent: parent.into(),
            ttl_seconds,
            protected,
            ..NewTenant::default()
        })
        .await
        .unwrap();
    }

    fn register(pattern: &str) -> Principal {
        Principal {
            token_id: "t1".into(),
            name: "ci".into(),
            role: Role::Register,
            project: Some("p".into()),
            tenants: Some(TenantPattern::parse(pattern).unwrap()),
        }
    }

    #[tokio::test]
    async fn placement_needs_an_owned_or_shared_parent() {
        let (api, _dir, _stop) = api().await;
        tenant(&api, "integration", "", 0, false).await;
        tenant(&api, "staging", "integration", 0, true).await;
        tenant(&api, "feat-a", "integration", 0, false).await;
        tenant(&api, "sandbox", "", 3600, false).await;
        let hotfix = register("hotfix-*");
        let place = |parent: &str| api.authorize_placement(&hotfix, "p", "hotfix-1", parent);
        assert!(place("").is_ok(), "a root of its own");
        assert!(place("integration").is_ok(), "a root is shared");
        assert!(place("staging").is_ok(), "a protected tenant is shared");
        let refused = place("feat-a").unwrap_err();
        assert_eq!(refused.reason, ErrorReason::PermissionDenied);
        assert!(refused.message.contains("under p/feat-a"), "{refused}");
        assert!(place("sandbox").is_err(), "a root with a TTL is not shared");
        assert!(place("missing").is_ok(), "refused later, as missing");
        // Its own tenants, and an existing tenant (whose parent is kept).
        tenant(&api, "hotfix-2", "integration", 0, false).await;
        assert!(place("hotfix-2").is_ok());
        assert!(
            api.authorize_placement(&hotfix, "p", "feat-a", "sandbox")
                .is_ok()
        );
        assert!(
            api.authorize_placement(&Principal::anonymous(), "p", "x", "feat-a")
                .is_ok(),
            "admins place anywhere"
        );
    }

    #[tokio::test]
    async fn a_ttl_needs_the_right_to_delete_every_descendant() {
        let (api, _dir, _stop) = api().await;
        tenant(&api, "integration", "", 0, false).await;
        tenant(&api, "feat-a", "integration", 0, false).await;
        tenant(&api, "feat-a-1", "feat-a", 0, false).await;
        tenant(&api, "feat-b", "integration", 0, false).await;
        tenant(&api, "qa-b", "feat-b", 0, false).await;
        let feat = register("feat-*");
        assert!(api.authorize_ttl(&feat, "p", "feat-a").is_ok());
        let refused = api.authorize_ttl(&feat, "p", "feat-b").unwrap_err();
        assert!(refused.message.contains("qa-b"), "{refused}");
    }
}
