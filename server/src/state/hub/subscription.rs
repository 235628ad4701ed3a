//! One subscriber's stream of messages ([`Subscription`]): what the hub
//! pushes to a group, encoded once, and the hand-written stream each
//! subscriber polls.

use super::*;

/// A message on its way to subscribers, with its birth time for latency.
#[derive(Debug)]
pub(super) struct Push<M> {
    pub(super) message: M,
    /// `message` in protobuf, encoded once for every subscriber of the
    /// group (see [`Encoded`]).
    pub(super) encoded: Bytes,
    pub(super) created: Instant,
}

impl<M: prost::Message> Push<M> {
    pub(super) fn new(message: M, created: Instant) -> Arc<Self> {
        Arc::new(Self {
            encoded: Bytes::from(message.encode_to_vec()),
            message,
            created,
        })
    }
}

/// A watch message already encoded in protobuf (without gRPC's framing).
/// A live push is encoded once per group and the bytes are shared by every
/// subscriber of the group, so a stream of these costs a subscriber a copy
/// of the bytes instead of a clone of the message and its encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded(pub Bytes);

/// What a subscription has to deliver next.
pub(super) enum Item<M> {
    /// A message of this subscriber's own (snapshot, replay, reset).
    Own(M),
    /// A live push its group shares.
    Shared(Arc<Push<M>>),
}

impl<M: prost::Message + Clone> Item<M> {
    fn is_last(&self, is_last: impl Fn(&M) -> bool) -> bool {
        match self {
            Self::Own(m) => is_last(m),
            Self::Shared(p) => is_last(&p.message),
        }
    }

    fn message(self) -> M {
        match self {
            Self::Own(m) => m,
            Self::Shared(p) => p.message.clone(),
        }
    }

    fn encoded(self) -> Encoded {
        match self {
            Self::Own(m) => Encoded(Bytes::from(m.encode_to_vec())),
            Self::Shared(p) => Encoded(p.encoded.clone()),
        }
    }
}

/// One subscriber's stream of messages: the initial snapshot or replay,
/// then live pushes. Ends after a `tenant_deleted` message, and with
/// `UNAVAILABLE` when the daemon shuts down (resume on another replica).
///
/// A hand-written [`Stream`]: one push wakes every subscriber of a group,
/// so what a poll costs is paid thousands of times per change. Polling
/// allocates nothing (the receive future's box is reused), and the shutdown
/// signal is registered once per task rather than on every poll.
pub struct Subscription<L: Lens> {
    pub(super) hub: Arc<Hub<L>>,
    /// The token this subscription is counted against.
    pub(super) owner: Option<Arc<str>>,
    pub(super) key: GroupKey<L::Selection>,
    pub(super) rx: BroadcastStream<Arc<Push<L::Message>>>,
    pub(super) pending: VecDeque<Item<L::Message>>,
    /// Live pushes at or below this revision are already covered.
    pub(super) after: Revision,
    pub(super) done: bool,
    pub(super) shutdown: CancellationToken,
    /// Wakes the stream when the daemon starts draining.
    pub(super) cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The waker `cancelled` was last polled with: polling it again takes
    /// the shutdown token's lock, which every subscription shares, so it is
    /// polled only when the stream moved to another task.
    pub(super) registered: Option<Waker>,
}

// No field is pinned structurally: the futures are boxed, so moving a
// subscription never moves them.
impl<L: Lens> Unpin for Subscription<L> {}

impl<L: Lens> Drop for Subscription<L> {
    fn drop(&mut self) {
        self.hub.metrics.subscribers.decrement(1.0);
        if let Some(owner) = &self.owner {
            self.hub.release(owner, &self.key);
        }
    }
}

/// A subscription as the stream a tonic handler returns.
pub type MessageStream<M> = Pin<Box<dyn Stream<Item = Result<M, tonic::Status>> + Send>>;

impl<L: Lens> Subscription<L> {
    /// The next message; `None` when the stream is over.
    pub async fn next(&mut self) -> Option<Result<L::Message, tonic::Status>> {
        futures::StreamExt::next(self).await
    }

    /// This subscription as a stream for tonic.
    pub fn into_stream(self) -> MessageStream<L::Message> {
        Box::pin(self)
    }

    /// Handles what the group channel delivered; a message to deliver is
    /// queued in `pending`.
    fn receive(&mut self, received: Result<Arc<Push<L::Message>>, BroadcastStreamRecvError>) {
        match received {
            Ok(push) => {
                let revision = L::revision(&push.message);
                if revision <= self.after {
                    return;
                }
                self.after = revision;
                self.hub
                    .metrics
                    .latency
                    .record(push.created.elapsed().as_secs_f64());
                self.pending.push_back(Item::Shared(push));
            }
            Err(BroadcastStreamRecvError::Lagged(_)) => {
                self.hub.metrics.resets_lagged.increment(1);
                match self.hub.join(&self.key, 0) {
                    Ok((rx, mut initial, after)) => {
                        self.rx = BroadcastStream::new(rx);
                        self.after = after;
                        for m in &mut initial {
                            L::mark_reset(m);
                        }
                        self.pending.extend(initial.into_iter().map(Item::Own));
                    }
                    Err(_) => {
                        let m = self
                            .hub
                            .deleted(&Resolution::new(), self.hub.view.revision());
                        self.pending.push_back(Item::Own(m));
                    }
                }
            }
        }
    }
}

impl<L: Lens> Subscription<L> {
    /// The next thing to deliver (see [`Stream::poll_next`]).
    fn poll_item(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Item<L::Message>, tonic::Status>>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                self.done |= item.is_last(L::is_last);
                self.hub.metrics.pushes.increment(1);
                return Poll::Ready(Some(Ok(item)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            if self.shutdown.is_cancelled() {
                self.done = true;
                return Poll::Ready(Some(Err(tonic::Status::unavailable(
                    "stratad is shutting down; resume the watch on another replica",
                ))));
            }
            match Pin::new(&mut self.rx).poll_next(cx) {
                Poll::Ready(Some(received)) => self.receive(received),
                // The group was dropped: the hub is gone.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {
                    let fresh = self
                        .registered
                        .as_ref()
                        .is_none_or(|w| !w.will_wake(cx.waker()));
                    if fresh {
                        if self.cancelled.as_mut().poll(cx).is_ready() {
                            continue;
                        }
                        self.registered = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// This subscription as a stream of encoded messages, for a codec that
    /// writes [`Encoded`] bytes as they are (see [`crate::transport::grpc`]).
    pub fn into_encoded_stream(self) -> MessageStream<Encoded> {
        Box::pin(EncodedStream(self))
    }
}

impl<L: Lens> Stream for Subscription<L> {
    type Item = Result<L::Message, tonic::Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .poll_item(cx)
            .map(|item| item.map(|r| r.map(Item::message)))
    }
}

/// A subscription yielding [`Encoded`] messages.
pub(super) struct EncodedStream<L: Lens>(Subscription<L>);

impl<L: Lens> Stream for EncodedStream<L> {
    type Item = Result<Encoded, tonic::Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .0
            .poll_item(cx)
            .map(|item| item.map(|r| r.map(Item::encoded)))
    }
}
