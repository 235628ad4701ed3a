//! Replicated mode end to end: a real 3-member etcd cluster with two
//! `stratad` replicas over it (each its own process, port and data dir).
//!
//! - writes through one replica reach subscribers and readers on the other,
//!   and the replica that acknowledged a write reads it at once;
//! - SIGKILL of the etcd leader under writers: writes resume within seconds
//!   and no acknowledged write is lost;
//! - SIGKILL of a replica under subscribers and hundreds of writes in
//!   flight: subscribers that resume on the other replica from their last
//!   revision get exactly what they missed (checked against etcd's own
//!   history);
//! - SIGKILL of the leader replica: health probes and tenant TTL collection
//!   continue on the other within the leader lease TTL;
//! - an ephemeral instance stays alive while its keep-alives go to another
//!   replica, and expires within its TTL once they stop;
//! - config values on a default etcd: the default size limit fits etcd's
//!   request limit, and a limit raised past it fails writes clearly.
//!
//! Without etcd these tests fail under CI and skip loudly elsewhere.

// Test code: a failed step should fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::panic::AssertUnwindSafe;

use futures::{FutureExt, StreamExt};
use nix::sys::signal::Signal;
use serde_json::Value;
use strata_proto::v1::config_service_client::ConfigServiceClient;
use strata_proto::v1::registry_service_client::RegistryServiceClient;
use strata_proto::v1::tenant_service_client::TenantServiceClient;
use strata_proto::v1::watch_config_response::Kind;
use strata_proto::v1::{
    CreateTenantRequest, GetLayerRequest, GetTenantRequest, PutConfigRequest, ResolveRequest,
    WatchConfigRequest, WatchConfigResponse, WatchServicesRequest, WatchServicesResponse,
};
use strata_server::store::etcd::{EtcdOptions, EtcdStore};
use strata_server::store::{KeyRange, Revision, Store};
use strata_tests::etcd::{EtcdCluster, EtcdSettings, etcd_available};
use strata_tests::{AuthChannel, BearerToken, Daemon, http_get, http_json, http_ok, http_request};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::Streaming;
use tonic::transport::Channel;

/// Every replica of a test stores its keys under this etcd prefix.
const PREFIX: &str = "/replicas/";
const PROJECT: &str = "vega";
const TENANTS: &str = "/v1/projects/vega/tenants";

// ---------------------------------------------------------------- fixture

/// The tests of this file run one at a time: each starts a 3-member etcd
/// cluster and two daemons, and several of them at once on a small machine
/// would turn their timing bounds into a measure of CPU contention.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `start` again (up to 3 times) when it panicked because a port that
/// was free a moment ago was taken by someone else before the process
/// bound it; any other failure goes on as it was.
async fn retry_port_races<T, F, Fut>(what: &str, mut start: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    const ATTEMPTS: usize = 3;
    for attempt in 1..=ATTEMPTS {
        match AssertUnwindSafe(start()).catch_unwind().await {
            Ok(started) => return started,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                let race = message.contains("address already in use")
                    || message.contains("Address already in use");
                if race && attempt < ATTEMPTS {
                    eprintln!("{what}: a port was taken before it was bound; starting again");
                    continue;
                }
                std::panic::resume_unwind(panic);
            }
        }
    }
    unreachable!("the last attempt returns or panics")
}

/// Starts an etcd cluster of `members` (see [`retry_port_races`]).
async fn start_etcd(members: usize, settings: EtcdSettings) -> EtcdCluster {
    retry_port_races("etcd", || {
        EtcdCluster::start_with(members, settings.clone())
    })
    .await
}

/// Starts `n` replicas over `etcd`, concurrently. Replica `i` lists the
/// members starting at member `i`, so the replicas talk to different
/// members first, as replicas on different hosts would.
async fn replicas(etcd: &EtcdCluster, n: usize, env: &[(&str, &str)]) -> Vec<Daemon> {
    let starts = (0..n).map(|i| {
        let mut endpoints = etcd.endpoints();
        let members = endpoints.len();
        endpoints.rotate_left(i % members);
        let endpoints = endpoints.join(",");
        retry_port_races("stratad", move || {
            let mut builder = Daemon::builder()
                .args(["--etcd-endpoints", &endpoints])
                .env("STRATA_ETCD_PREFIX", PREFIX);
            for (k, v) in env {
                builder = builder.env(k, v);
            }
            builder.start()
        })
    });
    futures::future::join_all(starts).await
}

/// The last lines of a daemon's log, for failure messages.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// gRPC clients of one replica.
#[derive(Clone)]
struct Client {
    config: ConfigServiceClient<AuthChannel>,
    tenants: TenantServiceClient<AuthChannel>,
    registry: RegistryServiceClient<AuthChannel>,
}

impl Client {
    async fn new(daemon: &Daemon) -> Self {
        let channel = Channel::from_shared(daemon.endpoint())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", daemon.addr));
        let channel = AuthChannel::new(channel, BearerToken::new(&daemon.admin_token()).unwrap());
        Self {
            config: ConfigServiceClient::new(channel.clone()),
            tenants: TenantServiceClient::new(channel.clone()),
            registry: RegistryServiceClient::new(channel),
        }
    }

    async fn create_tenant(&mut self, name: &str) -> Revision {
        self.tenants
            .create_tenant(CreateTenantRequest {
                project: PROJECT.into(),
                name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("create tenant {name}: {e}"))
            .into_inner()
            .header
            .unwrap()
            .revision
    }

    async fn put(
        &mut self,
        tenant: &str,
        key: &str,
        value: &str,
    ) -> Result<Revision, tonic::Status> {
        Ok(self
            .config
            .put_config(PutConfigRequest {
                project: PROJECT.into(),
                tenant: tenant.into(),
                key: key.into(),
                value: value.as_bytes().to_vec(),
                format: "yaml".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .header
            .unwrap()
            .revision)
    }

    /// Waits (bounded) until this replica's view has the tenant another
    /// replica created: replicas converge through the store's watch, and
    /// only the replica that acknowledged a write is sure to serve it at once.
    async fn wait_for_tenant(&mut self, name: &str, who: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self
                .tenants
                .get_tenant(GetTenantRequest {
                    project: PROJECT.into(),
                    name: name.into(),
                })
                .await;
            match found {
                Ok(_) => return,
                Err(e) if e.code() == tonic::Code::NotFound => {
                    assert!(
                        Instant::now() < deadline,
                        "{who} has not seen tenant {name} after 10 s"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{who}: get tenant {name}: {e}"),
            }
        }
    }

    /// A tenant's own layer of `key`: (value, the revision the read saw).
    async fn layer(&mut self, tenant: &str, key: &str) -> (String, Revision) {
        let r = self
            .config
            .get_layer(GetLayerRequest {
                project: PROJECT.into(),
                tenant: tenant.into(),
                key: key.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("get layer {tenant}/{key}: {e}"))
            .into_inner();
        (
            String::from_utf8(r.layer.unwrap().value).unwrap(),
            r.header.unwrap().revision,
        )
    }

    /// Every resolved key of `tenant`: (key → value, revision of the read).
    async fn resolve_all(&mut self, tenant: &str) -> (BTreeMap<String, String>, Revision) {
        let r = self
            .config
            .resolve(ResolveRequest {
                project: PROJECT.into(),
                tenant: tenant.into(),
                keys: vec![],
                prefixes: vec![String::new()],
            })
            .await
            .unwrap_or_else(|e| panic!("resolve {tenant}: {e}"))
            .into_inner();
        let values = r
            .values
            .into_iter()
            .map(|v| (v.key, String::from_utf8(v.value).unwrap()))
            .collect();
        (values, r.header.unwrap().revision)
    }

    /// Resolves everything of `tenant` once this replica's view has reached
    /// `revision` (another replica's write arrives through the watch).
    async fn resolve_all_at(
        &mut self,
        tenant: &str,
        revision: Revision,
        who: &str,
    ) -> BTreeMap<String, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (values, seen) = self.resolve_all(tenant).await;
            if seen >= revision {
                return values;
            }
            assert!(
                Instant::now() < deadline,
                "{who} did not reach revision {revision} within 10 s (at {seen})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn watch_config(
        &mut self,
        tenant: &str,
        start_revision: Revision,
    ) -> Result<Streaming<WatchConfigResponse>, tonic::Status> {
        Ok(self
            .config
            .watch(WatchConfigRequest {
                project: PROJECT.into(),
                tenant: tenant.into(),
                keys: vec![],
                prefixes: vec![String::new()],
                start_revision,
            })
            .await?
            .into_inner())
    }

    /// A config watch of a tenant created through another replica: retried
    /// (bounded) while this replica has not seen the tenant yet.
    async fn watch_config_converged(&mut self, tenant: &str) -> Streaming<WatchConfigResponse> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.watch_config(tenant, 0).await {
                Ok(stream) => return stream,
                Err(e) if e.code() == tonic::Code::NotFound && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("watch {tenant}: {e}"),
            }
        }
    }

    async fn watch_services(
        &mut self,
        tenant: &str,
        service: &str,
    ) -> Streaming<WatchServicesResponse> {
        self.registry
            .watch_services(WatchServicesRequest {
                project: PROJECT.into(),
                tenant: tenant.into(),
                services: vec![service.into()],
                start_revision: 0,
            })
            .await
            .unwrap_or_else(|e| panic!("watch services of {tenant}: {e}"))
            .into_inner()
    }
}

async fn next_config(
    stream: &mut Streaming<WatchConfigResponse>,
    who: &str,
) -> WatchConfigResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap_or_else(|_| panic!("{who}: no push within 10 s"))
        .unwrap_or_else(|e| panic!("{who}: watch failed: {e}"))
        .unwrap_or_else(|| panic!("{who}: watch ended"))
}

async fn next_services(
    stream: &mut Streaming<WatchServicesResponse>,
    who: &str,
) -> WatchServicesResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap_or_else(|_| panic!("{who}: no push within 10 s"))
        .unwrap_or_else(|e| panic!("{who}: watch failed: {e}"))
        .unwrap_or_else(|| panic!("{who}: watch ended"))
}

/// (key, value) of each change of a push (`None`: the key went away).
fn changes(m: &WatchConfigResponse) -> Vec<(String, Option<String>)> {
    m.changes
        .iter()
        .map(|c| {
            let value = c
                .value
                .as_ref()
                .map(|v| String::from_utf8(v.value.clone()).unwrap());
            (c.key.clone(), value)
        })
        .collect()
}

/// The `strata_leader` gauge of a replica (1: it runs the leader-only jobs).
async fn is_leader(addr: SocketAddr) -> Option<bool> {
    let (status, body) = http_get(addr, "/metrics").await.ok()?;
    if status != 200 {
        return None;
    }
    body.lines()
        .find_map(|l| l.strip_prefix("strata_leader "))
        .map(|v| v.trim() == "1")
}

/// Polls `check` every 50 ms until it holds; panics with `what` after `limit`.
/// Returns how long it took.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A real TCP server for probes: accepts and answers until stopped.
struct Upstream {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Upstream {
    async fn on(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = conn.write_all(b"hello\n").await;
                });
            }
        });
        Self { addr, task }
    }

    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// The health the replica at `addr` reports for an instance.
async fn instance_health(addr: SocketAddr, tenant: &str, service: &str, id: &str) -> String {
    let json = http_ok(
        addr,
        "GET",
        &format!("{TENANTS}/{tenant}/services/{service}/instances"),
        "",
    )
    .await;
    json["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["id"] == id)
        .map(|i| i["health"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_else(|| "absent".into())
}

// ------------------------------------------------------------------ tests

/// A subscriber on replica A sees every write made through replica B (and
/// the other way round), in order; a services watch on A sees a
/// registration made through B; the replica that acknowledged a write
/// serves it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_see_each_others_writes_and_read_their_own() {
    if !etcd_available("replicas_see_each_others_writes_and_read_their_own") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let etcd = start_etcd(3, EtcdSettings::default()).await;
    let daemons = replicas(&etcd, 2, &[]).await;
    let (a, b) = (&daemons[0], &daemons[1]);
    let mut ca = Client::new(a).await;
    let mut cb = Client::new(b).await;

    cb.create_tenant("integration").await;
    let mut watch_a = ca.watch_config_converged("integration").await;
    let mut watch_b = cb.watch_config("integration", 0).await.unwrap();
    for (who, w) in [("A", &mut watch_a), ("B", &mut watch_b)] {
        let snapshot = next_config(w, who).await;
        assert_eq!(snapshot.kind, Kind::Snapshot as i32, "{who}: {snapshot:?}");
        assert!(snapshot.changes.is_empty(), "{who}: {snapshot:?}");
    }
    let mut services_a = ca.watch_services("integration", "game").await;
    let first = next_services(&mut services_a, "A services").await;
    assert!(
        first.services.iter().all(|s| s.instances.is_empty()),
        "nothing registered yet: {first:?}"
    );

    // Writes alternate between the replicas.
    for i in 0..20 {
        let (name, writer) = if i % 2 == 0 {
            ("B", &mut cb)
        } else {
            ("A", &mut ca)
        };
        let value = format!("round: {i}\n");
        let r = writer
            .put("integration", "game/server.yaml", &value)
            .await
            .unwrap_or_else(|e| panic!("write {i} through {name}: {e}"));
        // Read-your-writes on the replica that acknowledged it: no wait.
        let (read, at) = writer.layer("integration", "game/server.yaml").await;
        assert_eq!(read, value, "write {i} not readable at once on {name}");
        assert!(at >= r, "{name} read at {at} after acknowledging {r}");
        let (resolved, at) = writer.resolve_all("integration").await;
        assert!(at >= r);
        assert_eq!(resolved.get("game/server.yaml"), Some(&value));
        // Both subscribers get it once, at its revision.
        for (who, w) in [("A", &mut watch_a), ("B", &mut watch_b)] {
            let m = next_config(w, who).await;
            assert_eq!(
                (m.kind, m.revision, changes(&m)),
                (
                    Kind::Change as i32,
                    r,
                    vec![("game/server.yaml".to_owned(), Some(value.clone()))]
                ),
                "{who}'s push of write {i} (made through {name})"
            );
        }
    }

    // A registration through B reaches A's services watch.
    let registered = http_ok(
        b.addr,
        "POST",
        &format!("{TENANTS}/integration/services/game/instances"),
        r#"{"id":"game-1","endpoints":{"main":"127.0.0.1:7777"},"kind":"persistent"}"#,
    )
    .await;
    let r = registered["revision"].as_i64().unwrap();
    let m = next_services(&mut services_a, "A services").await;
    assert_eq!(m.revision, r, "{m:?}");
    let game = m.services.iter().find(|s| s.service == "game").unwrap();
    assert_eq!(game.tenant, "integration");
    let ids: Vec<&str> = game.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["game-1"], "{m:?}");
    // And B serves it at once.
    let listed = http_ok(
        b.addr,
        "GET",
        &format!("{TENANTS}/integration/services/game/instances"),
        "",
    )
    .await;
    assert_eq!(listed["instances"][0]["id"], "game-1", "{listed}");
}

/// One acknowledged write of a writer.
#[derive(Debug, Clone)]
struct Ack {
    key: String,
    value: String,
    revision: Revision,
    at: Instant,
}

/// SIGKILL of the etcd leader while four writers write through two
/// replicas: every writer's writes resume within seconds, and every
/// acknowledged write is readable afterwards through both replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_etcd_leader_under_writers_loses_no_acknowledged_write() {
    if !etcd_available("killing_the_etcd_leader_under_writers_loses_no_acknowledged_write") {
        return;
    }
    const WRITERS: usize = 4;
    /// Acknowledged writes each writer still makes after the kill.
    const AFTER_KILL: usize = 25;
    /// Longest a writer may go without an acknowledged write.
    const MAX_STALL: Duration = Duration::from_secs(10);
    let _serial = SERIAL.lock().await;
    let mut etcd = start_etcd(3, EtcdSettings::default()).await;
    let daemons = replicas(&etcd, 2, &[]).await;
    let mut clients = [
        Client::new(&daemons[0]).await,
        Client::new(&daemons[1]).await,
    ];
    clients[0].create_tenant("integration").await;
    clients[1].wait_for_tenant("integration", "replica 1").await;

    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let acked_total = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut client = clients[w % 2].clone();
        let killed_at = Arc::clone(&killed_at);
        let acked_total = Arc::clone(&acked_total);
        writers.push(tokio::spawn(async move {
            let mut acks: Vec<Ack> = Vec::new();
            let mut failures = 0usize;
            let deadline = Instant::now() + Duration::from_secs(60);
            for i in 0..5_000 {
                let after_kill = killed_at
                    .lock()
                    .unwrap()
                    .map_or(0, |k| acks.iter().filter(|a| a.at > k).count());
                if after_kill >= AFTER_KILL {
                    break;
                }
                let key = format!("w{w}/k{i:04}");
                let value = format!("v: {w}-{i}");
                // Retried until acknowledged: a retry after an unknown
                // outcome writes the same value again, which is harmless.
                loop {
                    assert!(Instant::now() < deadline, "writer {w} did not finish in 60 s");
                    match client.put("integration", &key, &value).await {
                        Ok(revision) => {
                            acks.push(Ack {
                                key: key.clone(),
                                value: value.clone(),
                                revision,
                                at: Instant::now(),
                            });
                            acked_total.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Err(e) => {
                            assert!(
                                matches!(
                                    e.code(),
                                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                                ),
                                "writer {w}: a write failed for another reason than availability: {e}"
                            );
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
            (acks, failures)
        }));
    }

    eventually(
        Duration::from_secs(30),
        "100 writes before the kill",
        || {
            let n = acked_total.load(Ordering::Relaxed);
            async move { n >= 100 }
        },
    )
    .await;
    let leader = etcd.wait_leader(Duration::from_secs(10)).await;
    etcd.kill(leader);
    let kill_time = Instant::now();
    *killed_at.lock().unwrap() = Some(kill_time);

    let mut all: Vec<Ack> = Vec::new();
    let mut report = Vec::new();
    for (w, task) in writers.into_iter().enumerate() {
        let (acks, failures) = match task.await {
            Ok(done) => done,
            Err(e) => panic!(
                "writer {w}: {e}\nreplica 0 stderr (tail):\n{}\nreplica 1 stderr (tail):\n{}",
                tail(&daemons[0].stderr()),
                tail(&daemons[1].stderr())
            ),
        };
        let longest = acks
            .windows(2)
            .map(|p| p[1].at - p[0].at)
            .max()
            .unwrap_or_default();
        let resumed = acks
            .iter()
            .find(|a| a.at > kill_time)
            .map(|a| a.at - kill_time)
            .expect("a write after the kill");
        report.push(format!(
            "writer {w}: {} acked, {failures} failed attempts, first ack after kill {resumed:?}, longest stall {longest:?}",
            acks.len()
        ));
        assert!(
            longest < MAX_STALL,
            "writer {w} stalled for {longest:?} (limit {MAX_STALL:?})"
        );
        assert!(
            resumed < MAX_STALL,
            "writer {w} resumed only after {resumed:?}"
        );
        all.extend(acks);
    }
    eprintln!("etcd leader m{leader} killed; {}", report.join("; "));
    assert_ne!(etcd.wait_leader(Duration::from_secs(10)).await, leader);

    // Every acknowledged write is there, read through each replica.
    let last = all.iter().map(|a| a.revision).max().unwrap();
    for (i, client) in clients.iter_mut().enumerate() {
        let who = format!("replica {i}");
        let values = client.resolve_all_at("integration", last, &who).await;
        for ack in &all {
            assert_eq!(
                values.get(&ack.key),
                Some(&ack.value),
                "{who}: write of {} acknowledged at revision {} is missing",
                ack.key,
                ack.revision
            );
        }
    }
}

/// A subscriber's record: what it saw, and where it saw it.
#[derive(Debug, Default)]
struct Seen {
    /// (revision, key, value) of every change push, in arrival order.
    changes: Vec<(Revision, String, Option<String>)>,
    /// Revision of the first snapshot.
    snapshot: Revision,
    /// Pushes received from the first replica before it died.
    from_first: usize,
    /// Last revision seen on the first replica, and the survivor's
    /// revision when the subscriber came back: the changes in between
    /// happened while it was away.
    away: (Revision, Revision),
}

impl Seen {
    /// How many changes the subscriber missed while away (and got replayed).
    fn missed(&self) -> usize {
        let (last, back) = self.away;
        self.changes
            .iter()
            .filter(|(r, _, _)| *r > last && *r <= back)
            .count()
    }
}

/// SIGKILL of a replica with subscribers attached while two writers make
/// hundreds of writes: each subscriber resumes on the surviving replica
/// from its last revision and ends up with exactly etcd's sequence of
/// changes — none lost, none twice — including every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribers_resume_on_another_replica_without_loss_or_duplicate() {
    if !etcd_available("subscribers_resume_on_another_replica_without_loss_or_duplicate") {
        return;
    }
    const SUBSCRIBERS: usize = 3;
    const WRITES_PER_WRITER: usize = 400;
    const KEYS: usize = 10;
    let _serial = SERIAL.lock().await;
    let etcd = start_etcd(3, EtcdSettings::default()).await;
    let daemons = replicas(&etcd, 2, &[]).await;
    let survivor_endpoint = daemons[1].endpoint();
    let survivor_token = daemons[1].admin_token();
    let client_a = Client::new(&daemons[0]).await;
    let mut client_b = Client::new(&daemons[1]).await;
    client_b.create_tenant("integration").await;
    client_a
        .clone()
        .wait_for_tenant("integration", "replica A")
        .await;
    // The end marker is the last write; subscribers stop when they see it.
    const END: &str = "zz/end";

    let delivered = Arc::new(AtomicUsize::new(0));
    let mut subscribers = Vec::new();
    for s in 0..SUBSCRIBERS {
        let mut first = client_a.clone();
        let mut survivor = client_b.clone();
        let delivered = Arc::clone(&delivered);
        subscribers.push(tokio::spawn(async move {
            let who = format!("subscriber {s}");
            let mut seen = Seen::default();
            let mut stream = first.watch_config_converged("integration").await;
            let snapshot = next_config(&mut stream, &who).await;
            assert_eq!(snapshot.kind, Kind::Snapshot as i32);
            seen.snapshot = snapshot.revision;
            let mut last = snapshot.revision;
            let mut resumed = false;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                assert!(Instant::now() < deadline, "{who}: no end marker in 60 s");
                let message = tokio::time::timeout(Duration::from_secs(15), stream.message())
                    .await
                    .unwrap_or_else(|_| panic!("{who}: nothing for 15 s (resumed: {resumed})"));
                let m = match message {
                    Ok(Some(m)) => m,
                    Ok(None) | Err(_) if !resumed => {
                        // The replica died: resume on the other one after
                        // the last revision seen, as the SDK does — after
                        // a pause (a client's back-off), so that a few
                        // hundred writes happen while it is away.
                        resumed = true;
                        tokio::time::sleep(Duration::from_millis(600 * (s as u64 + 1))).await;
                        let (_, back) = survivor.resolve_all("integration").await;
                        seen.away = (last, back);
                        stream = survivor
                            .watch_config("integration", last + 1)
                            .await
                            .unwrap_or_else(|e| panic!("{who}: resume failed: {e}"));
                        continue;
                    }
                    other => panic!("{who}: watch on the survivor failed: {other:?}"),
                };
                assert_eq!(
                    m.kind,
                    Kind::Change as i32,
                    "{who}: a resume within the journal replays, never a snapshot: {m:?}"
                );
                assert!(!m.reset, "{who}: {m:?}");
                assert!(
                    m.revision > last,
                    "{who}: revision {} after {last}: duplicate or out of order",
                    m.revision
                );
                last = m.revision;
                if !resumed {
                    seen.from_first += 1;
                }
                delivered.fetch_add(1, Ordering::Relaxed);
                let mut done = false;
                for (key, value) in changes(&m) {
                    done |= key == END;
                    seen.changes.push((m.revision, key, value));
                }
                if done {
                    assert!(resumed, "{who}: never had to resume");
                    return seen;
                }
            }
        }));
    }

    // Writer 0 writes through the survivor all along; writer 1 through the
    // replica that is killed, then through the survivor.
    let mut writers = Vec::new();
    for w in 0..2 {
        let mut client = if w == 0 {
            client_b.clone()
        } else {
            client_a.clone()
        };
        let survivor_endpoint = survivor_endpoint.clone();
        let survivor_token = survivor_token.clone();
        writers.push(tokio::spawn(async move {
            let mut acked: Vec<(Revision, String, String)> = Vec::new();
            let mut switched = false;
            for i in 0..WRITES_PER_WRITER {
                let key = format!("k{}", i % KEYS);
                let value = format!("v: {w}-{i}");
                match client.put("integration", &key, &value).await {
                    Ok(r) => acked.push((r, key, value)),
                    // Its outcome is unknown (the replica died under it):
                    // not counted, not retried; etcd's history says.
                    Err(e)
                        if w == 1
                            && !switched
                            && matches!(
                                e.code(),
                                tonic::Code::Unavailable
                                    | tonic::Code::Unknown
                                    | tonic::Code::Cancelled
                            ) =>
                    {
                        eprintln!("writer 1 switches replica after: {e}");
                        switched = true;
                        let channel = Channel::from_shared(survivor_endpoint.clone())
                            .unwrap()
                            .connect()
                            .await
                            .unwrap();
                        client.config = ConfigServiceClient::new(AuthChannel::new(
                            channel,
                            BearerToken::new(&survivor_token).unwrap(),
                        ));
                    }
                    Err(e) => panic!("writer {w}: write {i} failed: {e}"),
                }
            }
            acked
        }));
    }

    eventually(
        Duration::from_secs(30),
        "subscribers receive 150 pushes from the first replica",
        || {
            let n = delivered.load(Ordering::Relaxed);
            async move { n >= 150 }
        },
    )
    .await;
    daemons[0].signal(Signal::SIGKILL);
    let killed = Instant::now();
    let mut acked = Vec::new();
    for task in writers {
        acked.extend(task.await.unwrap());
    }
    let in_flight_after_kill = acked.len();
    let end = client_b.put("integration", END, "end: true").await.unwrap();
    eprintln!(
        "replica killed with {} pushes delivered; writers done {:?} later",
        delivered.load(Ordering::Relaxed),
        killed.elapsed()
    );
    let mut seen_by = Vec::new();
    for task in subscribers {
        seen_by.push(task.await.unwrap());
    }

    // etcd's own history of the tenant's layers is the truth to compare with.
    let raw = EtcdStore::connect(EtcdOptions::new(etcd.endpoints()).with_prefix(PREFIX))
        .await
        .unwrap();
    let layers = format!("c/{PROJECT}/integration/");
    let from = seen_by.iter().map(|s| s.snapshot).min().unwrap() + 1;
    let mut history = raw
        .watch(KeyRange::prefix(layers.as_bytes().to_vec()), from)
        .await
        .unwrap();
    let mut truth: Vec<(Revision, String)> = Vec::new();
    while truth.last().is_none_or(|(r, _)| *r < end) {
        let batch = tokio::time::timeout(Duration::from_secs(10), history.next())
            .await
            .expect("etcd history in time")
            .expect("etcd watch open")
            .expect("etcd history readable");
        for event in batch.events.iter() {
            let key = String::from_utf8(event.kv.key[layers.len()..].to_vec()).unwrap();
            truth.push((batch.revision, key));
        }
    }
    assert!(
        truth.len() >= in_flight_after_kill,
        "etcd holds {} layer writes, {} were acknowledged",
        truth.len(),
        in_flight_after_kill
    );

    // Writes committed together (the etcd store's group commit) share a
    // revision; their order inside it is nobody's promise.
    truth.sort();
    let acked_at: BTreeMap<(Revision, String), String> =
        acked.into_iter().map(|(r, k, v)| ((r, k), v)).collect();
    for (s, seen) in seen_by.iter().enumerate() {
        let expected: Vec<&(Revision, String)> =
            truth.iter().filter(|(r, _)| *r > seen.snapshot).collect();
        let mut got: Vec<(Revision, String)> = seen
            .changes
            .iter()
            .map(|(r, k, _)| (*r, k.clone()))
            .collect();
        got.sort();
        assert_eq!(
            got.len(),
            expected.len(),
            "subscriber {s}: {} changes seen, etcd has {} (first replica delivered {})",
            got.len(),
            expected.len(),
            seen.from_first
        );
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(&g, e, "subscriber {s}: sequence differs from etcd's");
        }
        let values: BTreeMap<(Revision, String), &Option<String>> = seen
            .changes
            .iter()
            .map(|(r, k, v)| ((*r, k.clone()), v))
            .collect();
        for ((r, key), value) in acked_at.range((seen.snapshot + 1, String::new())..) {
            assert_eq!(
                values.get(&(*r, key.clone())).copied(),
                Some(&Some(value.clone())),
                "subscriber {s}: acknowledged write of {key} at {r}"
            );
        }
        assert!(
            seen.from_first > 0 && seen.from_first < got.len(),
            "subscriber {s}: {} of {} pushes came before the kill",
            seen.from_first,
            got.len()
        );
    }
    let missed: Vec<usize> = seen_by.iter().map(Seen::missed).collect();
    eprintln!(
        "{} writes checked against etcd; pushes before the kill per subscriber: {:?}; \
         changes missed while away and replayed on resume: {missed:?}",
        truth.len(),
        seen_by.iter().map(|s| s.from_first).collect::<Vec<_>>()
    );
    assert!(
        missed.iter().sum::<usize>() >= 200,
        "the subscribers should have missed hundreds of changes while away: {missed:?}"
    );
}

/// SIGKILL of the replica running the leader-only jobs: the other takes
/// over within the leader lease TTL — it probes (a probed server stopped
/// after the kill turns unhealthy, and healthy again when it returns) and
/// collects expired tenants.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_only_jobs_move_to_the_surviving_replica() {
    if !etcd_available("leader_only_jobs_move_to_the_surviving_replica") {
        return;
    }
    // Lease TTL + one probe failure threshold (2 × 200 ms) or one GC tick,
    // with slack for a loaded machine.
    const TAKEOVER: Duration =
        Duration::from_secs(strata_server::daemon::leader::DEFAULT_TERM_TTL_SECONDS as u64 + 5);
    let _serial = SERIAL.lock().await;
    let etcd = start_etcd(3, EtcdSettings::default()).await;
    let daemons = replicas(&etcd, 2, &[]).await;
    // Exactly one replica leads.
    let addrs = [daemons[0].addr, daemons[1].addr];
    let deadline = Instant::now() + Duration::from_secs(10);
    let leader = loop {
        match [is_leader(addrs[0]).await, is_leader(addrs[1]).await] {
            [Some(true), Some(false)] => break 0,
            [Some(false), Some(true)] => break 1,
            flags => assert!(
                Instant::now() < deadline,
                "not exactly one leader within 10 s: strata_leader gauges {flags:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let follower = 1 - leader;
    let f = daemons[follower].addr;
    http_ok(f, "PUT", &format!("{TENANTS}/integration"), "").await;
    let upstream = Upstream::on("127.0.0.1:0".parse().unwrap()).await;
    let up_addr = upstream.addr;
    http_ok(
        f,
        "POST",
        &format!("{TENANTS}/integration/services/mm/instances"),
        &format!(
            r#"{{"id":"mm-1","endpoints":{{"main":"{up_addr}"}},"kind":"persistent",
                "check":{{"tcp":true,"interval_ms":200,"failure_threshold":2}}}}"#
        ),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "mm-1 healthy (probed by the leader)",
        || instance_health(f, "integration", "mm", "mm-1").then_eq("healthy"),
    )
    .await;

    daemons[leader].signal(Signal::SIGKILL);
    let killed = Instant::now();
    upstream.stop().await;
    http_ok(
        f,
        "PUT",
        &format!("{TENANTS}/short-lived"),
        r#"{"ttl_seconds":1}"#,
    )
    .await;

    let takeover = eventually(TAKEOVER, "the survivor leads", || async move {
        is_leader(f).await == Some(true)
    })
    .await;
    let unhealthy = eventually(TAKEOVER, "mm-1 unhealthy after its server stopped", || {
        instance_health(f, "integration", "mm", "mm-1").then_eq("unhealthy")
    })
    .await;
    let collected = eventually(TAKEOVER, "short-lived collected", || async move {
        let (status, _) = http_json(f, "GET", &format!("{TENANTS}/short-lived"), "").await;
        status == 404
    })
    .await;
    // The probes go on: the server's return is noticed.
    let upstream = Upstream::on(up_addr).await;
    eventually(Duration::from_secs(5), "mm-1 healthy again", || {
        instance_health(f, "integration", "mm", "mm-1").then_eq("healthy")
    })
    .await;
    upstream.stop().await;
    eprintln!(
        "after the kill: leader in {:?}, probe verdict in {:?}, tenant collected in {:?} (since kill: {:?})",
        takeover,
        unhealthy,
        collected,
        killed.elapsed()
    );
}

/// Future helper: compares a string result with an expected value.
trait ThenEq {
    fn then_eq(self, expected: &'static str) -> impl std::future::Future<Output = bool>;
}

impl<F: std::future::Future<Output = String>> ThenEq for F {
    async fn then_eq(self, expected: &'static str) -> bool {
        self.await == expected
    }
}

/// An ephemeral instance registered through replica 1 stays alive while
/// its owner's keep-alives go to replica 2 (for more than twice its TTL,
/// with replica 1 dead), and expires within its TTL once they stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ephemeral_lease_lives_on_through_another_replica() {
    if !etcd_available("an_ephemeral_lease_lives_on_through_another_replica") {
        return;
    }
    const TTL: Duration = Duration::from_secs(2);
    let _serial = SERIAL.lock().await;
    let etcd = start_etcd(3, EtcdSettings::default()).await;
    let daemons = replicas(&etcd, 2, &[]).await;
    let (one, two) = (daemons[0].addr, daemons[1].addr);
    http_ok(one, "PUT", &format!("{TENANTS}/integration"), "").await;
    let done = http_ok(
        one,
        "POST",
        &format!("{TENANTS}/integration/services/game/instances"),
        r#"{"id":"game-1","endpoints":{"main":"127.0.0.1:7777"},"ttl_seconds":2}"#,
    )
    .await;
    let lease = done["lease_id"]
        .as_i64()
        .expect("an ephemeral registration has a lease");
    let present = |addr: SocketAddr| async move {
        let (status, json) = http_json(
            addr,
            "GET",
            &format!("{TENANTS}/integration/services/game/instances"),
            "",
        )
        .await;
        status == 200
            && json["instances"]
                .as_array()
                .is_some_and(|a| a.iter().any(|i| i["id"] == "game-1"))
    };
    eventually(Duration::from_secs(5), "replica 2 sees game-1", || {
        present(two)
    })
    .await;

    // The owner's replica dies; its keep-alives fail over to replica 2.
    daemons[0].signal(Signal::SIGKILL);
    let heartbeat = format!("/v1/leases/{lease}/heartbeat");
    let kept_from = Instant::now();
    let keep_until = kept_from + TTL * 2 + Duration::from_millis(1_500);
    let mut beats = 0;
    let mut last_beat = kept_from;
    while Instant::now() < keep_until {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (status, json) = http_json(two, "POST", &heartbeat, "").await;
        last_beat = Instant::now();
        assert_eq!(status, 200, "heartbeat through replica 2: {json}");
        assert!(json["ttl_seconds"].as_i64().unwrap() >= 2, "{json}");
        beats += 1;
        assert!(
            present(two).await,
            "game-1 vanished while kept alive ({beats} beats, {:?} after replica 1 died)",
            kept_from.elapsed()
        );
    }

    // Keep-alives stop: gone one TTL after the last (+ etcd's expiry tick
    // and the watch to the replica), not sooner.
    eventually(
        TTL + Duration::from_secs(3),
        "game-1 expires",
        || async move { !present(two).await },
    )
    .await;
    let gone = last_beat.elapsed();
    assert!(
        gone >= TTL - Duration::from_millis(200),
        "expired {gone:?} after the last keep-alive: sooner than its TTL of {TTL:?}"
    );
    let (status, json) = http_json(two, "POST", &heartbeat, "").await;
    assert_eq!(status, 404, "a heartbeat after expiry: {json}");
    eprintln!(
        "{beats} keep-alives through replica 2 over {:?}; expired {gone:?} after the last",
        keep_until - kept_from
    );
}

/// On an etcd with its default request limit (1.5 MiB), the default value
/// size limit is lowered so that a write — which carries its value twice,
/// layer and history — always fits, and stratad says so at startup; a limit
/// raised past what etcd accepts fails such writes with a clear error that
/// names etcd's `--max-request-bytes`, and writes nothing. With etcd's
/// limit raised, 1 MiB values work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_values_fit_etcds_request_limit() {
    if !etcd_available("config_values_fit_etcds_request_limit") {
        return;
    }
    let lowered = strata_server::store::etcd::DEFAULT_MAX_VALUE_BYTES;
    let put = |addr: SocketAddr, key: &str, size: usize| {
        let path = format!("{TENANTS}/integration/config/{key}?format=binary");
        async move {
            let body = vec![b'x'; size];
            let (status, text) = http_request(addr, "PUT", &path, &[], &body).await.unwrap();
            (status, text)
        }
    };
    let _serial = SERIAL.lock().await;
    let etcd = start_etcd(1, EtcdSettings::default()).await;
    let default = &replicas(&etcd, 1, &[]).await[0];
    http_ok(default.addr, "PUT", &format!("{TENANTS}/integration"), "").await;
    let log = default.stderr();
    assert!(
        log.contains("max_value_bytes") && log.contains(&lowered.to_string()),
        "the startup log names the lowered limit: {log}"
    );
    let (status, text) = put(default.addr, "big.bin", lowered).await;
    assert_eq!(status, 200, "a value at the limit: {text}");
    let (status, body) = http_get(
        default.addr,
        &format!("{TENANTS}/integration/config/big.bin"),
    )
    .await
    .unwrap();
    assert_eq!((status, body.len()), (200, lowered));
    let (status, text) = put(default.addr, "over.bin", lowered + 1).await;
    assert_eq!(status, 413, "{text}");
    assert!(
        text.contains(&format!("limit is {lowered} bytes")),
        "{text}"
    );

    // Raised past what a default etcd accepts: a clear error, nothing written.
    let raised = &replicas(&etcd, 1, &[("STRATA_LIMITS_MAX_VALUE_BYTES", "1048576")]).await[0];
    let log = raised.stderr();
    assert!(
        log.contains("--max-request-bytes"),
        "the startup log warns that etcd must accept larger requests: {log}"
    );
    let (status, text) = put(raised.addr, "huge.bin", 1024 * 1024).await;
    let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(status, 400, "{json}");
    let message = json.to_string();
    assert!(
        message.contains("--max-request-bytes") && message.contains("max_value_bytes"),
        "the error says what to change: {message}"
    );
    eprintln!("1 MiB value on a default etcd: {status} {message}");
    let (status, _) = http_get(
        raised.addr,
        &format!("{TENANTS}/integration/config/huge.bin"),
    )
    .await
    .unwrap();
    assert_eq!(status, 404, "nothing was written");

    // etcd allowed 3 MiB requests: 1 MiB values fit.
    let big_etcd = start_etcd(
        1,
        EtcdSettings {
            extra_args: vec!["--max-request-bytes".into(), "3145728".into()],
            ..EtcdSettings::default()
        },
    )
    .await;
    let roomy = &replicas(
        &big_etcd,
        1,
        &[("STRATA_LIMITS_MAX_VALUE_BYTES", "1048576")],
    )
    .await[0];
    http_ok(roomy.addr, "PUT", &format!("{TENANTS}/integration"), "").await;
    let (status, text) = put(roomy.addr, "huge.bin", 1024 * 1024).await;
    assert_eq!(status, 200, "{text}");
    let (status, body) = http_get(
        roomy.addr,
        &format!("{TENANTS}/integration/config/huge.bin"),
    )
    .await
    .unwrap();
    assert_eq!((status, body.len()), (200, 1024 * 1024));
}
