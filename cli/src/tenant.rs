//! `strata tenant create|get|list|delete`. Deleting shows what goes with
//! the tenant (its config layers, its service instances and, with
//! `--force`, its descendants) and asks first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;
use strata_client::Code as tonic_code;
use strata_client::Connection;
use strata_client::proto::{
    CreateTenantRequest, DeleteTenantRequest, FallbackPolicy, GetTenantRequest,
    ListInstancesRequest, ListServicesRequest, ListTenantsRequest, Tenant,
};

use crate::ctx::{Ctx, Failure, err, resolve_all};
use crate::output::Output;
use crate::plan;

#[derive(Debug, Subcommand)]
pub(crate) enum TenantCommand {
    /// Create a tenant.
    Create {
        /// Tenant name (DNS label).
        name: String,
        /// Parent tenant.
        #[arg(long)]
        parent: Option<String>,
        /// Label `key=value` (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Time to live, e.g. `72h`.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Never resolve services outside this tenant.
        #[arg(long)]
        strict: bool,
        /// Refuse deletion without --force.
        #[arg(long)]
        protected: bool,
    },
    /// Show one tenant.
    Get {
        /// Tenant name.
        name: String,
    },
    /// List the project's tenants as a tree.
    List,
    /// Delete a tenant with its config and service instances. Shows what
    /// will be removed and asks first; without a terminal, --yes is required.
    Delete {
        /// Tenant name.
        name: String,
        /// Delete even when protected, together with all its descendants.
        #[arg(long)]
        force: bool,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("label {s:?} is not key=value"))
}

/// Runs one `tenant` command.
pub(crate) async fn run(ctx: &Ctx, cmd: TenantCommand) -> Result<(), Failure> {
    let client = ctx.connect().await?;
    tenant(&client, &ctx.project, ctx.out, cmd).await
}

async fn tenant(
    client: &Connection,
    project: &str,
    out: Output,
    cmd: TenantCommand,
) -> Result<(), Failure> {
    let mut tenants = client.tenants();
    match cmd {
        TenantCommand::Create {
            name,
            parent,
            labels,
            ttl,
            strict,
            protected,
        } => {
            let r = tenants
                .create_tenant(CreateTenantRequest {
                    project: project.to_owned(),
                    name,
                    parent: parent.unwrap_or_default(),
                    labels: labels.into_iter().collect::<HashMap<_, _>>(),
                    ttl_seconds: ttl.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
                    fallback: if strict {
                        FallbackPolicy::Strict
                    } else {
                        FallbackPolicy::Permissive
                    } as i32,
                    protected,
                })
                .await
                .map_err(err)?
                .into_inner();
            out.tenants(r.tenant.as_slice());
        }
        TenantCommand::Get { name } => {
            let r = tenants
                .get_tenant(GetTenantRequest {
                    project: project.to_owned(),
                    name,
                })
                .await
                .map_err(err)?
                .into_inner();
            out.tenants(r.tenant.as_slice());
        }
        TenantCommand::List => {
            let r = tenants
                .list_tenants(ListTenantsRequest {
                    project: project.to_owned(),
                })
                .await
                .map_err(err)?
                .into_inner();
            out.tenants(&r.tenants);
        }
        TenantCommand::Delete { name, force, yes } => {
            let doomed = removal_plan(client, project, &name, force).await?;
            // The plan is shown even when it cannot be confirmed, so a
            // script's log says what it would have removed.
            eprint!("{}", doomed.describe(&name, force));
            plan::confirm(&format!("delete tenant {name}"), yes)?;
            let r = tenants
                .delete_tenant(DeleteTenantRequest {
                    project: project.to_owned(),
                    name: name.clone(),
                    force,
                })
                .await
                .map_err(err)?
                .into_inner();
            out.record(&[
                ("deleted", json!(name)),
                ("deleted_layers", json!(r.deleted_layers)),
                ("deleted_tenants", json!(doomed.tenant_names())),
                ("deleted_instances", json!(doomed.instance_count())),
                ("revision", json!(r.header.map_or(0, |h| h.revision))),
            ]);
        }
    }
    Ok(())
}

/// What deleting a tenant takes with it, as seen just before the delete.
struct Removal {
    /// The tenant first, then (with `--force`) its descendants.
    tenants: Vec<DoomedTenant>,
    /// Why the server will refuse, when it will.
    refusal: Option<String>,
}

struct DoomedTenant {
    name: String,
    /// Keys this tenant holds a layer of (values, patches and tombstones).
    layers: usize,
    /// Instance ids by service; `None` when the daemon has no registry.
    instances: Option<BTreeMap<String, Vec<String>>>,
}

impl Removal {
    fn tenant_names(&self) -> Vec<&str> {
        self.tenants.iter().map(|t| t.name.as_str()).collect()
    }

    fn instance_count(&self) -> usize {
        self.tenants
            .iter()
            .filter_map(|t| t.instances.as_ref())
            .flat_map(BTreeMap::values)
            .map(Vec::len)
            .sum()
    }

    /// The preview shown before asking.
    fn describe(&self, name: &str, force: bool) -> String {
        let mut text = if force && self.tenants.len() > 1 {
            format!("Deleting tenant {name} and its descendants removes:\n")
        } else {
            format!("Deleting tenant {name} removes:\n")
        };
        for t in &self.tenants {
            let instances = match &t.instances {
                None => "service instances unknown (the daemon has no service registry)".to_owned(),
                Some(instances) if instances.is_empty() => "no service instances".to_owned(),
                Some(instances) => {
                    let count: usize = instances.values().map(Vec::len).sum();
                    let by_service: Vec<String> = instances
                        .iter()
                        .map(|(service, ids)| format!("{service}: {}", ids.join(", ")))
                        .collect();
                    format!("{count} service instance(s) ({})", by_service.join("; "))
                }
            };
            text.push_str(&format!(
                "  tenant {}: {} config key(s), {instances}\n",
                t.name, t.layers
            ));
        }
        if let Some(refusal) = &self.refusal {
            text.push_str(&format!("  note: {refusal}\n"));
        }
        text
    }
}

/// Gathers what deleting `name` would remove: the tenant (with `force`, its
/// whole subtree), how many config keys each holds a layer of, and each one's
/// registered instances.
async fn removal_plan(
    client: &Connection,
    project: &str,
    name: &str,
    force: bool,
) -> Result<Removal, String> {
    // GetTenant first so a missing tenant is the server's own not-found error.
    let target = client
        .tenants()
        .get_tenant(GetTenantRequest {
            project: project.to_owned(),
            name: name.to_owned(),
        })
        .await
        .map_err(err)?
        .into_inner()
        .tenant
        .unwrap_or_default();
    let all = client
        .tenants()
        .list_tenants(ListTenantsRequest {
            project: project.to_owned(),
        })
        .await
        .map_err(err)?
        .into_inner()
        .tenants;
    // `chain` lists a tenant and its ancestors, so the subtree is every tenant
    // whose chain contains `name` — already parents before children.
    let subtree: Vec<&Tenant> = all
        .iter()
        .filter(|t| t.chain.iter().any(|c| c == name))
        .collect();
    let children: Vec<&str> = subtree
        .iter()
        .filter(|t| t.parent == name)
        .map(|t| t.name.as_str())
        .collect();
    let refusal = if force {
        None
    } else if target.protected {
        Some(format!(
            "{name} is protected; the server refuses to delete it without --force"
        ))
    } else if !children.is_empty() {
        Some(format!(
            "{name} has child tenants ({}); the server refuses to delete it without --force",
            children.join(", ")
        ))
    } else {
        None
    };
    let doomed: Vec<&Tenant> = if force { subtree } else { vec![&target] };
    let mut tenants = Vec::with_capacity(doomed.len());
    for t in doomed {
        tenants.push(DoomedTenant {
            name: t.name.clone(),
            layers: own_layer_count(client, project, t).await?,
            instances: own_instances(client, project, &t.name).await?,
        });
    }
    Ok(Removal { tenants, refusal })
}

/// How many keys `tenant` holds a layer of. A tenant's layer of a key is the
/// nearest of its chain, so a key it holds a value or patch for resolves with
/// it first in the origin; a key its parent resolves but it does not can only
/// be hidden by its own tombstone. (A tombstone over a key no ancestor has is
/// invisible through the API; the delete's answer gives the exact count.)
async fn own_layer_count(
    client: &Connection,
    project: &str,
    tenant: &Tenant,
) -> Result<usize, String> {
    let own = resolve_all(client, project, &tenant.name, "").await?;
    let mut count = own
        .iter()
        .filter(|v| v.origin.first() == Some(&tenant.name))
        .count();
    if !tenant.parent.is_empty() {
        let keys: BTreeSet<&str> = own.iter().map(|v| v.key.as_str()).collect();
        count += resolve_all(client, project, &tenant.parent, "")
            .await?
            .iter()
            .filter(|v| !keys.contains(v.key.as_str()))
            .count();
    }
    Ok(count)
}

/// The instance ids registered in exactly `tenant`, by service; `None` from
/// a daemon without the registry, so deleting still works against one.
async fn own_instances(
    client: &Connection,
    project: &str,
    tenant: &str,
) -> Result<Option<BTreeMap<String, Vec<String>>>, String> {
    let mut registry = client.registry();
    let listed = registry
        .list_services(ListServicesRequest {
            project: project.to_owned(),
            tenant: tenant.to_owned(),
        })
        .await;
    let services = match listed {
        Ok(r) => r.into_inner().services,
        Err(status) if status.code() == tonic_code::Unimplemented => return Ok(None),
        Err(status) => return Err(err(status)),
    };
    let mut by_service = BTreeMap::new();
    for s in services {
        let mut ids: Vec<String> = registry
            .list_instances(ListInstancesRequest {
                project: project.to_owned(),
                tenant: tenant.to_owned(),
                service: s.service.clone(),
            })
            .await
            .map_err(err)?
            .into_inner()
            .instances
            .into_iter()
            .map(|i| i.id)
            .collect();
        if !ids.is_empty() {
            ids.sort();
            by_service.insert(s.service, ids);
        }
    }
    Ok(Some(by_service))
}
