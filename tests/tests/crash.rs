//! Crash safety of the embedded store: run `store-torture` (concurrent
//! writers printing every acknowledged write), SIGKILL it at a random moment,
//! reopen the store and check that every acknowledged write survived at its
//! acknowledged revision and that the revision sequence has no hole and no
//! reuse. The rounds share one data directory, so every round also
//! re-checks what all earlier rounds acknowledged.

// Test code: a broken expectation should fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::Rng;
use strata_server::store::embedded::EmbeddedStore;
use strata_server::store::{EventKind, KeyRange, KeyValue, LeaseId, Revision, Store};

const ROUNDS: usize = 20;
const WRITERS: &str = "8";
/// The whole test must finish within this.
const TOTAL_LIMIT: Duration = Duration::from_secs(240);
/// Longest one watch read or one child exit may take.
const STEP_LIMIT: Duration = Duration::from_secs(30);

/// Kills (SIGKILL) and reaps the child on every exit path.
struct ChildGuard(Child);

impl ChildGuard {
    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.0.id()).unwrap())
    }

    /// SIGKILLs the child and waits for it; fails if it had exited by itself.
    fn kill_and_reap(&mut self) {
        if let Some(status) = self.0.try_wait().unwrap() {
            panic!("store-torture exited by itself before the kill: {status}");
        }
        kill(self.pid(), Signal::SIGKILL).unwrap();
        let deadline = Instant::now() + STEP_LIMIT;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                // Anything but death by SIGKILL means it stopped by itself.
                assert_eq!(
                    status.signal(),
                    Some(9),
                    "store-torture ended with {status}"
                );
                return;
            }
            assert!(Instant::now() < deadline, "killed child did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = kill(self.pid(), Signal::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

/// One acknowledged transaction.
#[derive(Debug)]
struct Ack {
    lease: LeaseId,
    keys: Vec<Vec<u8>>,
}

/// Parses the complete lines of the child's output (a line cut by the kill
/// is not an acknowledgement).
fn parse(output: &[u8], acks: &mut BTreeMap<Revision, Ack>, leases: &mut Vec<LeaseId>) -> usize {
    let text = String::from_utf8(output.to_vec()).unwrap();
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    let mut count = 0;
    for line in complete.lines() {
        let mut words = line.split(' ');
        match words.next() {
            Some("lease") => leases.push(words.next().unwrap().parse().unwrap()),
            Some("ack") => {
                let revision: Revision = words.next().unwrap().parse().unwrap();
                let lease: LeaseId = words.next().unwrap().parse().unwrap();
                let keys: Vec<Vec<u8>> = words.map(|w| w.as_bytes().to_vec()).collect();
                assert!(!keys.is_empty(), "ack without keys: {line}");
                let previous = acks.insert(revision, Ack { lease, keys });
                assert!(
                    previous.is_none(),
                    "revision {revision} acknowledged twice: {line}"
                );
                count += 1;
            }
            _ => panic!("unexpected output line {line:?}"),
        }
    }
    count
}

fn read_all(mut from: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = from.read_to_end(&mut buf);
        buf
    })
}

/// Reopens the store and checks everything acknowledged so far. Returns the
/// store revision after one extra write.
async fn verify(
    dir: &Path,
    round: usize,
    acks: &BTreeMap<Revision, Ack>,
    leases: &[LeaseId],
) -> Revision {
    let path = dir.to_path_buf();
    let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&path))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("round {round}: reopen failed: {e}"));
    let status = store.status().await.unwrap();
    let current = status.revision;
    assert_eq!(status.compacted_revision, 0);
    if let Some((&max, _)) = acks.last_key_value() {
        assert!(
            current >= max,
            "round {round}: store at {current}, but {max} was acknowledged"
        );
    }

    // Every acknowledged key holds exactly what was acknowledged.
    let all = store
        .range(KeyRange::prefix(b"torture/".to_vec()))
        .await
        .unwrap();
    assert_eq!(all.revision, current);
    let stored: BTreeMap<&[u8], &KeyValue> =
        all.kvs.iter().map(|kv| (kv.key.as_slice(), kv)).collect();
    for (&revision, ack) in acks {
        for key in &ack.keys {
            let expected = KeyValue {
                key: key.clone(),
                value: key.clone(),
                create_revision: revision,
                mod_revision: revision,
                version: 1,
                lease: ack.lease,
            };
            let got = stored.get(key.as_slice()).copied();
            assert_eq!(
                got,
                Some(&expected),
                "round {round}: acknowledged write {} lost or changed",
                String::from_utf8_lossy(key)
            );
        }
    }
    for &lease in leases {
        let info = store
            .lease_time_to_live(lease)
            .await
            .unwrap_or_else(|e| panic!("round {round}: lease {lease}: {e}"));
        assert_eq!(info.granted_ttl_seconds, 3600);
    }

    // The history holds every revision from 1 to `current` exactly once, and
    // each acknowledged revision holds exactly the acknowledged puts.
    if current > 0 {
        let mut history = store.watch(KeyRange::prefix(Vec::new()), 1).await.unwrap();
        let mut expected_next: Revision = 1;
        while expected_next <= current {
            let item = tokio::time::timeout(STEP_LIMIT, history.next()).await;
            let batch = match item {
                Ok(Some(Ok(batch))) => batch,
                other => panic!("round {round}: history read at {expected_next}: {other:?}"),
            };
            assert_eq!(
                batch.revision, expected_next,
                "round {round}: hole or reuse in history"
            );
            if let Some(ack) = acks.get(&batch.revision) {
                let keys: Vec<&[u8]> = batch.events.iter().map(|e| e.kv.key.as_slice()).collect();
                let acked: Vec<&[u8]> = ack.keys.iter().map(Vec::as_slice).collect();
                assert_eq!(
                    keys, acked,
                    "round {round}: events of revision {}",
                    batch.revision
                );
                assert!(batch.events.iter().all(|e| e.kind == EventKind::Put));
            }
            expected_next += 1;
        }
    }

    // The next write gets the next revision.
    let next = store
        .put(format!("verify/{round}").as_bytes(), b"v")
        .await
        .unwrap();
    assert_eq!(
        next,
        current + 1,
        "round {round}: first write after restart"
    );
    assert_eq!(store.status().await.unwrap().revision, next);
    tokio::task::spawn_blocking(move || drop(store))
        .await
        .unwrap();
    next
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rng = rand::rng();
    let mut acks: BTreeMap<Revision, Ack> = BTreeMap::new();
    let mut leases: Vec<LeaseId> = Vec::new();
    let mut rounds_with_acks = 0;
    let mut last_revision: Revision = 0;
    for round in 0..ROUNDS {
        assert!(
            started.elapsed() < TOTAL_LIMIT,
            "crash test ran out of time at round {round}"
        );
        let mut child = ChildGuard(
            Command::new(env!("CARGO_BIN_EXE_store-torture"))
                .arg(dir.path())
                .arg(format!("r{round:02}"))
                .arg(WRITERS)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let stdout = read_all(child.0.stdout.take().unwrap());
        // Mostly mid-stream kills; every fifth round kills early (possibly
        // while the store is still opening or recovering).
        let delay = if round % 5 == 4 {
            rng.random_range(0..60)
        } else {
            rng.random_range(100..700)
        };
        std::thread::sleep(Duration::from_millis(delay));
        child.kill_and_reap();
        drop(child);
        let output = stdout.join().unwrap();
        let acked = parse(&output, &mut acks, &mut leases);
        if acked > 0 {
            rounds_with_acks += 1;
        }
        let revision = runtime.block_on(async {
            tokio::time::timeout(STEP_LIMIT * 4, verify(dir.path(), round, &acks, &leases)).await
        });
        let revision = revision.unwrap_or_else(|_| panic!("round {round}: verify timed out"));
        assert!(
            revision > last_revision,
            "round {round}: revision went back"
        );
        last_revision = revision;
        eprintln!(
            "round {round:2}: killed after {delay:3} ms, {acked:5} acks, store at revision {revision}"
        );
    }
    assert!(
        rounds_with_acks >= ROUNDS / 2,
        "only {rounds_with_acks} of {ROUNDS} rounds acknowledged anything; the kill comes too early"
    );
}
