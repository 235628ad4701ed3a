//! Tenant and configuration operations, shared by the gRPC and HTTP
//! handlers: validate against the view → build one store transaction whose
//! compares pin what was validated → commit → wait until the view has the
//! revision → answer. A transaction whose compares fail (someone else wrote
//! in between) is re-planned against the newer view, so the caller gets the
//! precise domain error (already exists, not found, …) rather than a retry
//! hint.

// Config layers: writes, history, rollback, resolution, explanation.
mod config;
// Tenants: creation, placement, updates, deletion.
mod tenants;

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

pub(crate) use config::plan_layer;
pub(crate) use tenants::plan_new_tenant;

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
