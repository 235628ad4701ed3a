//! The registry's HTTP/JSON API for CD steps (plain curl):
//!
//! | method and path | does |
//! | --- | --- |
//! | `POST /v1/projects/{p}/tenants/{t}/services/{s}/instances` | register (body: an instance) |
//! | `GET /v1/projects/{p}/tenants/{t}/services/{s}/instances` | the tenant's own instances |
//! | `DELETE /v1/projects/{p}/tenants/{t}/services/{s}/instances/{id}` | deregister |
//! | `POST /v1/projects/{p}/tenants/{t}/services/{s}/instances/{id}/drain` | drain (`?undo=true` undoes) |
//! | `GET /v1/projects/{p}/tenants/{t}/services/{s}` | resolve with fallback |
//! | `GET /v1/projects/{p}/tenants/{t}/services` | every service visible from the tenant |
//! | `POST /v1/projects/{p}/tenants/{t}/services/{s}:register` | atomic branch registration |
//! | `POST /v1/leases/{lease}/heartbeat` | renew an ephemeral instance's lease |
//!
//! Bodies are parsed here (not by extractors) so every malformed one gets
//! the JSON error body, and duplicate endpoint names are caught rather than
//! silently collapsed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use http::{Method, StatusCode};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

use crate::app::api::{NewTenant, PutLayer};
use crate::app::audit::{self, Operation, Target};
use crate::app::auth::{Action, Principal};
use crate::app::registry::{BranchRegistration, InstanceInfo, Registration, ServiceResolution};
use crate::domain::document::{Format, Mode};
use crate::domain::registry::{CheckKind, CheckSpec, Health, InstanceSpec, Protocol, UdpExpect};
use crate::error::ApiError;
use crate::transport::http::{HttpState, RouteTable, build, flag, invalid, listed, read_body};
use crate::transport::state::DaemonState;

/// Largest registration body.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

const SERVICES: &str = "/v1/projects/{project}/tenants/{tenant}/services";
const SERVICE: &str = "/v1/projects/{project}/tenants/{tenant}/services/{service}";
const INSTANCES: &str = "/v1/projects/{project}/tenants/{tenant}/services/{service}/instances";
const INSTANCE: &str = "/v1/projects/{project}/tenants/{tenant}/services/{service}/instances/{id}";
const DRAIN: &str =
    "/v1/projects/{project}/tenants/{tenant}/services/{service}/instances/{id}/drain";
const HEARTBEAT: &str = "/v1/leases/{lease}/heartbeat";

fn table() -> RouteTable<HttpState> {
    vec![
        (Method::GET, SERVICES, get(list_services)),
        (Method::GET, SERVICE, get(resolve_service)),
        (Method::POST, SERVICE, post(register_branch)),
        (Method::GET, INSTANCES, get(list_instances)),
        (Method::POST, INSTANCES, post(register)),
        (Method::DELETE, INSTANCE, delete(deregister)),
        (Method::POST, DRAIN, post(drain)),
        (Method::POST, HEARTBEAT, post(heartbeat)),
    ]
}

/// Routes of the registry's JSON API.
pub fn router(state: Arc<DaemonState>) -> Router {
    build(table()).with_state(HttpState(state))
}

/// Method and path of every route of [`router`].
pub fn routes() -> Vec<(Method, &'static str)> {
    listed(table())
}

/// Endpoints in body order, duplicates kept so they can be refused.
#[derive(Debug, Default)]
struct Endpoints(Vec<(String, EndpointJson)>);

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EndpointJson {
    Address(String),
    Full {
        address: String,
        #[serde(default)]
        protocol: Option<String>,
    },
}

impl<'de> Deserialize<'de> for Endpoints {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EndpointsVisitor;
        impl<'de> Visitor<'de> for EndpointsVisitor {
            type Value = Endpoints;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"an object of endpoints, {"main": "host:port"}"#)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Endpoints, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, EndpointJson>()? {
                    out.push(entry);
                }
                Ok(Endpoints(out))
            }
        }
        deserializer.deserialize_map(EndpointsVisitor)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckJson {
    #[serde(default)]
    tcp: bool,
    #[serde(default)]
    http: Option<String>,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    grpc: Option<String>,
    #[serde(default)]
    udp: Option<UdpCheckJson>,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    interval_ms: u32,
    #[serde(default)]
    timeout_ms: u32,
    #[serde(default)]
    failure_threshold: u32,
    #[serde(default)]
    success_threshold: u32,
}

/// `"udp": {"send": "ping", "expect": "pong"}`: text, or `send_hex` /
/// `expect_hex` for binary datagrams, or `expect_regex`; no expectation
/// accepts any reply.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UdpCheckJson {
    #[serde(default)]
    send: Option<String>,
    #[serde(default)]
    send_hex: Option<String>,
    #[serde(default)]
    expect: Option<String>,
    #[serde(default)]
    expect_hex: Option<String>,
    #[serde(default)]
    expect_regex: Option<String>,
}

impl UdpCheckJson {
    fn into_kind(self) -> Result<CheckKind, ApiError> {
        let hex = |field: &str, text: &str| -> Result<Vec<u8>, ApiError> {
            crate::domain::hex::decode(text.trim()).map_err(|_| {
                invalid(format!(
                    "check udp.{field} is not hex: {:?}",
                    crate::domain::registry::truncated(text.trim())
                ))
            })
        };
        let send = match (self.send, self.send_hex) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(h)) => hex("send_hex", &h)?,
            _ => return Err(invalid("check udp needs exactly one of send or send_hex")),
        };
        let expect = match (self.expect, self.expect_hex, self.expect_regex) {
            (None, None, None) => UdpExpect::Any,
            (Some(text), None, None) => UdpExpect::Bytes(text.into_bytes()),
            (None, Some(h), None) => UdpExpect::Bytes(hex("expect_hex", &h)?),
            (None, None, Some(pattern)) => UdpExpect::Regex(pattern),
            _ => {
                return Err(invalid(
                    "check udp takes at most one of expect, expect_hex or expect_regex",
                ));
            }
        };
        Ok(CheckKind::Udp { send, expect })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceJson {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    endpoints: Endpoints,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    ttl_seconds: i64,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    weight: u32,
    #[serde(default)]
    version: String,
    #[serde(default)]
    check: Option<CheckJson>,
    #[serde(default)]
    lease_id: i64,
}

fn protocol(name: Option<&str>) -> Result<Option<Protocol>, ApiError> {
    name.map(|p| p.parse::<Protocol>().map_err(|e| invalid(e.0)))
        .transpose()
}

impl InstanceJson {
    fn into_spec(self) -> Result<(Option<String>, InstanceSpec, i64), ApiError> {
        let mut endpoints = Vec::with_capacity(self.endpoints.0.len());
        for (name, e) in self.endpoints.0 {
            let (address, proto) = match e {
                EndpointJson::Address(a) => (a, None),
                EndpointJson::Full { address, protocol } => (address, protocol),
            };
            endpoints.push((name, address, protocol(proto.as_deref())?));
        }
        let persistent = match self.kind.as_deref() {
            None | Some("ephemeral") => false,
            Some("persistent") => true,
            Some(other) => {
                return Err(invalid(format!(
                    "kind {other:?} is not one of: ephemeral, persistent"
                )));
            }
        };
        let check = self.check.map(check_spec).transpose()?;
        let spec = InstanceSpec {
            endpoints,
            protocol: protocol(self.protocol.as_deref())?,
            metadata: self.metadata,
            weight: self.weight,
            version: self.version,
            persistent,
            ttl_seconds: self.ttl_seconds,
            check,
        };
        Ok((self.id, spec, self.lease_id))
    }
}

fn check_spec(c: CheckJson) -> Result<CheckSpec, ApiError> {
    let mut kinds = Vec::new();
    if c.tcp {
        kinds.push(CheckKind::Tcp);
    }
    if let Some(path) = c.http {
        kinds.push(CheckKind::Http {
            path,
            status: c.status,
        });
    }
    if let Some(service) = c.grpc {
        kinds.push(CheckKind::Grpc { service });
    }
    if let Some(udp) = c.udp {
        kinds.push(udp.into_kind()?);
    }
    if kinds.len() != 1 {
        return Err(invalid(
            r#"check needs exactly one of "tcp": true, "http": "/path", "grpc": "service" or "udp": {"send": …}"#,
        ));
    }
    Ok(CheckSpec {
        kind: kinds.remove(0),
        endpoint: c.endpoint,
        interval_ms: c.interval_ms,
        timeout_ms: c.timeout_ms,
        failure_threshold: c.failure_threshold,
        success_threshold: c.success_threshold,
    })
}

async fn json_body<T: for<'de> Deserialize<'de>>(body: Body) -> Result<T, ApiError> {
    let bytes = read_body(body, MAX_BODY_BYTES).await?;
    crate::transport::http::json_object(&bytes)
}

fn instance_json(i: &InstanceInfo) -> Value {
    let r = &i.entry.record;
    let endpoints: serde_json::Map<String, Value> = r
        .endpoints
        .iter()
        .map(|(name, e)| {
            (
                name.clone(),
                json!({"address": e.address, "protocol": e.protocol}),
            )
        })
        .collect();
    json!({
        "id": i.id,
        "tenant": i.tenant,
        "service": i.service,
        "endpoints": endpoints,
        "metadata": r.metadata,
        "weight": r.weight,
        "version": r.version,
        "kind": if r.persistent { "persistent" } else { "ephemeral" },
        "ttl_seconds": r.ttl_seconds,
        "lease_id": i.entry.lease,
        "draining": r.draining,
        "health": match i.health {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        },
        "health_detail": i.health_detail,
        "mod_revision": i.entry.mod_revision,
    })
}

fn resolution_json(r: &ServiceResolution) -> Value {
    json!({
        "service": r.service,
        "tenant": r.tenant,
        "fallback": r.fallback,
        "instances": r.instances.iter().map(instance_json).collect::<Vec<_>>(),
    })
}

async fn register(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path((project, tenant, service)): Path<(String, String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    let target = Target::new(Operation::Register, &project, &tenant).subject(&service);
    audit::authorize(&principal, Action::Register, target)?;
    let (id, spec, lease) = json_body::<InstanceJson>(body).await?.into_spec()?;
    let (done, revision) = s
        .api()?
        .register(Registration {
            project,
            tenant,
            service,
            id,
            spec,
            lease: (lease != 0).then_some(lease),
        })
        .await?;
    let mut out = json!({"id": done.id, "revision": revision});
    if done.lease != 0 {
        out["lease_id"] = json!(done.lease);
        out["ttl_seconds"] = json!(done.ttl_seconds);
    }
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn deregister(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path((project, tenant, service, id)): Path<(String, String, String, String)>,
) -> Result<Response, ApiError> {
    let target =
        Target::new(Operation::Deregister, &project, &tenant).subject(format!("{service}/{id}"));
    audit::authorize(&principal, Action::Register, target)?;
    let revision = s
        .api()?
        .deregister(&project, &tenant, &service, &id)
        .await?;
    Ok(Json(json!({"revision": revision})).into_response())
}

async fn drain(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path((project, tenant, service, id)): Path<(String, String, String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let target =
        Target::new(Operation::Drain, &project, &tenant).subject(format!("{service}/{id}"));
    audit::authorize(&principal, Action::Register, target)?;
    let draining = !flag(&params, "undo")?;
    let revision = s
        .api()?
        .drain(&project, &tenant, &service, &id, draining)
        .await?;
    Ok(Json(json!({"revision": revision, "draining": draining})).into_response())
}

async fn heartbeat(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path(lease): Path<String>,
) -> Result<Response, ApiError> {
    principal.authorize(Action::Heartbeat, "", "")?;
    let lease: i64 = lease
        .parse()
        .map_err(|_| invalid(format!("lease {lease:?} is not a whole number")))?;
    let api = s.api()?;
    let ttl = api.heartbeat(lease, principal.project.as_deref()).await?;
    Ok(
        Json(json!({"lease_id": lease, "ttl_seconds": ttl, "revision": api.revision()}))
            .into_response(),
    )
}

async fn list_instances(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path((project, tenant, service)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    principal.authorize(Action::Read, &project, &tenant)?;
    let (mut list, revision) = s.api()?.instances(&project, &tenant, &service)?;
    for instance in &mut list {
        instance.redact_for(&principal, &project);
    }
    let list: Vec<Value> = list.iter().map(instance_json).collect();
    Ok(Json(json!({"revision": revision, "instances": list})).into_response())
}

async fn resolve_service(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path((project, tenant, service)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    principal.authorize(Action::Read, &project, &tenant)?;
    let (mut r, revision) = s.api()?.resolve_service(&project, &tenant, &service)?;
    r.redact_for(&principal, &project);
    crate::transport::layers::tracing::record_resolution(
        &project,
        &tenant,
        &service,
        r.tenant.as_deref(),
        r.fallback,
    );
    let mut out = resolution_json(&r);
    out["revision"] = json!(revision);
    Ok(Json(out).into_response())
}

async fn list_services(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path((project, tenant)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    principal.authorize(Action::Read, &project, &tenant)?;
    let (mut list, revision) = s.api()?.list_services(&project, &tenant)?;
    for resolution in &mut list {
        resolution.redact_for(&principal, &project);
    }
    let list: Vec<Value> = list.iter().map(resolution_json).collect();
    Ok(Json(json!({"revision": revision, "services": list})).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigJson {
    value: String,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BranchJson {
    #[serde(default)]
    parent: String,
    #[serde(default)]
    ttl_seconds: i64,
    #[serde(default)]
    strict: bool,
    #[serde(default)]
    labels: HashMap<String, String>,
    #[serde(default)]
    instances: Vec<InstanceJson>,
    #[serde(default)]
    config: BTreeMap<String, ConfigJson>,
}

/// `POST …/services/{s}:register` (the path segment carries the verb).
async fn register_branch(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path((project, tenant, service)): Path<(String, String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    let target = Target::new(Operation::RegisterBranch, &project, &tenant)
        .subject(service.strip_suffix(":register").unwrap_or(&service));
    audit::authorize(&principal, Action::Register, target)?;
    let service = service
        .strip_suffix(":register")
        .ok_or_else(|| {
            invalid(format!(
                "POST on a service takes the :register verb (…/services/{service}:register)"
            ))
        })?
        .to_owned();
    let branch: BranchJson = json_body(body).await?;
    let mut instances = Vec::with_capacity(branch.instances.len());
    for (i, instance) in branch.instances.into_iter().enumerate() {
        let (id, spec, lease) = instance
            .into_spec()
            .map_err(|e| e.prefixed(&format!("instance {i}: ")))?;
        if lease != 0 {
            return Err(invalid(
                "lease_id is not accepted in a branch registration (its ephemeral instances share a new lease)",
            ));
        }
        instances.push((id, spec));
    }
    let mut config = Vec::with_capacity(branch.config.len());
    for (key, c) in branch.config {
        let format = c
            .format
            .map(|f| f.parse::<Format>())
            .transpose()
            .map_err(|e| invalid(format!("config {key:?}: {e}")))?;
        let mode = c
            .mode
            .map(|m| m.parse::<Mode>())
            .transpose()
            .map_err(|e| invalid(format!("config {key:?}: {e}")))?
            .unwrap_or(Mode::Replace);
        config.push(PutLayer {
            project: project.clone(),
            tenant: tenant.clone(),
            key,
            value: c.value.into_bytes(),
            format,
            mode,
            expected_revision: None,
        });
    }
    s.api()?
        .authorize_placement(&principal, &project, &tenant, &branch.parent)?;
    let (done, revision) = s
        .api()?
        .register_branch(BranchRegistration {
            tenant: NewTenant {
                project,
                name: tenant,
                parent: branch.parent,
                labels: branch.labels,
                ttl_seconds: branch.ttl_seconds,
                strict: branch.strict,
                protected: false,
            },
            service,
            instances,
            config,
        })
        .await?;
    let mut out = json!({
        "revision": revision,
        "tenant_created": done.tenant_created,
        "instance_ids": done.instance_ids,
    });
    if done.lease != 0 {
        out["lease_id"] = json!(done.lease);
    }
    Ok(Json(out).into_response())
}
