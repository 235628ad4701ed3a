//! Service registry operations on [`Api`]: register (ephemeral under a
//! lease, or persistent and probed), deregister, drain, heartbeat, the
//! atomic branch registration a CD step makes, and reads — a tenant's own
//! instances, `resolve_service` with fallback, every service visible from a
//! tenant. Same shape as the config operations: validate → plan against the
//! view → one transaction whose compares pin what was planned → wait for
//! the view.

// Branch registration: tenant, instances and config in one transaction.
mod branch;
// Reads: instances, resolution, services, counts.
mod queries;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use prost::Message;
use strata_proto::v1::ErrorReason;

use crate::app::api::{
    Api, NewTenant, PutLayer, invalid, name_error, not_found, plan_layer, plan_new_tenant,
    precondition, project_view, tenant_missing,
};
use crate::domain::names;
use crate::domain::registry::{self, Health, InstanceSpec, InvalidInstance};
use crate::error::ApiError;
use crate::probe::{ProbeKind, ProbeSpec, ProbeTarget};
use crate::state::keyspace::{self, CheckRecord, HealthRecord, InstanceRecord, LayerRecord};
use crate::state::view::{InstanceEntry, ProjectView};
use crate::store::{Compare, CompareOp, KeyRange, LeaseId, Revision, Txn, unix_now_ms};

/// Most instances in one branch registration, and most config layers: keeps
/// the transaction within etcd's default limit of 128 operations.
pub const MAX_BRANCH_ITEMS: usize = 20;

/// An instance with its health, as reads report it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceInfo {
    /// Tenant it is registered in.
    pub tenant: String,
    /// Service.
    pub service: String,
    /// Instance id.
    pub id: String,
    /// Stored state.
    pub entry: InstanceEntry,
    /// Health.
    pub health: Health,
    /// Last probe failure, if any.
    pub health_detail: String,
}

impl InstanceInfo {
    /// Keeps what only the instance's operators should see — the probe's
    /// failure text (it names addresses, ports and what answered there)
    /// and the lease id — from callers that may not register in its
    /// tenant.
    pub fn redact_for(&mut self, principal: &crate::app::auth::Principal, project: &str) {
        if !principal.allows(crate::app::auth::Action::Register, project, &self.tenant) {
            self.redact();
        }
    }

    /// Drops the probe's failure text and the lease id.
    pub fn redact(&mut self) {
        self.health_detail.clear();
        self.entry.lease = 0;
    }
}

impl ServiceResolution {
    /// [`InstanceInfo::redact_for`] of every instance.
    pub fn redact_for(&mut self, principal: &crate::app::auth::Principal, project: &str) {
        for instance in &mut self.instances {
            instance.redact_for(principal, project);
        }
    }
}

/// Where a service resolves for a tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceResolution {
    /// Service.
    pub service: String,
    /// Serving tenant; `None` when nothing routable was found.
    pub tenant: Option<String>,
    /// Whether the serving tenant is not the asking one.
    pub fallback: bool,
    /// Routable instances of the serving tenant.
    pub instances: Vec<InstanceInfo>,
}

/// A request to register one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Project.
    pub project: String,
    /// Tenant.
    pub tenant: String,
    /// Service.
    pub service: String,
    /// Instance id; generated when `None`.
    pub id: Option<String>,
    /// The instance.
    pub spec: InstanceSpec,
    /// Ephemeral: an existing lease to attach to.
    pub lease: Option<LeaseId>,
}

/// The answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// Instance id.
    pub id: String,
    /// Lease to keep alive (0 for persistent instances).
    pub lease: LeaseId,
    /// The lease's TTL in seconds (0 for persistent instances).
    pub ttl_seconds: i64,
}

/// A CD step's registration of a service in a branch tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchRegistration {
    /// The tenant, created when missing (its `name`, `parent`, TTL, policy
    /// and labels apply only then).
    pub tenant: NewTenant,
    /// Service.
    pub service: String,
    /// Instances as (id, spec); `None` ids are generated.
    pub instances: Vec<(Option<String>, InstanceSpec)>,
    /// Config layers to write in the tenant (`project` and `tenant` of each
    /// are taken from `tenant`).
    pub config: Vec<PutLayer>,
}

/// The answer to a branch registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchRegistered {
    /// Whether the tenant was created by this call.
    pub tenant_created: bool,
    /// Ids of the instances, in request order.
    pub instance_ids: Vec<String>,
    /// Lease of the ephemeral instances (0: none).
    pub lease: LeaseId,
}

/// Validates a registration into its record, including what the prober
/// will make of its check.
fn instance_record(
    spec: &InstanceSpec,
    limits: &registry::RegistrationLimits,
    probes: &crate::probe::policy::ProbePolicy,
    now: i64,
) -> Result<InstanceRecord, ApiError> {
    let record = registry::build_record(spec, limits, now).map_err(instance_error)?;
    if let Some(check) = &record.check {
        let target = probe_target(check, &record.endpoints)
            .ok_or_else(|| invalid("the check cannot be probed"))?;
        target
            .spec
            .validate()
            .map_err(|e| invalid(format!("check: {e}")))?;
        // A literal address is checked now, so the caller learns at once
        // that it cannot be probed; names are checked at every probe.
        if let Ok(addr) = target.address.parse::<std::net::SocketAddr>() {
            probes
                .check(addr)
                .map_err(|e| ApiError::new(ErrorReason::PermissionDenied, format!("check: {e}")))?;
        }
    }
    Ok(record)
}

/// Validates an instance read from a backup with the rules of a
/// registration (limits, check, probe policy): an import must not store
/// what registering could not.
pub(crate) fn validate_imported(
    record: &InstanceRecord,
    limits: &registry::RegistrationLimits,
    probes: &crate::probe::policy::ProbePolicy,
) -> Result<(), ApiError> {
    let mut endpoints = Vec::with_capacity(record.endpoints.len());
    for (name, e) in &record.endpoints {
        let protocol = e
            .protocol
            .parse::<registry::Protocol>()
            .map_err(|e| invalid(e.0))?;
        endpoints.push((name.clone(), e.address.clone(), Some(protocol)));
    }
    let check = match &record.check {
        None => None,
        Some(c) => Some(registry::CheckSpec {
            kind: match c.kind.as_str() {
                "tcp" => registry::CheckKind::Tcp,
                "http" => registry::CheckKind::Http {
                    path: c.http_path.clone(),
                    status: u16::try_from(c.http_status).ok().filter(|s| *s != 0),
                },
                "grpc" => registry::CheckKind::Grpc {
                    service: c.grpc_service.clone(),
                },
                "udp" => registry::CheckKind::Udp {
                    send: c.udp_send.clone(),
                    expect: registry::UdpExpect::of_record(c),
                },
                other => {
                    return Err(invalid(format!(
                        "check kind {other:?} is not tcp, http, grpc or udp"
                    )));
                }
            },
            endpoint: Some(c.endpoint.clone()),
            interval_ms: c.interval_ms,
            timeout_ms: c.timeout_ms,
            failure_threshold: c.failure_threshold,
            success_threshold: c.success_threshold,
        }),
    };
    let spec = InstanceSpec {
        endpoints,
        protocol: None,
        metadata: record.metadata.clone(),
        weight: record.weight,
        version: record.version.clone(),
        persistent: record.persistent,
        ttl_seconds: 0,
        check,
    };
    instance_record(&spec, limits, probes, record.registered_at_unix_ms).map(drop)
}

/// What the prober should probe for a check, or `None` when the check's
/// endpoint is missing (cannot happen for validated registrations).
pub fn probe_target(
    check: &CheckRecord,
    endpoints: &BTreeMap<String, crate::state::keyspace::EndpointRecord>,
) -> Option<ProbeTarget> {
    let address = endpoints.get(&check.endpoint)?.address.clone();
    let kind = match check.kind.as_str() {
        "tcp" => ProbeKind::Tcp,
        "http" => ProbeKind::Http {
            path: check.http_path.clone(),
            expected_status: u16::try_from(check.http_status).ok().filter(|s| *s != 0),
        },
        "grpc" => ProbeKind::Grpc {
            service: check.grpc_service.clone(),
        },
        "udp" => ProbeKind::Udp {
            send: check.udp_send.clone(),
            expect: crate::domain::registry::UdpExpect::of_record(check),
        },
        _ => return None,
    };
    Some(ProbeTarget {
        address,
        spec: ProbeSpec {
            kind,
            interval: Duration::from_millis(u64::from(check.interval_ms)),
            timeout: Duration::from_millis(u64::from(check.timeout_ms)),
            failure_threshold: check.failure_threshold.max(1),
            success_threshold: check.success_threshold.max(1),
        },
    })
}

fn instance_error(e: InvalidInstance) -> ApiError {
    match e {
        InvalidInstance::Invalid(e) => invalid(e.0),
        InvalidInstance::TooLarge(e) => ApiError::new(ErrorReason::LimitExceeded, e.0),
    }
}

fn instance_missing(tenant: &str, service: &str, id: &str) -> ApiError {
    not_found(format!(
        "no instance {id:?} of service {service:?} in tenant {tenant:?}"
    ))
}

/// A fresh instance id: the service name and 48 random bits (random enough
/// that replicas generating ids at once do not collide).
fn generate_id(service: &str) -> String {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_i64(unix_now_ms());
    format!("{service}-{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}

fn info(p: &ProjectView, tenant: &str, service: &str, id: &str, e: &InstanceEntry) -> InstanceInfo {
    let verdict = p.health_of(tenant, service, id).map(|h| &h.record);
    InstanceInfo {
        tenant: tenant.to_owned(),
        service: service.to_owned(),
        id: id.to_owned(),
        entry: e.clone(),
        health: registry::health(&e.record, verdict),
        health_detail: verdict.map(|v| v.detail.clone()).unwrap_or_default(),
    }
}

/// Instances registered in `tenant` (every service).
fn instance_count(p: &ProjectView, tenant: &str) -> usize {
    p.instances
        .get(tenant)
        .map_or(0, |services| services.values().map(|ids| ids.len()).sum())
}

/// Resolves `service` for `tenant` in `p` (the tenant must exist).
pub fn resolution(p: &ProjectView, chain: &[&str], service: &str) -> ServiceResolution {
    match p.resolve_service(chain, service) {
        Some((tenant, instances)) => ServiceResolution {
            service: service.to_owned(),
            tenant: Some(tenant.to_owned()),
            fallback: Some(&tenant) != chain.first(),
            instances: instances
                .into_iter()
                .map(|(id, e)| info(p, tenant, service, id, e))
                .collect(),
        },
        None => ServiceResolution {
            service: service.to_owned(),
            tenant: None,
            fallback: false,
            instances: Vec::new(),
        },
    }
}

/// Adds the registration of one instance to `txn`: pins the instance's
/// current state, writes it (under `lease` when ephemeral) and drops a probe
/// verdict that no longer applies (the check or endpoints changed).
#[allow(clippy::too_many_arguments)]
fn plan_instance(
    p: Option<&ProjectView>,
    project: &str,
    tenant: &str,
    service: &str,
    id: &str,
    record: &InstanceRecord,
    lease: LeaseId,
    txn: Txn,
) -> Txn {
    let key = keyspace::instance_key(project, tenant, service, id);
    let current = p.and_then(|p| p.instance(tenant, service, id));
    let mut txn = txn.when(Compare::mod_revision(
        key.clone(),
        CompareOp::Equal,
        current.map_or(0, |c| c.mod_revision),
    ));
    let verdict_applies = current
        .is_some_and(|c| c.record.check == record.check && c.record.endpoints == record.endpoints);
    if !verdict_applies {
        txn = txn.delete(KeyRange::Key(keyspace::health_key(
            project, tenant, service, id,
        )));
    }
    let value = record.encode_to_vec();
    if lease == 0 {
        txn.put(key, value)
    } else {
        txn.put_with_lease(key, value, lease)
    }
}

impl Api {
    fn validate_names(&self, project: &str, tenant: &str, service: &str) -> Result<(), ApiError> {
        names::validate_project(project).map_err(name_error)?;
        names::validate_tenant(tenant).map_err(name_error)?;
        names::validate_service(service).map_err(name_error)
    }

    /// The granted TTL of `lease` in seconds, if it exists and has not
    /// expired.
    async fn live_lease_ttl(&self, lease: LeaseId) -> Result<Option<i64>, ApiError> {
        match self.store.lease_time_to_live(lease).await {
            Ok(info) if info.remaining_seconds >= 0 => Ok(Some(info.granted_ttl_seconds)),
            Ok(_) | Err(crate::store::StoreError::LeaseNotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn revoke_quietly(&self, lease: LeaseId) {
        if let Err(e) = self.store.lease_revoke(lease).await {
            tracing::warn!(lease, error = %e, "could not revoke the lease of a failed registration");
        }
    }

    /// Registers an instance, or updates it in place when its id is already
    /// registered (a re-registration also clears a drain).
    pub async fn register(&self, req: Registration) -> Result<(Registered, Revision), ApiError> {
        self.validate_names(&req.project, &req.tenant, &req.service)?;
        if let Some(id) = &req.id {
            names::validate_id("instance id", id).map_err(name_error)?;
        }
        let record = instance_record(
            &req.spec,
            &self.limits.registration,
            &self.probes,
            unix_now_ms(),
        )?;
        let id = req.id.clone().unwrap_or_else(|| generate_id(&req.service));
        // The lease's granted TTL is learnt here, from the look-up or the
        // grant, so the answer needs no further store call: each one waits
        // for a turn of the store's writer.
        let (lease, ttl_seconds, granted) = if record.persistent {
            if req.lease.is_some_and(|l| l != 0) {
                return Err(invalid(
                    "lease_id is for ephemeral instances; a persistent one has no lease",
                ));
            }
            (0, 0, false)
        } else if let Some(lease) = req.lease.filter(|l| *l != 0) {
            self.lease_of_project(lease, &req.project)?;
            let Some(ttl) = self.live_lease_ttl(lease).await? else {
                return Err(not_found(format!(
                    "lease {lease} does not exist or has expired; register without it to get a new one"
                )));
            };
            (lease, ttl, false)
        } else {
            let existing = {
                let state = self.view.read();
                project_view(&state, &req.project)
                    .and_then(|p| p.instance(&req.tenant, &req.service, &id))
                    .map_or(0, |e| e.lease)
            };
            let alive = if existing == 0 {
                None
            } else {
                self.live_lease_ttl(existing).await?
            };
            match alive {
                Some(ttl) => (existing, ttl, false),
                None => {
                    let lease = self.store.lease_grant(record.ttl_seconds).await?;
                    (lease.id, lease.ttl_seconds, true)
                }
            }
        };
        let tenant_key = keyspace::tenant_key(&req.project, &req.tenant);
        let written = self
            .write(|state| {
                let p = project_view(state, &req.project)
                    .filter(|p| p.tenants.contains_key(&req.tenant))
                    .ok_or_else(|| tenant_missing(&req.project, &req.tenant))?;
                let txn = Txn::new().when(Compare::exists(tenant_key.clone()));
                let adding = usize::from(p.instance(&req.tenant, &req.service, &id).is_none());
                let txn = crate::app::limits::plan_instances(
                    &self.limits.counts,
                    &req.project,
                    &req.tenant,
                    instance_count(p, &req.tenant),
                    adding,
                    state.revision,
                    txn,
                )?;
                let txn = plan_instance(
                    Some(p),
                    &req.project,
                    &req.tenant,
                    &req.service,
                    &id,
                    &record,
                    lease,
                    txn,
                );
                Ok((txn, ()))
            })
            .await;
        let ((), revision) = match written {
            Ok(done) => done,
            Err(e) => {
                if granted {
                    self.revoke_quietly(lease).await;
                }
                return Err(e);
            }
        };
        let kind = if record.persistent {
            "persistent"
        } else {
            "ephemeral"
        };
        metrics::counter!("strata_registry_registrations_total", "project" => req.project.clone(), "kind" => kind)
            .increment(1);
        Ok((
            Registered {
                id,
                lease,
                ttl_seconds,
            },
            revision,
        ))
    }

    /// Removes an instance (and its probe verdict).
    pub async fn deregister(
        &self,
        project: &str,
        tenant: &str,
        service: &str,
        id: &str,
    ) -> Result<Revision, ApiError> {
        let ((), revision) = self
            .write(|state| {
                let current = project_view(state, project)
                    .and_then(|p| p.instance(tenant, service, id))
                    .ok_or_else(|| instance_missing(tenant, service, id))?;
                let key = keyspace::instance_key(project, tenant, service, id);
                let txn = Txn::new()
                    .when(Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        current.mod_revision,
                    ))
                    .delete(KeyRange::Key(key))
                    .delete(KeyRange::Key(keyspace::health_key(
                        project, tenant, service, id,
                    )));
                Ok((txn, ()))
            })
            .await?;
        metrics::counter!("strata_registry_deregistrations_total", "project" => project.to_owned())
            .increment(1);
        Ok(revision)
    }

    /// Marks an instance draining (listed, not routable) or undoes it.
    pub async fn drain(
        &self,
        project: &str,
        tenant: &str,
        service: &str,
        id: &str,
        draining: bool,
    ) -> Result<Revision, ApiError> {
        let ((), revision) = self
            .write(|state| {
                let current = project_view(state, project)
                    .and_then(|p| p.instance(tenant, service, id))
                    .ok_or_else(|| instance_missing(tenant, service, id))?;
                let key = keyspace::instance_key(project, tenant, service, id);
                let record = InstanceRecord {
                    draining,
                    ..(*current.record).clone()
                };
                let txn = Txn::new().when(Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    current.mod_revision,
                ));
                let txn = if current.lease == 0 {
                    txn.put(key, record.encode_to_vec())
                } else {
                    txn.put_with_lease(key, record.encode_to_vec(), current.lease)
                };
                Ok((txn, ()))
            })
            .await?;
        Ok(revision)
    }

    /// Renews a lease; answers its remaining TTL in seconds. `project`:
    /// the one project the caller may act in (`None`: every project); a
    /// lease no instance of that project holds is answered as if it did not
    /// exist, so a token of one project can neither keep another project's
    /// instances alive nor learn which lease ids exist.
    pub async fn heartbeat(&self, lease: LeaseId, project: Option<&str>) -> Result<i64, ApiError> {
        if let Some(project) = project {
            self.lease_of_project(lease, project)?;
        }
        match self.store.lease_keep_alive(lease).await {
            Ok(ttl) => Ok(ttl),
            Err(crate::store::StoreError::LeaseNotFound(_)) => Err(not_found(format!(
                "lease {lease} does not exist or has expired; register again"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Refuses `lease` unless an instance of `project` holds it.
    fn lease_of_project(&self, lease: LeaseId, project: &str) -> Result<(), ApiError> {
        let held = project_view(&self.view.read(), project).is_some_and(|p| p.holds_lease(lease));
        if held {
            Ok(())
        } else {
            Err(not_found(format!(
                "lease {lease} does not exist or has expired, or holds no instance of project \
                 {project:?}; register again"
            )))
        }
    }

    /// Records a probe verdict on a persistent instance. A verdict that
    /// changes nothing, or is for an instance that is gone or whose check
    /// changed since it was probed (`check` is the check the probe ran), is
    /// dropped: `Ok(None)`.
    #[allow(clippy::too_many_arguments)]
    pub async fn set_health(
        &self,
        project: &str,
        tenant: &str,
        service: &str,
        id: &str,
        check: &keyspace::CheckRecord,
        healthy: bool,
        detail: &str,
    ) -> Result<Option<Revision>, ApiError> {
        let outdated = || precondition("the instance's check changed since it was probed");
        let written = self
            .write(|state| {
                let p = project_view(state, project);
                let current = p
                    .and_then(|p| p.instance(tenant, service, id))
                    .ok_or_else(|| instance_missing(tenant, service, id))?;
                if current.record.check.as_ref() != Some(check) {
                    return Err(outdated());
                }
                let previous = p.and_then(|p| p.health_of(tenant, service, id));
                if previous
                    .is_some_and(|h| h.record.healthy == healthy && h.record.detail == detail)
                {
                    return Err(ApiError::new(
                        ErrorReason::AlreadyExists,
                        "verdict unchanged",
                    ));
                }
                let since_unix_ms = match previous {
                    Some(h) if h.record.healthy == healthy => h.record.since_unix_ms,
                    _ => unix_now_ms(),
                };
                let record = HealthRecord {
                    healthy,
                    detail: detail.to_owned(),
                    since_unix_ms,
                };
                let health_key = keyspace::health_key(project, tenant, service, id);
                let txn = Txn::new()
                    .when(Compare::mod_revision(
                        keyspace::instance_key(project, tenant, service, id),
                        CompareOp::Equal,
                        current.mod_revision,
                    ))
                    .when(Compare::mod_revision(
                        health_key.clone(),
                        CompareOp::Equal,
                        previous.map_or(0, |h| h.mod_revision),
                    ))
                    .put(health_key, record.encode_to_vec());
                Ok((txn, ()))
            })
            .await;
        match written {
            Ok(((), revision)) => Ok(Some(revision)),
            Err(e)
                if matches!(
                    e.reason,
                    ErrorReason::NotFound
                        | ErrorReason::FailedPrecondition
                        | ErrorReason::AlreadyExists
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}
