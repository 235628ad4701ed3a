//! `strata config put|get|list|delete|history|explain|diff`, and the way
//! to `config apply` and `config rollback` (in `apply.rs`: they plan and
//! ask first).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;
use strata_client::Connection;
use strata_client::proto::{
    DeleteLayerRequest, ExplainRequest, GetLayerRequest, ListHistoryRequest, PutConfigRequest,
    ResolveRequest, ResolvedValue,
};

use crate::apply;
use crate::ctx::{Ctx, Failure, err, resolve_all};
use crate::output::{Output, Table};

/// Where `config put` takes the value from.
#[derive(Debug, Args)]
pub(crate) struct ValueSource {
    /// The value.
    #[arg(long, conflicts_with = "file", required_unless_present_any = ["file", "mode"])]
    value: Option<String>,
    /// Read the value from a file (format guessed from its extension).
    #[arg(long)]
    file: Option<PathBuf>,
}

/// `config put --mode`: how the layer combines with the parent's value.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum ModeArg {
    Replace,
    Merge,
    Delete,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
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

/// Runs one `config` command.
pub(crate) async fn run(ctx: &Ctx, cmd: ConfigCommand) -> Result<(), Failure> {
    // Apply and rollback connect themselves, after checking their arguments.
    match cmd {
        ConfigCommand::Apply(args) => apply::run(ctx, args).await,
        ConfigCommand::Rollback {
            tenant,
            key,
            to,
            expected_revision,
            yes,
        } => {
            let args = apply::RollbackArgs {
                tenant,
                key,
                to,
                expected_revision,
                yes,
            };
            apply::rollback(ctx, args).await
        }
        cmd => {
            let client = ctx.connect().await?;
            Ok(config(&client, &ctx.project, ctx.out, cmd).await?)
        }
    }
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
