//! The client SDK (`strata-client`) against real `stratad` processes: typed
//! hot reload, bad values, the disk cache with every daemon down, failover
//! across restarts with no lost or duplicated update, the registration
//! guard across a restart and on drop, and discovery with fallback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::Deserialize;
use strata_client::proto::{
    CreateTenantRequest, DeleteLayerRequest, Instance, InstanceKind, ListInstancesRequest,
    Protocol, PutConfigRequest, RegisterRequest,
};
use strata_client::{
    Client, ClientBuilder, Connection, Error, InstanceSpec, PowerOfTwoChoices, RoundRobin, Source,
    WatchError,
};
use strata_tests::{Daemon, free_port};
use tokio::time::{Instant, sleep, timeout};

const PROJECT: &str = "vega";

#[derive(Debug, Clone, PartialEq, Deserialize)]
struct Settings {
    max_players: u32,
    tick_rate: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
struct Seq {
    seq: u64,
}

fn dead_endpoint() -> String {
    format!("127.0.0.1:{}", free_port())
}

fn client(endpoints: &[String], tenant: &str, cache: Option<&Path>) -> Client {
    builder(endpoints, tenant, cache).build().unwrap()
}

/// The builder behind [`client`], for tests that change one setting.
fn builder(endpoints: &[String], tenant: &str, cache: Option<&Path>) -> ClientBuilder {
    let mut builder = Client::builder()
        .endpoints(endpoints.iter().cloned())
        .project(PROJECT)
        .tenant(tenant)
        .connect_timeout(Duration::from_millis(500))
        .request_timeout(Duration::from_secs(2))
        .startup_timeout(Duration::from_secs(1))
        .backoff(Duration::from_millis(50), Duration::from_millis(500));
    if let Some(dir) = cache {
        builder = builder.cache_dir(dir);
    }
    if let Some(token) = token_of(endpoints) {
        builder = builder.token(token);
    }
    builder
}

/// The admin token of the first of `endpoints` this process started a
/// daemon on (replicas of one store share it).
fn token_of(endpoints: &[String]) -> Option<String> {
    endpoints.iter().find_map(|e| {
        e.trim_start_matches("http://")
            .parse::<SocketAddr>()
            .ok()
            .and_then(strata_tests::token_for)
    })
}

/// Admin-side calls (what a CD step or operator would do), retried while a
/// daemon restarts.
struct Admin {
    endpoint: String,
}

impl Admin {
    fn new(addr: SocketAddr) -> Self {
        Self {
            endpoint: format!("http://{addr}"),
        }
    }

    async fn connection(&self) -> Connection {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match Connection::connect(&[&self.endpoint], Duration::from_secs(1)).await {
                Ok(c) => {
                    return match token_of(std::slice::from_ref(&self.endpoint)) {
                        Some(token) => c.with_token(&token).unwrap(),
                        None => c,
                    };
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "daemon unreachable: {e}");
                    sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn tenant(&self, name: &str, parent: &str) {
        self.connection()
            .await
            .tenants()
            .create_tenant(CreateTenantRequest {
                project: PROJECT.into(),
                name: name.into(),
                parent: parent.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// Writes a layer; retries until a daemon acknowledges it. Returns the
    /// revision.
    async fn put(&self, tenant: &str, key: &str, format: &str, value: &str) -> i64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let outcome = self
                .connection()
                .await
                .config()
                .put_config(PutConfigRequest {
                    project: PROJECT.into(),
                    tenant: tenant.into(),
                    key: key.into(),
                    value: value.as_bytes().to_vec(),
                    format: format.into(),
                    mode: "replace".into(),
                    expected_revision: 0,
                })
                .await;
            match outcome {
                Ok(r) => return r.into_inner().header.unwrap().revision,
                Err(e) => {
                    assert!(Instant::now() < deadline, "put {key}: {e}");
                    sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn delete_layer(&self, tenant: &str, key: &str) -> i64 {
        self.connection()
            .await
            .config()
            .delete_layer(DeleteLayerRequest {
                project: PROJECT.into(),
                tenant: tenant.into(),
                key: key.into(),
                expected_revision: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .header
            .unwrap()
            .revision
    }

    /// Registers a persistent instance (it outlives daemon restarts, as an
    /// operator-registered database or matchmaker would); retries until a
    /// daemon acknowledges it.
    async fn register_persistent(&self, tenant: &str, service: &str, id: &str, address: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let outcome = self
                .connection()
                .await
                .registry()
                .register(RegisterRequest {
                    project: PROJECT.into(),
                    tenant: tenant.into(),
                    service: service.into(),
                    instance: Some(Instance {
                        id: id.into(),
                        endpoints: [(
                            "main".to_string(),
                            strata_client::proto::Endpoint {
                                address: address.into(),
                                protocol: Protocol::Grpc as i32,
                            },
                        )]
                        .into(),
                        weight: 300,
                        kind: InstanceKind::Persistent as i32,
                        ..Default::default()
                    }),
                    lease_id: 0,
                })
                .await;
            match outcome {
                Ok(_) => return,
                Err(e) => {
                    assert!(Instant::now() < deadline, "register {id}: {e}");
                    sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn instance_ids(&self, tenant: &str, service: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .connection()
            .await
            .registry()
            .list_instances(ListInstancesRequest {
                project: PROJECT.into(),
                tenant: tenant.into(),
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .instances
            .into_iter()
            .map(|i| i.id)
            .collect();
        ids.sort();
        ids
    }
}

/// Polls `check` every 20 ms until it holds; fails after `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        sleep(Duration::from_millis(20)).await;
    }
}

/// A daemon on a fixed address and data directory, so it can be killed and
/// started again where its clients expect it.
struct Restartable {
    addr: SocketAddr,
    data: tempfile::TempDir,
    daemon: Option<Daemon>,
}

impl Restartable {
    async fn start() -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let data = tempfile::tempdir().unwrap();
        let mut this = Self {
            addr,
            data,
            daemon: None,
        };
        this.up().await;
        this
    }

    fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    async fn up(&mut self) {
        assert!(self.daemon.is_none());
        self.daemon = Some(
            Daemon::builder()
                .addr(self.addr)
                .data_dir(&self.data.path().join("data"))
                .start()
                .await,
        );
    }

    async fn down(&mut self, signal: Signal) {
        let mut daemon = self.daemon.take().expect("running");
        daemon.signal(signal);
        daemon.wait_exit(Duration::from_secs(15)).await;
    }
}

#[tokio::test]
async fn typed_config_hot_reloads_within_one_push_and_a_bad_value_keeps_the_last_good_one() {
    let daemon = Daemon::start().await;
    let admin = Admin::new(daemon.addr);
    admin.tenant("integration", "").await;
    admin.tenant("feat-1", "integration").await;
    admin
        .put(
            "integration",
            "game/settings.json",
            "json",
            r#"{"max_players":16,"tick_rate":30}"#,
        )
        .await;

    let client = client(&[daemon.addr.to_string()], "feat-1", None);
    let settings = client
        .watch::<Settings>("game/settings.json")
        .await
        .unwrap();
    assert_eq!(settings.get().max_players, 16);
    assert_eq!(settings.load().tick_rate, 30);
    assert_eq!(settings.source(), Source::Daemon);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    settings.on_change(move |old: &Settings, new: &Settings| {
        sink.lock()
            .unwrap()
            .push((old.max_players, new.max_players));
    });
    let mut changes = settings.changes();
    let mut errors = settings.errors();

    // The feature tenant overrides the key, in another format: the handle
    // decodes by the new value's format, on the first push.
    let revision = admin
        .put(
            "feat-1",
            "game/settings.json",
            "yaml",
            "max_players: 24\ntick_rate: 60\n",
        )
        .await;
    timeout(Duration::from_secs(5), changes.changed())
        .await
        .expect("one push brings the new value")
        .unwrap();
    assert_eq!(
        **changes.borrow_and_update(),
        Settings {
            max_players: 24,
            tick_rate: 60
        }
    );
    assert_eq!(settings.get().max_players, 24);
    assert_eq!(settings.revision(), revision);
    assert_eq!(*seen.lock().unwrap(), [(16, 24)]);

    // A value that does not decode: reported with its revision, the last
    // good value stays, no callback.
    let bad = admin
        .put(
            "feat-1",
            "game/settings.json",
            "json",
            r#"{"max_players":"lots"}"#,
        )
        .await;
    let error = timeout(Duration::from_secs(5), errors.recv())
        .await
        .expect("the bad value is reported")
        .unwrap();
    match error {
        WatchError::Decode {
            key,
            revision,
            format,
            ..
        } => {
            assert_eq!(key, "game/settings.json");
            assert_eq!(revision, bad);
            assert_eq!(format, "json");
        }
        other => panic!("expected a decode error, got {other}"),
    }
    assert_eq!(settings.get().max_players, 24);
    assert_eq!(settings.revision(), revision);
    assert!(!changes.has_changed().unwrap());

    // The next good value goes through (here: removing the override, so the
    // integration value resolves again).
    admin.delete_layer("feat-1", "game/settings.json").await;
    timeout(Duration::from_secs(5), changes.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(settings.get().max_players, 16);
    assert_eq!(*seen.lock().unwrap(), [(16, 24), (24, 16)]);

    // Removing the key everywhere keeps the last value and says so.
    admin
        .delete_layer("integration", "game/settings.json")
        .await;
    let error = timeout(Duration::from_secs(5), errors.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(error, WatchError::Removed { .. }), "{error}");
    assert_eq!(settings.get().max_players, 16);

    // Watching a key that does not exist is an error, not a default.
    match client.watch::<Settings>("game/absent.json").await {
        Err(Error::MissingKey { key, tenant }) => {
            assert_eq!(
                (key.as_str(), tenant.as_str()),
                ("game/absent.json", "feat-1")
            );
        }
        other => panic!("expected MissingKey, got {other:?}"),
    }
}

#[tokio::test]
async fn a_prefix_watch_is_a_map_that_follows_keys_coming_and_going() {
    #[derive(Debug, Deserialize)]
    struct MapInfo {
        slots: u32,
    }
    let daemon = Daemon::start().await;
    let admin = Admin::new(daemon.addr);
    admin.tenant("integration", "").await;
    admin
        .put("integration", "maps/dust.toml", "toml", "slots = 10\n")
        .await;
    admin.put("integration", "other/x.json", "json", "{}").await;
    let client = client(&[daemon.addr.to_string()], "integration", None);
    let maps = client.watch_prefix::<MapInfo>("maps/").await.unwrap();
    assert_eq!(maps.snapshot().len(), 1);
    assert_eq!(maps.get("maps/dust.toml").unwrap().slots, 10);
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    maps.on_change(move |key, old: Option<&MapInfo>, new: Option<&MapInfo>| {
        sink.lock()
            .unwrap()
            .push((key.to_owned(), old.map(|m| m.slots), new.map(|m| m.slots)));
    });
    let mut changes = maps.changes();

    admin
        .put("integration", "maps/nuke.yaml", "yaml", "slots: 12\n")
        .await;
    timeout(Duration::from_secs(5), changes.changed())
        .await
        .unwrap()
        .unwrap();
    admin.delete_layer("integration", "maps/dust.toml").await;
    timeout(Duration::from_secs(5), changes.changed())
        .await
        .unwrap()
        .unwrap();
    let snapshot = maps.snapshot();
    assert_eq!(snapshot.keys().collect::<Vec<_>>(), ["maps/nuke.yaml"]);
    assert_eq!(
        *events.lock().unwrap(),
        [
            ("maps/nuke.yaml".to_owned(), None, Some(12)),
            ("maps/dust.toml".to_owned(), Some(10), None),
        ]
    );
}

#[tokio::test]
async fn with_every_daemon_down_a_watch_starts_from_the_disk_cache_then_catches_up() {
    let mut daemon = Restartable::start().await;
    let admin = Admin::new(daemon.addr);
    admin.tenant("integration", "").await;
    admin
        .put(
            "integration",
            "game/settings.json",
            "json",
            r#"{"max_players":16,"tick_rate":30}"#,
        )
        .await;
    let cache = tempfile::tempdir().unwrap();
    let endpoints = [daemon.endpoint(), dead_endpoint()];

    // A first run watches the key, which writes it to the cache.
    {
        let first = client(&endpoints, "integration", Some(cache.path()));
        let path = first.cache_path().unwrap().to_owned();
        let settings = first.watch::<Settings>("game/settings.json").await.unwrap();
        assert_eq!(settings.get().max_players, 16);
        eventually("the cache file is written", Duration::from_secs(5), || {
            let path = path.clone();
            async move {
                std::fs::read_to_string(&path).is_ok_and(|text| text.contains("max_players"))
            }
        })
        .await;
    }
    // No daemon is left.
    daemon.down(Signal::SIGKILL).await;

    // A game server starting now starts from the cache, and says so.
    let second = client(&endpoints, "integration", Some(cache.path()));
    let started = Instant::now();
    let settings = second
        .watch::<Settings>("game/settings.json")
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(settings.source(), Source::DiskCache);
    assert_eq!(settings.get().max_players, 16);
    let mut changes = settings.changes();
    // Without a cache the same start fails as unreachable.
    let no_cache = client(&endpoints, "integration", None);
    match no_cache.watch::<Settings>("game/settings.json").await {
        Err(Error::Unreachable {
            endpoints: tried, ..
        }) => assert_eq!(tried.len(), 2),
        other => panic!("expected Unreachable, got {other:?}"),
    }

    // A daemon returns and the value moves on: the watch catches up.
    daemon.up().await;
    admin
        .put(
            "integration",
            "game/settings.json",
            "json",
            r#"{"max_players":32,"tick_rate":30}"#,
        )
        .await;
    timeout(Duration::from_secs(10), async {
        loop {
            changes.changed().await.unwrap();
            if changes.borrow_and_update().max_players == 32 {
                break;
            }
        }
    })
    .await
    .expect("caught up after the daemon returned");
    assert_eq!(settings.source(), Source::Daemon);
    assert!(settings.revision() > 0);
}

#[tokio::test]
async fn with_every_daemon_down_a_service_watch_starts_from_the_disk_cache_then_catches_up() {
    let mut daemon = Restartable::start().await;
    let admin = Admin::new(daemon.addr);
    admin.tenant("integration", "").await;
    admin
        .register_persistent("integration", "matchmaker", "mm-1", "10.0.0.1:7000")
        .await;
    let cache = tempfile::tempdir().unwrap();
    let endpoints = [daemon.endpoint(), dead_endpoint()];

    // A first run watches the service, which writes its set to the cache.
    {
        let first = client(&endpoints, "integration", Some(cache.path()));
        let path = first.cache_path().unwrap().to_owned();
        let matchmaker = first.watch_service("matchmaker").await.unwrap();
        assert_eq!(matchmaker.source(), Source::Daemon);
        assert_eq!(matchmaker.get().instances.len(), 1);
        eventually("the cache file is written", Duration::from_secs(5), || {
            let path = path.clone();
            async move { std::fs::read_to_string(&path).is_ok_and(|text| text.contains("mm-1")) }
        })
        .await;
    }
    // No daemon is left.
    daemon.down(Signal::SIGKILL).await;

    // A game server starting now gets the cached set, and says where from.
    let second = client(&endpoints, "integration", Some(cache.path()));
    let started = Instant::now();
    let matchmaker = second.watch_service("matchmaker").await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(matchmaker.source(), Source::DiskCache);
    let cached = matchmaker.get();
    assert_eq!(cached.tenant.as_deref(), Some("integration"));
    assert!(!cached.fallback);
    assert_eq!(cached.instances.len(), 1);
    let instance = &cached.instances[0];
    assert_eq!(instance.id, "mm-1");
    assert_eq!(instance.address(), Some("10.0.0.1:7000"));
    assert_eq!(
        instance.endpoint("main").unwrap().protocol,
        Protocol::Grpc,
        "the protocol survives the cache"
    );
    assert_eq!(instance.weight, 300);
    let mut changes = matchmaker.changes();
    // Only what was watched is cached: another service, or a client
    // without a cache, fails as unreachable.
    match second.watch_service("lobby").await {
        Err(Error::Unreachable { .. }) => {}
        other => panic!("expected Unreachable for an uncached service, got {other:?}"),
    }
    let no_cache = client(&endpoints, "integration", None);
    match no_cache.watch_service("matchmaker").await {
        Err(Error::Unreachable {
            endpoints: tried, ..
        }) => assert_eq!(tried.len(), 2),
        other => panic!("expected Unreachable, got {other:?}"),
    }

    // A daemon returns and a second instance joins: the watch catches up.
    daemon.up().await;
    admin
        .register_persistent("integration", "matchmaker", "mm-2", "10.0.0.2:7000")
        .await;
    timeout(Duration::from_secs(10), async {
        loop {
            changes.changed().await.unwrap();
            if changes.borrow_and_update().instances.len() == 2 {
                break;
            }
        }
    })
    .await
    .expect("caught up after the daemon returned");
    assert_eq!(matchmaker.source(), Source::Daemon);
    let current = matchmaker.get();
    let ids: Vec<&str> = current.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["mm-1", "mm-2"]);
    assert!(current.revision > cached.revision);
}

/// A restartable daemon with `integration` holding `counter.json` at
/// `seq = 0`, and its admin.
async fn counter_daemon() -> (Restartable, Admin) {
    let daemon = Restartable::start().await;
    let admin = Admin::new(daemon.addr);
    admin.tenant("integration", "").await;
    admin
        .put("integration", "counter.json", "json", r#"{"seq":0}"#)
        .await;
    (daemon, admin)
}

/// Puts `seq = i` for i in `range`, waiting after each until the handle
/// holds it.
async fn put_and_see(
    admin: &Admin,
    handle: &strata_client::Config<Seq>,
    range: std::ops::RangeInclusive<u64>,
) {
    for i in range {
        admin
            .put(
                "integration",
                "counter.json",
                "json",
                &format!(r#"{{"seq":{i}}}"#),
            )
            .await;
        eventually(
            &format!("seq {i} arrives"),
            Duration::from_secs(15),
            || async { handle.get().seq == i },
        )
        .await;
    }
}

#[tokio::test]
async fn watches_fail_over_across_daemon_restarts_with_no_lost_or_duplicated_update() {
    let (mut daemon, admin) = counter_daemon().await;

    // The first endpoint is dead: the client rotates past it.
    let client = client(&[dead_endpoint(), daemon.endpoint()], "integration", None);
    let counter = client.watch::<Seq>("counter.json").await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    counter.on_change(move |_, new: &Seq| sink.lock().unwrap().push(new.seq));
    let mut errors = counter.errors();

    put_and_see(&admin, &counter, 1..=10).await;
    daemon.down(Signal::SIGKILL).await;
    daemon.up().await;
    put_and_see(&admin, &counter, 11..=20).await;
    // A graceful stop ends streams with UNAVAILABLE; same outcome.
    daemon.down(Signal::SIGTERM).await;
    daemon.up().await;
    put_and_see(&admin, &counter, 21..=30).await;

    // A burst while the stream is up: every revision arrives, in order.
    for i in 31..=60 {
        admin
            .put(
                "integration",
                "counter.json",
                "json",
                &format!(r#"{{"seq":{i}}}"#),
            )
            .await;
    }
    eventually("seq 60 arrives", Duration::from_secs(15), || async {
        counter.get().seq == 60
    })
    .await;
    sleep(Duration::from_millis(200)).await;

    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        (1..=60).collect::<Vec<_>>(),
        "every update exactly once, in order"
    );
    // The disconnects were reported on the error stream.
    let mut disconnects = 0;
    while let Ok(e) = errors.try_recv() {
        if matches!(e, WatchError::Disconnected { .. }) {
            disconnects += 1;
        }
    }
    assert!(disconnects >= 2, "{disconnects} disconnects reported");
}

#[tokio::test]
async fn the_registration_guard_survives_a_daemon_restart_and_deregisters_on_drop() {
    let mut daemon = Restartable::start().await;
    let admin = Admin::new(daemon.addr);
    admin.tenant("integration", "").await;
    let client = client(&[daemon.endpoint()], "integration", None);

    let registration = client
        .register(
            InstanceSpec::new("game")
                .endpoint("main", "127.0.0.1:7777")
                .ttl(Duration::from_secs(2)),
        )
        .await
        .unwrap();
    let id = registration.id().to_owned();
    assert_eq!(
        admin.instance_ids("integration", "game").await,
        [id.as_str()]
    );

    // Kept alive well past its TTL.
    sleep(Duration::from_secs(4)).await;
    assert_eq!(
        admin.instance_ids("integration", "game").await,
        [id.as_str()]
    );
    assert_eq!(registration.registrations(), 1);

    // The daemon goes away for longer than the TTL: the lease lapses, and
    // when the daemon returns the guard registers the same id again.
    daemon.down(Signal::SIGKILL).await;
    sleep(Duration::from_secs(3)).await;
    daemon.up().await;
    eventually("the instance is back", Duration::from_secs(15), || async {
        registration.registrations() >= 2
            && admin.instance_ids("integration", "game").await == [id.as_str()]
    })
    .await;
    // And it stays (the new lease is kept alive).
    sleep(Duration::from_secs(3)).await;
    assert_eq!(
        admin.instance_ids("integration", "game").await,
        [id.as_str()]
    );
    let resolved = client.resolve("game").await.unwrap();
    assert_eq!(resolved.instances.len(), 1);
    assert_eq!(resolved.instances[0].address(), Some("127.0.0.1:7777"));

    // Dropping the guard removes the instance at once (its lease alone
    // would hold it for its TTL; use a long one to tell them apart).
    drop(registration);
    let long = client
        .register(
            InstanceSpec::new("lobby")
                .endpoint("main", "127.0.0.1:7778")
                .ttl(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    assert_eq!(admin.instance_ids("integration", "lobby").await.len(), 1);
    drop(long);
    eventually(
        "dropped instances vanish",
        Duration::from_secs(5),
        || async {
            admin.instance_ids("integration", "lobby").await.is_empty()
                && admin.instance_ids("integration", "game").await.is_empty()
        },
    )
    .await;
}

#[tokio::test]
async fn a_service_watch_follows_fallback_and_balancers_spread_over_it() {
    let daemon = Daemon::start().await;
    let admin = Admin::new(daemon.addr);
    admin.tenant("integration", "").await;
    admin.tenant("feat-1", "integration").await;
    let endpoints = [daemon.addr.to_string()];
    let integration = client(&endpoints, "integration", None);
    let feature = client(&endpoints, "feat-1", None);

    let mut shared = Vec::new();
    for port in [9001, 9002, 9003] {
        shared.push(
            integration
                .register(
                    InstanceSpec::new("matchmaker").endpoint("main", format!("127.0.0.1:{port}")),
                )
                .await
                .unwrap(),
        );
    }
    let watch = feature.watch_service("matchmaker").await.unwrap();
    let mut changes = watch.changes();
    let current = watch.get();
    assert_eq!(current.tenant.as_deref(), Some("integration"));
    assert!(current.fallback);
    assert_eq!(current.instances.len(), 3);

    let rr = RoundRobin::new();
    let picks: std::collections::BTreeSet<_> = (0..3)
        .map(|_| rr.pick(&current.instances).unwrap().id.clone())
        .collect();
    assert_eq!(picks.len(), 3, "round robin visits each instance");
    let p2c = PowerOfTwoChoices::new();
    let held: Vec<_> = (0..30)
        .map(|_| p2c.pick(&current.instances).unwrap())
        .collect();
    // Two distinct random candidates, the less loaded wins. The spread is
    // random, not exact: the least loaded instance is left out of a third
    // of the draws, and two tied leaders drawn together push one ahead.
    // Simulated over 300k runs of 30 picks: never above 12 or below 5.
    for instance in &current.instances {
        let in_flight = p2c.in_flight(instance);
        assert!(
            (4..=13).contains(&in_flight),
            "even spread with equal weights: {} has {in_flight} of 30 in flight",
            instance.id
        );
    }
    drop(held);

    // The branch deploys its own matchmaker: the watch switches to it.
    let own = feature
        .register(InstanceSpec::new("matchmaker").endpoint("main", "127.0.0.1:9100"))
        .await
        .unwrap();
    timeout(Duration::from_secs(5), changes.changed())
        .await
        .unwrap()
        .unwrap();
    let current = watch.get();
    assert_eq!(current.tenant.as_deref(), Some("feat-1"));
    assert!(!current.fallback);
    assert_eq!(current.instances.len(), 1);
    assert_eq!(current.instances[0].address(), Some("127.0.0.1:9100"));

    // It goes away: back to the integration instances.
    own.deregister().await.unwrap();
    timeout(Duration::from_secs(5), changes.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(watch.get().tenant.as_deref(), Some("integration"));
    assert_eq!(watch.get().instances.len(), 3);
    drop(shared);
}

#[tokio::test]
async fn one_client_holds_more_watches_than_a_connection_allows_streams() {
    // stratad allows 200 concurrent streams per HTTP/2 connection; a client
    // with more watches must spread them, and still make one-shot calls.
    let daemon = Daemon::start().await;
    let admin = Admin::new(daemon.addr);
    admin.tenant("integration", "").await;
    admin
        .put("integration", "shared.json", "json", r#"{"seq":0}"#)
        .await;
    let client = client(&[daemon.addr.to_string()], "integration", None);
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..250 {
        let handle = client.watch::<Seq>("shared.json").await.unwrap();
        let seen = Arc::clone(&seen);
        handle.on_change(move |_, _| {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        handles.push(handle);
    }
    let resolved = timeout(Duration::from_secs(5), client.resolve("nothing"))
        .await
        .expect("a one-shot call is not starved by the watches")
        .unwrap();
    assert!(resolved.tenant.is_none());
    admin
        .put("integration", "shared.json", "json", r#"{"seq":1}"#)
        .await;
    eventually(
        "every watch sees the change",
        Duration::from_secs(10),
        || async { seen.load(std::sync::atomic::Ordering::SeqCst) == 250 },
    )
    .await;
    assert!(handles.iter().all(|h| h.get().seq == 1));
}

/// Replicated mode: two `stratad` replicas over one etcd cluster. The
/// client starts on the first; the replica it is on is SIGKILLed (twice,
/// alternating), and the watch resumes on the other from its last revision
/// — the replicas share the store's revisions, so this is the exact-resume
/// path, not a reset snapshot — with every update seen once, in order.
#[tokio::test]
async fn watches_fail_over_between_etcd_replicas_with_no_lost_or_duplicated_update() {
    if !strata_tests::etcd::etcd_available(
        "watches_fail_over_between_etcd_replicas_with_no_lost_or_duplicated_update",
    ) {
        return;
    }
    let cluster = strata_tests::etcd::EtcdCluster::start(1).await;
    let prefix = format!("/sdk-{}/", free_port());
    let replica = |addr: SocketAddr| {
        Daemon::builder()
            .addr(addr)
            .args(["--etcd-endpoints", &cluster.endpoints_arg()])
            .env("STRATA_ETCD_PREFIX", &prefix)
            .start()
    };
    // Each port is picked right before its replica binds it: a port picked
    // earlier could meanwhile become the local end of a replica's etcd
    // connection.
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        addrs.push(addr);
        replicas.push(Some(replica(addr).await));
    }
    let admins = [Admin::new(addrs[0]), Admin::new(addrs[1])];
    admins[1].tenant("integration", "").await;
    // Through replica 0 (retried until acknowledged), so its view has the
    // tenant before the client, which starts there, opens its watch: a
    // replica learns another's writes through its etcd watch, a moment later.
    admins[0]
        .put("integration", "counter.json", "json", r#"{"seq":0}"#)
        .await;

    let endpoints: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let client = client(&endpoints, "integration", None);
    let counter = client.watch::<Seq>("counter.json").await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    counter.on_change(move |_, new: &Seq| sink.lock().unwrap().push(new.seq));
    let mut errors = counter.errors();

    // Writes go through the replica that stays up; the client's replica dies.
    put_and_see(&admins[1], &counter, 1..=10).await;
    let mut first = replicas[0].take().unwrap();
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).await;
    put_and_see(&admins[1], &counter, 11..=20).await;

    // The first replica returns; now the second dies.
    replicas[0] = Some(replica(addrs[0]).await);
    let mut second = replicas[1].take().unwrap();
    second.signal(Signal::SIGKILL);
    second.wait_exit(Duration::from_secs(10)).await;
    put_and_see(&admins[0], &counter, 21..=30).await;
    sleep(Duration::from_millis(200)).await;

    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        (1..=30).collect::<Vec<_>>(),
        "every update exactly once, in order"
    );
    let mut disconnects = 0;
    while let Ok(e) = errors.try_recv() {
        if matches!(e, WatchError::Disconnected { .. }) {
            disconnects += 1;
        }
    }
    assert!(
        disconnects >= 2,
        "the watch moved twice: {disconnects} disconnects"
    );
}

/// The `op="/strata.v1.ConfigService/Watch"` requests the daemon at `addr`
/// has answered.
async fn watch_requests(addr: SocketAddr) -> f64 {
    let (_, metrics) = strata_tests::http_get(addr, "/metrics").await.unwrap();
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("strata_rpc_requests_total{op=\"/strata.v1.ConfigService/Watch\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A watch that resumes where nothing was missed gets no message until the
/// next change: the SDK must take the accepted stream as live instead of
/// timing it out and reconnecting every request timeout.
#[tokio::test]
async fn a_resumed_watch_with_nothing_missed_stays_open() {
    let (mut daemon, admin) = counter_daemon().await;
    let client = builder(&[daemon.endpoint()], "integration", None)
        .request_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let counter = client.watch::<Seq>("counter.json").await.unwrap();
    put_and_see(&admin, &counter, 1..=1).await;

    daemon.down(Signal::SIGKILL).await;
    daemon.up().await;
    // Let the watch resume on the restarted daemon.
    eventually("the watch resumes", Duration::from_secs(10), || async {
        watch_requests(daemon.addr).await >= 1.0
    })
    .await;
    sleep(Duration::from_millis(500)).await;
    let resumed = watch_requests(daemon.addr).await;
    sleep(Duration::from_secs(2)).await;
    let later = watch_requests(daemon.addr).await;
    assert_eq!(
        later,
        resumed,
        "the watch reopened {} times in 2 s with nothing to deliver",
        later - resumed
    );
    // And it is live: the next change arrives.
    put_and_see(&admin, &counter, 2..=2).await;
}
