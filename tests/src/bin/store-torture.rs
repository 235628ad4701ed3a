//! `store-torture`: hammers an embedded store so that `tests/tests/crash.rs`
//! can SIGKILL it at a random moment and check what survived.
//!
//! Usage: `store-torture <data-dir> <tag> [writers]`.
//!
//! Opens the embedded store in `<data-dir>`, grants one long lease, then runs
//! `writers` concurrent tasks that commit transactions on unique keys under
//! `torture/<tag>/`: single puts, three-key txns, and puts attached to the
//! lease. After each acknowledged transaction it prints, flushed at once:
//!
//! ```text
//! ack <revision> <lease-id or 0> <key> [<key> ...]
//! ```
//!
//! Every key's value is the key itself. Before the first write it prints
//! `lease <id>`. It stops by itself after [`MAX_RUN`] or [`MAX_WRITES`].

use std::error::Error;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_server::store::embedded::EmbeddedStore;
use strata_server::store::{Compare, Store, Txn};

/// Longest the binary runs when nobody kills it.
const MAX_RUN: Duration = Duration::from_secs(60);
/// Most transactions one writer commits.
const MAX_WRITES: usize = 1_000_000;
/// TTL of the lease; far longer than any test round.
const LEASE_TTL_SECONDS: i64 = 3600;

type AnyError = Box<dyn Error + Send + Sync>;

/// Prints one line to stdout and flushes it, so that the line is out before
/// the next write can be acknowledged.
fn say(line: &str) -> Result<(), AnyError> {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

async fn writer(
    store: Arc<EmbeddedStore>,
    tag: String,
    writer: usize,
    lease: i64,
) -> Result<(), AnyError> {
    let started = Instant::now();
    for i in 0..MAX_WRITES {
        if started.elapsed() > MAX_RUN {
            break;
        }
        let base = format!("torture/{tag}/w{writer}/{i:07}");
        let (txn, keys, lease_id) = match i % 4 {
            0 | 1 => (Txn::new().put(base.clone(), base.clone()), vec![base], 0),
            2 => {
                let keys: Vec<String> = ["a", "b", "c"]
                    .iter()
                    .map(|s| format!("{base}/{s}"))
                    .collect();
                let mut txn = Txn::new().when(Compare::missing(keys[0].clone()));
                for k in &keys {
                    txn = txn.put(k.clone(), k.clone());
                }
                (txn, keys, 0)
            }
            _ => (
                Txn::new().put_with_lease(base.clone(), base.clone(), lease),
                vec![base],
                lease,
            ),
        };
        let resp = store.txn(txn).await?;
        if !resp.succeeded {
            return Err(format!("txn on fresh keys {keys:?} failed its compare").into());
        }
        say(&format!(
            "ack {} {lease_id} {}",
            resp.revision,
            keys.join(" ")
        ))?;
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), AnyError> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: store-torture <data-dir> <tag> [writers]";
    let dir = PathBuf::from(args.next().ok_or(usage)?);
    let tag = args.next().ok_or(usage)?;
    let writers: usize = match args.next() {
        Some(n) => n.parse()?,
        None => 8,
    };
    let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&dir)).await??;
    let store = Arc::new(store);
    let lease = store.lease_grant(LEASE_TTL_SECONDS).await?;
    say(&format!("lease {}", lease.id))?;
    let mut tasks = Vec::with_capacity(writers);
    for w in 0..writers {
        tasks.push(tokio::spawn(writer(
            Arc::clone(&store),
            tag.clone(),
            w,
            lease.id,
        )));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}
