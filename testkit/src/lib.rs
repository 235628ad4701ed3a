//! `strata-testkit`: real processes on loopback ports that both the
//! end-to-end tests (`strata-tests`) and the load generators
//! (`strata-benches`) start — one implementation, so that a fix to how they
//! start, wait for or clean up a process reaches both.
//!
//! - [`etcd`]: a real etcd cluster (members on free loopback ports, health
//!   and leader checks, stop/kill/restart, a janitor so that no member
//!   outlives the process that started it);
//! - [`http`]: the one-shot HTTP/1.1 GET those checks need.
//!
//! Every fallible call returns a [`BoxError`] rather than panicking: the
//! tests turn errors into panics in their own harness, the load generators
//! report them.

pub mod etcd;
pub mod http;

/// Error type of the kit.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A loopback port that was free a moment ago (another process may take it
/// before the caller binds it; callers that care retry).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
