//! The token every command sends (`STRATA_TOKEN` or `--token-file`), and
//! `strata token create|list|revoke` (admin).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use strata_client::proto::{
    CreateTokenRequest, ListTokensRequest, RevokeTokenRequest, Role, TokenInfo,
};

use crate::ctx::{Ctx, Failure, err};
use crate::output::Table;

/// `--token-file`; the token itself comes from `STRATA_TOKEN`.
#[derive(Debug, Args)]
pub(crate) struct TokenArgs {
    /// File holding the bearer token (e.g. stratad's `<data-dir>/admin.token`).
    /// Without it, the token is read from the STRATA_TOKEN variable.
    #[arg(long, env = "STRATA_TOKEN_FILE", value_name = "FILE", global = true)]
    token_file: Option<PathBuf>,
}

impl TokenArgs {
    /// The token to send: the file's first line when `--token-file` is
    /// given, else `STRATA_TOKEN`, else none (the daemon then answers
    /// UNAUTHENTICATED unless it runs with `--auth=off`). The token is kept
    /// off the command line on purpose: arguments are visible to every
    /// user of the machine in the process list.
    pub(crate) fn token(&self) -> Result<Option<String>, String> {
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--token-file {}: {e}", path.display()))?;
            let token = text.lines().next().unwrap_or("").trim().to_owned();
            if token.is_empty() {
                return Err(format!(
                    "--token-file {}: the file is empty",
                    path.display()
                ));
            }
            return Ok(Some(token));
        }
        Ok(std::env::var("STRATA_TOKEN")
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty()))
    }
}

/// A role as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum RoleArg {
    /// Read tenants, config and the registry; watch.
    Read,
    /// Manage tenants matching --tenants: create, delete, register, write config.
    Register,
    /// Write config in any tenant of the project.
    Write,
    /// Everything.
    Admin,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Read => Role::Read,
            RoleArg::Register => Role::Register,
            RoleArg::Write => Role::Write,
            RoleArg::Admin => Role::Admin,
        }
    }
}

/// `strata token …` (needs an admin token valid for every project).
#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a token and print it once (it cannot be shown again).
    Create {
        /// Name of the holder, e.g. `ci-feat-login` (shown in lists and audit).
        name: String,
        /// What the token may do.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Tenant name pattern a register token manages, e.g. `feat-*`.
        #[arg(long = "tenants", value_name = "PATTERN")]
        tenant_pattern: Option<String>,
        /// Make an admin token valid for every project instead of --project.
        #[arg(long)]
        all_projects: bool,
        /// Lifetime, e.g. `30d`; none: no expiry.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// List tokens (ids, names, roles, scopes; never secrets).
    List,
    /// Revoke a token by id; every daemon refuses it from then on.
    Revoke {
        /// Token id (16 hex digits, as `token list` shows).
        id: String,
    },
}

fn role_name(role: i32) -> &'static str {
    match Role::try_from(role) {
        Ok(Role::Read) => "read",
        Ok(Role::Register) => "register",
        Ok(Role::Write) => "write",
        Ok(Role::Admin) => "admin",
        _ => "unknown",
    }
}

fn info_json(t: &TokenInfo) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "role": role_name(t.role),
        "project": if t.project.is_empty() { Value::Null } else { json!(t.project) },
        "tenant_pattern": if t.tenant_pattern.is_empty() { Value::Null } else { json!(t.tenant_pattern) },
        "created_at_unix_ms": t.created_at_unix_ms,
        "created_by": t.created_by,
        "expires_at_unix_ms": if t.expires_at_unix_ms == 0 { Value::Null } else { json!(t.expires_at_unix_ms) },
    })
}

/// Runs a `strata token` command.
pub(crate) async fn run(ctx: &Ctx, cmd: TokenCommand) -> Result<(), Failure> {
    let client = ctx.connect().await?;
    let mut tokens = client.tokens();
    match cmd {
        TokenCommand::Create {
            name,
            role,
            tenant_pattern,
            all_projects,
            ttl,
        } => {
            if all_projects && role != RoleArg::Admin {
                return Err(Failure::Usage(
                    "--all-projects is only for admin tokens".into(),
                ));
            }
            let r = tokens
                .create_token(CreateTokenRequest {
                    name,
                    role: Role::from(role) as i32,
                    project: if all_projects {
                        String::new()
                    } else {
                        ctx.project.clone()
                    },
                    tenant_pattern: tenant_pattern.unwrap_or_default(),
                    ttl_seconds: ttl.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
                })
                .await
                .map_err(err)?
                .into_inner();
            let info = r.info.unwrap_or_default();
            match ctx.out {
                crate::output::Output::Json => {
                    let mut v = info_json(&info);
                    v["token"] = json!(r.token);
                    println!("{v}");
                }
                crate::output::Output::Table => {
                    eprintln!(
                        "created token {} ({}); this is the only time it is shown:",
                        info.id,
                        role_name(info.role)
                    );
                    println!("{}", r.token);
                }
            }
        }
        TokenCommand::List => {
            let r = tokens
                .list_tokens(ListTokensRequest {})
                .await
                .map_err(err)?
                .into_inner();
            let mut table = Table::new(&["ID", "NAME", "ROLE", "PROJECT", "TENANTS", "CREATED BY"]);
            for t in &r.tokens {
                table.row(vec![
                    t.id.clone(),
                    t.name.clone(),
                    role_name(t.role).to_owned(),
                    if t.project.is_empty() {
                        "*".to_owned()
                    } else {
                        t.project.clone()
                    },
                    if t.tenant_pattern.is_empty() {
                        "-".to_owned()
                    } else {
                        t.tenant_pattern.clone()
                    },
                    t.created_by.clone(),
                ]);
            }
            let json = Value::Array(r.tokens.iter().map(info_json).collect());
            ctx.out.table_with(table, json);
        }
        TokenCommand::Revoke { id } => {
            let r = tokens
                .revoke_token(RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(err)?
                .into_inner();
            ctx.out.record(&[
                ("revoked", json!(id)),
                ("revision", json!(r.header.map_or(0, |h| h.revision))),
            ]);
        }
    }
    Ok(())
}
