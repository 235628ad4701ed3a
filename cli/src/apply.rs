//! `strata config apply -f DIR --tenant T`: the GitOps path. Syncs a
//! directory of files into a tenant's own layers (one file per key; the
//! file's path under DIR is the key, its extension the format), showing the
//! plan first. Every write carries the revision the plan saw, so a layer
//! changed by someone else in between makes the apply stop with an error
//! instead of overwriting that change.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;
use strata_client::proto::{
    ConfigLayer, DeleteLayerRequest, GetLayerRequest, GetTenantRequest, ListHistoryRequest,
    PutConfigRequest, RollbackRequest,
};
use strata_client::{Code, Connection};

use crate::ctx::{Ctx, Failure, err, resolve_all};
use crate::plan::{self, Change, Plan};

/// Most files an apply reads (a guard against pointing it at `/`).
const MAX_FILES: usize = 10_000;

/// `strata config apply`.
#[derive(Debug, Args)]
pub(crate) struct ApplyArgs {
    /// Directory of config files: `DIR/mm/server.yaml` becomes key
    /// `mm/server.yaml` (format from the extension). Hidden files and
    /// directories are skipped.
    #[arg(long, short = 'f')]
    dir: PathBuf,
    /// Tenant to sync into.
    #[arg(long)]
    tenant: String,
    /// Also remove the tenant's own layers of keys that have no file.
    #[arg(long)]
    prune: bool,
    /// Do not ask for confirmation.
    #[arg(long, short)]
    yes: bool,
    /// Show the plan only; change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// One file of the directory, as the layer it should become.
#[derive(Debug, Clone)]
struct Desired {
    value: Vec<u8>,
    format: &'static str,
}

/// One planned write.
#[derive(Debug)]
enum Step {
    Put {
        key: String,
        desired: Desired,
        /// -1: the layer must still be absent; else its revision.
        expected: i64,
    },
    Delete {
        key: String,
        expected: i64,
    },
}

/// The format the daemon gives a key from its extension (`text` when it
/// does not know it); the same table as the daemon's.
fn format_of(key: &str) -> &'static str {
    let ext = key
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "json" => "json",
        "yaml" | "yml" => "yaml",
        "toml" => "toml",
        "properties" => "properties",
        "bin" => "binary",
        _ => "text",
    }
}

/// Checks a key the way the daemon does, so a bad file name is reported
/// before anything is written.
fn check_key(key: &str) -> Result<(), String> {
    for segment in key.split('/') {
        if segment.is_empty()
            || segment == "."
            || segment == ".."
            || !segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(format!(
                "file {key:?} cannot be a config key: use A-Z, a-z, 0-9, '.', '_', '-' in each path segment"
            ));
        }
    }
    Ok(())
}

/// Reads every file under `dir` as (key → desired layer).
fn read_dir(dir: &Path) -> Result<BTreeMap<String, Desired>, String> {
    let mut out = BTreeMap::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        let entries = std::fs::read_dir(&current)
            .map_err(|e| format!("cannot read directory {}: {e}", current.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot read {}: {e}", current.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(format!(
                    "{}: file names must be UTF-8",
                    entry.path().display()
                ));
            };
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let kind = entry
                .file_type()
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if kind.is_dir() {
                pending.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(dir)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let key = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            check_key(&key)?;
            let value =
                std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            out.insert(
                key.clone(),
                Desired {
                    value,
                    format: format_of(&key),
                },
            );
            if out.len() > MAX_FILES {
                return Err(format!(
                    "{} holds more than {MAX_FILES} files; is it the right directory?",
                    dir.display()
                ));
            }
        }
    }
    Ok(out)
}

/// The tenant's own layer of `key`, if it has one.
async fn own_layer(
    client: &Connection,
    project: &str,
    tenant: &str,
    key: &str,
) -> Result<Option<ConfigLayer>, String> {
    match client
        .config()
        .get_layer(GetLayerRequest {
            project: project.to_owned(),
            tenant: tenant.to_owned(),
            key: key.to_owned(),
        })
        .await
    {
        Ok(r) => Ok(r.into_inner().layer),
        Err(status) if status.code() == Code::NotFound => Ok(None),
        Err(status) => Err(err(status)),
    }
}

/// Keys the tenant may hold a layer of that are not in `files`: every key
/// resolved for the tenant or one of its ancestors (a layer over a key is
/// found through the chain; a tombstone over a key no ancestor has cannot
/// be listed through the API and is left alone).
async fn other_keys(
    client: &Connection,
    project: &str,
    chain: &[String],
    files: &BTreeMap<String, Desired>,
) -> Result<BTreeSet<String>, String> {
    let mut keys = BTreeSet::new();
    for tenant in chain {
        for v in resolve_all(client, project, tenant, "").await? {
            if !files.contains_key(&v.key) {
                keys.insert(v.key);
            }
        }
    }
    Ok(keys)
}

/// Runs `strata config apply`.
pub(crate) async fn run(ctx: &Ctx, args: ApplyArgs) -> Result<(), Failure> {
    let files = read_dir(&args.dir).map_err(Failure::Usage)?;
    let client = ctx.connect().await?;
    let project = ctx.project.as_str();
    let tenant = client
        .tenants()
        .get_tenant(GetTenantRequest {
            project: project.to_owned(),
            name: args.tenant.clone(),
        })
        .await
        .map_err(err)?
        .into_inner()
        .tenant
        .unwrap_or_default();

    let mut plan = Plan::default();
    let mut steps = Vec::new();
    for (key, desired) in &files {
        match own_layer(&client, project, &args.tenant, key).await? {
            None => {
                plan.push(Change::Create, key.clone(), desired.format);
                steps.push(Step::Put {
                    key: key.clone(),
                    desired: desired.clone(),
                    expected: -1,
                });
            }
            Some(layer)
                if layer.value == desired.value
                    && layer.format == desired.format
                    && layer.mode == "replace" =>
            {
                plan.push(Change::Unchanged, key.clone(), "");
            }
            Some(layer) => {
                let mut what = Vec::new();
                if layer.mode != "replace" {
                    what.push(format!("mode {} -> replace", layer.mode));
                }
                if layer.format != desired.format {
                    what.push(format!("format {} -> {}", layer.format, desired.format));
                }
                if layer.value != desired.value {
                    what.push(format!(
                        "value {} -> {} bytes",
                        layer.value.len(),
                        desired.value.len()
                    ));
                }
                plan.push(
                    Change::Update,
                    key.clone(),
                    format!("{}; at revision {}", what.join(", "), layer.mod_revision),
                );
                steps.push(Step::Put {
                    key: key.clone(),
                    desired: desired.clone(),
                    expected: layer.mod_revision,
                });
            }
        }
    }
    if args.prune {
        let chain = if tenant.chain.is_empty() {
            vec![args.tenant.clone()]
        } else {
            tenant.chain.clone()
        };
        for key in other_keys(&client, project, &chain, &files).await? {
            if let Some(layer) = own_layer(&client, project, &args.tenant, &key).await? {
                plan.push(
                    Change::Delete,
                    key.clone(),
                    format!("{} layer at revision {}", layer.mode, layer.mod_revision),
                );
                steps.push(Step::Delete {
                    key,
                    expected: layer.mod_revision,
                });
            }
        }
    }

    eprint!(
        "{}",
        plan.render(&format!(
            "Plan for tenant {} of project {project} from {}:",
            args.tenant,
            args.dir.display()
        ))
    );
    if !plan.changes_anything() || args.dry_run {
        ctx.out.record(&[
            ("tenant", json!(args.tenant)),
            ("applied", json!(false)),
            ("plan", plan.to_json()),
        ]);
        return Ok(());
    }
    plan::confirm(
        &format!("apply these changes to tenant {}", args.tenant),
        args.yes,
    )?;

    let mut done = 0usize;
    let mut revision = 0;
    for step in &steps {
        let result = match step {
            Step::Put {
                key,
                desired,
                expected,
            } => client
                .config()
                .put_config(PutConfigRequest {
                    project: project.to_owned(),
                    tenant: args.tenant.clone(),
                    key: key.clone(),
                    value: desired.value.clone(),
                    format: desired.format.to_owned(),
                    mode: "replace".to_owned(),
                    expected_revision: *expected,
                })
                .await
                .map(|r| r.into_inner().header.map_or(0, |h| h.revision)),
            Step::Delete { key, expected } => client
                .config()
                .delete_layer(DeleteLayerRequest {
                    project: project.to_owned(),
                    tenant: args.tenant.clone(),
                    key: key.clone(),
                    expected_revision: *expected,
                })
                .await
                .map(|r| r.into_inner().header.map_or(0, |h| h.revision)),
        };
        let key = match step {
            Step::Put { key, .. } | Step::Delete { key, .. } => key,
        };
        match result {
            Ok(r) => {
                done += 1;
                revision = r;
            }
            Err(status) => {
                let why = if status.code() == Code::FailedPrecondition {
                    " (it changed since the plan was made; run apply again to see the new plan)"
                } else {
                    ""
                };
                return Err(Failure::Server(format!(
                    "{key}: {}{why}; {done} of {} changes were applied before it",
                    err(status),
                    steps.len()
                )));
            }
        }
    }
    ctx.out.record(&[
        ("tenant", json!(args.tenant)),
        ("applied", json!(true)),
        ("created", json!(plan.count(Change::Create))),
        ("updated", json!(plan.count(Change::Update))),
        ("deleted", json!(plan.count(Change::Delete))),
        ("unchanged", json!(plan.count(Change::Unchanged))),
        ("revision", json!(revision)),
    ]);
    Ok(())
}

/// `strata config rollback`, shown as a plan first.
pub(crate) struct RollbackArgs {
    /// Tenant.
    pub(crate) tenant: String,
    /// Key.
    pub(crate) key: String,
    /// Revision to restore the layer to.
    pub(crate) to: i64,
    /// Compare-and-set on the layer's current revision.
    pub(crate) expected_revision: Option<i64>,
    /// Do not ask.
    pub(crate) yes: bool,
}

/// Runs `strata config rollback`: shows what the layer is now and what it
/// becomes, asks, then rolls back guarded by the revision shown (unless the
/// caller gave one), so a change in between fails instead of being undone.
pub(crate) async fn rollback(ctx: &Ctx, args: RollbackArgs) -> Result<(), Failure> {
    let client = ctx.connect().await?;
    let project = ctx.project.as_str();
    let current = own_layer(&client, project, &args.tenant, &args.key).await?;
    let versions = client
        .config()
        .list_history(ListHistoryRequest {
            project: project.to_owned(),
            tenant: args.tenant.clone(),
            key: args.key.clone(),
            limit: 0,
        })
        .await
        .map_err(err)?
        .into_inner()
        .versions;
    let target = versions.iter().find(|v| v.revision <= args.to);
    let now = current.as_ref().map_or_else(
        || "no layer now".to_owned(),
        |l| format!("now {} {} at revision {}", l.mode, l.format, l.mod_revision),
    );
    let mut plan = Plan::default();
    match target.and_then(|v| v.layer.as_ref()) {
        Some(layer) => plan.push(
            if current.is_some() {
                Change::Update
            } else {
                Change::Create
            },
            args.key.clone(),
            format!(
                "{now}; becomes the version of revision {}: {} {}, {} bytes",
                target.map_or(0, |v| v.revision),
                layer.mode,
                layer.format,
                layer.value.len()
            ),
        ),
        None if target.is_some() => plan.push(
            Change::Delete,
            args.key.clone(),
            format!("{now}; the layer did not exist at revision {}", args.to),
        ),
        None if versions.last().is_some() => plan.push(
            Change::Delete,
            args.key.clone(),
            format!(
                "{now}; revision {} is before the oldest kept version (revision {}): \
                 the layer is removed if that version created it, else the daemon refuses",
                args.to,
                versions.last().map_or(0, |v| v.revision)
            ),
        ),
        None => plan.push(
            Change::Update,
            args.key.clone(),
            format!("{now}; restored as it was at revision {}", args.to),
        ),
    }
    eprint!(
        "{}",
        plan.render(&format!(
            "Rolling back {} in tenant {} of project {project} to revision {}:",
            args.key, args.tenant, args.to
        ))
    );
    plan::confirm(&format!("roll back {}", args.key), args.yes)?;
    let expected = args
        .expected_revision
        .unwrap_or_else(|| current.as_ref().map_or(-1, |l| l.mod_revision));
    let r = client
        .config()
        .rollback(RollbackRequest {
            project: project.to_owned(),
            tenant: args.tenant.clone(),
            key: args.key.clone(),
            revision: args.to,
            expected_revision: expected,
        })
        .await
        .map_err(err)?
        .into_inner();
    let restored = r.restored.unwrap_or_default();
    ctx.out.record(&[
        ("key", json!(args.key)),
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_formats_follow_the_daemon() {
        assert_eq!(format_of("mm/server.yml"), "yaml");
        assert_eq!(format_of("a.JSON"), "json");
        assert_eq!(format_of("README"), "text");
        assert!(check_key("mm/server.yaml").is_ok());
        assert!(check_key("bad name.json").is_err());
        assert!(check_key("a/../b").is_err());
    }
}
