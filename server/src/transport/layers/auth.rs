//! The authentication middleware: every request's bearer token becomes a
//! [`Principal`] in its extensions (see [`crate::app::auth`] for the rules),
//! and open streams end when their token is revoked or expires.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::app::auth::{AuthMode, Authenticator, Principal};

/// Paths served without a token: liveness, readiness, gRPC health and
/// reflection (the schema is public; every call it describes needs a token).
fn is_open_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz")
        || path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.")
}

/// The authentication middleware (see the module documentation).
pub async fn authenticate(
    State(auth): State<Arc<Authenticator>>,
    mut request: Request,
    next: Next,
) -> Response {
    if auth.mode() == AuthMode::Off {
        request.extensions_mut().insert(Principal::anonymous());
        return next.run(request).await;
    }
    let path = request.uri().path();
    if is_open_path(path) || (path == "/metrics" && !auth.metrics_need_token) {
        return next.run(request).await;
    }
    match auth.authenticate_headers(request.headers()) {
        Ok(principal) => {
            let streaming = crate::transport::grpc_methods::is_streaming_grpc(&request);
            let token = Arc::clone(&principal.token_id);
            request.extensions_mut().insert(principal);
            let response = next.run(request).await;
            if streaming {
                // A stream outlives the check made when it opened: it ends
                // when its token is revoked or expires.
                response.map(|body| {
                    axum::body::Body::new(RevocableBody::new(body, Arc::clone(&auth), token))
                })
            } else {
                response
            }
        }
        Err(error) => {
            if crate::transport::grpc_methods::is_grpc(request.headers()) {
                tonic::Status::from(error).into_http()
            } else {
                let mut response = error.into_response();
                if response.status() == http::StatusCode::UNAUTHORIZED {
                    response.headers_mut().insert(
                        http::header::WWW_AUTHENTICATE,
                        http::HeaderValue::from_static("Bearer"),
                    );
                }
                response
            }
        }
    }
}

/// A streaming response that ends, with `UNAUTHENTICATED` in its trailers,
/// once its token is revoked or expires (checked whenever the token table
/// changes, and at the expiry).
///
/// One push to thousands of watch streams polls every one of them, so a
/// poll must not touch anything the streams share: the table's version is
/// read with one atomic load, and the wake-up on a change is registered
/// only when the stream's waker changes (as `hub::Subscription` does for
/// shutdown), not on every poll.
struct RevocableBody {
    inner: axum::body::Body,
    auth: Arc<Authenticator>,
    token: Arc<str>,
    /// The token table's version this stream last checked.
    changes: tokio::sync::watch::Receiver<u64>,
    /// Completes on the next change after `changes`' version.
    wakeup: std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
    /// The waker `wakeup` was last polled with.
    registered: Option<std::task::Waker>,
    expiry: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Set once the closing trailers went out.
    ended: bool,
}

/// A future completing on the next change of the token table after what
/// `changes` has seen.
fn next_change(
    changes: &tokio::sync::watch::Receiver<u64>,
) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>> {
    let mut changes = changes.clone();
    Box::pin(async move {
        // An error means the table is gone with the daemon: never wake.
        if changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    })
}

impl RevocableBody {
    fn new(inner: axum::body::Body, auth: Arc<Authenticator>, token: Arc<str>) -> Self {
        let mut changes = auth.changes();
        changes.borrow_and_update();
        let wakeup = next_change(&changes);
        let mut body = Self {
            inner,
            auth,
            token,
            changes,
            wakeup,
            registered: None,
            expiry: None,
            ended: false,
        };
        if let Ok(expires) = body.auth.validity(&body.token) {
            body.set_expiry(expires);
        }
        body
    }

    fn set_expiry(&mut self, expires_at_unix_ms: i64) {
        self.expiry = (expires_at_unix_ms != 0).then(|| {
            let left = expires_at_unix_ms.saturating_sub(crate::store::unix_now_ms());
            let left = Duration::from_millis(u64::try_from(left).unwrap_or(0));
            Box::pin(tokio::time::sleep(left))
        });
    }

    /// Re-checks the token after a change of the table; `Err` with why the
    /// stream must end.
    fn recheck(&mut self) -> Result<(), &'static str> {
        self.changes.borrow_and_update();
        self.wakeup = next_change(&self.changes);
        self.registered = None;
        let expires = self.auth.validity(&self.token)?;
        self.set_expiry(expires);
        Ok(())
    }

    /// The trailers that end the stream.
    fn closing(&mut self, why: &str) -> http_body::Frame<axum::body::Bytes> {
        self.ended = true;
        let status = tonic::Status::unauthenticated(format!(
            "token {} {why}; this stream is closed",
            self.token
        ));
        let mut trailers = http::HeaderMap::new();
        // Only fails for a message that cannot be a header value, which
        // ours (hex id, fixed words) never is.
        let _ = status.add_header(&mut trailers);
        http_body::Frame::trailers(trailers)
    }
}

impl http_body::Body for RevocableBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            if this.changes.has_changed().unwrap_or(false)
                && let Err(why) = this.recheck()
            {
                return Poll::Ready(Some(Ok(this.closing(why))));
            }
            if this
                .registered
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                break;
            }
            if this.wakeup.as_mut().poll(cx).is_pending() {
                this.registered = Some(cx.waker().clone());
                break;
            }
            // Changed between the check and the poll: check again.
        }
        if let Some(expiry) = &mut this.expiry
            && expiry.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Some(Ok(this.closing("has expired"))));
        }
        std::pin::Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }
}
