//! Group commit: transactions that callers issue at the same time travel to
//! etcd together, as the nested transactions of one request.
//!
//! **Why.** Every etcd request costs the cluster a gRPC round, a raft
//! proposal and an apply on every member, whatever it writes. A `stratad`
//! config write is a transaction with several compares and puts, and many
//! writers (a CD pipeline applying a directory, hundreds of game servers
//! registering at once) would otherwise pay that fixed cost one by one.
//!
//! **How.** Each caller's [`Txn`] becomes one nested transaction (etcd ≥
//! 3.3) of an outer transaction without compares. etcd evaluates every
//! nested transaction's compares against the state before the request,
//! applies the ops of those whose compares hold, all at one revision, and
//! answers for each whether it succeeded.
//!
//! **Same results as one at a time.** A batch only takes transactions none
//! of which writes a key that another one of the batch compares or writes.
//! Then every compare sees what it would have seen had the others run before
//! or after it, so the batch's outcome is that of running its members one
//! after another. A transaction that conflicts with the batch being formed
//! waits for the next one; a compare-and-swap race between two writers is
//! still decided by etcd, one batch after the other.
//!
//! **No wait for a lone writer.** At most [`MAX_IN_FLIGHT`] requests are
//! out at once; a transaction that finds a free slot leaves at once, alone,
//! as the plain transaction it is. Only while every slot is taken do new
//! transactions queue, and the next free slot takes all of them that fit:
//! the busier the replica, the larger its batches.
//!
//! **Limits.** A batch stays within etcd's default `--max-txn-ops` (etcd
//! counts the outer list against the nested ones' budget) and well under
//! its default request size; a transaction too large for that goes alone.
//! When etcd refuses a whole batch (a member's lease expired, a member is
//! malformed, the cluster has smaller limits), nothing of it was applied,
//! and every member is sent again on its own, so each gets its own answer.
//! When the outcome of a batch is unknown, every member gets the unknown
//! outcome error a lone transaction would have got.
//!
//! Members of one batch share its revision: [`TxnResponse::revision`] is
//! the same for all of them, and a watcher sees their events in one
//! [`WatchBatch`](crate::store::WatchBatch).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use etcd_client as etcd;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::{CallError, Inner, Repeat, header_revision};
use crate::store::{KeyRange, StoreError, Txn, TxnOp, TxnResponse};

/// Requests to etcd in flight at once. etcd on a busy cluster is bound by
/// its per-request CPU, so one request at a time, carrying everything that
/// queued while the previous one was out, gives the largest batches and
/// the most writes/s; the batch size grows with the load by itself.
/// Measured on a 3-member cluster on 2 vCPUs (`etcd-bench`, 16 / 128
/// writers, `stratad` ÷ raw puts in the same run): 1 in flight 0.63 /
/// 0.52, 2 in flight 0.46 / 0.60, 4 in flight 0.42 / 0.57, 8 in flight
/// 0.41 / 0.44.
pub(super) const MAX_IN_FLIGHT: usize = 1;

/// etcd's default `--max-txn-ops`. etcd checks the outer list against it
/// and every nested transaction against what the outer list leaves.
const ETCD_MAX_TXN_OPS: usize = 128;

/// Most bytes of keys and values in one batch: a third of etcd's default
/// request limit, so a batch is never refused for size by a default cluster.
const MAX_BATCH_BYTES: usize = 512 * 1024;

/// A transaction waiting for its batch.
struct Pending {
    txn: Txn,
    /// Keys, values and per-op overhead, for [`MAX_BATCH_BYTES`].
    bytes: usize,
    /// The most compares or ops of the transaction (what etcd counts).
    width: usize,
    reply: oneshot::Sender<Result<TxnResponse, StoreError>>,
}

/// Hands transactions to the commit task (see the module documentation).
pub(super) struct GroupCommit {
    queue: mpsc::UnboundedSender<Pending>,
}

impl GroupCommit {
    /// Starts the commit task on the current runtime. It ends when this
    /// handle is dropped and the last batch is answered.
    pub(super) fn start(inner: Arc<Inner>) -> Self {
        let (queue, pending) = mpsc::unbounded_channel();
        tokio::spawn(commit_loop(inner, pending));
        Self { queue }
    }

    /// Commits `txn` (already validated) with whatever else is waiting.
    pub(super) async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            bytes: txn_bytes(&txn),
            width: txn.compares.len().max(txn.ops.len()),
            txn,
            reply,
        };
        self.queue
            .send(pending)
            .map_err(|_| StoreError::Unavailable("the etcd store is shut down".into()))?;
        answer.await.map_err(|_| {
            StoreError::Unavailable(
                "the etcd commit task stopped (the runtime is shutting down); \
                 the transaction may or may not have been applied"
                    .into(),
            )
        })?
    }
}

async fn commit_loop(inner: Arc<Inner>, mut pending: mpsc::UnboundedReceiver<Pending>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut backlog: VecDeque<Pending> = VecDeque::new();
    loop {
        if backlog.is_empty() {
            match pending.recv().await {
                Some(p) => backlog.push_back(p),
                None => return,
            }
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // Everything that arrived while the slots were taken joins now.
        while let Ok(p) = pending.try_recv() {
            backlog.push_back(p);
        }
        let batch = take_batch(&mut backlog);
        tokio::spawn(commit(inner.clone(), batch, slot));
    }
}

/// Takes from the front of `backlog` the transactions that may share one
/// request; the others keep their order for the next batch.
fn take_batch(backlog: &mut VecDeque<Pending>) -> Vec<Pending> {
    let mut batch = Vec::new();
    let Some(first) = backlog.pop_front() else {
        return batch;
    };
    if first.bytes > MAX_BATCH_BYTES || first.width + 2 > ETCD_MAX_TXN_OPS / 2 {
        batch.push(first);
        return batch;
    }
    let mut footprint = Footprint::default();
    footprint.add(&first.txn);
    let mut bytes = first.bytes;
    let mut widest = first.width;
    batch.push(first);
    let mut skipped = VecDeque::new();
    while let Some(next) = backlog.pop_front() {
        let width = widest.max(next.width);
        if batch.len() + 1 + width > ETCD_MAX_TXN_OPS || bytes + next.bytes > MAX_BATCH_BYTES {
            backlog.push_front(next);
            break;
        }
        if footprint.admits(&next.txn) {
            footprint.add(&next.txn);
            bytes += next.bytes;
            widest = width;
            batch.push(next);
        } else {
            // It read or writes a key of this batch: it goes after it. Its
            // own keys stay reserved, so nothing queued behind it overtakes
            // it on those keys.
            footprint.add(&next.txn);
            skipped.push_back(next);
        }
    }
    while let Some(p) = skipped.pop_back() {
        backlog.push_front(p);
    }
    batch
}

/// Keys a batch reads (compares) and writes (puts, deletes).
#[derive(Default)]
struct Footprint {
    read: HashSet<Vec<u8>>,
    written: HashSet<Vec<u8>>,
    /// Deleted prefixes (tenant and lease clean-ups; rare).
    written_prefixes: Vec<Vec<u8>>,
}

impl Footprint {
    fn writes(&self, key: &[u8]) -> bool {
        self.written.contains(key) || self.written_prefixes.iter().any(|p| key.starts_with(p))
    }

    /// Whether `txn` can join: it writes nothing the batch reads or writes,
    /// and reads nothing the batch writes.
    fn admits(&self, txn: &Txn) -> bool {
        let reads_clash = txn.compares.iter().any(|c| self.writes(&c.key));
        let writes_clash = txn.ops.iter().any(|op| match op {
            TxnOp::Put { key, .. } | TxnOp::Delete(KeyRange::Key(key)) => {
                self.writes(key) || self.read.contains(key)
            }
            TxnOp::Delete(KeyRange::Prefix(prefix)) => {
                self.read.iter().any(|k| k.starts_with(prefix))
                    || self.written.iter().any(|k| k.starts_with(prefix))
                    || self
                        .written_prefixes
                        .iter()
                        .any(|p| p.starts_with(prefix) || prefix.starts_with(p))
            }
        });
        !reads_clash && !writes_clash
    }

    fn add(&mut self, txn: &Txn) {
        for c in &txn.compares {
            self.read.insert(c.key.clone());
        }
        for op in &txn.ops {
            match op {
                TxnOp::Put { key, .. } | TxnOp::Delete(KeyRange::Key(key)) => {
                    self.written.insert(key.clone());
                }
                TxnOp::Delete(KeyRange::Prefix(prefix)) => {
                    self.written_prefixes.push(prefix.clone());
                }
            }
        }
    }
}

/// Bytes `txn` adds to a request: keys, values and a little per entry.
fn txn_bytes(txn: &Txn) -> usize {
    const PER_ENTRY: usize = 32;
    let compares: usize = txn
        .compares
        .iter()
        .map(|c| {
            PER_ENTRY
                + c.key.len()
                + match &c.target {
                    crate::store::CompareTarget::Value(v) => v.len(),
                    _ => 0,
                }
        })
        .sum();
    let ops: usize = txn
        .ops
        .iter()
        .map(|op| {
            PER_ENTRY
                + match op {
                    TxnOp::Put { key, value, .. } => key.len() + value.len(),
                    TxnOp::Delete(KeyRange::Key(k) | KeyRange::Prefix(k)) => 2 * k.len() + 1,
                }
        })
        .sum();
    compares + ops
}

/// Records one request to etcd: how many transactions it carried and how
/// long etcd took to answer (the same metrics as the embedded store's group
/// commit, so one alert and one dashboard cover both).
fn record(size: usize, started: Instant) {
    metrics::histogram!("strata_store_write_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    metrics::histogram!("strata_store_write_batch_size").record(size as f64);
}

async fn commit(inner: Arc<Inner>, mut batch: Vec<Pending>, slot: OwnedSemaphorePermit) {
    let started = Instant::now();
    if batch.len() == 1 {
        if let Some(p) = batch.pop() {
            let result = inner.txn_alone(&p.txn).await;
            drop(slot);
            record(1, started);
            let _ = p.reply.send(result);
        }
        return;
    }
    let nested = batch
        .iter()
        .map(|p| etcd::TxnOp::txn(inner.etcd_txn(&p.txn)))
        .collect::<Vec<_>>();
    let request = etcd::Txn::new().and_then(nested);
    let outcome = inner
        .call("txn", Repeat::Unsafe, |client| {
            let request = request.clone();
            async move { client.kv_client().txn(request).await }
        })
        .await;
    drop(slot);
    match outcome {
        Ok(response) => {
            record(batch.len(), started);
            answer_batch(batch, &response);
        }
        Err(CallError::Rejected(status)) => {
            // Nothing was applied. Sent alone, each member gets its own
            // answer (the one etcd refused, the others their commit).
            tracing::debug!(
                members = batch.len(),
                error = %status.message(),
                "etcd refused a batch; sending its transactions one by one"
            );
            let alone = batch.into_iter().map(|p| {
                let inner = inner.clone();
                async move {
                    let started = Instant::now();
                    let result = inner.txn_alone(&p.txn).await;
                    record(1, started);
                    let _ = p.reply.send(result);
                }
            });
            futures::future::join_all(alone).await;
        }
        Err(CallError::Store(error)) => {
            for p in batch {
                let _ = p.reply.send(Err(error.clone()));
            }
        }
    }
}

/// Gives each member the answer of its own nested transaction.
fn answer_batch(batch: Vec<Pending>, response: &etcd::TxnResponse) {
    let revision = header_revision(response.header());
    let answers = response.op_responses();
    if answers.len() != batch.len() {
        let error = StoreError::Backend(format!(
            "etcd answered a batch of {} transactions with {} results",
            batch.len(),
            answers.len()
        ));
        for p in batch {
            let _ = p.reply.send(Err(error.clone()));
        }
        return;
    }
    for (p, answer) in batch.into_iter().zip(answers) {
        let result = match (&revision, answer) {
            (Err(e), _) => Err(e.clone()),
            (Ok(revision), etcd::TxnOpResponse::Txn(nested)) => Ok(TxnResponse {
                succeeded: nested.succeeded(),
                revision: *revision,
                deleted: super::deleted_count(&nested),
            }),
            (Ok(_), _) => Err(StoreError::Backend(
                "etcd answered a nested transaction with another kind of result".into(),
            )),
        };
        let _ = p.reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Compare;

    fn pending(txn: Txn) -> Pending {
        let (reply, _answer) = oneshot::channel();
        Pending {
            bytes: txn_bytes(&txn),
            width: txn.compares.len().max(txn.ops.len()),
            txn,
            reply,
        }
    }

    fn write(key: &str, guard: &str) -> Txn {
        Txn::new()
            .when(Compare::exists(guard.as_bytes()))
            .put(key.as_bytes(), b"v".as_slice())
    }

    fn keys(batch: &[Pending]) -> Vec<String> {
        batch
            .iter()
            .map(|p| match &p.txn.ops[0] {
                TxnOp::Put { key, .. } | TxnOp::Delete(KeyRange::Key(key)) => {
                    String::from_utf8_lossy(key).into_owned()
                }
                TxnOp::Delete(KeyRange::Prefix(p)) => format!("{}*", String::from_utf8_lossy(p)),
            })
            .collect()
    }

    #[test]
    fn independent_writes_share_a_batch() {
        let mut backlog: VecDeque<_> = ["a", "b", "c"]
            .into_iter()
            .map(|k| pending(write(k, "tenant")))
            .collect();
        let batch = take_batch(&mut backlog);
        assert_eq!(keys(&batch), ["a", "b", "c"]);
        assert!(backlog.is_empty());
    }

    #[test]
    fn a_write_of_a_key_another_member_reads_or_writes_waits() {
        let mut backlog: VecDeque<_> = [
            write("a", "tenant"),
            write("a", "tenant"), // writes what the first writes
            write("tenant", "x"), // writes what the first compares
            write("b", "a"),      // compares what the first writes
            write("c", "other"),  // independent
            Txn::new().delete(KeyRange::prefix(b"c".as_slice())), // covers c
        ]
        .into_iter()
        .map(pending)
        .collect();
        let first = take_batch(&mut backlog);
        assert_eq!(keys(&first), ["a", "c"]);
        // The ones left keep their order.
        assert_eq!(keys(backlog.make_contiguous()), ["a", "tenant", "b", "c*"]);
    }

    #[test]
    fn a_waiting_write_keeps_its_keys_from_later_ones() {
        // The second waits for the first; the third writes the key the
        // second compares, so letting it overtake the second would change
        // what the second's compare sees.
        let mut backlog: VecDeque<_> = [write("a", "g"), write("b", "a"), write("c", "b")]
            .into_iter()
            .map(pending)
            .collect();
        let first = take_batch(&mut backlog);
        assert_eq!(keys(&first), ["a"]);
        let second = take_batch(&mut backlog);
        assert_eq!(keys(&second), ["b"]);
        assert_eq!(keys(&take_batch(&mut backlog)), ["c"]);
    }

    #[test]
    fn a_batch_stays_within_etcds_op_and_size_limits() {
        let mut backlog: VecDeque<_> = (0..300)
            .map(|i| pending(write(&format!("k{i}"), "tenant")))
            .collect();
        let batch = take_batch(&mut backlog);
        let widest = batch.iter().map(|p| p.width).max().unwrap_or(0);
        assert!(batch.len() + widest <= ETCD_MAX_TXN_OPS, "{}", batch.len());
        assert!(batch.len() > 100, "{}", batch.len());

        let big = vec![b'x'; 200 * 1024];
        let mut backlog: VecDeque<_> = (0..4)
            .map(|i| pending(Txn::new().put(format!("big{i}").into_bytes(), big.clone())))
            .collect();
        assert_eq!(take_batch(&mut backlog).len(), 2);
        let huge = Txn::new().put(b"huge".to_vec(), vec![b'x'; MAX_BATCH_BYTES + 1]);
        let mut backlog: VecDeque<_> = [huge, write("a", "g")].into_iter().map(pending).collect();
        assert_eq!(keys(&take_batch(&mut backlog)), ["huge"]);
    }
}
