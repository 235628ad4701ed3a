//! The tests' face of the shared etcd cluster harness
//! ([`strata_testkit::etcd`], which the load generators use too): where a
//! test's cluster lives, the panicking calls a test wants, and the policy
//! for a missing etcd binary.
//!
//! Every member is killed when the [`EtcdCluster`] drops; a cluster kept in
//! a `static` is cleaned up by the kit's janitor when the test binary exits.
//!
//! Without the `etcd` binary, [`etcd_available`] fails loudly under CI (the
//! `CI` variable is set) and otherwise tells the caller to skip, after
//! printing why.

use std::io::Write;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;

pub use strata_testkit::etcd::{DEFAULT_ETCD_BIN, EtcdSettings, TestCerts, etcd_bin};

/// Whether a test that needs etcd can run. When the binary is missing this
/// panics if `CI` is set (a CI run must never skip silently), and otherwise
/// prints a loud message naming `test` and returns false so it can skip.
pub fn etcd_available(test: &str) -> bool {
    if etcd_bin().is_some() {
        return true;
    }
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    assert!(
        !ci,
        "etcd not found ({DEFAULT_ETCD_BIN}, $ETCD_BIN or PATH) and CI is set: install the \
         Debian package etcd-server (./scripts/test.sh does) instead of skipping {test}"
    );
    // Straight to the stderr stream: libtest swallows `eprintln!` output of
    // passing tests, and this must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!! SKIPPED {test}: etcd not found ({DEFAULT_ETCD_BIN}, $ETCD_BIN or PATH); \
         install etcd-server (./scripts/test.sh does) to run it !!!!!\n"
    );
    false
}

/// A temporary directory on tmpfs when there is one: etcd fsyncs every
/// commit, and on tmpfs that costs nothing, which keeps tests fast.
fn temp_dir() -> TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::Builder::new()
            .prefix("strata-etcd-")
            .tempdir_in(shm)
    {
        return dir;
    }
    tempfile::Builder::new()
        .prefix("strata-etcd-")
        .tempdir()
        .expect("temporary directory for etcd")
}

/// A running etcd cluster of the kit whose waits panic (with the member's
/// log) instead of returning errors; everything else is the kit's
/// [`strata_testkit::etcd::EtcdCluster`], reached through `Deref`.
#[derive(Debug)]
pub struct EtcdCluster(strata_testkit::etcd::EtcdCluster);

impl Deref for EtcdCluster {
    type Target = strata_testkit::etcd::EtcdCluster;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for EtcdCluster {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl EtcdCluster {
    /// Starts `members` members with default settings and waits until every
    /// one reports healthy. Panics when etcd is missing or does not start.
    pub async fn start(members: usize) -> Self {
        Self::start_with(members, EtcdSettings::default()).await
    }

    /// Starts a cluster with these settings, in a temporary directory on
    /// tmpfs when there is one.
    pub async fn start_with(members: usize, settings: EtcdSettings) -> Self {
        let bin = etcd_bin().expect("etcd binary (check etcd_available first)");
        // Ports are picked free and bound by etcd a moment later; another
        // test may take one in between. That race, and only it, is retried
        // with fresh ports.
        const ATTEMPTS: usize = 3;
        let mut attempt = 1;
        loop {
            match strata_testkit::etcd::EtcdCluster::start(
                &bin,
                temp_dir(),
                members,
                settings.clone(),
            )
            .await
            {
                Ok(cluster) => return Self(cluster),
                Err(e) => {
                    let message = e.to_string();
                    let race = message.contains("address already in use")
                        || message.contains("Address already in use");
                    if race && attempt < ATTEMPTS {
                        eprintln!("etcd: a port was taken before it was bound; starting again");
                        attempt += 1;
                        continue;
                    }
                    // The message carries the member's log.
                    panic!("etcd cluster of {members}: {e}");
                }
            }
        }
    }

    /// Starts member `i` again on its ports and data directory (after
    /// `stop` or `kill`) and waits until healthy; panics when it does not
    /// come back.
    pub async fn restart(&mut self, i: usize) {
        if let Err(e) = self.0.restart(i).await {
            panic!("{e}");
        }
    }

    /// Waits until member `i` answers `/health` with `true`; panics with its
    /// log after `timeout`.
    pub async fn wait_healthy(&mut self, i: usize, timeout: Duration) {
        if let Err(e) = self.0.wait_healthy(i, timeout).await {
            panic!("{e}");
        }
    }

    /// Waits until some running member leads; panics after `timeout`.
    pub async fn wait_leader(&mut self, timeout: Duration) -> usize {
        self.0
            .wait_leader(timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}
