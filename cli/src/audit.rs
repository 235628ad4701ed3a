//! `strata audit`: the daemon's audit log (admin tokens only), newest
//! first, filtered by tenant, actor, operation, result and time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use serde_json::{Value, json};
use strata_client::proto::{AuditEntry, QueryAuditRequest};

use crate::ctx::{Ctx, Failure, err};
use crate::output::{Output, Table};

/// Arguments of `strata audit`.
#[derive(Debug, Args)]
pub(crate) struct AuditArgs {
    /// Only entries naming this tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// Only entries by this token (its id or its name).
    #[arg(long)]
    actor: Option<String>,
    /// Only this operation, e.g. `PutConfig`, `DeleteTenant`, `CreateToken`.
    #[arg(long = "op")]
    operation: Option<String>,
    /// `ok`, `error` (every refusal), or an error code such as `permission_denied`.
    #[arg(long)]
    result: Option<String>,
    /// Only entries newer than this: a duration ago (`1h`, `30m`) or an
    /// RFC 3339 time (`2026-01-02T03:04:05Z`).
    #[arg(long, value_parser = parse_time)]
    since: Option<i64>,
    /// Only entries older than this (same forms as --since).
    #[arg(long, value_parser = parse_time)]
    until: Option<i64>,
    /// Every project instead of --project.
    #[arg(long)]
    all_projects: bool,
    /// Most entries shown.
    #[arg(long, default_value_t = 100)]
    limit: u32,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A time as Unix milliseconds: `1h` (that long ago) or RFC 3339.
fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ago) = humantime::parse_duration(s) {
        let ago = i64::try_from(ago.as_millis()).unwrap_or(i64::MAX);
        return Ok(now_ms().saturating_sub(ago));
    }
    humantime::parse_rfc3339_weak(s)
        .map_err(|_| format!("{s:?} is neither a duration (1h, 30m) nor an RFC 3339 time"))
        .and_then(|t| {
            t.duration_since(UNIX_EPOCH)
                .map_err(|e| e.to_string())
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        })
}

fn time_text(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// An entry as `-o json` prints it: the daemon's rendering (shared through
/// `strata_proto::names`, so the two never differ) plus a readable `time`.
fn entry_json(e: &AuditEntry) -> Value {
    let mut json = strata_proto::names::audit_entry_json(e);
    if let Some(fields) = json.as_object_mut() {
        fields.insert("time".to_owned(), json!(time_text(e.time_unix_ms)));
    }
    json
}

/// Runs `strata audit`.
pub(crate) async fn run(ctx: &Ctx, args: AuditArgs) -> Result<(), Failure> {
    if let (Some(since), Some(until)) = (args.since, args.until)
        && until <= since
    {
        return Err(Failure::Usage("--until must be later than --since".into()));
    }
    let client = ctx.connect().await?;
    let response = client
        .audit()
        .query(QueryAuditRequest {
            project: if args.all_projects {
                String::new()
            } else {
                ctx.project.clone()
            },
            tenant: args.tenant.unwrap_or_default(),
            actor: args.actor.unwrap_or_default(),
            since_unix_ms: args.since.unwrap_or(0),
            until_unix_ms: args.until.unwrap_or(0),
            operation: args.operation.unwrap_or_default(),
            limit: args.limit,
            result: args.result.unwrap_or_default(),
        })
        .await
        .map_err(err)?
        .into_inner();
    match ctx.out {
        Output::Json => {
            let entries: Vec<Value> = response.entries.iter().map(entry_json).collect();
            println!(
                "{}",
                json!({"entries": entries, "truncated": response.truncated})
            );
        }
        Output::Table => {
            let mut table = Table::new(&[
                "TIME",
                "ACTOR",
                "OPERATION",
                "TENANT",
                "SUBJECT",
                "RESULT",
                "REVISION",
            ]);
            for e in &response.entries {
                table.row(vec![
                    time_text(e.time_unix_ms),
                    e.actor_name.clone(),
                    e.operation.clone(),
                    if e.project.is_empty() {
                        "-".to_owned()
                    } else {
                        format!("{}/{}", e.project, e.tenant)
                    },
                    e.subject.clone(),
                    e.result.clone(),
                    if e.revision > 0 {
                        e.revision.to_string()
                    } else {
                        "-".to_owned()
                    },
                ]);
            }
            ctx.out.table_with(table, Value::Null);
            if response.truncated {
                eprintln!("(more entries match; narrow the filters or raise --limit)");
            }
        }
    }
    Ok(())
}
