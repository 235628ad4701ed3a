//! The etcd backend beyond the conformance suite, on real etcd clusters:
//! watches and writes surviving killed members (the one being watched, the
//! leader), an unreachable cluster, the compaction point found without
//! having compacted, key prefixes, etcd auth and TLS with client
//! certificates, and `stratad` selecting etcd.
//!
//! Without etcd these tests fail under CI and skip loudly elsewhere.

// Test code: a failed step should fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::signal::Signal;
use strata_server::store::etcd::{EtcdAuth, EtcdOptions, EtcdStore, EtcdTls};
use strata_server::store::{EventKind, KeyRange, Revision, Store, StoreError, WatchBatch};
use strata_tests::etcd::{EtcdCluster, EtcdSettings, TestCerts, etcd_available};
use strata_tests::{Daemon, free_port, http_get, http_request, run_stratad};

async fn connect(endpoints: Vec<String>, prefix: &str) -> EtcdStore {
    EtcdStore::connect(EtcdOptions::new(endpoints).with_prefix(prefix))
        .await
        .expect("connect to the test cluster")
}

/// Reads batches until one at or past `last`; fails on errors, gaps in
/// ordering, or after `limit`.
async fn read_through(
    stream: &mut strata_server::store::WatchStream,
    last: Revision,
    limit: Duration,
) -> Vec<WatchBatch> {
    let deadline = Instant::now() + limit;
    let mut out: Vec<WatchBatch> = Vec::new();
    while out.last().is_none_or(|b| b.revision < last) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(Ok(batch))) => {
                if let Some(prev) = out.last() {
                    assert!(
                        batch.revision > prev.revision,
                        "revision {} after {}: duplicate or out of order",
                        batch.revision,
                        prev.revision
                    );
                }
                out.push(batch);
            }
            Ok(Some(Err(e))) => panic!("watch failed: {e}"),
            Ok(None) => panic!("watch ended"),
            Err(_) => panic!(
                "watch did not reach {last} within {limit:?}; at {:?}",
                out.last().map(|b| b.revision)
            ),
        }
    }
    out
}

/// A watch on the member that gets SIGKILLed goes on at another member,
/// from exactly where it was: every acknowledged write arrives once, in
/// order, with no gap, while writes keep coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_survives_killing_its_member_without_gap_or_duplicate() {
    if !etcd_available("watch_survives_killing_its_member_without_gap_or_duplicate") {
        return;
    }
    const WRITES: usize = 300;
    let mut cluster = EtcdCluster::start(3).await;
    let e = cluster.endpoints();
    // The watcher talks to member 0 first; the writer to the others.
    let watcher = connect(e.clone(), "/w/").await;
    let writer = connect(vec![e[1].clone(), e[2].clone(), e[0].clone()], "/w/").await;
    let mut stream = watcher.watch(KeyRange::prefix(""), 0).await.unwrap();

    let acked_count = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&acked_count);
    let writes = tokio::spawn(async move {
        let mut acked: BTreeMap<Revision, Vec<u8>> = BTreeMap::new();
        for i in 0..WRITES {
            let key = format!("k{i:04}").into_bytes();
            // A write whose outcome is unknown (its member died under it)
            // is not retried: the watch may show it or not.
            if let Ok(r) = writer.put(&key, b"v").await {
                acked.insert(r, key);
                counter.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        acked
    });
    let reader = tokio::spawn(async move {
        let mut seen: Vec<WatchBatch> = Vec::new();
        // Reads until told the last revision, then through it.
        let mut budget = 0;
        while budget < 10_000 {
            budget += 1;
            match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
                Ok(Some(Ok(batch))) => {
                    if let Some(prev) = seen.last() {
                        assert!(batch.revision > prev.revision, "duplicate or out of order");
                    }
                    let done = batch.events.iter().any(|e| e.kv.key == b"~end");
                    seen.push(batch);
                    if done {
                        return seen;
                    }
                }
                other => panic!("watch failed: {other:?}"),
            }
        }
        panic!("more batches than written");
    });

    let deadline = Instant::now() + Duration::from_secs(30);
    while acked_count.load(Ordering::Relaxed) < WRITES / 3 {
        assert!(Instant::now() < deadline, "writes do not progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.kill(0);
    let acked = writes.await.unwrap();
    let end = connect(vec![e[1].clone(), e[2].clone()], "/w/").await;
    let end_rev = end.put(b"~end", b"").await.unwrap();
    let seen = reader.await.unwrap();
    assert_eq!(seen.last().unwrap().revision, end_rev);

    assert!(
        acked.len() > WRITES / 2,
        "only {} writes acknowledged",
        acked.len()
    );
    let seen_keys: BTreeMap<Revision, Vec<u8>> = seen
        .iter()
        .map(|b| {
            assert_eq!(b.events.len(), 1, "one put per revision");
            assert_eq!(b.events[0].kind, EventKind::Put);
            (b.revision, b.events[0].kv.key.clone())
        })
        .collect();
    for (r, key) in &acked {
        assert_eq!(
            seen_keys.get(r),
            Some(key),
            "acknowledged write at {r} missing from the watch"
        );
    }
    // Anything else the watch saw is a write that failed with an unknown
    // outcome, or the end marker.
    assert!(seen_keys.len() <= WRITES + 1);
}

/// SIGKILL the leader while four writers run: writes resume within a few
/// seconds, and every acknowledged write is there afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_loses_no_acknowledged_write() {
    if !etcd_available("killing_the_leader_loses_no_acknowledged_write") {
        return;
    }
    const WRITERS: usize = 4;
    const WRITES: usize = 120;
    let mut cluster = EtcdCluster::start(3).await;
    let store = Arc::new(connect(cluster.endpoints(), "/l/").await);
    let progress = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = Arc::clone(&store);
        let progress = Arc::clone(&progress);
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut longest_gap = Duration::ZERO;
            let mut last_ack = Instant::now();
            for i in 0..WRITES {
                let key = format!("w{w}/{i:04}");
                // Retried until acknowledged, bounded: a retry after an
                // unknown outcome rewrites the same value, which is fine.
                for attempt in 0.. {
                    match store.put(key.as_bytes(), key.as_bytes()).await {
                        Ok(r) => {
                            acked.push((key.clone(), r));
                            break;
                        }
                        Err(StoreError::Unavailable(_)) if attempt < 100 => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("write {key} failed for good: {e}"),
                    }
                }
                longest_gap = longest_gap.max(last_ack.elapsed());
                last_ack = Instant::now();
                progress.fetch_add(1, Ordering::Relaxed);
            }
            (acked, longest_gap)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while progress.load(Ordering::Relaxed) < WRITERS * WRITES / 4 {
        assert!(Instant::now() < deadline, "writes do not progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    cluster.kill(leader);
    let killed_at = Instant::now();
    let mut acked = Vec::new();
    for task in tasks {
        let (mine, gap) = task.await.unwrap();
        assert!(gap < Duration::from_secs(5), "writes stalled for {gap:?}");
        eprintln!("longest stall of a writer: {gap:?}");
        acked.extend(mine);
    }
    let new_leader = cluster.wait_leader(Duration::from_secs(10)).await;
    assert_ne!(new_leader, leader);
    let all = store.range(KeyRange::prefix("")).await.unwrap();
    let stored: BTreeMap<Vec<u8>, (Vec<u8>, Revision)> = all
        .kvs
        .into_iter()
        .map(|kv| (kv.key, (kv.value, kv.mod_revision)))
        .collect();
    assert_eq!(acked.len(), WRITERS * WRITES);
    for (key, r) in acked {
        let (value, modified) = stored
            .get(key.as_bytes())
            .unwrap_or_else(|| panic!("acknowledged write {key} lost"));
        assert_eq!(value, key.as_bytes());
        assert!(*modified >= r);
    }
    eprintln!(
        "leader {leader} killed; writes done {:?} later",
        killed_at.elapsed()
    );
}

/// No etcd at any endpoint: `connect` fails with `Unavailable`, naming the
/// endpoints, within the request timeout.
#[tokio::test]
async fn unreachable_etcd_is_unavailable() {
    let endpoints = vec![
        format!("http://127.0.0.1:{}", free_port()),
        format!("http://127.0.0.1:{}", free_port()),
    ];
    let mut options = EtcdOptions::new(endpoints.clone());
    options.request_timeout = Duration::from_secs(2);
    let started = Instant::now();
    let err = EtcdStore::connect(options).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    match err {
        StoreError::Unavailable(message) => {
            for e in &endpoints {
                assert!(message.contains(e), "{message}");
            }
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// A store that never compacted still reports the compaction point
/// another client set, and follows it as it moves.
#[tokio::test]
async fn status_finds_compaction_done_by_another_client() {
    if !etcd_available("status_finds_compaction_done_by_another_client") {
        return;
    }
    let cluster = EtcdCluster::start(1).await;
    let a = connect(cluster.endpoints(), "/a/").await;
    let b = connect(cluster.endpoints(), "/b/").await;
    assert_eq!(b.status().await.unwrap().compacted_revision, 0);
    let mut revisions = Vec::new();
    for i in 0..40 {
        revisions.push(a.put(format!("k{i}").as_bytes(), b"v").await.unwrap());
    }
    for at in [revisions[3], revisions[17], revisions[38]] {
        a.compact(at).await.unwrap();
        let status = b.status().await.unwrap();
        assert_eq!(status.compacted_revision, at);
        assert!(status.revision >= revisions[39]);
        match b.watch(KeyRange::prefix(""), at - 1).await {
            Ok(mut w) => match w.next().await {
                Some(Err(StoreError::Compacted { compacted, .. })) => assert_eq!(compacted, at),
                other => panic!("expected Compacted, got {other:?}"),
            },
            Err(e) => panic!("watch: {e}"),
        }
    }
}

/// Two installations with different prefixes share a cluster without
/// seeing each other's keys, in reads and in watches of everything.
#[tokio::test]
async fn prefixes_keep_installations_apart() {
    if !etcd_available("prefixes_keep_installations_apart") {
        return;
    }
    let cluster = EtcdCluster::start(1).await;
    let one = connect(cluster.endpoints(), "/one/").await;
    let two = connect(cluster.endpoints(), "/two/").await;
    let mut watch_one = one.watch(KeyRange::prefix(""), 0).await.unwrap();
    two.put(b"t/p/x", b"two").await.unwrap();
    let r = one.put(b"t/p/x", b"one").await.unwrap();
    let batch = read_through(&mut watch_one, r, Duration::from_secs(10)).await;
    assert_eq!(batch.len(), 1, "{batch:?}");
    assert_eq!(batch[0].events[0].kv.key, b"t/p/x");
    let all = one.range(KeyRange::prefix("")).await.unwrap();
    assert_eq!(all.kvs.len(), 1);
    assert_eq!(all.kvs[0].value, b"one");
    assert_eq!(two.delete(KeyRange::prefix("")).await.unwrap(), 1);
    assert_eq!(one.get(b"t/p/x").await.unwrap().unwrap().value, b"one");
}

/// With etcd auth on, the store works as the given user; a wrong password
/// is reported as an authentication failure without waiting out retries.
#[tokio::test]
async fn auth_with_user_and_password() {
    if !etcd_available("auth_with_user_and_password") {
        return;
    }
    let cluster = EtcdCluster::start(1).await;
    let addr = cluster
        .endpoint(0)
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    for (path, body) in [
        ("/v3/auth/role/add", r#"{"name":"root"}"#),
        (
            "/v3/auth/user/add",
            r#"{"name":"root","password":"rootpw"}"#,
        ),
        ("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#),
        ("/v3/auth/enable", "{}"),
    ] {
        let (code, text) = http_request(addr, "POST", path, &[], body.as_bytes())
            .await
            .unwrap();
        assert_eq!(code, 200, "{path}: {text}");
    }
    let with = |password: &str| {
        let mut options = EtcdOptions::new(cluster.endpoints());
        options.auth = Some(EtcdAuth {
            username: "root".into(),
            password: password.into(),
        });
        options.request_timeout = Duration::from_secs(5);
        options
    };
    let store = EtcdStore::connect(with("rootpw")).await.unwrap();
    let mut w = store.watch(KeyRange::prefix(""), 0).await.unwrap();
    let r = store.put(b"k", b"v").await.unwrap();
    read_through(&mut w, r, Duration::from_secs(10)).await;
    assert_eq!(store.get(b"k").await.unwrap().unwrap().value, b"v");

    let started = Instant::now();
    let err = EtcdStore::connect(with("wrong")).await.unwrap_err();
    assert!(err.to_string().contains("authentication"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let err = EtcdStore::connect(EtcdOptions::new(cluster.endpoints())).await;
    assert!(err.is_err(), "no credentials must not work");
}

/// TLS with a private CA and a client certificate (etcd's
/// `--client-cert-auth`): works with the certificate, fails without it.
#[tokio::test]
async fn tls_with_client_certificate() {
    if !etcd_available("tls_with_client_certificate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::generate(dir.path()).expect("test certificates");
    let cluster = EtcdCluster::start_with(
        1,
        EtcdSettings {
            tls: Some(certs.clone()),
            ..EtcdSettings::default()
        },
    )
    .await;
    assert!(cluster.endpoint(0).starts_with("https://"));
    let with = |client_cert: bool| {
        let mut options = EtcdOptions::new(cluster.endpoints());
        options.tls = Some(EtcdTls {
            ca_file: certs.ca.clone(),
            cert_file: client_cert.then(|| certs.client_cert.clone()),
            key_file: client_cert.then(|| certs.client_key.clone()),
        });
        options.request_timeout = Duration::from_secs(3);
        options
    };
    let store = EtcdStore::connect(with(true)).await.unwrap();
    let mut w = store.watch(KeyRange::prefix(""), 0).await.unwrap();
    let r = store.put(b"k", b"v").await.unwrap();
    read_through(&mut w, r, Duration::from_secs(10)).await;
    assert!(EtcdStore::connect(with(false)).await.is_err());
}

/// `stratad --etcd-endpoints` serves from etcd: writes land under the
/// configured prefix, survive a daemon restart (the state is in etcd, not
/// the data dir), and a cluster that cannot be reached is a one-line
/// startup error.
#[tokio::test]
async fn stratad_runs_on_etcd() {
    if !etcd_available("stratad_runs_on_etcd") {
        return;
    }
    let cluster = EtcdCluster::start(3).await;
    let start = || {
        Daemon::builder()
            .args(["--etcd-endpoints", &cluster.endpoints_arg()])
            .env("STRATA_ETCD_PREFIX", "/strata-e2e/")
            .start()
    };
    let mut daemon = start().await;
    let (code, body) = http_get(daemon.addr, "/v1/status").await.unwrap();
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["store_kind"], "etcd", "{body}");
    let (code, text) = http_request(
        daemon.addr,
        "PUT",
        "/v1/projects/vega/tenants/integration",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(code, 201, "{text}");
    let path = "/v1/projects/vega/tenants/integration/config/mm/server.yaml";
    let (code, text) = http_request(daemon.addr, "PUT", path, &[], b"port: 7000\n")
        .await
        .unwrap();
    assert!(code == 200 || code == 201, "{code} {text}");

    let raw = connect(cluster.endpoints(), "/strata-e2e/").await;
    let keys = raw.range(KeyRange::prefix("")).await.unwrap();
    assert!(
        keys.kvs
            .iter()
            .any(|kv| kv.key.starts_with(b"c/vega/integration/")),
        "the layer is stored in etcd under the prefix"
    );

    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(15)).await.success());
    let daemon = start().await;
    let (code, body) = http_get(daemon.addr, path).await.unwrap();
    assert_eq!((code, body.as_str()), (200, "port: 7000\n"));

    let dead = format!("http://127.0.0.1:{}", free_port());
    let (status, stderr) =
        run_stratad(&["--listen", "127.0.0.1:0", "--etcd-endpoints", &dead], &[]).await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&dead) && stderr.contains("etcd"),
        "{stderr}"
    );
}
