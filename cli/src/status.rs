//! `strata status`: the daemon's store, revisions, uptime and version.

use serde_json::json;
use strata_client::proto::StatusRequest;

use crate::ctx::{Ctx, Failure, err};

/// Runs `strata status` against the first reachable daemon.
pub(crate) async fn run(ctx: &Ctx) -> Result<(), Failure> {
    let client = ctx.connect().await?;
    let s = client
        .admin()
        .status(StatusRequest {})
        .await
        .map_err(err)?
        .into_inner();
    ctx.out.record(&[
        ("endpoint", json!(client.endpoint())),
        ("store", json!(s.store_kind)),
        ("revision", json!(s.revision)),
        ("compacted_revision", json!(s.compacted_revision)),
        ("uptime_seconds", json!(s.uptime_seconds)),
        ("version", json!(s.version)),
        ("ready", json!(s.ready)),
    ]);
    Ok(())
}
