//! The shutdown signal every serving loop waits on. Its own module, below
//! the loops, so that they need nothing from the crate root that starts
//! them.

use tokio::sync::watch;

/// A shutdown signal the serving loops wait on.
#[derive(Debug, Clone)]
pub struct Shutdown(pub(crate) watch::Receiver<bool>);

impl Shutdown {
    /// Resolves once shutdown began (or its sender is gone).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}
