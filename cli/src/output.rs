//! Rendering of results as aligned tables (for people) or JSON (for scripts).

use clap::ValueEnum;
use serde_json::{Value, json};
use strata_client::proto::watch_config_response::Kind;
use strata_client::proto::{
    ConfigVersion, FallbackPolicy, Health, Instance, InstanceKind, Protocol, ResolvedService,
    ResolvedValue, Tenant, WatchConfigResponse, WatchServicesResponse, watch_services_response,
};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// Aligned columns.
    Table,
    /// One JSON document.
    Json,
}

/// A table under construction.
pub(crate) struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(String::len).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let line = |cells: &[String]| {
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<width$}", width = widths.get(i).copied().unwrap_or(0)))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        };
        let mut out = line(&self.header);
        for row in &self.rows {
            out.push('\n');
            out.push_str(&line(row));
        }
        out
    }
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn tenant_json(t: &Tenant) -> Value {
    json!({
        "project": t.project,
        "name": t.name,
        "parent": t.parent,
        "labels": t.labels,
        "ttl_seconds": t.ttl_seconds,
        "expires_at_unix_ms": t.expires_at_unix_ms,
        "fallback": if t.fallback == FallbackPolicy::Strict as i32 { "strict" } else { "permissive" },
        "protected": t.protected,
        "create_revision": t.create_revision,
        "mod_revision": t.mod_revision,
        "chain": t.chain,
    })
}

fn protocol_name(p: i32) -> &'static str {
    match Protocol::try_from(p) {
        Ok(Protocol::Http) => "http",
        Ok(Protocol::Grpc) => "grpc",
        Ok(Protocol::Tcp) => "tcp",
        Ok(Protocol::Udp) => "udp",
        Ok(Protocol::Unspecified) | Err(_) => "-",
    }
}

fn kind_name(k: i32) -> &'static str {
    match InstanceKind::try_from(k) {
        Ok(InstanceKind::Persistent) => "persistent",
        Ok(InstanceKind::Ephemeral) => "ephemeral",
        Ok(InstanceKind::Unspecified) | Err(_) => "-",
    }
}

fn health_name(h: i32) -> &'static str {
    match Health::try_from(h) {
        Ok(Health::Healthy) => "healthy",
        Ok(Health::Unhealthy) => "unhealthy",
        Ok(Health::Unknown) => "unknown",
        Ok(Health::Unspecified) | Err(_) => "-",
    }
}

/// An endpoint's protocol, which defaults to its instance's.
fn endpoint_protocol(i: &Instance, p: i32) -> &'static str {
    if p == Protocol::Unspecified as i32 {
        protocol_name(i.protocol)
    } else {
        protocol_name(p)
    }
}

/// `name=address` pairs sorted by name, for tables.
fn endpoints_text(i: &Instance) -> String {
    let mut endpoints: Vec<String> = i
        .endpoints
        .iter()
        .map(|(name, e)| format!("{name}={}", e.address))
        .collect();
    endpoints.sort();
    endpoints.join(",")
}

fn instance_json(i: &Instance) -> Value {
    let endpoints: serde_json::Map<String, Value> = i
        .endpoints
        .iter()
        .map(|(name, e)| {
            (
                name.clone(),
                json!({"address": e.address, "protocol": endpoint_protocol(i, e.protocol)}),
            )
        })
        .collect();
    let mut v = json!({
        "id": i.id,
        "tenant": i.tenant,
        "service": i.service,
        "kind": kind_name(i.kind),
        "endpoints": endpoints,
        "metadata": i.metadata,
        "weight": i.weight,
        "version": i.version,
        "health": health_name(i.health),
        "draining": i.draining,
        "mod_revision": i.mod_revision,
    });
    if !i.health_detail.is_empty() {
        v["health_detail"] = json!(i.health_detail);
    }
    if i.lease_id != 0 {
        v["lease_id"] = json!(i.lease_id);
    }
    if i.ttl_seconds != 0 {
        v["ttl_seconds"] = json!(i.ttl_seconds);
    }
    v
}

/// Where a service resolves; `tenant` is null when nothing serves it.
fn resolved_json(s: &ResolvedService) -> Value {
    json!({
        "service": s.service,
        "tenant": if s.tenant.is_empty() { Value::Null } else { json!(s.tenant) },
        "fallback": s.fallback,
        "instances": s.instances.iter().map(instance_json).collect::<Vec<_>>(),
    })
}

/// A resolution in a few words: `feat-1`, `integration (fallback)` or `-`.
fn served_by(s: &ResolvedService) -> String {
    match (s.tenant.as_str(), s.fallback) {
        ("", _) => "-".to_owned(),
        (t, true) => format!("{t} (fallback)"),
        (t, false) => t.to_owned(),
    }
}

impl Output {
    /// Prints key/value facts.
    pub(crate) fn record(self, fields: &[(&str, Value)]) {
        match self {
            Output::Json => {
                let map: serde_json::Map<String, Value> = fields
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.clone()))
                    .collect();
                print_json(&Value::Object(map));
            }
            Output::Table => {
                let mut table = Table::new(&["FIELD", "VALUE"]);
                for (k, v) in fields {
                    let text = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    table.row(vec![(*k).to_owned(), text]);
                }
                println!("{}", table.render());
            }
        }
    }

    /// Prints tenants; the table shows the tree by indenting children.
    pub(crate) fn tenants(self, tenants: &[Tenant]) {
        match self {
            Output::Json => print_json(&Value::Array(tenants.iter().map(tenant_json).collect())),
            Output::Table => {
                let mut table =
                    Table::new(&["TENANT", "PARENT", "FALLBACK", "PROTECTED", "TTL", "LABELS"]);
                for t in tenants {
                    let depth = t.chain.len().saturating_sub(1);
                    let mut labels: Vec<String> =
                        t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    labels.sort();
                    table.row(vec![
                        format!("{}{}", "  ".repeat(depth), t.name),
                        if t.parent.is_empty() {
                            "-".into()
                        } else {
                            t.parent.clone()
                        },
                        if t.fallback == FallbackPolicy::Strict as i32 {
                            "strict"
                        } else {
                            "permissive"
                        }
                        .into(),
                        t.protected.to_string(),
                        if t.ttl_seconds > 0 {
                            format!("{}s", t.ttl_seconds)
                        } else {
                            "-".into()
                        },
                        labels.join(","),
                    ]);
                }
                println!("{}", table.render());
            }
        }
    }

    /// Prints one value: raw to stdout for tables (so it can be piped), a
    /// JSON document with metadata otherwise.
    pub(crate) fn value(
        self,
        key: &str,
        value: &[u8],
        format: &str,
        origin: &[String],
        revision: i64,
    ) {
        match self {
            Output::Json => print_json(&json!({
                "key": key,
                "format": format,
                "origin": origin,
                "mod_revision": revision,
                "value": String::from_utf8_lossy(value),
            })),
            Output::Table => {
                let text = String::from_utf8_lossy(value);
                print!("{text}");
                if !text.ends_with('\n') {
                    println!();
                }
            }
        }
    }

    /// Prints resolved values as a list.
    pub(crate) fn values(self, values: &[ResolvedValue]) {
        match self {
            Output::Json => print_json(&Value::Array(
                values
                    .iter()
                    .map(|v| {
                        json!({
                            "key": v.key,
                            "format": v.format,
                            "origin": v.origin,
                            "mod_revision": v.mod_revision,
                            "value": String::from_utf8_lossy(&v.value),
                        })
                    })
                    .collect(),
            )),
            Output::Table => {
                let mut table = Table::new(&["KEY", "FORMAT", "ORIGIN", "REVISION", "SIZE"]);
                for v in values {
                    table.row(vec![
                        v.key.clone(),
                        v.format.clone(),
                        v.origin.join(","),
                        v.mod_revision.to_string(),
                        v.value.len().to_string(),
                    ]);
                }
                println!("{}", table.render());
            }
        }
    }

    /// Prints one watch message: a line per key for people, one JSON object
    /// per line (NDJSON) for scripts.
    pub(crate) fn watch_message(self, m: &WatchConfigResponse) {
        let kind = if m.kind == Kind::Snapshot as i32 {
            "snapshot"
        } else {
            "change"
        };
        match self {
            Output::Json => {
                let changes: Vec<Value> = m
                    .changes
                    .iter()
                    .map(|c| match &c.value {
                        Some(v) => json!({
                            "key": c.key,
                            "format": v.format,
                            "origin": v.origin,
                            "value": String::from_utf8_lossy(&v.value),
                        }),
                        None => json!({"key": c.key, "deleted": true}),
                    })
                    .collect();
                println!(
                    "{}",
                    json!({
                        "revision": m.revision,
                        "kind": kind,
                        "reset": m.reset,
                        "tenant_deleted": m.tenant_deleted,
                        "changes": changes,
                    })
                );
            }
            Output::Table => {
                let reset = if m.reset { " (reset)" } else { "" };
                let gone = if m.tenant_deleted {
                    " — tenant deleted"
                } else {
                    ""
                };
                println!("@{} {kind}{reset}{gone}", m.revision);
                for c in &m.changes {
                    match &c.value {
                        Some(v) => {
                            println!("  {}  [{}] from {}", c.key, v.format, v.origin.join(","))
                        }
                        None => println!("  {}  (removed)", c.key),
                    }
                }
            }
        }
    }

    /// Prints every service visible from a tenant and where each resolves.
    pub(crate) fn services(self, services: &[ResolvedService]) {
        let mut table = Table::new(&["SERVICE", "TENANT", "FALLBACK", "ROUTABLE"]);
        let mut json = Vec::new();
        for s in services {
            table.row(vec![
                s.service.clone(),
                if s.tenant.is_empty() {
                    "-".into()
                } else {
                    s.tenant.clone()
                },
                if s.tenant.is_empty() {
                    "-".into()
                } else if s.fallback {
                    "yes".into()
                } else {
                    "no".into()
                },
                s.instances.len().to_string(),
            ]);
            json.push(json!({
                "service": s.service,
                "tenant": if s.tenant.is_empty() { Value::Null } else { json!(s.tenant) },
                "fallback": s.fallback,
                "routable_instances": s.instances.len(),
            }));
        }
        self.table_with(table, Value::Array(json));
    }

    /// Prints instances with their state.
    pub(crate) fn instances(self, instances: &[Instance]) {
        let mut table = Table::new(&[
            "ID",
            "HEALTH",
            "DRAINING",
            "KIND",
            "VERSION",
            "WEIGHT",
            "ENDPOINTS",
        ]);
        for i in instances {
            let health = if i.health_detail.is_empty() {
                health_name(i.health).to_owned()
            } else {
                format!("{} ({})", health_name(i.health), i.health_detail)
            };
            table.row(vec![
                i.id.clone(),
                health,
                if i.draining { "yes" } else { "no" }.into(),
                kind_name(i.kind).into(),
                if i.version.is_empty() {
                    "-".into()
                } else {
                    i.version.clone()
                },
                i.weight.to_string(),
                endpoints_text(i),
            ]);
        }
        self.table_with(
            table,
            Value::Array(instances.iter().map(instance_json).collect()),
        );
    }

    /// Prints where a service resolves for `tenant`: which tenant serves it
    /// and its routable instances.
    pub(crate) fn resolved(self, tenant: &str, s: &ResolvedService, revision: i64) {
        match self {
            Output::Json => {
                let mut v = resolved_json(s);
                v["revision"] = json!(revision);
                print_json(&v);
            }
            Output::Table => {
                if s.tenant.is_empty() {
                    println!(
                        "{} has no routable instance for {tenant}, revision {revision}",
                        s.service
                    );
                    return;
                }
                println!(
                    "{} for {tenant}: served by {}, revision {revision}",
                    s.service,
                    served_by(s)
                );
                let mut table = Table::new(&["ID", "WEIGHT", "VERSION", "ENDPOINTS"]);
                for i in &s.instances {
                    table.row(vec![
                        i.id.clone(),
                        i.weight.to_string(),
                        if i.version.is_empty() {
                            "-".into()
                        } else {
                            i.version.clone()
                        },
                        endpoints_text(i),
                    ]);
                }
                println!("{}", table.render());
            }
        }
    }

    /// Prints one service watch message: a line per service for people, one
    /// JSON object per line (NDJSON) for scripts.
    pub(crate) fn service_watch_message(self, m: &WatchServicesResponse) {
        let kind = if m.kind == watch_services_response::Kind::Snapshot as i32 {
            "snapshot"
        } else {
            "change"
        };
        match self {
            Output::Json => println!(
                "{}",
                json!({
                    "revision": m.revision,
                    "kind": kind,
                    "reset": m.reset,
                    "tenant_deleted": m.tenant_deleted,
                    "services": m.services.iter().map(resolved_json).collect::<Vec<_>>(),
                })
            ),
            Output::Table => {
                let reset = if m.reset { " (reset)" } else { "" };
                let gone = if m.tenant_deleted {
                    " — tenant deleted"
                } else {
                    ""
                };
                println!("@{} {kind}{reset}{gone}", m.revision);
                for s in &m.services {
                    if s.tenant.is_empty() {
                        println!("  {}: no routable instance", s.service);
                    } else {
                        let endpoints: Vec<String> =
                            s.instances.iter().map(endpoints_text).collect();
                        println!(
                            "  {} → {}: {}",
                            s.service,
                            served_by(s),
                            endpoints.join(" ")
                        );
                    }
                }
            }
        }
    }

    /// Prints versions of a layer, newest first.
    pub(crate) fn history(self, versions: &[ConfigVersion]) {
        let mut table = Table::new(&["REVISION", "WRITTEN", "CHANGE", "FORMAT", "SIZE", "NOTE"]);
        let mut json = Vec::new();
        for v in versions {
            let written = std::time::UNIX_EPOCH
                + std::time::Duration::from_millis(
                    u64::try_from(v.written_at_unix_ms).unwrap_or(0),
                );
            let written = humantime::format_rfc3339_seconds(written).to_string();
            let note = if v.restored_from > 0 {
                format!("rollback to {}", v.restored_from)
            } else {
                String::new()
            };
            let mut entry = json!({
                "revision": v.revision,
                "written_at": written,
                "removed": v.layer.is_none(),
            });
            if v.restored_from > 0 {
                entry["restored_from"] = json!(v.restored_from);
            }
            match &v.layer {
                Some(l) => {
                    entry["format"] = json!(l.format);
                    entry["mode"] = json!(l.mode);
                    entry["value"] = json!(String::from_utf8_lossy(&l.value));
                    table.row(vec![
                        v.revision.to_string(),
                        written,
                        l.mode.clone(),
                        l.format.clone(),
                        l.value.len().to_string(),
                        note,
                    ]);
                }
                None => table.row(vec![
                    v.revision.to_string(),
                    written,
                    "removed".into(),
                    "-".into(),
                    "-".into(),
                    note,
                ]),
            }
            json.push(entry);
        }
        self.table_with(table, Value::Array(json));
    }

    /// Prints a prepared table, or the JSON alternative.
    pub(crate) fn table_with(self, table: Table, json: Value) {
        match self {
            Output::Json => print_json(&json),
            Output::Table => println!("{}", table.render()),
        }
    }
}
