//! `strata`, the admin CLI: tenants, configuration and daemon status over
//! gRPC. A thin clap layer over the client SDK; it never depends on the
//! server.
//!
//! Exit codes: 0 success, 1 an error from the server (its message is
//! printed) or no reachable daemon, 2 a usage error.

#![allow(clippy::print_stdout)] // printing results is this binary's job

mod output;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use strata_client::Code as tonic_code;
use strata_client::proto::{
    CreateTenantRequest, DeleteLayerRequest, DeleteTenantRequest, ExplainRequest, FallbackPolicy,
    GetLayerRequest, GetTenantRequest, ListHistoryRequest, ListTenantsRequest, PutConfigRequest,
    ResolveRequest, ResolvedValue, RollbackRequest, StatusRequest, WatchConfigRequest,
};
use strata_client::{Client, Error};

use crate::output::{Output, Table};

/// Strata admin CLI.
#[derive(Debug, Parser)]
#[command(
    name = "strata",
    version,
    about = "Strata admin CLI: tenants, layered config, status"
)]
struct Cli {
    /// Daemon endpoints, comma-separated; the first reachable one is used.
    #[arg(
        long,
        env = "STRATA_ENDPOINTS",
        default_value = "http://127.0.0.1:7070",
        value_delimiter = ',',
        global = true
    )]
    endpoints: Vec<String>,
    /// Project to work in.
    #[arg(long, env = "STRATA_PROJECT", default_value = "default", global = true)]
    project: String,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    /// Per-call timeout, e.g. `5s`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Daemon status: store, revisions, uptime, version.
    Status,
    /// Create, inspect and delete tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Write, resolve and inspect configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Follow a tenant's resolved configuration: a snapshot, then every
    /// change. Reconnects and resumes from the last revision seen.
    Watch {
        /// Tenant.
        tenant: String,
        /// Exact key to watch (repeatable).
        #[arg(long = "key")]
        keys: Vec<String>,
        /// Key prefix to watch (repeatable); nothing selected watches every key.
        #[arg(long = "prefix")]
        prefixes: Vec<String>,
        /// Resume from this revision instead of starting with a snapshot.
        #[arg(long, default_value_t = 0)]
        start_revision: i64,
    },
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
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
    /// Delete a tenant and its config.
    Delete {
        /// Tenant name.
        name: String,
        /// Delete even when protected, together with all its descendants.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
struct ValueSource {
    /// The value.
    #[arg(long, conflicts_with = "file", required_unless_present_any = ["file", "mode"])]
    value: Option<String>,
    /// Read the value from a file (format guessed from its extension).
    #[arg(long)]
    file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    Replace,
    Merge,
    Delete,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Write a tenant's layer of a key.
    Put {
        /// Tenant.
        tenant: String,
        /// Key, e.g. `matchmaker/server.yaml`.
        key: String,
        #[command(flatten)]
        source: ValueSource,
        /// Format (json, yaml, toml, properties, text, binary); default from the
        /// file's or the key's extension.
        #[arg(long)]
        format: Option<String>,
        /// How the layer combines with the parent's value.
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        /// Only write if the layer is at this revision (-1: must not exist).
        #[arg(long, allow_hyphen_values = true)]
        expected_revision: Option<i64>,
    },
    /// Print the resolved value of a key (or the tenant's own layer).
    Get {
        /// Tenant.
        tenant: String,
        /// Key.
        key: String,
        /// Show only this tenant's layer, unresolved.
        #[arg(long)]
        layer: bool,
    },
    /// List resolved keys under a prefix.
    List {
        /// Tenant.
        tenant: String,
        /// Key prefix.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Remove a tenant's layer of a key.
    Delete {
        /// Tenant.
        tenant: String,
        /// Key.
        key: String,
    },
    /// List the kept versions of a tenant's layer of a key, newest first.
    History {
        /// Tenant.
        tenant: String,
        /// Key.
        key: String,
        /// Most versions shown (0: every kept version).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Restore a tenant's layer of a key to what it was at a revision
    /// (written as a new revision; see `history` for the revisions).
    Rollback {
        /// Tenant.
        tenant: String,
        /// Key.
        key: String,
        /// Revision to restore the layer to.
        #[arg(long)]
        to: i64,
        /// Only roll back if the layer is at this revision (-1: must not exist).
        #[arg(long, allow_hyphen_values = true)]
        expected_revision: Option<i64>,
    },
    /// Show which tenant supplied each field of a resolved value.
    Explain {
        /// Tenant.
        tenant: String,
        /// Key.
        key: String,
    },
    /// Compare the resolved configuration of two tenants.
    Diff {
        /// First tenant.
        a: String,
        /// Second tenant.
        b: String,
        /// Key prefix.
        #[arg(long, default_value = "")]
        prefix: String,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("label {s:?} is not key=value"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("strata: error: {message}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let client = Client::connect(&cli.endpoints, cli.timeout)
        .await
        .map_err(|e| e.to_string())?;
    let out = cli.output;
    let project = cli.project;
    match cli.command {
        Command::Status => {
            let s = client
                .admin()
                .status(StatusRequest {})
                .await
                .map_err(err)?
                .into_inner();
            out.record(&[
                ("endpoint", json!(client.endpoint())),
                ("store", json!(s.store_kind)),
                ("revision", json!(s.revision)),
                ("compacted_revision", json!(s.compacted_revision)),
                ("uptime_seconds", json!(s.uptime_seconds)),
                ("version", json!(s.version)),
                ("ready", json!(s.ready)),
            ]);
        }
        Command::Tenant(cmd) => tenant(&client, &project, out, cmd).await?,
        Command::Config(cmd) => config(&client, &project, out, cmd).await?,
        Command::Watch {
            tenant,
            keys,
            prefixes,
            start_revision,
        } => {
            let request = WatchConfigRequest {
                project,
                tenant,
                keys,
                prefixes,
                start_revision,
            };
            watch(&cli.endpoints, cli.timeout, client, request, out).await?;
        }
    }
    Ok(())
}

fn err(status: strata_client::Status) -> String {
    Error::from(status).to_string()
}

/// Streams watch messages until the tenant is deleted; on a broken stream,
/// reconnects (to any endpoint) and resumes after the last revision printed.
async fn watch(
    endpoints: &[String],
    timeout: Duration,
    mut client: Client,
    mut request: WatchConfigRequest,
    out: Output,
) -> Result<(), String> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match client.config().watch(request.clone()).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(message)) => {
                            backoff = Duration::from_millis(200);
                            request.start_revision = message.revision + 1;
                            out.watch_message(&message);
                            if message.tenant_deleted {
                                return Ok(());
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            eprintln!("strata: watch interrupted ({}); resuming", status.message());
                            break;
                        }
                    }
                }
            }
            Err(status) if status.code() == tonic_code::Unavailable => {
                eprintln!(
                    "strata: watch interrupted ({}); reconnecting",
                    status.message()
                );
            }
            Err(status) => return Err(err(status)),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        if let Ok(c) = Client::connect(endpoints, timeout).await {
            client = c;
        }
    }
}

async fn tenant(
    client: &Client,
    project: &str,
    out: Output,
    cmd: TenantCommand,
) -> Result<(), String> {
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
        TenantCommand::Delete { name, force } => {
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
                ("revision", json!(r.header.map_or(0, |h| h.revision))),
            ]);
        }
    }
    Ok(())
}

async fn resolve_all(
    client: &Client,
    project: &str,
    tenant: &str,
    prefix: &str,
) -> Result<Vec<ResolvedValue>, String> {
    Ok(client
        .config()
        .resolve(ResolveRequest {
            project: project.to_owned(),
            tenant: tenant.to_owned(),
            keys: vec![],
            prefixes: vec![prefix.to_owned()],
        })
        .await
        .map_err(err)?
        .into_inner()
        .values)
}

async fn config(
    client: &Client,
    project: &str,
    out: Output,
    cmd: ConfigCommand,
) -> Result<(), String> {
    let mut config = client.config();
    match cmd {
        ConfigCommand::Put {
            tenant,
            key,
            source,
            format,
            mode,
            expected_revision,
        } => {
            let (value, guessed) = match (&source.value, &source.file) {
                (Some(v), _) => (v.clone().into_bytes(), None),
                (None, Some(path)) => {
                    let bytes = std::fs::read(path)
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_owned);
                    (bytes, ext)
                }
                (None, None) => (Vec::new(), None),
            };
            let format = format.or(guessed.map(|ext| match ext.as_str() {
                "yml" => "yaml".to_owned(),
                "txt" => "text".to_owned(),
                other => other.to_owned(),
            }));
            let r = config
                .put_config(PutConfigRequest {
                    project: project.to_owned(),
                    tenant,
                    key,
                    value,
                    format: format.unwrap_or_default(),
                    mode: mode
                        .map(|m| format!("{m:?}").to_lowercase())
                        .unwrap_or_default(),
                    expected_revision: expected_revision.unwrap_or(0),
                })
                .await
                .map_err(err)?
                .into_inner();
            let layer = r.layer.unwrap_or_default();
            out.record(&[
                ("tenant", json!(layer.tenant)),
                ("key", json!(layer.key)),
                ("format", json!(layer.format)),
                ("mode", json!(layer.mode)),
                ("revision", json!(layer.mod_revision)),
            ]);
        }
        ConfigCommand::Get { tenant, key, layer } => {
            if layer {
                let l = config
                    .get_layer(GetLayerRequest {
                        project: project.to_owned(),
                        tenant,
                        key,
                    })
                    .await
                    .map_err(err)?
                    .into_inner()
                    .layer
                    .unwrap_or_default();
                out.value(&l.key, &l.value, &l.format, &[l.tenant], l.mod_revision);
            } else {
                let values = client
                    .config()
                    .resolve(ResolveRequest {
                        project: project.to_owned(),
                        tenant: tenant.clone(),
                        keys: vec![key.clone()],
                        prefixes: vec![],
                    })
                    .await
                    .map_err(err)?
                    .into_inner()
                    .values;
                let v = values
                    .into_iter()
                    .next()
                    .ok_or_else(|| format!("key {key:?} does not exist for tenant {tenant:?}"))?;
                out.value(&v.key, &v.value, &v.format, &v.origin, v.mod_revision);
            }
        }
        ConfigCommand::List { tenant, prefix } => {
            let values = resolve_all(client, project, &tenant, &prefix).await?;
            out.values(&values);
        }
        ConfigCommand::Delete { tenant, key } => {
            let r = config
                .delete_layer(DeleteLayerRequest {
                    project: project.to_owned(),
                    tenant,
                    key: key.clone(),
                    expected_revision: 0,
                })
                .await
                .map_err(err)?
                .into_inner();
            out.record(&[
                ("deleted", json!(key)),
                ("revision", json!(r.header.map_or(0, |h| h.revision))),
            ]);
        }
        ConfigCommand::History { tenant, key, limit } => {
            let r = config
                .list_history(ListHistoryRequest {
                    project: project.to_owned(),
                    tenant,
                    key,
                    limit,
                })
                .await
                .map_err(err)?
                .into_inner();
            out.history(&r.versions);
        }
        ConfigCommand::Rollback {
            tenant,
            key,
            to,
            expected_revision,
        } => {
            let r = config
                .rollback(RollbackRequest {
                    project: project.to_owned(),
                    tenant,
                    key: key.clone(),
                    revision: to,
                    expected_revision: expected_revision.unwrap_or(0),
                })
                .await
                .map_err(err)?
                .into_inner();
            let restored = r.restored.unwrap_or_default();
            out.record(&[
                ("key", json!(key)),
                ("restored_revision", json!(restored.revision)),
                (
                    "now",
                    json!(if r.layer.is_some() {
                        "restored"
                    } else {
                        "removed"
                    }),
                ),
                ("revision", json!(r.header.map_or(0, |h| h.revision))),
            ]);
        }
        ConfigCommand::Explain { tenant, key } => {
            let r = config
                .explain(ExplainRequest {
                    project: project.to_owned(),
                    tenant,
                    key,
                })
                .await
                .map_err(err)?
                .into_inner();
            let mut table = Table::new(&["FIELD", "TENANT"]);
            for f in &r.fields {
                table.row(vec![f.path.clone(), f.tenant.clone()]);
            }
            let origin = r.value.map(|v| v.origin).unwrap_or_default();
            out.table_with(table, json!({
                "origin": origin,
                "fields": r.fields.iter().map(|f| json!({"path": f.path, "tenant": f.tenant})).collect::<Vec<_>>(),
            }));
        }
        ConfigCommand::Diff { a, b, prefix } => {
            let left: BTreeMap<String, ResolvedValue> = resolve_all(client, project, &a, &prefix)
                .await?
                .into_iter()
                .map(|v| (v.key.clone(), v))
                .collect();
            let right: BTreeMap<String, ResolvedValue> = resolve_all(client, project, &b, &prefix)
                .await?
                .into_iter()
                .map(|v| (v.key.clone(), v))
                .collect();
            let mut table = Table::new(&[
                "KEY",
                "CHANGE",
                &format!("ORIGIN IN {a}"),
                &format!("ORIGIN IN {b}"),
            ]);
            let mut json = Vec::new();
            let keys: std::collections::BTreeSet<&String> =
                left.keys().chain(right.keys()).collect();
            for key in keys {
                let (l, r) = (left.get(key), right.get(key));
                let change = match (l, r) {
                    (Some(_), None) => format!("only in {a}"),
                    (None, Some(_)) => format!("only in {b}"),
                    (Some(l), Some(r)) if l.value != r.value || l.format != r.format => {
                        "differs".to_owned()
                    }
                    _ => continue,
                };
                let origin = |v: Option<&ResolvedValue>| {
                    v.map(|v| v.origin.join(",")).unwrap_or_else(|| "-".into())
                };
                json.push(json!({"key": key, "change": change, "a_origin": origin(l), "b_origin": origin(r)}));
                table.row(vec![key.clone(), change, origin(l), origin(r)]);
            }
            out.table_with(table, serde_json::Value::Array(json));
        }
    }
    Ok(())
}
