//! Self-registration: [`Client::register`] and its [`Registration`] guard.
//!
//! A game server registers itself as an *ephemeral* instance, bound to a
//! lease. The guard's background task renews the lease every third of its
//! TTL through the client's failover (any daemon will do: leases live in
//! the store, not in one daemon), and when a daemon says the lease is gone
//! — it lapsed while every daemon was down, or the store lost it — it
//! registers the same instance id again. Dropping the guard (or calling
//! [`Registration::deregister`]) removes the instance at once instead of
//! waiting for the lease to expire.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use strata_proto::v1::registry_service_client::RegistryServiceClient;
use strata_proto::v1::{
    DeregisterRequest, ErrorReason, HeartbeatRequest, Instance, InstanceKind, Protocol,
    RegisterRequest,
};

use crate::Error;
use crate::client::Client;

/// Shortest pause between two keep-alives, whatever the TTL.
const MIN_KEEPALIVE: Duration = Duration::from_millis(200);

/// What to register: a service instance of this game server.
///
/// ```
/// use std::time::Duration;
/// use strata_client::{InstanceSpec, proto::Protocol};
///
/// let spec = InstanceSpec::new("game-server")
///     .endpoint("main", "10.0.0.7:7777")
///     .endpoint_with_protocol("metrics", "10.0.0.7:9100", Protocol::Http)
///     .protocol(Protocol::Udp)
///     .metadata("region", "eu-west")
///     .version("1.4.2")
///     .ttl(Duration::from_secs(10));
/// assert_eq!(spec.service(), "game-server");
/// ```
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    service: String,
    id: Option<String>,
    endpoints: BTreeMap<String, strata_proto::v1::Endpoint>,
    protocol: Protocol,
    metadata: BTreeMap<String, String>,
    weight: u32,
    version: String,
    ttl: Duration,
}

impl InstanceSpec {
    /// An instance of `service`, with a generated id, protocol `http`,
    /// weight 100 and a 10 s lease.
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            id: None,
            endpoints: BTreeMap::new(),
            protocol: Protocol::Http,
            metadata: BTreeMap::new(),
            weight: 0,
            version: String::new(),
            ttl: Duration::from_secs(10),
        }
    }

    /// The service.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// A fixed instance id (`A-Z a-z 0-9 . _ -`); generated when not set.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// An endpoint (`host:port`) by name (`main`, `metrics`, …), speaking
    /// the instance's protocol. At least one is required.
    pub fn endpoint(mut self, name: impl Into<String>, address: impl Into<String>) -> Self {
        self.endpoints.insert(
            name.into(),
            strata_proto::v1::Endpoint {
                address: address.into(),
                protocol: Protocol::Unspecified as i32,
            },
        );
        self
    }

    /// An endpoint with its own protocol.
    pub fn endpoint_with_protocol(
        mut self,
        name: impl Into<String>,
        address: impl Into<String>,
        protocol: Protocol,
    ) -> Self {
        self.endpoints.insert(
            name.into(),
            strata_proto::v1::Endpoint {
                address: address.into(),
                protocol: protocol as i32,
            },
        );
        self
    }

    /// The protocol of endpoints that do not name theirs (default `http`).
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// A metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Relative load-balancing weight, 1–10000 (default 100).
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The version this instance runs.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// The lease TTL: how long the instance stays listed after the process
    /// dies without deregistering (default 10 s; whole seconds, at least 1).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }
}

/// Keeps a registered instance alive; deregisters it when dropped.
///
/// Dropping the guard deregisters in the background (on the current Tokio
/// runtime, if any). At shutdown prefer [`Registration::deregister`], which
/// waits for the daemon to confirm.
#[derive(Debug)]
pub struct Registration {
    shared: Arc<Shared>,
    keepalive: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    client: Client,
    request: RegisterRequest,
    id: String,
    lease: AtomicI64,
    ttl_seconds: AtomicI64,
    registrations: AtomicU64,
}

impl Shared {
    fn budget(&self) -> Duration {
        self.client
            .inner
            .startup_timeout
            .max(self.client.inner.request_timeout)
    }

    async fn register(&self) -> Result<(), Error> {
        // Registrations and deregistrations are traced (renewals are not:
        // one span per TTL/3 per instance would be noise).
        let span = self
            .client
            .start_call_span("strata.v1.RegistryService/Register", &self.request.service);
        let outcome = self
            .client
            .call(self.budget(), |channel, _| {
                let request = self
                    .client
                    .traced_request(self.request.clone(), span.as_ref());
                async move { RegistryServiceClient::new(channel).register(request).await }
            })
            .await;
        if let Some(cx) = &span {
            crate::trace::end_span(cx, outcome.as_ref().err().map(ToString::to_string));
        }
        let response = outcome?.into_inner();
        self.lease.store(response.lease_id, Ordering::Release);
        self.ttl_seconds
            .store(response.ttl_seconds.max(1), Ordering::Release);
        self.registrations.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn interval(&self) -> Duration {
        let ttl = Duration::from_secs(self.ttl_seconds.load(Ordering::Acquire).max(1) as u64);
        (ttl / 3).max(MIN_KEEPALIVE)
    }

    /// Renews the lease for as long as the guard lives.
    async fn keep_alive(self: Arc<Self>) {
        loop {
            let interval = self.interval();
            tokio::time::sleep(interval).await;
            let lease = self.lease.load(Ordering::Acquire);
            let outcome = self
                .client
                .call(interval, |channel, _| {
                    let request = self.client.request(HeartbeatRequest { lease_id: lease });
                    async move { RegistryServiceClient::new(channel).heartbeat(request).await }
                })
                .await;
            match outcome {
                Ok(_) => {}
                Err(e)
                    if e.reason() == ErrorReason::NotFound
                        || e.code() == Some(tonic::Code::NotFound) =>
                {
                    tracing::warn!(service = %self.request.service, id = %self.id, lease, "lease lost; registering again");
                    metrics::counter!("strata_sdk_reregistrations_total").increment(1);
                    if let Err(e) = self.register().await {
                        tracing::warn!(service = %self.request.service, id = %self.id, error = %e, "registering again failed; will retry");
                    }
                }
                Err(e) => {
                    metrics::counter!("strata_sdk_keepalive_failures_total").increment(1);
                    tracing::warn!(service = %self.request.service, id = %self.id, error = %e, "lease keep-alive failed; will retry");
                }
            }
        }
    }

    async fn deregister(&self) -> Result<(), Error> {
        let request = DeregisterRequest {
            project: self.request.project.clone(),
            tenant: self.request.tenant.clone(),
            service: self.request.service.clone(),
            id: self.id.clone(),
        };
        let span = self.client.start_call_span(
            "strata.v1.RegistryService/Deregister",
            &self.request.service,
        );
        let outcome = self
            .client
            .call(self.budget(), |channel, _| {
                let request = self.client.traced_request(request.clone(), span.as_ref());
                async move {
                    RegistryServiceClient::new(channel)
                        .deregister(request)
                        .await
                }
            })
            .await;
        if let Some(cx) = &span {
            crate::trace::end_span(cx, outcome.as_ref().err().map(ToString::to_string));
        }
        match outcome {
            Ok(_) => Ok(()),
            // Already gone (a retried deregister that had landed, or the
            // lease expired): the goal is met.
            Err(e) if e.code() == Some(tonic::Code::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Registration {
    /// The instance id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The service.
    pub fn service(&self) -> &str {
        &self.shared.request.service
    }

    /// The lease currently kept alive (changes when the instance had to be
    /// registered again).
    pub fn lease_id(&self) -> i64 {
        self.shared.lease.load(Ordering::Acquire)
    }

    /// How many times the instance was registered: 1, plus one for every
    /// time the lease was found lost and the instance registered again.
    pub fn registrations(&self) -> u64 {
        self.shared.registrations.load(Ordering::Acquire)
    }

    /// Stops the keep-alive and removes the instance, waiting for a daemon
    /// to confirm (with failover).
    pub async fn deregister(mut self) -> Result<(), Error> {
        if let Some(task) = self.keepalive.take() {
            task.abort();
        }
        self.shared.deregister().await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(task) = self.keepalive.take() else {
            return; // deregistered explicitly
        };
        task.abort();
        let shared = Arc::clone(&self.shared);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(e) = shared.deregister().await {
                        tracing::warn!(service = %shared.request.service, id = %shared.id, error = %e, "deregistering on drop failed; the lease will expire");
                    }
                });
            }
            Err(_) => tracing::warn!(
                service = %shared.request.service,
                id = %shared.id,
                "registration dropped outside a Tokio runtime; the lease will expire"
            ),
        }
    }
}

fn generate_id(service: &str) -> String {
    format!(
        "{service}-{:012x}",
        rand::random::<u64>() & 0xffff_ffff_ffff
    )
}

impl Client {
    /// Registers an ephemeral instance in this client's tenant and keeps it
    /// alive until the returned guard is dropped.
    ///
    /// ```no_run
    /// # async fn run(client: strata_client::Client) -> Result<(), strata_client::Error> {
    /// use strata_client::InstanceSpec;
    ///
    /// let registration = client
    ///     .register(InstanceSpec::new("game-server").endpoint("main", "10.0.0.7:7777"))
    ///     .await?;
    /// println!("registered as {}", registration.id());
    /// // … serve …
    /// registration.deregister().await?;
    /// # Ok(()) }
    /// ```
    pub async fn register(&self, spec: InstanceSpec) -> Result<Registration, Error> {
        // The id is chosen here, not by the daemon, so that a register
        // retried on another endpoint (or repeated after a lost lease)
        // updates the same instance instead of creating a second one.
        let id = spec.id.unwrap_or_else(|| generate_id(&spec.service));
        let ttl_seconds = i64::try_from(spec.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let request = RegisterRequest {
            project: self.project().to_owned(),
            tenant: self.tenant().to_owned(),
            service: spec.service,
            instance: Some(Instance {
                id: id.clone(),
                endpoints: spec.endpoints.into_iter().collect(),
                protocol: spec.protocol as i32,
                metadata: spec.metadata.into_iter().collect(),
                weight: spec.weight,
                version: spec.version,
                kind: InstanceKind::Ephemeral as i32,
                ttl_seconds,
                ..Instance::default()
            }),
            lease_id: 0,
        };
        let shared = Arc::new(Shared {
            client: self.clone(),
            request,
            id,
            lease: AtomicI64::new(0),
            ttl_seconds: AtomicI64::new(ttl_seconds),
            registrations: AtomicU64::new(0),
        });
        shared.register().await?;
        let keepalive = tokio::spawn(Arc::clone(&shared).keep_alive());
        Ok(Registration {
            shared,
            keepalive: Some(keepalive),
        })
    }
}
