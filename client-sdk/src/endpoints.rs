//! The endpoint pool behind a [`Client`](crate::Client): one lazily
//! connected channel per daemon, a shared "current" endpoint that every call
//! and watch starts from, rotation to the next endpoint when one fails, and
//! backoff with jitter between rounds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::Error;
use crate::tls::TlsConfig;

/// Parses `host:port` or a URI into its normalised URI and a tonic endpoint.
/// `host:port` means `https://` when `tls` is given, else `http://`; an
/// `https://` endpoint verifies the daemon with `tls` (the system's roots
/// without it).
pub(crate) fn parse_endpoint(
    endpoint: &str,
    tls: Option<&TlsConfig>,
) -> Result<(String, Endpoint), Error> {
    let endpoint = endpoint.trim();
    let uri = if endpoint.contains("://") {
        endpoint.to_owned()
    } else if tls.is_some() {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    };
    let parsed = Endpoint::from_shared(uri.clone()).map_err(|e| Error::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        message: e.to_string(),
    })?;
    if parsed.uri().scheme_str() != Some("https") {
        return Ok((uri, parsed));
    }
    let config = tls.map_or_else(
        || TlsConfig::new().client_config(),
        TlsConfig::client_config,
    );
    let parsed = parsed.tls_config(config).map_err(|e| {
        Error::Config(format!(
            "TLS settings for {uri}: {}",
            crate::tls::error_chain(&e)
        ))
    })?;
    Ok((uri, parsed))
}

/// Refuses a list of parsed endpoint URIs that mixes TLS and plaintext
/// (TLS configured, or an `https://` endpoint, next to an `http://` one)
/// unless `allow` says the plaintext fallback is wanted: failing over would
/// quietly send the token in clear. When allowed, says so in the log.
pub(crate) fn check_plaintext_fallback(
    uris: &[String],
    tls_configured: bool,
    allow: bool,
) -> Result<(), Error> {
    let secure = tls_configured || uris.iter().any(|u| u.starts_with("https://"));
    let plaintext: Vec<String> = uris
        .iter()
        .filter(|u| u.starts_with("http://"))
        .cloned()
        .collect();
    if !secure || plaintext.is_empty() {
        return Ok(());
    }
    if allow {
        tracing::warn!(
            plaintext = ?plaintext,
            "plaintext fallback allowed: calls that fail over to these endpoints send the token in clear"
        );
        return Ok(());
    }
    Err(Error::PlaintextFallback { plaintext })
}

/// Most watch streams on one connection. stratad (hyper) allows 200
/// concurrent streams per HTTP/2 connection; a stream over the limit waits
/// for a free one, so a client with many watches would hang. Keeping watches
/// at half of that leaves room for one-shot calls (which use the first
/// connection) and opens another connection when one is full.
const WATCHES_PER_CONNECTION: usize = 100;

/// One HTTP/2 connection to an endpoint and the watches it carries.
struct Connection {
    channel: Channel,
    watches: Arc<AtomicUsize>,
}

struct Target {
    uri: String,
    endpoint: Endpoint,
    /// Created on first use: `connect_lazy` needs a running Tokio runtime,
    /// and building a client must not.
    connections: Mutex<Vec<Connection>>,
}

impl Target {
    fn connections(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn open(&self) -> Connection {
        Connection {
            channel: self.endpoint.clone().connect_lazy(),
            watches: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// A watch's hold on a connection's stream budget; released on drop.
#[derive(Debug)]
pub(crate) struct WatchPermit(Arc<AtomicUsize>);

impl Drop for WatchPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Exponential backoff with "equal jitter": the delay for round `n` is
/// uniformly drawn from `[d/2, d]` with `d = min(initial * 2^n, max)`, so
/// clients that lost the same daemon do not all come back at once, yet none
/// retries with no pause at all.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
}

impl Backoff {
    pub(crate) fn delay(&self, round: u32) -> Duration {
        let factor = 1u32.checked_shl(round.min(16)).unwrap_or(u32::MAX);
        let full = self.initial.saturating_mul(factor).min(self.max);
        let half = full / 2;
        half + full.mul_f64(rand::random::<f64>() * 0.5)
    }
}

/// The daemons a client talks to.
pub(crate) struct Pool {
    targets: Vec<Target>,
    current: AtomicUsize,
    pub(crate) backoff: Backoff,
}

/// One endpoint picked for an attempt: report failures with its `index`.
pub(crate) struct Picked {
    pub(crate) index: usize,
    pub(crate) channel: Channel,
    pub(crate) uri: String,
}

impl Pool {
    pub(crate) fn new(
        endpoints: &[String],
        connect_timeout: Duration,
        backoff: Backoff,
        tls: Option<&TlsConfig>,
    ) -> Result<Self, Error> {
        if endpoints.is_empty() {
            return Err(Error::Config("no daemon endpoints given".into()));
        }
        let targets = endpoints
            .iter()
            .map(|e| {
                let (uri, endpoint) = parse_endpoint(e, tls)?;
                // HTTP/2 keep-alive pings notice a daemon that vanished
                // without closing the connection (power loss, partition), so
                // a watch moves on instead of waiting forever.
                let endpoint = endpoint
                    .connect_timeout(connect_timeout)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(connect_timeout.max(Duration::from_secs(5)))
                    .keep_alive_while_idle(true)
                    .tcp_nodelay(true);
                Ok(Target {
                    uri,
                    endpoint,
                    connections: Mutex::new(Vec::new()),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Self {
            targets,
            current: AtomicUsize::new(0),
            backoff,
        })
    }

    /// Number of endpoints.
    pub(crate) fn len(&self) -> usize {
        self.targets.len()
    }

    /// Every endpoint's URI, in order.
    pub(crate) fn uris(&self) -> Vec<String> {
        self.targets.iter().map(|t| t.uri.clone()).collect()
    }

    /// The endpoint one-shot calls go to now (its first connection).
    pub(crate) fn pick(&self) -> Picked {
        let index = self.current.load(Ordering::Acquire) % self.targets.len();
        let target = &self.targets[index];
        let channel = {
            let mut connections = target.connections();
            if connections.is_empty() {
                connections.push(target.open());
            }
            connections[0].channel.clone()
        };
        Picked {
            index,
            channel,
            uri: target.uri.clone(),
        }
    }

    /// The endpoint a watch goes to now, on a connection with room for one
    /// more stream (opening another connection when all are full).
    pub(crate) fn pick_for_watch(&self) -> (Picked, WatchPermit) {
        let index = self.current.load(Ordering::Acquire) % self.targets.len();
        let target = &self.targets[index];
        let mut connections = target.connections();
        let slot = match connections
            .iter()
            .position(|c| c.watches.load(Ordering::Acquire) < WATCHES_PER_CONNECTION)
        {
            Some(slot) => slot,
            None => {
                connections.push(target.open());
                connections.len() - 1
            }
        };
        let connection = &connections[slot];
        connection.watches.fetch_add(1, Ordering::AcqRel);
        let permit = WatchPermit(Arc::clone(&connection.watches));
        (
            Picked {
                index,
                channel: connection.channel.clone(),
                uri: target.uri.clone(),
            },
            permit,
        )
    }

    /// Reports that the endpoint at `index` failed: the pool moves to the
    /// next one, unless another caller already moved it (many watches
    /// failing together rotate once, not once each). The failed endpoint's
    /// connections are forgotten so the next use of it dials afresh
    /// (streams still open on them keep them until they end).
    pub(crate) fn failed(&self, index: usize) {
        let next = (index + 1) % self.targets.len();
        let _ = self
            .current
            .compare_exchange(index, next, Ordering::AcqRel, Ordering::Acquire);
        if let Some(target) = self.targets.get(index) {
            target.connections().clear();
        }
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("endpoints", &self.uris())
            .field("current", &self.current.load(Ordering::Relaxed))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_list_mixing_tls_and_plaintext_is_refused() {
        let uris = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let mixed = uris(&["https://a:1", "http://b:1", "http://c:1"]);
        match check_plaintext_fallback(&mixed, false, false) {
            Err(Error::PlaintextFallback { plaintext }) => {
                assert_eq!(plaintext, ["http://b:1", "http://c:1"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(check_plaintext_fallback(&mixed, false, true).is_ok());
        assert!(check_plaintext_fallback(&uris(&["http://b:1"]), true, false).is_err());
        assert!(check_plaintext_fallback(&uris(&["http://b:1"]), false, false).is_ok());
        assert!(check_plaintext_fallback(&uris(&["https://a:1"]), true, false).is_ok());
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_in_the_upper_half() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for _ in 0..100 {
            let d0 = b.delay(0);
            assert!(d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100));
            let d3 = b.delay(3);
            assert!(d3 >= Duration::from_millis(400) && d3 <= Duration::from_millis(800));
            let d40 = b.delay(40);
            assert!(d40 >= Duration::from_secs(1) && d40 <= Duration::from_secs(2));
        }
    }

    #[tokio::test]
    async fn a_failure_rotates_once_even_when_reported_twice() {
        let pool = Pool::new(
            &[
                "127.0.0.1:1".into(),
                "127.0.0.1:2".into(),
                "127.0.0.1:3".into(),
            ],
            Duration::from_secs(1),
            Backoff {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(1),
            },
            None,
        )
        .unwrap();
        let first = pool.pick();
        assert_eq!(first.uri, "http://127.0.0.1:1");
        pool.failed(first.index);
        pool.failed(first.index);
        assert_eq!(pool.pick().uri, "http://127.0.0.1:2");
        let second = pool.pick();
        pool.failed(second.index);
        pool.failed(pool.pick().index);
        assert_eq!(pool.pick().uri, "http://127.0.0.1:1", "wraps around");
    }

    #[tokio::test]
    async fn watches_spread_over_connections_and_release_their_slot() {
        let pool = Pool::new(
            &["127.0.0.1:1".into()],
            Duration::from_secs(1),
            Backoff {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(1),
            },
            None,
        )
        .unwrap();
        let permits: Vec<WatchPermit> = (0..WATCHES_PER_CONNECTION * 2 + 1)
            .map(|_| pool.pick_for_watch().1)
            .collect();
        assert_eq!(pool.targets[0].connections().len(), 3);
        let counts = |pool: &Pool| -> Vec<usize> {
            pool.targets[0]
                .connections()
                .iter()
                .map(|c| c.watches.load(Ordering::Acquire))
                .collect()
        };
        assert_eq!(
            counts(&pool),
            [WATCHES_PER_CONNECTION, WATCHES_PER_CONNECTION, 1]
        );
        drop(permits);
        assert_eq!(counts(&pool), [0, 0, 0]);
        // A freed slot on the first connection is reused before a new one.
        let _p = pool.pick_for_watch();
        assert_eq!(counts(&pool), [1, 0, 0]);
    }
}
