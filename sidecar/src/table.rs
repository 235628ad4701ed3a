//! The routing table: for each tenant the sidecar follows, where every
//! service visible from it resolves (the registry's fallback along the
//! tenant chain, pushed by `stratad` through the SDK's
//! `watch_tenant_services`). The table is an immutable snapshot in an
//! `ArcSwap`: a request's lookup is one atomic load and two hash probes —
//! no lock, no await on the control plane. A control task rebuilds the
//! snapshot whenever a watched view changes; when every daemon is down the
//! watches keep their last view and so the table keeps serving.
//!
//! The sidecar always follows its own tenant. A request carrying another
//! tenant (a call that came in from a feature environment) makes the
//! control task follow that tenant too; only the first such request waits
//! (at most `tenant_wait`) for its routes.
//!
//! The tenant comes from the caller, so a caller can name any number of
//! tenants that do not exist (docs/security.md, "Unknown tenants"). Each one the sidecar
//! does not know costs a call to stratad, so these learns have their own
//! budget (`tenant_learn_rate` per second, as many at once): past it a
//! request for a tenant not followed yet is refused with 429 at once, and
//! stratad never sees it. The names stratad refused are remembered for 5 s
//! (asking again costs nothing) — at most `max_unknown_tenants`, the
//! oldest forgotten first. Tenants already followed, and the own tenant,
//! never touch either: their requests are routed from the table.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use metrics::Counter;
use serde::Serialize;
use strata_client::{Client, Code, Error, TenantServicesWatch};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::config::Settings;
use crate::metrics::RouteMetrics;
use crate::upstream::{Balancer, Ejection, Upstream, now_ms};

/// Where one service resolves for one requesting tenant.
#[derive(Debug)]
pub struct Route {
    /// The service.
    pub service: String,
    /// The tenant requests come from.
    pub requested: String,
    /// The tenant that serves.
    pub tenant: String,
    /// Whether the serving tenant is an ancestor, not `requested` itself.
    pub fallback: bool,
    /// Its routable instances.
    pub balancer: Balancer,
    /// Request timeout to the response head.
    pub timeout: Duration,
    /// Metric handles.
    pub metrics: RouteMetrics,
    /// `strata-tenant=<requested>`, for requests without baggage.
    pub baggage: http::HeaderValue,
}

/// Everything known for one requesting tenant.
#[derive(Debug, Default)]
pub struct TenantRoutes {
    /// `[tenant, parent, …, root]`.
    pub chain: Vec<String>,
    /// Routes by service name.
    pub services: HashMap<String, Arc<Route>>,
    /// Revision of the view the routes come from.
    pub revision: i64,
    /// The tenant was deleted.
    pub deleted: bool,
}

/// One immutable snapshot of all routes.
#[derive(Debug, Default)]
pub struct Table {
    /// By requesting tenant.
    pub tenants: HashMap<String, TenantRoutes>,
}

/// A lookup's answer.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// Route found.
    Route(&'a Arc<Route>),
    /// The tenant is followed but the service resolves nowhere in its
    /// chain.
    NoRoute(&'a TenantRoutes),
    /// The tenant is not followed yet.
    UnknownTenant,
}

impl Table {
    /// Looks `service` up for `tenant`: two hash probes.
    pub fn lookup(&self, tenant: &str, service: &str) -> Lookup<'_> {
        match self.tenants.get(tenant) {
            None => Lookup::UnknownTenant,
            Some(t) => match t.services.get(service) {
                Some(r) => Lookup::Route(r),
                None => Lookup::NoRoute(t),
            },
        }
    }
}

/// Why a tenant's routes are not available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LearnError {
    /// stratad says there is no such tenant.
    NoSuchTenant,
    /// The sidecar follows as many tenants as it may.
    TooManyTenants(usize),
    /// No daemon answered in time.
    Unavailable(String),
    /// The budget for learning tenants (`tenant_learn_rate` per second)
    /// is spent; stratad was not asked.
    RateLimited(usize),
}

impl std::fmt::Display for LearnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LearnError::NoSuchTenant => f.write_str("no such tenant in the project"),
            LearnError::TooManyTenants(n) => {
                write!(f, "the sidecar already follows {n} tenants (max_tenants)")
            }
            LearnError::Unavailable(e) => write!(f, "control plane unavailable: {e}"),
            LearnError::RateLimited(n) => write!(
                f,
                "the tenant is not followed yet and the sidecar learns at most {n} new tenants \
                 per second (tenant_learn_rate); try again shortly"
            ),
        }
    }
}

struct LearnRequest {
    tenant: String,
    reply: oneshot::Sender<Result<(), LearnError>>,
}

/// The shared routing state: the current table and the way to ask the
/// control task for a tenant's routes.
pub struct Routing {
    table: ArcSwap<Table>,
    own: String,
    learn: mpsc::UnboundedSender<LearnRequest>,
    ready: AtomicBool,
    tenant_wait: Duration,
    /// How many refused tenant names are remembered (for `/routes`).
    unknown: AtomicUsize,
}

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing")
            .field("own", &self.own)
            .finish_non_exhaustive()
    }
}

impl Routing {
    /// The current snapshot (one atomic load).
    pub fn load(&self) -> arc_swap::Guard<Arc<Table>> {
        self.table.load()
    }

    /// The sidecar's own tenant.
    pub fn own_tenant(&self) -> &str {
        &self.own
    }

    /// Whether the own tenant's routes have arrived.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Asks the control task to follow `tenant` and waits (at most
    /// `tenant_wait`) until its routes are in the table. Only the first
    /// request of a tenant new to this sidecar gets here.
    pub async fn learn(&self, tenant: &str) -> Result<(), LearnError> {
        let (reply, answer) = oneshot::channel();
        self.learn
            .send(LearnRequest {
                tenant: tenant.to_owned(),
                reply,
            })
            .map_err(|_| LearnError::Unavailable("the sidecar is shutting down".into()))?;
        match tokio::time::timeout(self.tenant_wait, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(LearnError::Unavailable("the control task ended".into())),
            Err(_) => Err(LearnError::Unavailable(format!(
                "no routes for tenant {tenant:?} within {:?}",
                self.tenant_wait
            ))),
        }
    }

    /// Starts the control task on `client` and returns the shared state.
    pub fn start(client: Client, settings: &Settings) -> Arc<Routing> {
        let (tx, rx) = mpsc::unbounded_channel();
        let routing = Arc::new(Routing {
            table: ArcSwap::from_pointee(Table::default()),
            own: settings.tenant.clone(),
            learn: tx,
            ready: AtomicBool::new(false),
            tenant_wait: settings.tenant_wait,
            unknown: AtomicUsize::new(0),
        });
        let hits = |limit| crate::metrics::limit_hits(&settings.project, limit);
        let control = Control {
            client,
            routing: Arc::clone(&routing),
            project: settings.project.clone(),
            settings: settings.clone(),
            watched: HashMap::new(),
            upstreams: HashMap::new(),
            pending: HashMap::new(),
            refused: Refused::new(settings.max_unknown_tenants, hits("max_unknown_tenants")),
            budget: LearnBudget::new(settings.tenant_learn_rate, Instant::now()),
            rate_limited: hits("tenant_learn_rate"),
            changed: Arc::new(Notify::new()),
        };
        tokio::spawn(control.run(rx));
        routing
    }
}

struct Watched {
    watch: TenantServicesWatch,
    chain: Vec<String>,
    forwarder: tokio::task::JoinHandle<()>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}

type Learned = (
    String,
    Result<(TenantServicesWatch, Vec<String>), LearnError>,
);

/// The control task's state.
struct Control {
    client: Client,
    routing: Arc<Routing>,
    project: String,
    settings: Settings,
    watched: HashMap<String, Watched>,
    /// Upstreams by `tenant/id/address`, kept across rebuilds.
    upstreams: HashMap<String, Arc<Upstream>>,
    /// Requests waiting for a tenant being learned.
    pending: HashMap<String, Vec<oneshot::Sender<Result<(), LearnError>>>>,
    /// Tenants stratad said do not exist (asked again after 5 s).
    refused: Refused,
    /// What learning tenants not followed yet may cost stratad.
    budget: LearnBudget,
    /// Learns refused for the budget.
    rate_limited: Counter,
    changed: Arc<Notify>,
}

/// How long a "no such tenant" answer is remembered.
const REFUSAL_TTL: Duration = Duration::from_secs(5);

/// Tenant names stratad said do not exist, each remembered for
/// [`REFUSAL_TTL`] so asking again costs nothing — at most `cap` of them,
/// the oldest forgotten first (an eviction is counted).
#[derive(Debug)]
struct Refused {
    cap: usize,
    at: HashMap<String, Instant>,
    /// Refusals in the order they came (and so of expiry); entries whose
    /// name was since forgotten or refused again are skipped.
    order: VecDeque<(String, Instant)>,
    evicted: Counter,
}

impl Refused {
    fn new(cap: usize, evicted: Counter) -> Self {
        Self {
            cap: cap.max(1),
            at: HashMap::new(),
            order: VecDeque::new(),
            evicted,
        }
    }

    /// Whether `tenant` was refused less than [`REFUSAL_TTL`] before `now`.
    fn contains(&mut self, tenant: &str, now: Instant) -> bool {
        match self.at.get(tenant) {
            Some(at) if now.saturating_duration_since(*at) < REFUSAL_TTL => true,
            Some(_) => {
                self.at.remove(tenant);
                false
            }
            None => false,
        }
    }

    /// Remembers that stratad refused `tenant` at `now`: expired names go
    /// first, then the oldest while there are `cap`.
    fn insert(&mut self, tenant: String, now: Instant) {
        while let Some((name, at)) = self.order.front() {
            let current = self.at.get(name) == Some(at);
            let expired = now.saturating_duration_since(*at) >= REFUSAL_TTL;
            if current && !expired {
                break;
            }
            if current {
                self.at.remove(name);
            }
            self.order.pop_front();
        }
        while self.at.len() >= self.cap {
            let Some((name, at)) = self.order.pop_front() else {
                break;
            };
            if self.at.get(&name) == Some(&at) {
                self.at.remove(&name);
                self.evicted.increment(1);
            }
        }
        self.at.insert(tenant.clone(), now);
        self.order.push_back((tenant, now));
    }

    fn len(&self) -> usize {
        self.at.len()
    }
}

/// A token bucket: `per_second` learns per second, as many at once.
#[derive(Debug)]
struct LearnBudget {
    per_second: f64,
    tokens: f64,
    at: Instant,
}

impl LearnBudget {
    fn new(per_second: usize, now: Instant) -> Self {
        let per_second = per_second.max(1) as f64;
        Self {
            per_second,
            tokens: per_second,
            at: now,
        }
    }

    /// Takes one learn from the budget, if there is one left at `now`.
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.per_second);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Control {
    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<LearnRequest>) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Learned>();
        // The own tenant: retried until it works (readiness waits for it).
        let own = self.settings.tenant.clone();
        self.pending.insert(own.clone(), Vec::new());
        self.spawn_learn(own, done_tx.clone(), true);
        loop {
            tokio::select! {
                request = requests.recv() => {
                    let Some(request) = request else { return };
                    self.on_request(request, &done_tx);
                }
                Some((tenant, result)) = done_rx.recv() => self.on_learned(tenant, result),
                () = self.changed.notified() => self.rebuild(),
            }
        }
    }

    fn on_request(&mut self, request: LearnRequest, done: &mpsc::UnboundedSender<Learned>) {
        let tenant = request.tenant;
        if self.watched.contains_key(&tenant) {
            let _ = request.reply.send(Ok(()));
            return;
        }
        let now = Instant::now();
        if self.refused.contains(&tenant, now) {
            let _ = request.reply.send(Err(LearnError::NoSuchTenant));
            return;
        }
        if let Some(waiters) = self.pending.get_mut(&tenant) {
            waiters.push(request.reply);
            return;
        }
        if self.watched.len() + self.pending.len() >= self.settings.max_tenants {
            let _ = request
                .reply
                .send(Err(LearnError::TooManyTenants(self.settings.max_tenants)));
            return;
        }
        if !self.budget.take(now) {
            self.rate_limited.increment(1);
            let _ = request.reply.send(Err(LearnError::RateLimited(
                self.settings.tenant_learn_rate,
            )));
            return;
        }
        self.pending.insert(tenant.clone(), vec![request.reply]);
        self.spawn_learn(tenant, done.clone(), false);
    }

    fn spawn_learn(&self, tenant: String, done: mpsc::UnboundedSender<Learned>, forever: bool) {
        let client = self.client.clone();
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            loop {
                let result = learn(&client, &tenant).await;
                let retry = forever && result.is_err();
                if retry {
                    if let Err(e) = &result {
                        tracing::warn!(tenant = %tenant, error = %e, "own tenant's routes unavailable; retrying");
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                    continue;
                }
                let _ = done.send((tenant, result));
                return;
            }
        });
    }

    fn on_learned(
        &mut self,
        tenant: String,
        result: Result<(TenantServicesWatch, Vec<String>), LearnError>,
    ) {
        let waiters = self.pending.remove(&tenant).unwrap_or_default();
        let answer = match result {
            Ok((watch, chain)) => {
                let mut changes = watch.changes();
                let notify = Arc::clone(&self.changed);
                let forwarder = tokio::spawn(async move {
                    while changes.changed().await.is_ok() {
                        notify.notify_one();
                    }
                });
                tracing::info!(tenant = %tenant, chain = ?chain, "following tenant");
                self.watched.insert(
                    tenant.clone(),
                    Watched {
                        watch,
                        chain,
                        forwarder,
                    },
                );
                self.rebuild();
                if tenant == self.routing.own {
                    self.routing.ready.store(true, Ordering::Release);
                }
                Ok(())
            }
            Err(e) => {
                if e == LearnError::NoSuchTenant {
                    self.refused.insert(tenant.clone(), Instant::now());
                    self.routing
                        .unknown
                        .store(self.refused.len(), Ordering::Relaxed);
                }
                tracing::info!(tenant = %tenant, error = %e, "cannot follow tenant");
                Err(e)
            }
        };
        for waiter in waiters {
            let _ = waiter.send(answer.clone());
        }
    }

    /// Builds a fresh snapshot from every watch's current view.
    fn rebuild(&mut self) {
        let ejection = Ejection {
            after: self.settings.eject_after.max(1),
            duration: self.settings.eject_for,
        };
        let mut table = Table::default();
        let mut live: HashMap<String, Arc<Upstream>> = HashMap::new();
        let mut routes = 0usize;
        for (tenant, watched) in &self.watched {
            let view = watched.watch.get();
            let Some(baggage) = crate::tenant::baggage_value(tenant) else {
                continue;
            };
            let mut services = HashMap::with_capacity(view.services.len());
            for (name, resolved) in &view.services {
                let Some(serving) = resolved.tenant.clone() else {
                    continue;
                };
                let instances = resolved
                    .instances
                    .iter()
                    .filter_map(|i| {
                        let address = i.address()?.to_owned();
                        let key = format!("{}/{}/{}", i.tenant, i.id, address);
                        let upstream = self.upstreams.get(&key).cloned().unwrap_or_else(|| {
                            Arc::new(Upstream::new(
                                address,
                                i.tenant.clone(),
                                i.id.clone(),
                                ejection,
                            ))
                        });
                        live.insert(key, Arc::clone(&upstream));
                        Some((upstream, i.weight))
                    })
                    .collect();
                let route = Route {
                    service: name.clone(),
                    requested: tenant.clone(),
                    metrics: RouteMetrics::new(&self.project, name, &serving, resolved.fallback),
                    tenant: serving,
                    fallback: resolved.fallback,
                    balancer: Balancer::new(instances),
                    timeout: self.settings.timeout_for(name),
                    baggage: baggage.clone(),
                };
                services.insert(name.clone(), Arc::new(route));
                routes += 1;
            }
            table.tenants.insert(
                tenant.clone(),
                TenantRoutes {
                    chain: watched.chain.clone(),
                    services,
                    revision: view.revision,
                    deleted: view.deleted,
                },
            );
        }
        self.upstreams = live;
        metrics::gauge!("strata_sidecar_routes").set(routes as f64);
        metrics::gauge!("strata_sidecar_tenants").set(self.watched.len() as f64);
        self.routing.table.store(Arc::new(table));
    }
}

async fn learn(
    client: &Client,
    tenant: &str,
) -> Result<(TenantServicesWatch, Vec<String>), LearnError> {
    let classify = |e: Error| match &e {
        Error::Server {
            code: Code::NotFound,
            ..
        } => LearnError::NoSuchTenant,
        _ => LearnError::Unavailable(e.to_string()),
    };
    let watch = client
        .watch_tenant_services(tenant)
        .await
        .map_err(classify)?;
    // The chain only names tenants in errors and /routes; a failure here
    // must not keep the routes away.
    let chain = client
        .tenant_chain(tenant)
        .await
        .unwrap_or_else(|_| vec![tenant.to_owned()]);
    Ok((watch, chain))
}

/// `/routes`: for every followed tenant and service, where it resolves and
/// why.
#[derive(Debug, Serialize)]
pub struct RoutesView {
    /// The sidecar's own tenant.
    pub own_tenant: String,
    /// Whether the own tenant's routes have arrived.
    pub ready: bool,
    /// Tenant names stratad refused that are remembered (at most
    /// `max_unknown_tenants`).
    pub unknown_tenants: usize,
    /// By requesting tenant.
    pub tenants: Vec<TenantView>,
}

/// One followed tenant in `/routes`.
#[derive(Debug, Serialize)]
pub struct TenantView {
    /// The requesting tenant.
    pub tenant: String,
    /// Its chain.
    pub chain: Vec<String>,
    /// Revision of its view.
    pub revision: i64,
    /// Deleted.
    pub deleted: bool,
    /// Its routes, by service name.
    pub services: Vec<ServiceView>,
}

/// One route in `/routes`.
#[derive(Debug, Serialize)]
pub struct ServiceView {
    /// The service.
    pub service: String,
    /// The serving tenant.
    pub resolves_to: String,
    /// Whether that is a fallback.
    pub fallback: bool,
    /// Why, in words.
    pub why: String,
    /// Request timeout.
    pub timeout_ms: u64,
    /// Its instances.
    pub instances: Vec<InstanceView>,
}

/// One instance in `/routes`.
#[derive(Debug, Serialize)]
pub struct InstanceView {
    /// Instance id.
    pub id: String,
    /// `host:port`.
    pub address: String,
    /// Requests in flight from this sidecar.
    pub in_flight: usize,
    /// Ejected after failures.
    pub ejected: bool,
}

impl Routing {
    /// The `/routes` view of the current table.
    pub fn view(&self) -> RoutesView {
        let table = self.load();
        let now = now_ms();
        let mut tenants: Vec<TenantView> = table
            .tenants
            .iter()
            .map(|(name, t)| {
                let mut services: Vec<ServiceView> = t
                    .services
                    .values()
                    .map(|r| {
                        let skipped: Vec<&str> = t
                            .chain
                            .iter()
                            .take_while(|c| **c != r.tenant)
                            .map(String::as_str)
                            .collect();
                        let why = if r.fallback {
                            format!(
                                "no routable instance in {}; {} is the nearest tenant of the chain that has one",
                                skipped.join(", "),
                                r.tenant
                            )
                        } else {
                            format!("{} has routable instances", r.tenant)
                        };
                        ServiceView {
                            service: r.service.clone(),
                            resolves_to: r.tenant.clone(),
                            fallback: r.fallback,
                            why,
                            timeout_ms: u64::try_from(r.timeout.as_millis()).unwrap_or(u64::MAX),
                            instances: r
                                .balancer
                                .upstreams()
                                .iter()
                                .map(|u| InstanceView {
                                    id: u.id.clone(),
                                    address: u.address.clone(),
                                    in_flight: u.in_flight(),
                                    ejected: u.ejected(now),
                                })
                                .collect(),
                        }
                    })
                    .collect();
                services.sort_by(|a, b| a.service.cmp(&b.service));
                TenantView {
                    tenant: name.clone(),
                    chain: t.chain.clone(),
                    revision: t.revision,
                    deleted: t.deleted,
                    services,
                }
            })
            .collect();
        tenants.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        RoutesView {
            own_tenant: self.own.clone(),
            ready: self.is_ready(),
            unknown_tenants: self.unknown.load(Ordering::Relaxed),
            tenants,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Finding 5: however many names stratad refuses, at most `cap` are
    /// remembered (the oldest forgotten first, counted); each is answered
    /// from memory for 5 s, then asked again.
    #[test]
    fn unknown_tenant_names_are_capped_and_expire_finding_5() {
        let t0 = Instant::now();
        let mut refused = Refused::new(4, Counter::noop());
        for i in 0..1000u64 {
            refused.insert(format!("ghost-{i}"), t0 + Duration::from_millis(i));
            assert!(refused.len() <= 4);
            assert!(refused.order.len() <= 8, "{}", refused.order.len());
        }
        let now = t0 + Duration::from_millis(1000);
        // The newest four are remembered, the rest forgotten.
        assert!(refused.contains("ghost-999", now));
        assert!(refused.contains("ghost-996", now));
        assert!(!refused.contains("ghost-995", now));
        assert!(!refused.contains("ghost-0", now));
        // After the TTL even the newest is asked again.
        let later = t0 + Duration::from_millis(999) + REFUSAL_TTL;
        assert!(!refused.contains("ghost-999", later));
        // Refused again: remembered again, the stale entry skipped.
        refused.insert("ghost-999".into(), later);
        assert!(refused.contains("ghost-999", later));
        assert!(refused.len() <= 4);
    }

    /// Finding 5: the learn budget gives `rate` learns at once, then
    /// `rate` per second — never more, however often it is asked.
    #[test]
    fn tenant_learn_budget_is_its_rate_finding_5() {
        let t0 = Instant::now();
        let mut budget = LearnBudget::new(10, t0);
        let taken = (0..1000).filter(|_| budget.take(t0)).count();
        assert_eq!(taken, 10, "the first burst");
        // Over the next 2 s, asked every millisecond: 20 more.
        let taken = (1..=2000)
            .filter(|ms| budget.take(t0 + Duration::from_millis(*ms)))
            .count();
        assert!((19..=20).contains(&taken), "{taken}");
        // A long pause refills at most one second's worth.
        let later = t0 + Duration::from_secs(60);
        let taken = (0..1000).filter(|_| budget.take(later)).count();
        assert_eq!(taken, 10);
    }
}
