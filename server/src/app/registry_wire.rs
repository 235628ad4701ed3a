//! Registry objects to and from the wire: instances, checks, resolutions
//! and branch registrations as protobuf messages. The gRPC handlers and the
//! services watch (which pushes encoded resolutions) share them.

use strata_proto::v1::{
    Endpoint, HealthCheck, Instance, InstanceKind, Protocol as WireProtocol, RegisterBranchRequest,
    ResolvedService, UdpCheck,
};

use crate::app::api::{NewTenant, PutLayer};
use crate::app::registry::{BranchRegistration, InstanceInfo, ServiceResolution};
use crate::domain::document::{Format, Mode};
use crate::domain::registry::{CheckKind, CheckSpec, Health, InstanceSpec, Protocol, UdpExpect};
use crate::error::ApiError;

pub(crate) fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(strata_proto::v1::ErrorReason::InvalidArgument, message)
}

fn protocol_from_wire(value: i32) -> Result<Option<Protocol>, ApiError> {
    match WireProtocol::try_from(value) {
        Ok(WireProtocol::Unspecified) => Ok(None),
        Ok(WireProtocol::Http) => Ok(Some(Protocol::Http)),
        Ok(WireProtocol::Grpc) => Ok(Some(Protocol::Grpc)),
        Ok(WireProtocol::Tcp) => Ok(Some(Protocol::Tcp)),
        Ok(WireProtocol::Udp) => Ok(Some(Protocol::Udp)),
        Err(_) => Err(bad(format!("unknown protocol value {value}"))),
    }
}

fn protocol_to_wire(name: &str) -> WireProtocol {
    match name {
        "grpc" => WireProtocol::Grpc,
        "tcp" => WireProtocol::Tcp,
        "udp" => WireProtocol::Udp,
        _ => WireProtocol::Http,
    }
}

/// A check as the wire gives it; `None` when nothing is set.
fn check_from_wire(c: &HealthCheck) -> Result<Option<CheckSpec>, ApiError> {
    let mut kinds = Vec::new();
    if c.tcp {
        kinds.push(CheckKind::Tcp);
    }
    if !c.http_path.is_empty() {
        let status = match c.http_status {
            0 => None,
            s => Some(
                u16::try_from(s)
                    .map_err(|_| bad(format!("http_status {s} is not an HTTP status")))?,
            ),
        };
        kinds.push(CheckKind::Http {
            path: c.http_path.clone(),
            status,
        });
    }
    if !c.grpc_service.is_empty() {
        let service = if c.grpc_service == "*" {
            String::new()
        } else {
            c.grpc_service.clone()
        };
        kinds.push(CheckKind::Grpc { service });
    }
    if let Some(udp) = &c.udp {
        let expect = match (udp.expect.is_empty(), udp.expect_regex.is_empty()) {
            (true, true) => UdpExpect::Any,
            (false, true) => UdpExpect::Bytes(udp.expect.clone()),
            (true, false) => UdpExpect::Regex(udp.expect_regex.clone()),
            (false, false) => {
                return Err(bad("a UDP check has expect or expect_regex, not both"));
            }
        };
        kinds.push(CheckKind::Udp {
            send: udp.send.clone(),
            expect,
        });
    }
    if kinds.len() > 1 {
        return Err(bad(
            "a check is exactly one of tcp, http_path, grpc_service or udp",
        ));
    }
    Ok(kinds.pop().map(|kind| CheckSpec {
        kind,
        endpoint: (!c.endpoint.is_empty()).then(|| c.endpoint.clone()),
        interval_ms: c.interval_ms,
        timeout_ms: c.timeout_ms,
        failure_threshold: c.failure_threshold,
        success_threshold: c.success_threshold,
    }))
}

/// The spec of an instance from the wire (output-only fields ignored).
pub fn spec_from_wire(i: &Instance) -> Result<(Option<String>, InstanceSpec), ApiError> {
    let mut endpoints = Vec::with_capacity(i.endpoints.len());
    for (name, e) in &i.endpoints {
        endpoints.push((
            name.clone(),
            e.address.clone(),
            protocol_from_wire(e.protocol)?,
        ));
    }
    let persistent = match InstanceKind::try_from(i.kind) {
        Ok(InstanceKind::Persistent) => true,
        Ok(InstanceKind::Ephemeral | InstanceKind::Unspecified) => false,
        Err(_) => return Err(bad(format!("unknown instance kind {}", i.kind))),
    };
    let check = match &i.check {
        Some(c) => check_from_wire(c)?,
        None => None,
    };
    let spec = InstanceSpec {
        endpoints,
        protocol: protocol_from_wire(i.protocol)?,
        metadata: i.metadata.clone().into_iter().collect(),
        weight: i.weight,
        version: i.version.clone(),
        persistent,
        ttl_seconds: i.ttl_seconds,
        check,
    };
    Ok(((!i.id.is_empty()).then(|| i.id.clone()), spec))
}

/// An instance for the wire.
pub fn instance_to_proto(info: InstanceInfo) -> Instance {
    let r = &info.entry.record;
    let endpoints = r
        .endpoints
        .iter()
        .map(|(name, e)| {
            (
                name.clone(),
                Endpoint {
                    address: e.address.clone(),
                    protocol: protocol_to_wire(&e.protocol) as i32,
                },
            )
        })
        .collect();
    let check = r.check.as_ref().map(|c| HealthCheck {
        tcp: c.kind == "tcp",
        http_path: c.http_path.clone(),
        http_status: c.http_status,
        grpc_service: if c.kind == "grpc" && c.grpc_service.is_empty() {
            "*".into()
        } else {
            c.grpc_service.clone()
        },
        endpoint: c.endpoint.clone(),
        interval_ms: c.interval_ms,
        timeout_ms: c.timeout_ms,
        failure_threshold: c.failure_threshold,
        success_threshold: c.success_threshold,
        udp: (c.kind == "udp").then(|| UdpCheck {
            send: c.udp_send.clone(),
            expect: c.udp_expect.clone(),
            expect_regex: c.udp_expect_regex.clone(),
        }),
    });
    Instance {
        id: info.id,
        endpoints,
        protocol: WireProtocol::Unspecified as i32,
        metadata: r.metadata.clone().into_iter().collect(),
        weight: r.weight,
        version: r.version.clone(),
        kind: if r.persistent {
            InstanceKind::Persistent
        } else {
            InstanceKind::Ephemeral
        } as i32,
        ttl_seconds: r.ttl_seconds,
        check,
        draining: r.draining,
        health: match info.health {
            Health::Unknown => strata_proto::v1::Health::Unknown,
            Health::Healthy => strata_proto::v1::Health::Healthy,
            Health::Unhealthy => strata_proto::v1::Health::Unhealthy,
        } as i32,
        health_detail: info.health_detail,
        lease_id: info.entry.lease,
        tenant: info.tenant,
        service: info.service,
        mod_revision: info.entry.mod_revision,
    }
}

/// A service resolution for the wire.
pub fn resolution_to_proto(r: ServiceResolution) -> ResolvedService {
    ResolvedService {
        service: r.service,
        tenant: r.tenant.unwrap_or_default(),
        fallback: r.fallback,
        instances: r.instances.into_iter().map(instance_to_proto).collect(),
    }
}

/// A branch registration from the wire.
pub fn branch_from_wire(r: RegisterBranchRequest) -> Result<BranchRegistration, ApiError> {
    let instances = r
        .instances
        .iter()
        .map(spec_from_wire)
        .collect::<Result<Vec<_>, _>>()?;
    let mut config = Vec::with_capacity(r.config.len());
    for c in r.config {
        let format = if c.format.is_empty() {
            None
        } else {
            Some(c.format.parse::<Format>().map_err(|e| bad(e.to_string()))?)
        };
        let mode = if c.mode.is_empty() {
            Mode::Replace
        } else {
            c.mode.parse::<Mode>().map_err(|e| bad(e.to_string()))?
        };
        config.push(PutLayer {
            project: r.project.clone(),
            tenant: r.tenant.clone(),
            key: c.key,
            value: c.value,
            format,
            mode,
            expected_revision: None,
        });
    }
    Ok(BranchRegistration {
        tenant: NewTenant {
            project: r.project,
            name: r.tenant,
            parent: r.parent,
            labels: r.labels,
            ttl_seconds: r.tenant_ttl_seconds,
            strict: r.strict,
            protected: false,
        },
        service: r.service,
        instances,
        config,
    })
}
