//! `strata watch` and the resumable follow loop it shares with `strata
//! service watch`: print each message of a watch stream, reconnecting and
//! resuming right after the last message printed when the stream breaks.
//!
//! This loop stays separate from the SDK's watch engine
//! (`client-sdk/src/watch.rs`), which drives `Client::watch*` handles, on
//! purpose: the CLI's contract differs from the engine's in ways users and
//! scripts see.
//!
//! - It ends (exit 0) after the message saying the tenant was deleted; the
//!   engine never ends by itself (it keeps trying, the tenant may come back).
//! - It waits as long as it takes for the first message: `--start-revision`
//!   at or past the daemon's revision gets nothing until the next change.
//!   The engine counts a stream without a first message within the request
//!   timeout as a dead endpoint and moves on, which here would turn a quiet
//!   watch into a reconnect (and a stderr line) every `--timeout`.
//! - Any refusal other than `UNAVAILABLE` (unknown tenant, permission
//!   denied, a limit) ends the command with that error and exit 1, also
//!   after a reconnect; the engine retries those slowly forever, and treats
//!   more codes (`UNKNOWN`, `DEADLINE_EXCEEDED`, rate limits) as passing.
//! - It keeps trying `UNAVAILABLE` daemons forever; the engine's start gives
//!   up after the startup timeout (or falls back to the disk cache).
//! - It prints every interruption to stderr with the daemon's message
//!   (`watch interrupted (…); resuming` / `…; reconnecting`) and reconnects
//!   to the first reachable of `--endpoints`, in order.
//!
//! Bending the engine to all of that would add a mode to every SDK watch;
//! the loop below is the forty lines it takes.

use std::time::Duration;

use clap::Args;
use strata_client::Code as tonic_code;
use strata_client::proto::{
    WatchConfigRequest, WatchConfigResponse, WatchServicesRequest, WatchServicesResponse,
};
use strata_client::{Connection, Status};
use tonic::Streaming;

use crate::ctx::{Ctx, Failure, err};

/// Arguments of `strata watch`.
#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
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
}

/// Runs `strata watch`: connects, then prints every message until the
/// tenant is deleted.
pub(crate) async fn run(ctx: &Ctx, args: WatchArgs) -> Result<(), Failure> {
    let client = ctx.connect().await?;
    let out = ctx.out;
    let request = WatchConfigRequest {
        project: ctx.project.clone(),
        tenant: args.tenant,
        keys: args.keys,
        prefixes: args.prefixes,
        start_revision: args.start_revision,
    };
    follow(ctx, client, request, |m| out.watch_message(m)).await
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

impl Resumable for WatchServicesRequest {
    type Message = WatchServicesResponse;

    async fn open(&self, client: &Connection) -> Result<Streaming<Self::Message>, Status> {
        Ok(client
            .registry()
            .watch_services(self.clone())
            .await?
            .into_inner())
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
