//! The store conformance suite (`strata_server::store::conformance`) against
//! the etcd backend on a real 3-member etcd cluster, started once for this
//! test binary.
//!
//! Every case gets its own store client with its own key prefix. Shared
//! cases run side by side. Exclusive cases assert cluster-wide facts (exact
//! revision steps, compaction) that no prefix can isolate, since revisions
//! and compaction belong to the whole cluster; so every case holds a gate:
//! shared cases share it, an exclusive case takes it alone and runs while
//! nothing else writes. A compaction done by an exclusive case is below
//! every revision a later case uses, so it cannot disturb them.
//!
//! Without etcd the cases fail under CI and skip loudly elsewhere.

// Test code: a failed setup step should fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use strata_server::store::Store;
use strata_server::store::conformance::{CaseSpec, Fixture, Isolation};
use strata_server::store::etcd::{EtcdOptions, EtcdStore};
use strata_tests::etcd::{EtcdCluster, etcd_available};
use tokio::sync::{OnceCell, RwLock};

static CLUSTER: OnceCell<EtcdCluster> = OnceCell::const_new();
static GATE: RwLock<()> = RwLock::const_new(());

async fn cluster() -> &'static EtcdCluster {
    CLUSTER.get_or_init(|| EtcdCluster::start(3)).await
}

async fn etcd_fixture(spec: CaseSpec) -> Option<Fixture> {
    if !etcd_available(spec.name) {
        return None;
    }
    let endpoints = cluster().await.endpoints();
    let guard: Box<dyn Any + Send + Sync> = match spec.isolation {
        Isolation::Shared => Box::new(GATE.read().await),
        Isolation::Exclusive => Box::new(GATE.write().await),
    };
    static N: AtomicU64 = AtomicU64::new(0);
    let prefix = format!("/conformance-{}/", N.fetch_add(1, Ordering::Relaxed));
    let store = EtcdStore::connect(EtcdOptions::new(endpoints).with_prefix(prefix))
        .await
        .expect("connect to the test cluster");
    let store: Arc<dyn Store> = Arc::new(store);
    Some(Fixture::new(store, spec).with_guard(guard))
}

strata_server::store_conformance_tests!(etcd, etcd_fixture);
