//! `strata`, the admin CLI: tenants, configuration and daemon status over
//! gRPC. A thin clap layer over the client SDK; it never depends on the
//! server.
//!
//! Exit codes: 0 success, 1 an error from the server (its message is
//! printed), no reachable daemon, or a declined confirmation, 2 a usage
//! error.
//!
//! This file holds the top-level command line and the dispatch; each
//! command group lives in its own module. Modules form layers (checked by
//! `scripts/check-layers.py --crate cli --layers cli/layers.txt`), bottom-up:
//!
//! 1. **base** — `output` (tables and JSON), `tls` (the TLS flags), `ctx`
//!    (the shared [`Ctx`]: settings, connecting, [`Failure`] and so the
//!    exit code);
//! 2. **support** — `plan` (show a plan, then ask), `watch` (`strata watch`
//!    and the resumable follow loop `service watch` shares);
//! 3. **steps** — `apply` (`config apply` and `config rollback`);
//! 4. **commands** — `status`, `tenant`, `config`, `service`, `token`,
//!    `backup` (export, import), `audit`, `completion` (completion scripts
//!    and man pages); none uses another.

#![allow(clippy::print_stdout)] // printing results is this binary's job

mod apply;
mod audit;
mod backup;
mod completion;
mod config;
mod ctx;
mod output;
mod plan;
mod service;
mod status;
mod tenant;
mod tls;
mod token;
mod watch;

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

use crate::ctx::{Ctx, Failure};
use crate::output::Output;

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
    Tenant(tenant::TenantCommand),
    /// Write, resolve and inspect configuration.
    #[command(subcommand)]
    Config(config::ConfigCommand),
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
    Watch(watch::WatchArgs),
    /// Print a shell completion script (e.g. `strata completion bash >
    /// /usr/share/bash-completion/completions/strata`).
    Completion(completion::CompletionArgs),
    /// Write man pages for `strata` and every subcommand.
    Man(completion::ManArgs),
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

/// Builds the shared context from the global flags and runs the command.
/// Every command connects itself, after checking its own arguments, so a
/// usage error is reported as one even when no daemon is up.
async fn run(cli: Cli) -> Result<(), Failure> {
    // These need no daemon, token or settings.
    match &cli.command {
        Command::Completion(args) => return completion::completion(Cli::command(), args),
        Command::Man(args) => return completion::man(Cli::command(), args),
        _ => {}
    }
    let ctx = Ctx {
        endpoints: cli.endpoints,
        timeout: cli.timeout,
        project: cli.project,
        out: cli.output,
        tls: cli.tls.config().map_err(Failure::Usage)?,
        token: cli.token.token().map_err(Failure::Usage)?,
        allow_plaintext: cli.allow_plaintext,
    };
    match cli.command {
        Command::Status => status::run(&ctx).await,
        Command::Tenant(cmd) => tenant::run(&ctx, cmd).await,
        Command::Config(cmd) => config::run(&ctx, cmd).await,
        Command::Service(cmd) => service::run(&ctx, cmd).await,
        Command::Token(cmd) => token::run(&ctx, cmd).await,
        Command::Export(args) => backup::export(&ctx, args).await,
        Command::Import(args) => backup::import(&ctx, args).await,
        Command::Audit(args) => audit::run(&ctx, args).await,
        Command::Watch(args) => watch::run(&ctx, args).await,
        Command::Completion(_) | Command::Man(_) => Ok(()),
    }
}
