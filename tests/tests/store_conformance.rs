//! The store conformance suite (`strata_server::store::conformance`) against
//! the embedded redb backend: a fresh store in a fresh temporary directory
//! per case, once with default options and once with tiny buffers.

// Test code: a failed setup step should fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use strata_server::store::Store;
use strata_server::store::conformance::{CaseSpec, Fixture};
use strata_server::store::embedded::{EmbeddedOptions, EmbeddedStore};

async fn embedded_fixture(spec: CaseSpec) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&path))
        .await
        .unwrap()
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    Fixture::new(store, spec).with_guard(dir)
}

strata_server::store_conformance_tests!(embedded, embedded_fixture);

/// The same backend with tiny batches and a tiny live-watch buffer, so that
/// watchers fall back to reading the log all the time.
async fn embedded_small_buffers_fixture(spec: CaseSpec) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let options = EmbeddedOptions {
        max_batch: 4,
        watch_buffer: 16,
    };
    let store = tokio::task::spawn_blocking(move || EmbeddedStore::open_with(&path, options))
        .await
        .unwrap()
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    Fixture::new(store, spec).with_guard(dir)
}

strata_server::store_conformance_tests!(embedded_small_buffers, embedded_small_buffers_fixture);
