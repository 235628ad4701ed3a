//! The HTTP/JSON API for scripts and CD steps (usable with plain curl):
//! tenants and config layers under `/v1/projects/{project}/tenants/…`.
//!
//! Every error is JSON `{"error":{"code","message","metadata"}}` with a
//! fitting 4xx/5xx status — including malformed JSON bodies, bad query
//! parameters and oversized bodies, which are parsed here rather than by
//! extractors that would answer in plain text.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};
use strata_proto::v1::ErrorReason;

use crate::app::api::{LayerInfo, LayerVersion, NewTenant, PutLayer, TenantInfo};
use crate::app::audit::{self, Operation, Target};
use crate::app::auth::{Action, Principal};
use crate::domain::document::{Format, Mode};
use crate::error::ApiError;
use crate::store::Revision;
use crate::transport::http::{HttpState, RouteTable, build, flag, invalid, listed, read_body};
use crate::transport::state::DaemonState;

const TENANTS: &str = "/v1/projects/{project}/tenants";
const TENANT: &str = "/v1/projects/{project}/tenants/{tenant}";
const CONFIG: &str = "/v1/projects/{project}/tenants/{tenant}/config";
const CONFIG_KEY: &str = "/v1/projects/{project}/tenants/{tenant}/config/{*key}";

fn table() -> RouteTable<HttpState> {
    vec![
        (Method::GET, TENANTS, get(list_tenants)),
        (Method::GET, TENANT, get(get_tenant)),
        (Method::PUT, TENANT, put(put_tenant)),
        (Method::DELETE, TENANT, delete(delete_tenant)),
        (Method::GET, CONFIG, get(list_config)),
        (Method::GET, CONFIG_KEY, get(get_config)),
        (Method::PUT, CONFIG_KEY, put(put_config)),
        (Method::POST, CONFIG_KEY, post(rollback_config)),
        (Method::DELETE, CONFIG_KEY, delete(delete_config)),
    ]
}

/// Routes of the JSON API of tenants and config (answering 503 until the
/// view is loaded).
pub fn router(state: Arc<DaemonState>) -> Router {
    build(table()).with_state(HttpState(state))
}

/// Method and path of every route of [`router`].
pub fn routes() -> Vec<(Method, &'static str)> {
    listed(table())
}

type Params = Query<HashMap<String, String>>;

fn expected_revision(params: &HashMap<String, String>) -> Result<Option<Revision>, ApiError> {
    params
        .get("expected_revision")
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| invalid(format!("expected_revision={v:?} is not a whole number")))
        })
        .transpose()
        .map(|r| r.filter(|r| *r != 0))
}

fn tenant_json(info: &TenantInfo) -> Value {
    let r = &info.entry.record;
    json!({
        "project": info.project,
        "name": info.name,
        "parent": r.parent,
        "labels": r.labels,
        "ttl_seconds": r.ttl_seconds,
        "expires_at_unix_ms": r.expires_at_unix_ms,
        "fallback": if r.strict { "strict" } else { "permissive" },
        "protected": r.protected,
        "create_revision": info.entry.create_revision,
        "mod_revision": info.entry.mod_revision,
        "chain": info.chain,
    })
}

fn layer_json(info: &LayerInfo) -> Value {
    json!({
        "tenant": info.tenant,
        "key": info.key,
        "format": info.entry.format.name(),
        "mode": info.entry.mode.name(),
        "mod_revision": info.entry.mod_revision,
        "size_bytes": info.entry.value.len(),
    })
}

/// A value for JSON: the text itself, or its size when it is binary.
fn value_json(entry: &mut Value, format: Format, value: &[u8]) {
    match std::str::from_utf8(value) {
        Ok(text) if format != Format::Binary => entry["value"] = Value::String(text.to_owned()),
        _ => entry["size_bytes"] = json!(value.len()),
    }
}

fn version_json(v: &LayerVersion) -> Value {
    let mut entry = json!({
        "revision": v.revision,
        "removed": v.layer.is_none(),
        "written_at_unix_ms": v.written_at_unix_ms,
        "restored_from": v.restored_from,
    });
    if let Some(layer) = &v.layer {
        entry["format"] = json!(layer.format.name());
        entry["mode"] = json!(layer.mode.name());
        value_json(&mut entry, layer.format, &layer.value);
    }
    entry
}

fn content_type(format: Format) -> &'static str {
    match format {
        Format::Json => "application/json",
        Format::Yaml => "application/yaml",
        Format::Toml => "application/toml",
        Format::Properties => "text/x-java-properties; charset=utf-8",
        Format::Text => "text/plain; charset=utf-8",
        Format::Binary => "application/octet-stream",
    }
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Body of `PUT /v1/projects/{p}/tenants/{t}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantBody {
    #[serde(default)]
    parent: String,
    #[serde(default)]
    labels: HashMap<String, String>,
    #[serde(default)]
    ttl_seconds: i64,
    #[serde(default)]
    strict: bool,
    #[serde(default)]
    protected: bool,
}

async fn put_tenant(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path((project, tenant)): Path<(String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    // Stated before the body is read: the permission depends on it.
    audit::declare(Target::new(Operation::CreateTenant, &project, &tenant));
    let bytes = read_body(body, 64 * 1024).await?;
    let body: TenantBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        TenantBody::default()
    } else {
        crate::transport::http::json_object(&bytes)?
    };
    let action = Action::CreateTenant {
        protected: body.protected,
    };
    principal.authorize(action, &project, &tenant)?;
    s.api()?
        .authorize_placement(&principal, &project, &tenant, &body.parent)?;
    let (info, revision) = s
        .api()?
        .create_tenant(NewTenant {
            project,
            name: tenant,
            parent: body.parent,
            labels: body.labels,
            ttl_seconds: body.ttl_seconds,
            strict: body.strict,
            protected: body.protected,
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"revision": revision, "tenant": tenant_json(&info)})),
    )
        .into_response())
}

async fn get_tenant(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path((project, tenant)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    principal.authorize(Action::Read, &project, &tenant)?;
    let (info, revision) = s.api()?.tenant(&project, &tenant)?;
    Ok(Json(json!({"revision": revision, "tenant": tenant_json(&info)})).into_response())
}

async fn list_tenants(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path(project): Path<String>,
) -> Result<Response, ApiError> {
    principal.authorize(Action::Read, &project, "")?;
    let (tenants, revision) = s.api()?.list_tenants(&project);
    let tenants: Vec<Value> = tenants.iter().map(tenant_json).collect();
    Ok(Json(json!({"revision": revision, "tenants": tenants})).into_response())
}

async fn delete_tenant(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path((project, tenant)): Path<(String, String)>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    let target = Target::new(Operation::DeleteTenant, &project, &tenant);
    let force = match flag(&params, "force") {
        Ok(force) => force,
        Err(e) => {
            audit::declare(target);
            return Err(e);
        }
    };
    audit::authorize(&principal, Action::DeleteTenant { force }, target)?;
    let (deleted_layers, revision) = s.api()?.delete_tenant(&project, &tenant, force).await?;
    Ok(Json(json!({"revision": revision, "deleted_layers": deleted_layers})).into_response())
}

async fn put_config(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path((project, tenant, key)): Path<(String, String, String)>,
    Query(params): Params,
    body: Body,
) -> Result<Response, ApiError> {
    let target = Target::new(Operation::PutConfig, &project, &tenant).subject(&key);
    audit::authorize(&principal, Action::WriteConfig, target)?;
    let format = params
        .get("format")
        .map(|f| f.parse::<Format>())
        .transpose()
        .map_err(|e| invalid(e.to_string()))?;
    let mode = params
        .get("mode")
        .map(|m| m.parse::<Mode>())
        .transpose()
        .map_err(|e| invalid(e.to_string()))?
        .unwrap_or(Mode::Replace);
    let expected_revision = expected_revision(&params)?;
    // One byte over the limit is enough to report the violation precisely.
    let value = read_body(body, s.0.limits.max_value_bytes + 1)
        .await?
        .to_vec();
    let (info, revision) = s
        .api()?
        .put_layer(PutLayer {
            project,
            tenant,
            key,
            value,
            format,
            mode,
            expected_revision,
        })
        .await?;
    Ok(Json(json!({"revision": revision, "layer": layer_json(&info)})).into_response())
}

async fn get_config(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path((project, tenant, key)): Path<(String, String, String)>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    principal.authorize(Action::Read, &project, &tenant)?;
    if flag(&params, "history")? {
        let limit = params
            .get("limit")
            .map(|v| {
                v.parse::<usize>()
                    .map_err(|_| invalid(format!("limit={v:?} is not a whole number")))
            })
            .transpose()?
            .filter(|l| *l > 0);
        let (versions, revision) = s.api()?.history(&project, &tenant, &key, limit).await?;
        let versions: Vec<Value> = versions.iter().map(version_json).collect();
        return Ok(
            Json(json!({"revision": revision, "key": key, "versions": versions})).into_response(),
        );
    }
    if flag(&params, "explain")? {
        let (explained, revision) = s.api()?.explain(&project, &tenant, &key)?;
        let fields: Vec<Value> = explained
            .fields
            .iter()
            .map(|(path, tenant)| json!({"path": path, "tenant": tenant}))
            .collect();
        return Ok(Json(json!({
            "revision": revision,
            "key": key,
            "format": explained.resolved.format.name(),
            "origin": explained.resolved.origin,
            "mod_revision": explained.resolved.mod_revision,
            "fields": fields,
        }))
        .into_response());
    }
    let mut headers = HeaderMap::new();
    let (value, format, revision) = if flag(&params, "layer")? {
        let (info, revision) = s.api()?.layer(&project, &tenant, &key)?;
        headers.insert("x-strata-mode", header_value(info.entry.mode.name()));
        headers.insert(
            "x-strata-mod-revision",
            header_value(&info.entry.mod_revision.to_string()),
        );
        (info.entry.value.to_vec(), info.entry.format, revision)
    } else {
        let (mut values, revision) =
            s.api()?
                .resolve(&project, &tenant, std::slice::from_ref(&key), &[])?;
        let Some((_, resolved)) = values.pop() else {
            return Err(ApiError::new(
                ErrorReason::NotFound,
                format!("key {key:?} does not exist for tenant {tenant:?}"),
            )
            .with("revision", revision));
        };
        headers.insert("x-strata-origin", header_value(&resolved.origin.join(",")));
        headers.insert(
            "x-strata-mod-revision",
            header_value(&resolved.mod_revision.to_string()),
        );
        (resolved.value, resolved.format, revision)
    };
    // A merged value comes in the nearest layer's format; `?format=` asks
    // for another (json, yaml, toml convert into each other).
    let (value, format) = match params.get("format") {
        None => (value, format),
        Some(wanted) => {
            let wanted = wanted
                .parse::<Format>()
                .map_err(|e| invalid(e.to_string()))?;
            let converted = crate::app::api::off_runtime(value.len(), || {
                crate::domain::document::convert(format, wanted, &value)
            })
            .map_err(|e| invalid(format!("key {key:?}: {e}")))?;
            (converted, wanted)
        }
    };
    headers.insert("x-strata-revision", header_value(&revision.to_string()));
    headers.insert("x-strata-format", header_value(format.name()));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(format)),
    );
    Ok((headers, value).into_response())
}

async fn delete_config(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path((project, tenant, key)): Path<(String, String, String)>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    let target = Target::new(Operation::DeleteLayer, &project, &tenant).subject(&key);
    audit::authorize(&principal, Action::WriteConfig, target)?;
    let revision = s
        .api()?
        .delete_layer(&project, &tenant, &key, expected_revision(&params)?)
        .await?;
    Ok(Json(json!({"revision": revision})).into_response())
}

/// `POST …/config/{key}?rollback_to=REV`: restores the layer as it was at
/// revision REV (the only POST on a config key, so the parameter is required).
async fn rollback_config(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path((project, tenant, key)): Path<(String, String, String)>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    let target = Target::new(Operation::Rollback, &project, &tenant).subject(&key);
    audit::authorize(&principal, Action::WriteConfig, target)?;
    let to = params
        .get("rollback_to")
        .ok_or_else(|| invalid("POST on a config key needs ?rollback_to=<revision>"))?;
    let to = to
        .parse::<i64>()
        .map_err(|_| invalid(format!("rollback_to={to:?} is not a whole number")))?;
    let (done, revision) = s
        .api()?
        .rollback(&project, &tenant, &key, to, expected_revision(&params)?)
        .await?;
    Ok(Json(json!({
        "revision": revision,
        "restored": version_json(&done.restored),
        "layer": done.layer.as_ref().map(layer_json),
    }))
    .into_response())
}

async fn list_config(
    State(s): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path((project, tenant)): Path<(String, String)>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    principal.authorize(Action::Read, &project, &tenant)?;
    let prefix = params.get("prefix").cloned().unwrap_or_default();
    let (values, revision) =
        s.api()?
            .resolve(&project, &tenant, &[], std::slice::from_ref(&prefix))?;
    let values: Vec<Value> = values
        .into_iter()
        .map(|(key, r)| {
            let mut entry = json!({
                "key": key,
                "format": r.format.name(),
                "origin": r.origin,
                "mod_revision": r.mod_revision,
            });
            value_json(&mut entry, r.format, &r.value);
            entry
        })
        .collect();
    Ok(Json(json!({"revision": revision, "values": values})).into_response())
}
