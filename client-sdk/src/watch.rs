//! The resumable watch engine shared by config and service watches.
//!
//! A watch is a server stream that starts with a snapshot and then carries
//! one message per revision that changed the watched view. The engine opens
//! it on the pool's current endpoint; when the stream breaks (daemon killed,
//! shutting down, unreachable) it reports the disconnect, moves the pool to
//! the next endpoint, waits a backoff with jitter after every full round,
//! and reopens the stream with `start_revision = last revision seen + 1`.
//! The daemon then sends exactly the changes missed, or a reset snapshot
//! when it no longer has them; the feed diffs a snapshot against what it
//! holds, so its handle hears only of real changes — nothing lost, nothing
//! twice.

use std::future::Future;

use tokio::time::Instant;
use tonic::transport::Channel;

use crate::client::Client;
use crate::endpoints::WatchPermit;
use crate::{Error, WatchError};

/// Where a watch's current values came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// A daemon, live.
    Daemon,
    /// The disk cache: every daemon was down when the watch started. The
    /// watch keeps trying and switches to [`Source::Daemon`] once one
    /// answers.
    DiskCache,
}

impl Source {
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            Source::Daemon => 0,
            Source::DiskCache => 1,
        }
    }

    pub(crate) fn from_u8(v: u8) -> Self {
        if v == 1 {
            Source::DiskCache
        } else {
            Source::Daemon
        }
    }
}

/// A stream kind the engine can run.
pub(crate) trait Feed: Send + Sync + 'static {
    /// Messages of the stream.
    type Msg: Send + 'static;

    /// Opens the stream at `start_revision` (0 asks for a snapshot).
    fn open(
        &self,
        client: &Client,
        channel: Channel,
        start_revision: i64,
    ) -> impl Future<Output = Result<tonic::Streaming<Self::Msg>, tonic::Status>> + Send;

    /// The revision a message brings the view to.
    fn revision(msg: &Self::Msg) -> i64;

    /// Whether a message replaces the whole view.
    fn is_snapshot(msg: &Self::Msg) -> bool;

    /// Whether a message is the last one (the watched tenant was deleted).
    fn is_final(msg: &Self::Msg) -> bool;

    /// Applies a message to the held view and tells the handle (if attached).
    fn absorb(&mut self, msg: Self::Msg);

    /// Tries to start from the disk cache when no daemon answers; `true`
    /// when it did.
    fn start_from_cache(&mut self) -> bool;

    /// The handle's source changed.
    fn set_source(&mut self, source: Source);

    /// Reports a problem to the handle.
    fn report(&self, error: WatchError);
}

/// A stream that is open, and where.
pub(crate) struct Live<M> {
    stream: tonic::Streaming<M>,
    index: usize,
    uri: String,
    _permit: WatchPermit,
}

/// Bookkeeping of one watch across reconnects.
pub(crate) struct Resumable<F: Feed> {
    client: Client,
    pub(crate) feed: F,
    /// Revision of the last message applied; 0 before the first one or
    /// when started from the disk cache (then the next stream starts with a
    /// snapshot).
    revision: i64,
    source: Source,
}

impl<F: Feed> Resumable<F> {
    pub(crate) fn new(client: Client, feed: F) -> Self {
        Self {
            client,
            feed,
            revision: 0,
            source: Source::Daemon,
        }
    }

    pub(crate) fn source(&self) -> Source {
        self.source
    }

    pub(crate) fn revision(&self) -> i64 {
        self.revision
    }

    /// Opens the stream, within the request timeout; a fresh one also waits
    /// for its first message (the snapshot).
    async fn open(&mut self) -> Result<Live<F::Msg>, (usize, String, Error)> {
        let (picked, permit) = self.client.inner.pool.pick_for_watch();
        let start = if self.revision > 0 {
            self.revision + 1
        } else {
            0
        };
        let timeout = self.client.inner.request_timeout;
        let opened = tokio::time::timeout(timeout, async {
            let mut stream = self.feed.open(&self.client, picked.channel, start).await?;
            // A fresh watch must bring its snapshot. A resumed one with
            // nothing missed stays silent until the next change: the daemon
            // answered the call only once its subscription was in place, so
            // the stream is live (waiting for a message here reopened it
            // every request timeout).
            if start > 0 {
                return Ok::<_, tonic::Status>((stream, None));
            }
            let first = stream.message().await?.ok_or_else(|| {
                tonic::Status::unavailable("the watch ended before its first message")
            })?;
            Ok((stream, Some(first)))
        })
        .await;
        match opened {
            Ok(Ok((stream, first))) => {
                if let Some(first) = first {
                    self.apply(first);
                }
                Ok(Live {
                    stream,
                    index: picked.index,
                    uri: picked.uri,
                    _permit: permit,
                })
            }
            Ok(Err(status)) => Err((picked.index, picked.uri, Error::from(status))),
            Err(_) => Err((
                picked.index,
                picked.uri,
                Error::Server {
                    code: tonic::Code::DeadlineExceeded,
                    reason: strata_proto::v1::ErrorReason::Unavailable,
                    message: format!("no first watch message within {timeout:?}"),
                },
            )),
        }
    }

    fn apply(&mut self, msg: F::Msg) {
        let revision = F::revision(&msg);
        if !F::is_snapshot(&msg) && revision <= self.revision {
            // Already applied (a replay overlapping what we hold).
            return;
        }
        if self.source == Source::DiskCache {
            self.source = Source::Daemon;
            self.feed.set_source(Source::Daemon);
            tracing::info!(
                revision,
                "a daemon answered; watch caught up from the disk cache"
            );
        }
        self.revision = self.revision.max(revision);
        self.feed.absorb(msg);
    }

    /// Phase one, before the handle exists: the first message from a daemon,
    /// or — when every endpoint failed for the whole startup timeout — the
    /// disk cache. Errors other than unreachable daemons (an unknown tenant,
    /// a bad key) are returned as they are.
    pub(crate) async fn start(&mut self) -> Result<Option<Live<F::Msg>>, Error> {
        let client = self.client.clone();
        let pool = &client.inner.pool;
        let deadline = Instant::now() + self.client.inner.startup_timeout;
        let mut failures: u32 = 0;
        let last_error = loop {
            match self.open().await {
                Ok(live) => return Ok(Some(live)),
                Err((_, _, e)) if !e.is_transient() => return Err(e),
                Err((index, uri, e)) => {
                    pool.failed(index);
                    failures += 1;
                    let round_done = failures.is_multiple_of(pool.len() as u32);
                    if round_done && Instant::now() >= deadline {
                        break format!("{uri}: {e}");
                    }
                    if round_done {
                        let pause = pool
                            .backoff
                            .delay(failures / pool.len() as u32 - 1)
                            .min(deadline.saturating_duration_since(Instant::now()));
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        };
        if self.feed.start_from_cache() {
            self.source = Source::DiskCache;
            self.feed.set_source(Source::DiskCache);
            return Ok(None);
        }
        Err(Error::Unreachable {
            endpoints: pool.uris(),
            last_error,
        })
    }

    /// Phase two, in a background task: follow the stream for as long as
    /// the handle lives, reconnecting as described in the module docs.
    pub(crate) async fn run(mut self, mut live: Option<Live<F::Msg>>) {
        let len = self.client.inner.pool.len() as u32;
        let mut failures: u32 = 0;
        loop {
            if let Some(mut current) = live.take() {
                failures = 0;
                let ended = loop {
                    match current.stream.message().await {
                        Ok(Some(msg)) => {
                            let last = F::is_final(&msg);
                            self.apply(msg);
                            if last {
                                break "the watched tenant was deleted".to_owned();
                            }
                        }
                        Ok(None) => break "the daemon ended the stream".to_owned(),
                        Err(status) => break Error::from(status).to_string(),
                    }
                };
                self.feed.report(WatchError::Disconnected {
                    endpoint: current.uri.clone(),
                    message: ended,
                });
                metrics::counter!("strata_sdk_watch_reconnects_total").increment(1);
                self.client.inner.pool.failed(current.index);
                // A short pause even for a clean end: a daemon that is
                // restarting refuses at once, and a tight loop helps nobody.
                tokio::time::sleep(self.client.inner.pool.backoff.delay(0)).await;
            }
            match self.open().await {
                Ok(opened) => live = Some(opened),
                Err((index, uri, e)) => {
                    tracing::debug!(endpoint = %uri, error = %e, "watch reconnect failed");
                    if !e.is_transient() {
                        // E.g. the tenant is gone: say so, keep trying slowly
                        // (it may be created again).
                        self.feed.report(WatchError::Disconnected {
                            endpoint: uri,
                            message: e.to_string(),
                        });
                    }
                    self.client.inner.pool.failed(index);
                    failures = failures.saturating_add(1);
                    if failures.is_multiple_of(len) || !e.is_transient() {
                        let round = (failures / len).saturating_sub(1);
                        tokio::time::sleep(self.client.inner.pool.backoff.delay(round)).await;
                    }
                }
            }
        }
    }
}

/// Aborts a background task when dropped: handles own their watch tasks.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Spawns phase two of a watch.
pub(crate) fn spawn<F: Feed>(watch: Resumable<F>, live: Option<Live<F::Msg>>) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(watch.run(live)))
}
