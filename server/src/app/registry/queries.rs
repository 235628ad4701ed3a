//! Registry reads: the instances of a service in one tenant, resolution
//! along the tenant chain, the services of a tenant, instance counts.

use super::*;

impl Api {
    /// The instances of `service` registered in exactly `tenant`.
    pub fn instances(
        &self,
        project: &str,
        tenant: &str,
        service: &str,
    ) -> Result<(Vec<InstanceInfo>, Revision), ApiError> {
        let state = self.view.read();
        let p = project_view(&state, project)
            .filter(|p| p.tenants.contains_key(tenant))
            .ok_or_else(|| tenant_missing(project, tenant))?;
        let list = p
            .instances
            .get(tenant)
            .and_then(|s| s.get(service))
            .into_iter()
            .flatten()
            .map(|(id, e)| info(p, tenant, service, id, e))
            .collect();
        Ok((list, state.revision))
    }

    /// Resolves `service` for `tenant`, with fallback along the chain.
    pub fn resolve_service(
        &self,
        project: &str,
        tenant: &str,
        service: &str,
    ) -> Result<(ServiceResolution, Revision), ApiError> {
        names::validate_service(service).map_err(name_error)?;
        let state = self.view.read();
        let p = project_view(&state, project).ok_or_else(|| tenant_missing(project, tenant))?;
        let chain = p
            .chain(tenant)
            .ok_or_else(|| tenant_missing(project, tenant))?;
        let resolved = resolution(p, &chain, service);
        let fallback = if resolved.fallback { "true" } else { "false" };
        metrics::counter!("strata_service_resolves_total", "project" => project.to_owned(), "fallback" => fallback)
            .increment(1);
        Ok((resolved, state.revision))
    }

    /// Every service with an instance somewhere in `tenant`'s chain, with
    /// where it resolves for `tenant`.
    pub fn list_services(
        &self,
        project: &str,
        tenant: &str,
    ) -> Result<(Vec<ServiceResolution>, Revision), ApiError> {
        let state = self.view.read();
        let p = project_view(&state, project).ok_or_else(|| tenant_missing(project, tenant))?;
        let chain = p
            .chain(tenant)
            .ok_or_else(|| tenant_missing(project, tenant))?;
        let list = p
            .services_in_chain(&chain)
            .iter()
            .map(|s| resolution(p, &chain, s))
            .collect();
        Ok((list, state.revision))
    }

    /// Counts of instances by (project, tenant, kind, health), for metrics.
    pub fn instance_counts(&self) -> HashMap<(String, String, &'static str, &'static str), usize> {
        let state = self.view.read();
        let mut counts = HashMap::new();
        for (project, p) in &state.projects {
            for (tenant, services) in &p.instances {
                for (service, ids) in services {
                    for (id, e) in ids {
                        let kind = if e.record.persistent {
                            "persistent"
                        } else {
                            "ephemeral"
                        };
                        let health = match info(p, tenant, service, id, e).health {
                            Health::Healthy if e.record.draining => "draining",
                            Health::Healthy => "healthy",
                            Health::Unhealthy => "unhealthy",
                            Health::Unknown => "unknown",
                        };
                        *counts
                            .entry((project.clone(), tenant.clone(), kind, health))
                            .or_default() += 1;
                    }
                }
            }
        }
        counts
    }
}
