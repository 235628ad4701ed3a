//! `strata`, the admin CLI: tenants, configuration and daemon status over
//! gRPC. A thin clap layer over the client SDK; it never depends on the
//! server.
//!
//! Exit codes: 0 success, 1 an error from the server (its message is
//! printed), no reachable daemon, or a declined confirmation, 2 a usage
//! error.

#![allow(clippy::print_stdout)] // printing results is this binary's job

mod apply;
mod audit;
mod backup;
mod output;
mod plan;
mod service;
mod tls;
mod token;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use strata_client::Code as tonic_code;
use strata_client::proto::{
    CreateTenantRequest, DeleteLayerRequest, DeleteTenantRequest, ExplainRequest, FallbackPolicy,
    GetLayerRequest, GetTenantRequest, ListHistoryRequest, ListInstancesRequest,
    ListServicesRequest, ListTenantsRequest, PutConfigRequest, ResolveRequest, ResolvedValue,
    StatusRequest, Tenant, WatchConfigRequest, WatchConfigResponse,
};
use strata_client::{Connection, Error, Status};
use tonic::Streaming;

use crate::output::{Output, Table};

/// Strata admin CLI.
#[derive(Debug, Parser)]
#[command(
    name = "strata",
    version,
    about = "Strata admin CLI: tenants, layered config, service registry, status"
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
    #[command(flatten)]
    tls: tls::TlsArgs,
    /// Accept an endpoint list that mixes TLS and plaintext (https:// or
    /// --tls-ca next to http://). Refused by default: when the TLS
    /// endpoints fail, the token would go to an http:// one in clear.
    #[arg(
        long,
        env = "STRATA_ALLOW_PLAINTEXT",
        global = true,
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    allow_plaintext: bool,
    #[command(flatten)]
    token: token::TokenArgs,
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
    /// Register, resolve and follow service instances.
    #[command(subcommand)]
    Service(service::ServiceCommand),
    /// Create, list and revoke bearer tokens (admin).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Write a consistent backup (one revision) of --project, or of every
    /// project with --all, to a file (admin).
    Export(backup::ExportArgs),
    /// Restore a backup file into projects that do not exist yet (admin).
    /// Shows what it creates and asks; without a terminal, --yes is required.
    Import(backup::ImportArgs),
    /// The audit log: who changed what, when, at which revision, and the
    /// refused attempts (admin). Newest first.
    Audit(audit::AuditArgs),
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
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
    /// Sync a directory of files into a tenant's layers (one file per key),
    /// showing the plan first; without a terminal, --yes is required.
    Apply(apply::ApplyArgs),
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

/// Why a command failed; decides the exit code.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The server refused, no daemon was reachable, or the user declined:
    /// exit 1.
    Server(String),
    /// The command line cannot work as given: exit 2, like clap's own errors.
    Usage(String),
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Server(message)
    }
}

/// What every command needs besides its own arguments.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) endpoints: Vec<String>,
    pub(crate) timeout: Duration,
    pub(crate) project: String,
    pub(crate) out: Output,
    /// TLS settings from `--tls-ca`/`--tls-cert`/`--tls-key`.
    pub(crate) tls: Option<strata_client::TlsConfig>,
    /// Bearer token from `STRATA_TOKEN` or `--token-file`.
    pub(crate) token: Option<String>,
    /// `--allow-plaintext` / `STRATA_ALLOW_PLAINTEXT`.
    pub(crate) allow_plaintext: bool,
}

impl Ctx {
    /// Connects to the first reachable daemon.
    pub(crate) async fn connect(&self) -> Result<Connection, Failure> {
        let tls = self.tls.as_ref();
        let connected = if self.allow_plaintext {
            Connection::connect_allowing_plaintext_fallback(&self.endpoints, self.timeout, tls)
                .await
        } else {
            Connection::connect_with_tls(&self.endpoints, self.timeout, tls).await
        };
        let connection = connected.map_err(|e| match e {
            // The command line cannot work as given, whatever the daemons do.
            Error::PlaintextFallback { .. } => Failure::Usage(format!("--endpoints: {e}")),
            _ => Failure::Server(e.to_string()),
        })?;
        match &self.token {
            Some(token) => connection
                .with_token(token)
                .map_err(|e| Failure::Usage(format!("STRATA_TOKEN / --token-file: {e}"))),
            None => Ok(connection),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Server(message)) => {
            eprintln!("strata: error: {message}");
            ExitCode::from(1)
        }
        Err(Failure::Usage(message)) => {
            eprintln!("strata: error: {message}\n\nFor more information, try '--help'.");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let ctx = Ctx {
        endpoints: cli.endpoints,
        timeout: cli.timeout,
        project: cli.project,
        out: cli.output,
        tls: cli.tls.config().map_err(Failure::Usage)?,
        token: cli.token.token().map_err(Failure::Usage)?,
        allow_plaintext: cli.allow_plaintext,
    };
    // Service commands validate their arguments before connecting, so a usage
    // error is reported as one even when no daemon is up.
    if let Command::Service(cmd) = cli.command {
        return service::run(&ctx, cmd).await;
    }
    // Commands that plan before they change things live in their own files.
    match cli.command {
        Command::Token(cmd) => return token::run(&ctx, cmd).await,
        Command::Audit(args) => return audit::run(&ctx, args).await,
        Command::Export(args) => return backup::export(&ctx, args).await,
        Command::Import(args) => return backup::import(&ctx, args).await,
        Command::Config(ConfigCommand::Apply(args)) => return apply::run(&ctx, args).await,
        Command::Config(ConfigCommand::Rollback {
            tenant,
            key,
            to,
            expected_revision,
            yes,
        }) => {
            let args = apply::RollbackArgs {
                tenant,
                key,
                to,
                expected_revision,
                yes,
            };
            return apply::rollback(&ctx, args).await;
        }
        _ => {}
    }
    let client = ctx.connect().await?;
    let out = ctx.out;
    let project = ctx.project.clone();
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
            follow(&ctx, client, request, |m| out.watch_message(m)).await?;
        }
        // Handled above, before connecting.
        Command::Service(_)
        | Command::Export(_)
        | Command::Import(_)
        | Command::Token(_)
        | Command::Audit(_) => {}
    }
    Ok(())
}

/// The server's message for a failed call.
pub(crate) fn err(status: Status) -> String {
    Error::from(status).to_string()
}

/// A watch request that can be sent again after an interruption, resuming
/// right after the last message handled.
pub(crate) trait Resumable: Clone {
    /// What the stream carries.
    type Message;
    /// Opens the stream from the request's start revision.
    async fn open(&self, client: &Connection) -> Result<Streaming<Self::Message>, Status>;
    /// Moves the start past `message`; true when the stream is over for good
    /// (its tenant was deleted).
    fn advance(&mut self, message: &Self::Message) -> bool;
}

impl Resumable for WatchConfigRequest {
    type Message = WatchConfigResponse;

    async fn open(&self, client: &Connection) -> Result<Streaming<Self::Message>, Status> {
        Ok(client.config().watch(self.clone()).await?.into_inner())
    }

    fn advance(&mut self, message: &Self::Message) -> bool {
        self.start_revision = message.revision + 1;
        message.tenant_deleted
    }
}

/// Hands each message to `handle` until the stream is over for good. On a
/// broken stream it reconnects (to any endpoint) and resumes after the last
/// message handled, so nothing is missed or repeated across the gap.
pub(crate) async fn follow<R: Resumable>(
    ctx: &Ctx,
    mut client: Connection,
    mut request: R,
    mut handle: impl FnMut(&R::Message),
) -> Result<(), Failure> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match request.open(&client).await {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(message)) => {
                        backoff = Duration::from_millis(200);
                        let over = request.advance(&message);
                        handle(&message);
                        if over {
                            return Ok(());
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        eprintln!("strata: watch interrupted ({}); resuming", status.message());
                        break;
                    }
                }
            },
            Err(status) if status.code() == tonic_code::Unavailable => {
                eprintln!(
                    "strata: watch interrupted ({}); reconnecting",
                    status.message()
                );
            }
            Err(status) => return Err(err(status).into()),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        if let Ok(c) = ctx.connect().await {
            client = c;
        }
    }
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

async fn resolve_all(
    client: &Connection,
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
    client: &Connection,
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
        // Handled in `run` (they plan and ask first).
        ConfigCommand::Rollback { .. } | ConfigCommand::Apply(_) => {}
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
