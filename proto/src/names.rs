//! Names and renderings shared by the daemon, the SDK, the sidecar and the
//! CLI, kept here (the one crate all of them depend on) so the copies
//! cannot drift apart: span attribute keys, and the JSON form of an audit
//! entry.

/// Span attribute keys Strata sets on its spans. The daemon, the SDK and
/// the sidecar use these names, so a trace backend can join a call's client
/// and server spans on them.
pub mod attributes {
    /// The project.
    pub const PROJECT: &str = "strata.project";
    /// The tenant a request is made for (the caller's).
    pub const TENANT: &str = "strata.tenant";
    /// The service called or resolved.
    pub const SERVICE: &str = "strata.service";
    /// The tenant whose instances serve the request (empty: none).
    pub const RESOLVED_TENANT: &str = "strata.resolved_tenant";
    /// Whether the serving tenant is an ancestor of the requested one.
    pub const FALLBACK: &str = "strata.fallback";
    /// OpenTelemetry's `rpc.system` (`grpc`, or `http` for the daemon's
    /// HTTP routes).
    pub const RPC_SYSTEM: &str = "rpc.system";
    /// OpenTelemetry's `rpc.service`: the gRPC service (`strata.v1.RegistryService`).
    pub const RPC_SERVICE: &str = "rpc.service";
    /// OpenTelemetry's `rpc.method`: the gRPC method (`ResolveService`).
    pub const RPC_METHOD: &str = "rpc.method";
    /// OpenTelemetry's `rpc.grpc.status_code`.
    pub const RPC_GRPC_STATUS_CODE: &str = "rpc.grpc.status_code";
}

/// An audit entry as JSON: every field of [`AuditEntry`](crate::v1::AuditEntry)
/// under its proto name, as the daemon's `GET /v1/audit` and
/// `strata audit -o json` print it (the CLI adds a readable `time`).
pub fn audit_entry_json(e: &crate::v1::AuditEntry) -> serde_json::Value {
    serde_json::json!({
        "time_unix_ms": e.time_unix_ms,
        "actor_token_id": e.actor_token_id,
        "actor_name": e.actor_name,
        "operation": e.operation,
        "project": e.project,
        "tenant": e.tenant,
        "subject": e.subject,
        "result": e.result,
        "message": e.message,
        "revision": e.revision,
        "transport": e.transport,
        "member": e.member,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_audit_entry_renders_every_field_under_its_proto_name() {
        let entry = crate::v1::AuditEntry {
            time_unix_ms: 1,
            actor_name: "ci".into(),
            operation: "PutConfig".into(),
            revision: 7,
            ..Default::default()
        };
        let json = audit_entry_json(&entry);
        let keys: Vec<&str> = json
            .as_object()
            .into_iter()
            .flat_map(|o| o.keys().map(String::as_str))
            .collect();
        assert_eq!(
            keys,
            [
                "actor_name",
                "actor_token_id",
                "member",
                "message",
                "operation",
                "project",
                "result",
                "revision",
                "subject",
                "tenant",
                "time_unix_ms",
                "transport",
            ]
        );
        assert_eq!(json["operation"], "PutConfig");
        assert_eq!(json["revision"], 7);
    }
}
