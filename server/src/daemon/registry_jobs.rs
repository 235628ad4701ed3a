//! The registry's background jobs, run by the leader (with the embedded
//! store the single daemon is the leader):
//!
//! - **Health checks** — keeps the [`Prober`] probing exactly the persistent
//!   instances with a check, as the view holds them, and writes each
//!   verdict change to the store, where every replica and watcher sees it.
//! - **Tenant TTL collection** — deletes expired tenants. An expired tenant
//!   is collected with its whole subtree, since its descendants resolve
//!   through it and cannot outlive it; a subtree holding a protected tenant
//!   is never collected automatically (it is reported in
//!   `strata_tenants_expired_uncollected` and logged instead).
//! - **Instance gauges** — `strata_registry_instances` by project, tenant,
//!   kind and health.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::app::api::Api;
use crate::app::audit::{Operation, Target};
use crate::app::registry::probe_target;
use crate::probe::{Health, HealthChange, ProbeTarget, Prober};
use crate::state::keyspace::CheckRecord;
use crate::store::unix_now_ms;

/// How often expired tenants are looked for.
pub const TENANT_GC_INTERVAL: Duration = Duration::from_secs(1);
/// How often the instance gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest time between two rebuilds of the probe set: a burst of
/// registrations costs one rebuild.
const PROBE_SET_DEBOUNCE: Duration = Duration::from_millis(100);

/// Names a probed instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InstanceRef {
    /// Project.
    pub project: String,
    /// Tenant.
    pub tenant: String,
    /// Service.
    pub service: String,
    /// Instance id.
    pub id: String,
}

/// Every probed instance with its target and the check it came from.
fn probe_set(api: &Api) -> HashMap<InstanceRef, (ProbeTarget, CheckRecord)> {
    let state = api.view.read();
    let mut out = HashMap::new();
    for (project, p) in &state.projects {
        for (tenant, services) in &p.instances {
            for (service, ids) in services {
                for (id, e) in ids {
                    let Some(check) = &e.record.check else {
                        continue;
                    };
                    if let Some(target) = probe_target(check, &e.record.endpoints) {
                        let key = InstanceRef {
                            project: project.clone(),
                            tenant: tenant.clone(),
                            service: service.clone(),
                            id: id.clone(),
                        };
                        out.insert(key, (target, check.clone()));
                    }
                }
            }
        }
    }
    out
}

/// Runs the health checks until `shutdown`.
pub async fn health_checks(api: Api, shutdown: CancellationToken) {
    let (tx, mut changes) = mpsc::channel::<HealthChange<InstanceRef>>(1024);
    let prober = Prober::new(tx, shutdown.clone()).with_policy(api.probe_policy().clone());
    let mut revisions = api.view.subscribe();
    let mut checks: HashMap<InstanceRef, (ProbeTarget, CheckRecord)> = HashMap::new();
    let mut stale = true;
    loop {
        if stale {
            checks = probe_set(&api);
            prober.reconcile(
                checks
                    .iter()
                    .map(|(id, (target, _))| (id.clone(), target.clone()))
                    .collect(),
            );
            stale = false;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = revisions.changed() => {
                if changed.is_err() {
                    return;
                }
                // Let a burst of revisions settle into one rebuild, while
                // verdicts keep flowing.
                let settle = tokio::time::sleep(PROBE_SET_DEBOUNCE);
                tokio::pin!(settle);
                loop {
                    tokio::select! {
                        () = &mut settle => break,
                        Some(change) = changes.recv() => record(&api, &checks, change).await,
                    }
                }
                stale = true;
            }
            Some(change) = changes.recv() => record(&api, &checks, change).await,
        }
    }
}

async fn record(
    api: &Api,
    checks: &HashMap<InstanceRef, (ProbeTarget, CheckRecord)>,
    change: HealthChange<InstanceRef>,
) {
    let healthy = match change.health {
        Health::Healthy => true,
        Health::Unhealthy => false,
        // A restarted check has no verdict yet; the stored one stands until
        // the new check decides.
        Health::Unknown => return,
    };
    let Some((target, check)) = checks.get(&change.id) else {
        return;
    };
    if *target != change.target {
        return;
    }
    let i = &change.id;
    tracing::info!(
        project = %i.project, tenant = %i.tenant, service = %i.service, instance = %i.id,
        health = %change.health, detail = %change.detail, "instance health changed"
    );
    // Recorded in the audit log as the daemon's own change.
    let audited = Target::new(Operation::SetHealth, &i.project, &i.tenant)
        .subject(format!("{}/{}", i.service, i.id));
    let verdict = api.set_health(
        &i.project,
        &i.tenant,
        &i.service,
        &i.id,
        check,
        healthy,
        &change.detail,
    );
    if let Err(e) = crate::app::audit::as_daemon(audited, "health-check", verdict).await {
        tracing::warn!(error = %e, instance = %i.id, "could not record a health verdict");
    }
}

/// Collects expired tenants every `interval` until `shutdown`.
pub async fn tenant_gc(api: Api, interval: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        collect_expired(&api, unix_now_ms()).await;
    }
}

/// The roots of expired subtrees to collect, and how many expired tenants
/// are held back by a protected tenant in their subtree.
fn expired_roots(api: &Api, now_unix_ms: i64) -> (Vec<(String, String)>, usize) {
    let state = api.view.read();
    let mut roots = Vec::new();
    let mut held = 0;
    for (project, p) in &state.projects {
        let expired: HashSet<&str> = p
            .tenants
            .iter()
            .filter(|(_, t)| {
                t.record.expires_at_unix_ms > 0 && t.record.expires_at_unix_ms <= now_unix_ms
            })
            .map(|(name, _)| name.as_str())
            .collect();
        for name in &expired {
            let parent = p.tenants.get(*name).map(|t| t.record.parent.as_str());
            // A subtree goes with its topmost expired tenant.
            if parent.is_some_and(|parent| expired.contains(parent)) {
                continue;
            }
            let protected = p
                .subtree(name)
                .iter()
                .any(|t| p.tenants.get(*t).is_some_and(|e| e.record.protected));
            if protected {
                held += 1;
            } else {
                roots.push((project.clone(), (*name).to_owned()));
            }
        }
    }
    (roots, held)
}

/// One collection pass; returns how many subtrees were deleted.
pub async fn collect_expired(api: &Api, now_unix_ms: i64) -> usize {
    let (roots, held) = expired_roots(api, now_unix_ms);
    metrics::gauge!("strata_tenants_expired_uncollected").set(held as f64);
    if held > 0 {
        tracing::warn!(
            count = held,
            "expired tenants hold a protected tenant in their subtree and are not collected"
        );
    }
    let mut collected = 0;
    for (project, tenant) in roots {
        let audited = Target::new(Operation::ExpireTenant, &project, &tenant);
        let deleted = api.delete_tenant(&project, &tenant, true);
        match crate::app::audit::as_daemon(audited, "tenant-ttl", deleted).await {
            Ok((layers, revision)) => {
                collected += 1;
                metrics::counter!("strata_tenants_collected_total", "project" => project.clone())
                    .increment(1);
                tracing::info!(%project, %tenant, layers, revision, "collected expired tenant");
            }
            Err(e) => {
                tracing::warn!(%project, %tenant, error = %e, "could not collect expired tenant")
            }
        }
    }
    collected
}

/// Refreshes the instance gauges until `shutdown`.
pub async fn instance_gauges(api: Api, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(GAUGE_INTERVAL);
    let mut previous: HashSet<(String, String, &'static str, &'static str)> = HashSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let counts = api.instance_counts();
        for key in previous.difference(&counts.keys().cloned().collect()) {
            let (project, tenant, kind, health) = key.clone();
            metrics::gauge!("strata_registry_instances", "project" => project, "tenant" => tenant, "kind" => kind, "health" => health)
                .set(0.0);
        }
        previous = counts.keys().cloned().collect();
        for ((project, tenant, kind, health), n) in counts {
            metrics::gauge!("strata_registry_instances", "project" => project, "tenant" => tenant, "kind" => kind, "health" => health)
                .set(n as f64);
        }
    }
}
