//! The operator-facing contract of the metrics: every `strata_*` metric a
//! real `stratad`, a real `strata-sidecar` and the SDK (in this process,
//! through a Prometheus recorder) expose is listed in `docs/metrics.md` with
//! exactly the labels it carries and its type, and follows its naming rules
//! (prefix, units, `_total` counters, no instance id or key as a label). The other direction is checked too: a documented metric the
//! exercised components never emit fails the test, except the few listed in
//! [`CONDITIONAL`] with the reason they are not created here.
//!
//! The shipped alert rules (`deploy/prometheus/alerts.yaml`) and Grafana
//! dashboard (`deploy/grafana/strata.json`) may reference only documented
//! metrics and labels — a renamed metric would otherwise leave an alert
//! that can never fire. `promtool`, the Helm chart and the Kubernetes
//! schemas are checked by `scripts/check-deploy.sh`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use nix::sys::signal::Signal;
use serde::Deserialize;
use strata_client::{Client, InstanceSpec};
use strata_tests::sidecar::Sidecar;
use strata_tests::{Daemon, free_port, http_get, http_ok, http_request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::{Instant, sleep};

const PROJECT: &str = "vega";

/// Documented metrics that the tests below cannot make appear, with why.
/// Keep this short: everything else must be emitted.
const CONDITIONAL: &[(&str, &str)] = &[
    (
        "strata_audit_write_failures_total",
        "needs the store to refuse an audit write",
    ),
    (
        "strata_audit_pruned_total",
        "needs audit entries older than the retention",
    ),
    (
        "strata_rate_limited_total",
        "needs a per-token rate limit to be configured and exceeded",
    ),
    (
        "strata_tls_handshake_failures_total",
        "needs a TLS listener (tests/tests/tls.rs covers TLS)",
    ),
    (
        "strata_audit_refusals_suppressed_total",
        "needs a token over its refusal budget (tests/tests/hostile.rs)",
    ),
    (
        "strata_connections_refused_total",
        "needs limits.max_connections reached (tests/tests/hostile.rs)",
    ),
];

/// Labels that would make a series per instance, key or request: never
/// allowed (docs/metrics.md).
const FORBIDDEN_LABELS: &[&str] = &[
    "instance",
    "instance_id",
    "id",
    "key",
    "address",
    "endpoint",
    "lease",
    "lease_id",
    "path",
    "uri",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// One documented metric.
#[derive(Debug, Clone)]
struct DocMetric {
    kind: String,
    labels: BTreeSet<String>,
}

/// `docs/metrics.md` by component (`stratad`, `sdk`, `sidecar`): metric
/// name → type and label names, parsed from its tables.
fn documented() -> BTreeMap<&'static str, BTreeMap<String, DocMetric>> {
    let text = std::fs::read_to_string(repo_root().join("docs/metrics.md")).unwrap();
    let mut out: BTreeMap<&'static str, BTreeMap<String, DocMetric>> = BTreeMap::new();
    let mut component: Option<&'static str> = None;
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            component = if heading.contains("strata-sidecar") {
                Some("sidecar")
            } else if heading.contains("SDK") {
                Some("sdk")
            } else if heading.contains("stratad") {
                Some("stratad")
            } else {
                None
            };
            continue;
        }
        let Some(row) = line.strip_prefix("| `strata_") else {
            continue;
        };
        let component =
            component.unwrap_or_else(|| panic!("metric row outside a component section: {line}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert!(
            cells.len() >= 4,
            "metrics.md row needs name | type | labels | meaning: {line}"
        );
        let name = format!("strata_{}", cells[0].trim_end_matches('`'));
        let kind = cells[1].to_owned();
        assert!(
            ["counter", "gauge", "histogram"].contains(&kind.as_str()),
            "{name}: unknown type {kind:?}"
        );
        let labels = backticked(&strip_parenthesized(cells[2]));
        let previous = out
            .entry(component)
            .or_default()
            .insert(name.clone(), DocMetric { kind, labels });
        assert!(previous.is_none(), "{name} is listed twice for {component}");
    }
    for component in ["stratad", "sdk", "sidecar"] {
        assert!(
            out.get(component).is_some_and(|m| !m.is_empty()),
            "docs/metrics.md has no metrics table for {component}"
        );
    }
    out
}

/// `a` (`x`, `y`), `b` → `a` , `b`: drops the value lists after a label.
fn strip_parenthesized(cell: &str) -> String {
    let mut depth = 0usize;
    cell.chars()
        .filter(|c| {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                _ => return depth == 0,
            }
            false
        })
        .collect()
}

fn backticked(cell: &str) -> BTreeSet<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// One scraped metric family: type and the label sets of its series (`le`
/// removed from histogram buckets).
#[derive(Debug, Default)]
struct Family {
    kind: String,
    label_sets: BTreeSet<BTreeSet<String>>,
}

/// Parses Prometheus text exposition into families by name.
fn parse_exposition(text: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                panic!("bad TYPE line: {line}");
            };
            families.entry(name.to_owned()).or_default().kind = kind.to_owned();
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, _value) = line.rsplit_once(' ').expect("sample line");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, label_names(rest.trim_end_matches('}'))),
            None => (series, BTreeSet::new()),
        };
        let family = if families.contains_key(name) {
            name.to_owned()
        } else {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| families.contains_key(*b)))
                .unwrap_or_else(|| panic!("sample of an undeclared family: {line}"))
                .to_owned()
        };
        let mut labels = labels;
        labels.remove("le");
        families.get_mut(&family).unwrap().label_sets.insert(labels);
    }
    families
}

/// Label names of `a="x",b="y,z"` (values may hold commas and escaped quotes).
fn label_names(body: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = body;
    while let Some((name, after)) = rest.split_once("=\"") {
        names.insert(name.trim_start_matches(',').trim().to_owned());
        let mut escaped = false;
        let end = after
            .char_indices()
            .find(|&(_, c)| {
                let close = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                close
            })
            .map(|(i, _)| i)
            .expect("closing quote");
        rest = &after[end + 1..];
    }
    names
}

/// Checks one component's scrape against its documented table: every
/// scraped `strata_*` family is documented with its type and exact labels
/// and follows the naming rules. Returns the documented names not seen.
fn check_component(
    component: &str,
    scraped: &BTreeMap<String, Family>,
    docs: &BTreeMap<String, DocMetric>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, family) in scraped.iter().filter(|(n, _)| n.starts_with("strata_")) {
        let Some(doc) = docs.get(name) else {
            problems.push(format!(
                "{component} exposes {name} ({}, labels {:?}) but docs/metrics.md does not list it under {component}",
                family.kind, family.label_sets
            ));
            continue;
        };
        if doc.kind != family.kind {
            problems.push(format!(
                "{name}: documented as a {}, exposed as a {}",
                doc.kind, family.kind
            ));
        }
        for labels in &family.label_sets {
            if labels != &doc.labels {
                problems.push(format!(
                    "{name}: a series has labels {labels:?}, docs/metrics.md says {:?}",
                    doc.labels
                ));
            }
            for label in labels {
                if FORBIDDEN_LABELS.contains(&label.as_str()) {
                    problems.push(format!(
                        "{name}: label {label:?} would make a series per instance or key"
                    ));
                }
            }
        }
        if (family.kind == "counter") != name.ends_with("_total") {
            problems.push(format!(
                "{name}: counters, and only counters, end in _total"
            ));
        }
        if ["_ms", "_millis", "_milliseconds", "_us", "_kb", "_mb"]
            .iter()
            .any(|s| name.ends_with(s) || name.contains(&format!("{s}_")))
        {
            problems.push(format!("{name}: use base units (seconds, bytes)"));
        }
        if family.kind == "histogram" && name.contains("duration") && !name.ends_with("_seconds") {
            problems.push(format!("{name}: a duration histogram is in _seconds"));
        }
    }
    assert!(
        problems.is_empty(),
        "{component} metrics do not match docs/metrics.md:\n  {}",
        problems.join("\n  ")
    );
    docs.keys()
        .filter(|n| !scraped.contains_key(*n))
        .filter(|n| !CONDITIONAL.iter().any(|(c, _)| c == n))
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------
// Alert rules and dashboard reference only documented metrics.

/// Names that are not ours but are fine in PromQL: Prometheus' own
/// per-target series.
const PROMETHEUS_SERIES: &[&str] = &["up"];

/// Labels a query may use besides documented ones: target labels added by
/// Prometheus, and the histogram bucket bound.
const TARGET_LABELS: &[&str] = &["job", "instance", "le", "namespace", "pod"];

/// Every `strata_*` identifier in `text`, with the label names of a
/// selector (`name{a="x", b=~"y"}`) right after it.
fn referenced(text: &str) -> Vec<(String, BTreeSet<String>)> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("strata_") {
        let start = i + at;
        let preceded_by_ident = start > 0 && {
            let c = bytes[start - 1];
            c.is_ascii_alphanumeric() || c == b'_' || c == b':'
        };
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(text.len() - start);
        i = end;
        if preceded_by_ident {
            continue;
        }
        let name = text[start..end].to_owned();
        let mut labels = BTreeSet::new();
        if text[end..].starts_with('{') {
            let close = closing_brace(&text[end..]) + end;
            for matcher in split_outside_quotes(&text[end + 1..close]) {
                let label: String = matcher
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !label.is_empty() {
                    labels.insert(label);
                }
            }
        }
        out.push((name, labels));
    }
    out
}

/// Splits a selector's matchers at commas outside quoted values.
fn split_outside_quotes(body: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut quoted, mut escaped, mut start) = (false, false, 0);
    for (i, c) in body.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&body[start..]);
    parts
}

/// Offset of the `}` closing the selector that `text` starts with.
fn closing_brace(text: &str) -> usize {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return i,
            _ => {}
        }
    }
    panic!("unclosed selector: {text}")
}

/// Label names in `by (…)`, `without (…)`, `on (…)`, `ignoring (…)`.
fn grouping_labels(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for keyword in [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        let mut rest = text;
        while let Some(at) = rest.find(keyword) {
            let before_ok = at == 0 || {
                let c = rest.as_bytes()[at - 1];
                !(c.is_ascii_alphanumeric() || c == b'_')
            };
            let after = rest[at + keyword.len()..].trim_start();
            rest = &rest[at + keyword.len()..];
            if !before_ok || !after.starts_with('(') {
                continue;
            }
            let Some(close) = after.find(')') else {
                continue;
            };
            for label in after[1..close].split(',') {
                let label = label.trim();
                if !label.is_empty() {
                    out.insert(label.to_owned());
                }
            }
        }
    }
    out
}

/// Checks that `text` uses only documented metrics and labels.
fn check_references(what: &str, text: &str, all: &BTreeMap<String, DocMetric>) -> BTreeSet<String> {
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (name, labels) in referenced(text) {
        let (base, doc) = match all.get(&name) {
            Some(doc) => (name.clone(), doc),
            None => {
                let hist = ["_bucket", "_sum", "_count"].iter().find_map(|s| {
                    let base = name.strip_suffix(s)?;
                    all.get(base)
                        .filter(|d| d.kind == "histogram")
                        .map(|d| (base.to_owned(), d))
                });
                match hist {
                    Some(found) => found,
                    None => {
                        problems.push(format!(
                            "{what} references {name}, which docs/metrics.md does not list"
                        ));
                        continue;
                    }
                }
            }
        };
        for label in labels {
            if !doc.labels.contains(&label) && !TARGET_LABELS.contains(&label.as_str()) {
                problems.push(format!(
                    "{what}: {name} has no label {label:?} (docs/metrics.md: {:?})",
                    doc.labels
                ));
            }
        }
        used.insert(base);
    }
    let known: BTreeSet<&str> = all
        .values()
        .flat_map(|d| d.labels.iter().map(String::as_str))
        .chain(TARGET_LABELS.iter().copied())
        .collect();
    for label in grouping_labels(text) {
        if !known.contains(label.as_str()) {
            problems.push(format!(
                "{what} groups by {label:?}, which no documented metric has"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    used
}

fn all_documented() -> BTreeMap<String, DocMetric> {
    documented().into_values().flatten().collect()
}

#[test]
fn alert_rules_reference_only_documented_metrics() {
    let text = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yaml")).unwrap();
    let used = check_references("alerts.yaml", &text, &all_documented());
    // Each area the operator relies on has an alert.
    for metric in [
        "strata_leader",
        "strata_ready",
        "strata_store_write_duration_seconds",
        "strata_watch_resets_total",
        "strata_probe_results_total",
        "strata_tenants_expired_uncollected",
        "strata_sidecar_requests_total",
        "strata_sdk_cache_starts_total",
    ] {
        assert!(used.contains(metric), "alerts.yaml has no rule on {metric}");
    }
    for name in PROMETHEUS_SERIES {
        assert!(
            text.contains(&format!("{name}{{")),
            "alerts.yaml: daemon-down rule on {name}"
        );
    }
    // Every alert has a runbook entry in docs/operations.md, and its
    // `runbook` annotation points at it.
    let operations = std::fs::read_to_string(repo_root().join("docs/operations.md")).unwrap();
    let alerts: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 10, "only {} alerts", alerts.len());
    for alert in alerts {
        assert!(
            operations.contains(&format!("\n### {alert}\n")),
            "docs/operations.md has no runbook section `### {alert}`"
        );
        let link = format!("runbook: \"docs/operations.md#{}\"", alert.to_lowercase());
        let rule = text
            .split("- alert: ")
            .find(|r| r.starts_with(alert))
            .unwrap();
        assert!(rule.contains(&link), "{alert}: annotation should be {link}");
    }
    // The Helm chart ships the same rules (PrometheusRule): an identical copy.
    let chart =
        std::fs::read_to_string(repo_root().join("deploy/helm/strata/files/alerts.yaml")).unwrap();
    assert!(
        chart == text,
        "deploy/helm/strata/files/alerts.yaml differs from deploy/prometheus/alerts.yaml: \
         cp deploy/prometheus/alerts.yaml deploy/helm/strata/files/alerts.yaml"
    );
}

#[test]
fn dashboard_references_only_documented_metrics() {
    let text = std::fs::read_to_string(repo_root().join("deploy/grafana/strata.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    // Every query string, wherever it sits (panel targets, template variables).
    let mut queries = Vec::new();
    collect_queries(&dashboard, &mut queries);
    assert!(
        queries.len() >= 10,
        "dashboard has only {} queries",
        queries.len()
    );
    let all = all_documented();
    let mut used = BTreeSet::new();
    for query in &queries {
        used.extend(check_references("strata.json", query, &all));
    }
    // One row per component at least.
    for prefix in [
        "strata_rpc_",
        "strata_watch_",
        "strata_sidecar_",
        "strata_sdk_",
        "strata_store_",
    ] {
        assert!(
            used.iter().any(|m| m.starts_with(prefix)),
            "dashboard shows no {prefix}* metric"
        );
    }
}

fn collect_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::Object(q)) => {
                        if let Some(serde_json::Value::String(s)) = q.get("query") {
                            out.push(s.clone());
                        }
                    }
                    _ => collect_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_queries(v, out)),
        _ => {}
    }
}

#[test]
fn the_doc_parser_reads_labels_and_skips_value_lists() {
    let docs = documented();
    let stratad = &docs["stratad"];
    assert_eq!(
        stratad["strata_watch_resets_total"].labels,
        ["reason", "watch"].map(String::from).into()
    );
    assert!(stratad["strata_ready"].labels.is_empty());
    assert_eq!(stratad["strata_rpc_duration_seconds"].kind, "histogram");
    assert_eq!(
        docs["sidecar"]["strata_sidecar_requests_total"].labels,
        ["code", "fallback", "project", "service", "tenant"]
            .map(String::from)
            .into()
    );
    let refs =
        referenced(r#"sum by (job) (rate(strata_a_total{code=~"5..", x="y,z"}[5m])) / strata_b"#);
    assert_eq!(refs[0].0, "strata_a_total");
    assert_eq!(refs[0].1, ["code", "x"].map(String::from).into());
    assert_eq!(refs[1].0, "strata_b");
    assert_eq!(
        grouping_labels("sum by (job, le) (x) unless on (instance) y"),
        ["instance", "job", "le"].map(String::from).into()
    );
}

// ---------------------------------------------------------------------------
// Scraping real components.

/// Aborts a task when dropped, so test servers stop with the test.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A keep-alive HTTP/1.1 server answering every request `200 ok`.
async fn http_upstream() -> (SocketAddr, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    // Bodiless requests: answer each complete head.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, Task(task))
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").await.expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// Polls `scrape` until every name in `want` is exposed or `limit` passes;
/// returns the last scrape.
async fn scrape_until<F, Fut>(
    want: &[&str],
    limit: Duration,
    mut scrape: F,
) -> BTreeMap<String, Family>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let deadline = Instant::now() + limit;
    loop {
        let families = parse_exposition(&scrape().await);
        if want.iter().all(|w| families.contains_key(*w)) || Instant::now() >= deadline {
            return families;
        }
        sleep(Duration::from_millis(200)).await;
    }
}

async fn put_tenant(api: SocketAddr, tenant: &str, body: &str) {
    http_ok(
        api,
        "PUT",
        &format!("/v1/projects/{PROJECT}/tenants/{tenant}"),
        body,
    )
    .await;
}

async fn register(api: SocketAddr, tenant: &str, service: &str, body: &str) {
    http_ok(
        api,
        "POST",
        &format!("/v1/projects/{PROJECT}/tenants/{tenant}/services/{service}/instances"),
        body,
    )
    .await;
}

/// A request through the sidecar's outbound port to `service` (named by
/// the `Host` header): the status, 0 when the exchange failed.
async fn through(sidecar: &Sidecar, service: &str) -> u16 {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(sidecar.outbound).await?;
        stream
            .write_all(
                format!("GET / HTTP/1.1\r\nhost: {service}\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        std::io::Result::Ok(raw)
    };
    let Ok(Ok(raw)) = tokio::time::timeout(Duration::from_secs(10), exchange).await else {
        return 0;
    };
    String::from_utf8_lossy(&raw)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn stratad_and_sidecar_metrics_are_the_documented_ones() {
    // Compaction every second keeping one revision, so the job runs here.
    let daemon = Daemon::builder()
        .env("STRATA_COMPACTION_INTERVAL", "1s")
        .env("STRATA_COMPACTION_RETAIN_REVISIONS", "1")
        .start()
        .await;
    let api = daemon.addr;
    put_tenant(api, "integration", "{}").await;
    put_tenant(api, "feat-1", r#"{"parent":"integration"}"#).await;
    // A tenant that expires (collected) and one that expires but holds a
    // protected child (held back).
    put_tenant(api, "short", r#"{"ttl_seconds":1}"#).await;
    put_tenant(api, "held", r#"{"ttl_seconds":1}"#).await;
    put_tenant(api, "keep", r#"{"parent":"held","protected":true}"#).await;
    http_ok(
        api,
        "PUT",
        &format!("/v1/projects/{PROJECT}/tenants/integration/config/game/config.json"),
        r#"{"max_players":16}"#,
    )
    .await;

    let (upstream, _upstream_task) = http_upstream().await;
    let dead = format!("127.0.0.1:{}", free_port());
    // lobby: probed over TCP (probe metrics), served by integration.
    register(
        api,
        "integration",
        "lobby",
        &format!(
            r#"{{"id":"lobby-1","endpoints":{{"main":"{upstream}"}},"protocol":"http","kind":"persistent",
                "check":{{"tcp":true,"interval_ms":200}}}}"#
        ),
    )
    .await;
    // flaky: one live and one dead instance (connect retries, ejection).
    for (id, addr) in [("flaky-live", upstream.to_string()), ("flaky-dead", dead)] {
        register(
            api,
            "integration",
            "flaky",
            &format!(r#"{{"id":"{id}","endpoints":{{"main":"{addr}"}},"protocol":"http","kind":"persistent"}}"#),
        )
        .await;
    }
    // An ephemeral instance whose lease runs out (lease expiry).
    register(
        api,
        "integration",
        "scratch",
        r#"{"id":"scratch-1","endpoints":{"main":"127.0.0.1:9"},"ttl_seconds":1}"#,
    )
    .await;
    // Deregistration, resolution and an atomic branch registration.
    register(
        api,
        "integration",
        "gone",
        r#"{"id":"gone-1","endpoints":{"main":"127.0.0.1:9"},"kind":"persistent"}"#,
    )
    .await;
    let (status, body) = http_request(
        api,
        "DELETE",
        &format!("/v1/projects/{PROJECT}/tenants/integration/services/gone/instances/gone-1"),
        &[],
        b"",
    )
    .await
    .unwrap();
    assert!((200..300).contains(&status), "{status} {body}");
    http_ok(
        api,
        "POST",
        &format!("/v1/projects/{PROJECT}/tenants/feat-2/services/lobby:register"),
        r#"{"parent":"integration","instances":[{"id":"lobby-f2","endpoints":{"main":"127.0.0.1:9"},"kind":"persistent"}]}"#,
    )
    .await;

    // The sidecar watches services; feat-1 has no lobby, so calls fall back.
    // An inbound listener in front of the "app" (the upstream), and a TCP
    // route that expects PROXY v2 headers.
    let inbound: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let inbound_arg = format!("{inbound}={upstream}");
    let sidecar = Sidecar::start(
        &daemon.endpoint(),
        PROJECT,
        "feat-1",
        &["lobby;accept-proxy"],
        &["--inbound", &inbound_arg],
    )
    .await;
    // A config watch (the other watch kind), as a game server holds one.
    let client = Client::builder()
        .endpoints([daemon.endpoint()])
        .project(PROJECT)
        .tenant("feat-1")
        .token(daemon.admin_token())
        .build()
        .unwrap();
    let _config = client.watch::<Game>("game/config.json").await.unwrap();
    let lobby_ok = async {
        let deadline = Instant::now() + Duration::from_secs(15);
        while through(&sidecar, "lobby").await != 200 {
            assert!(
                Instant::now() < deadline,
                "lobby never routable through the sidecar:\n{}",
                sidecar.stderr()
            );
            sleep(Duration::from_millis(100)).await;
        }
    };
    lobby_ok.await;
    assert_eq!(through(&sidecar, "nosuch").await, 503);
    let (status, _) = http_request(inbound, "GET", "/", &[("x-strata-tenant", "feat-1")], b"")
        .await
        .expect("a call through the inbound listener");
    assert_eq!(status, 200);
    // No PROXY header where one is required: refused (and counted).
    let mut bare = tokio::net::TcpStream::connect(sidecar.tcp[0])
        .await
        .unwrap();
    bare.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), bare.read_to_end(&mut sink)).await;
    http_ok(
        api,
        "GET",
        &format!("/v1/projects/{PROJECT}/tenants/feat-1/services/lobby"),
        "",
    )
    .await;
    // A change for the config watchers (pushes).
    http_ok(
        api,
        "PUT",
        &format!("/v1/projects/{PROJECT}/tenants/feat-1/config/game/config.json?mode=merge"),
        r#"{"max_players":8}"#,
    )
    .await;

    // What each scrape must show: the documented metrics, less the
    // conditional ones.
    let docs = documented();
    let want = |component: &str| -> Vec<String> {
        docs[component]
            .keys()
            .filter(|n| !CONDITIONAL.iter().any(|(c, _)| c == n))
            .cloned()
            .collect()
    };
    // Drive flaky until the dead instance is ejected (bounded).
    for _ in 0..60 {
        through(&sidecar, "flaky").await;
        if sidecar
            .metrics()
            .await
            .contains("strata_sidecar_ejections_total{")
        {
            break;
        }
    }
    let sidecar_want = want("sidecar");
    let sidecar_want: Vec<&str> = sidecar_want.iter().map(String::as_str).collect();
    let sidecar_scrape =
        scrape_until(&sidecar_want, Duration::from_secs(10), || sidecar.metrics()).await;

    let stratad_want = want("stratad");
    let stratad_want: Vec<&str> = stratad_want.iter().map(String::as_str).collect();
    let stratad_scrape = scrape_until(&stratad_want, Duration::from_secs(20), || scrape(api)).await;

    let missing_daemon = check_component("stratad", &stratad_scrape, &docs["stratad"]);
    let missing_sidecar = check_component("sidecar", &sidecar_scrape, &docs["sidecar"]);
    assert!(
        missing_daemon.is_empty() && missing_sidecar.is_empty(),
        "documented but never emitted here (emit them, or list them in CONDITIONAL with why):\n  \
         stratad: {missing_daemon:?}\n  sidecar: {missing_sidecar:?}"
    );
}

#[derive(Debug, Deserialize)]
struct Game {
    #[allow(dead_code)] // decoded to prove the value fits
    max_players: u32,
}

/// The SDK records through the `metrics` facade; this process installs the
/// Prometheus recorder an application would.
fn sdk_recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).expect("one recorder per test binary");
            handle
        })
        .clone()
}

fn sdk_client(endpoints: &[String], token: &str, cache: &Path) -> Client {
    Client::builder()
        .token(token)
        .endpoints(endpoints.iter().cloned())
        .project(PROJECT)
        .tenant("integration")
        .connect_timeout(Duration::from_millis(500))
        .request_timeout(Duration::from_secs(2))
        .startup_timeout(Duration::from_secs(1))
        .backoff(Duration::from_millis(50), Duration::from_millis(300))
        .cache_dir(cache)
        .build()
        .unwrap()
}

#[tokio::test]
async fn sdk_metrics_are_the_documented_ones() {
    let handle = sdk_recorder();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let start = || Daemon::builder().addr(addr).data_dir(&data).start();
    let mut daemon = start().await;
    put_tenant(addr, "integration", "{}").await;
    let key_path = format!("/v1/projects/{PROJECT}/tenants/integration/config/game/config.json");
    http_ok(addr, "PUT", &key_path, r#"{"max_players":16}"#).await;

    let cache = tmp.path().join("cache");
    let endpoint = addr.to_string();
    let token = daemon.admin_token();
    let client = sdk_client(std::slice::from_ref(&endpoint), &token, &cache);
    let config = client.watch::<Game>("game/config.json").await.unwrap();
    // A value that does not decode (kept out), then a good one again.
    let mut errors = config.errors();
    http_ok(addr, "PUT", &key_path, r#"{"max_players":"many"}"#).await;
    tokio::time::timeout(Duration::from_secs(10), errors.recv())
        .await
        .expect("decode error reported")
        .unwrap();
    http_ok(addr, "PUT", &key_path, r#"{"max_players":12}"#).await;
    // A cache that cannot be written: its directory is under a file.
    let blocker = tmp.path().join("not-a-dir");
    std::fs::write(&blocker, b"").unwrap();
    let unwritable = sdk_client(
        std::slice::from_ref(&endpoint),
        &token,
        &blocker.join("cache"),
    );
    let _unwritable_watch = unwritable.watch::<Game>("game/config.json").await.unwrap();
    // A registration whose lease lapses while the daemon is down.
    let registration = client
        .register(
            InstanceSpec::new("game")
                .endpoint("main", "127.0.0.1:7777")
                .ttl(Duration::from_secs(1)),
        )
        .await
        .unwrap();

    daemon.signal(Signal::SIGKILL);
    daemon.wait_exit(Duration::from_secs(10)).await;
    sleep(Duration::from_secs(3)).await;
    // Every daemon down: a new client starts from the disk cache.
    let cold = sdk_client(&[format!("127.0.0.1:{}", free_port())], &token, &cache);
    let cached = cold
        .watch::<Game>("game/config.json")
        .await
        .expect("started from the cache");
    assert_eq!(cached.source(), strata_client::Source::DiskCache);
    drop(daemon);
    let _restarted = start().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while registration.registrations() < 2 {
        assert!(
            Instant::now() < deadline,
            "the registration never came back"
        );
        sleep(Duration::from_millis(100)).await;
    }

    let docs = documented();
    let want: Vec<&str> = docs["sdk"].keys().map(String::as_str).collect();
    let scraped = scrape_until(&want, Duration::from_secs(10), || {
        let text = handle.render();
        async move { text }
    })
    .await;
    let missing = check_component("sdk", &scraped, &docs["sdk"]);
    assert!(
        missing.is_empty(),
        "SDK metrics documented but never emitted here (emit them, or list them in CONDITIONAL with why): {missing:?}"
    );
}

// ---------------------------------------------------------------------------
// The shipped deployments start the real binaries.

/// A container's `args` and `env` in a rendered manifest (the chart's own
/// output, so a small indentation-aware reader is enough): env values from
/// `valueFrom` are `None`.
struct Container {
    args: Vec<String>,
    env: Vec<(String, Option<String>)>,
}

fn container(rendered: &str, kind: &str, name: &str) -> Container {
    let docs: Vec<&str> = rendered.split("\n---\n").collect();
    let doc = docs
        .iter()
        .find(|d| {
            d.contains(&format!("\nkind: {kind}\n")) && d.contains(&format!("- name: {name}\n"))
        })
        .unwrap_or_else(|| panic!("no {kind} with a container {name}"));
    let lines: Vec<&str> = doc.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let start = lines
        .iter()
        .position(|l| l.trim() == format!("- name: {name}"))
        .unwrap();
    let base = indent(lines[start]);
    let block: Vec<&str> = lines[start + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > base)
        .copied()
        .collect();
    let unquote = |v: &str| v.trim().trim_matches('"').to_owned();
    let section = |key: &str| -> Vec<&str> {
        let Some(at) = block.iter().position(|l| l.trim() == format!("{key}:")) else {
            return Vec::new();
        };
        let level = indent(block[at]);
        block[at + 1..]
            .iter()
            .take_while(|l| indent(l) > level || (indent(l) == level && l.trim().starts_with("- ")))
            .copied()
            .collect()
    };
    let args = section("args")
        .iter()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(unquote)
        .collect();
    let mut env = Vec::new();
    let lines = section("env");
    for (i, line) in lines.iter().enumerate() {
        if let Some(key) = line.trim().strip_prefix("- name: ") {
            let value = lines
                .get(i + 1)
                .and_then(|l| l.trim().strip_prefix("value: "))
                .map(unquote);
            env.push((key.to_owned(), value));
        }
    }
    Container { args, env }
}

/// The `- |` literal block of a container's `command` (a shell script).
fn container_script(rendered: &str, name: &str) -> String {
    let lines: Vec<&str> = rendered.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let start = lines
        .iter()
        .position(|l| l.trim() == format!("- name: {name}"))
        .unwrap_or_else(|| panic!("no container {name}"));
    let at = start
        + lines[start..]
            .iter()
            .position(|l| l.trim() == "- |")
            .expect("a literal block in the command");
    let body: Vec<&str> = lines[at + 1..]
        .iter()
        .take_while(|l| indent(l) > indent(lines[at]))
        .copied()
        .collect();
    let margin = body.iter().map(|l| indent(l)).min().unwrap_or(0);
    body.iter().map(|l| format!("{}\n", &l[margin..])).collect()
}

/// `--flag=value` pairs of `args` without the flags in `drop`.
fn without(args: &[String], drop: &[&str]) -> Vec<String> {
    args.iter()
        .filter(|a| !drop.iter().any(|d| a.starts_with(&format!("{d}="))))
        .cloned()
        .collect()
}

#[tokio::test]
async fn the_shipped_deployments_start_the_real_binaries() {
    let root = repo_root();
    // The chart's stratad (embedded store): its flags and environment, with
    // the listener and data dir the harness chooses.
    let embedded =
        std::fs::read_to_string(root.join("deploy/helm/rendered/embedded.yaml")).unwrap();
    let stratad = container(&embedded, "StatefulSet", "stratad");
    assert!(
        stratad
            .args
            .iter()
            .any(|a| a.starts_with("--shutdown-grace="))
    );
    let mut builder = Daemon::builder().args(without(&stratad.args, &["--listen", "--data-dir"]));
    for (key, value) in &stratad.env {
        builder = builder.env(key, value.as_deref().expect("plain env value"));
    }
    let daemon = builder.start().await;
    let (status, _) = http_get(daemon.addr, "/healthz").await.unwrap();
    assert_eq!(status, 200);
    put_tenant(daemon.addr, "integration", "{}").await;
    drop(daemon);

    // The systemd unit's command line (with the example config file).
    let unit = std::fs::read_to_string(root.join("deploy/systemd/stratad.service")).unwrap();
    let exec: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(exec[0], "/usr/local/bin/stratad");
    let mut args = Vec::new();
    let mut rest = exec[1..].iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            // The harness picks the data dir.
            "--data-dir" => {
                rest.next();
            }
            "--config" => {
                rest.next();
                args.push("--config".to_owned());
                args.push(root.join("deploy/stratad.toml").display().to_string());
            }
            _ => args.push(arg.clone()),
        }
    }
    let daemon = Daemon::builder().args(args).start().await;
    assert!(
        daemon.stderr().trim_start().starts_with('{'),
        "--log-format json: {}",
        daemon.stderr()
    );

    put_tenant(daemon.addr, "integration", "{}").await;

    let etcd = std::fs::read_to_string(root.join("deploy/helm/rendered/etcd.yaml")).unwrap();
    // The backup CronJob's script, run three times against the daemon with
    // the chart's environment: each run writes a backup, the oldest beyond
    // KEEP are removed.
    let script = container_script(&etcd, "strata-backup");
    let backup_job = container(&etcd, "CronJob", "strata-backup");
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = strata_tests::strata_bin()
        .parent()
        .unwrap()
        .display()
        .to_string();
    for run in 0..3 {
        let mut command = tokio::process::Command::new("/bin/sh");
        command
            .arg("-ec")
            .arg(script.replace("/backup/", &format!("{}/", dir.path().display())))
            .env_clear()
            .env("PATH", format!("{bin_dir}:/usr/bin:/bin"));
        for (key, value) in &backup_job.env {
            let value = match key.as_str() {
                "STRATA_ENDPOINTS" => daemon.endpoint(),
                "STRATA_TOKEN" => daemon.admin_token(),
                "KEEP" => "2".to_owned(),
                _ => value
                    .clone()
                    .unwrap_or_else(|| panic!("{key}: no test value")),
            };
            command.env(key, value);
        }
        let output = command.output().await.unwrap();
        assert!(
            output.status.success(),
            "backup run {run}: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // The file name has one-second resolution.
        sleep(Duration::from_millis(1100)).await;
    }
    let backups: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(backups.len(), 2, "KEEP=2 backups kept: {backups:?}");
    for backup in &backups {
        let text = std::fs::read_to_string(backup).unwrap();
        assert!(
            text.contains("integration"),
            "{} holds the tenant",
            backup.display()
        );
    }

    // The example game server's sidecar, configured only by the chart's
    // environment (addresses moved to free loopback ports, the tenant label
    // and token Secret filled in).
    let sidecar = container(&etcd, "Deployment", "strata-sidecar");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let tcp = format!("127.0.0.1:{}", free_port());
    let mut command = tokio::process::Command::new(strata_tests::sidecar::sidecar_bin());
    command
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let names: BTreeSet<&str> = sidecar.env.iter().map(|(k, _)| k.as_str()).collect();
    for required in [
        "STRATA_ENDPOINTS",
        "STRATA_PROJECT",
        "STRATA_TENANT",
        "STRATA_TOKEN",
        "STRATA_SIDECAR_ADMIN",
        "STRATA_SIDECAR_TCP",
    ] {
        assert!(
            names.contains(required),
            "the example sidecar sets no {required}"
        );
    }
    for (key, value) in &sidecar.env {
        let value = match key.as_str() {
            "STRATA_ENDPOINTS" => daemon.endpoint(),
            "STRATA_PROJECT" => PROJECT.to_owned(),
            "STRATA_TENANT" => "integration".to_owned(),
            "STRATA_TOKEN" => daemon.admin_token(),
            "STRATA_SIDECAR_OUTBOUND" => format!("127.0.0.1:{}", free_port()),
            // Traces go nowhere here (tests/tests/tracing.rs covers them).
            "OTEL_EXPORTER_OTLP_ENDPOINT" => format!("http://127.0.0.1:{}", free_port()),
            "STRATA_SIDECAR_ADMIN" => {
                assert_eq!(value.as_deref(), Some("0.0.0.0:15000"));
                admin.to_string()
            }
            "STRATA_SIDECAR_TCP" => {
                let value = value.clone().unwrap();
                assert!(value.starts_with("127.0.0.1:16001="), "{value}");
                value.replacen("127.0.0.1:16001", &tcp, 1)
            }
            _ => value
                .clone()
                .unwrap_or_else(|| panic!("{key}: no test value for valueFrom")),
        };
        command.env(key, value);
    }
    let mut child = command.spawn().expect("spawn strata-sidecar");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((200, _)) = http_get(admin, "/readyz").await {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .await
                .unwrap();
            panic!("strata-sidecar with the chart's environment exited with {status}:\n{stderr}");
        }
        assert!(
            Instant::now() < deadline,
            "strata-sidecar with the chart's environment never became ready"
        );
        sleep(Duration::from_millis(100)).await;
    }
    child.kill().await.unwrap();
}
