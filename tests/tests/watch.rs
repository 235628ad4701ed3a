//! `ConfigService.Watch` against a real daemon: pushes follow the
//! subscriber's *resolved* view, resume replays exactly what was missed, and
//! a resume beyond the kept history gets a reset snapshot.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed step should fail loudly

use std::time::Duration;

use strata_proto::v1::config_service_client::ConfigServiceClient;
use strata_proto::v1::tenant_service_client::TenantServiceClient;
use strata_proto::v1::watch_config_response::Kind;
use strata_proto::v1::{
    CreateTenantRequest, DeleteLayerRequest, DeleteTenantRequest, PutConfigRequest,
    WatchConfigRequest, WatchConfigResponse,
};
use strata_tests::AuthChannel as Channel;
use strata_tests::Daemon;
use tonic::Streaming;

struct Fixture {
    config: ConfigServiceClient<Channel>,
    tenants: TenantServiceClient<Channel>,
}

impl Fixture {
    async fn new(daemon: &Daemon) -> Self {
        let channel = daemon.channel().await;
        Self {
            config: ConfigServiceClient::new(channel.clone()),
            tenants: TenantServiceClient::new(channel),
        }
    }

    async fn tenant(&mut self, name: &str, parent: &str) {
        self.tenants
            .create_tenant(CreateTenantRequest {
                project: "vega".into(),
                name: name.into(),
                parent: parent.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn put(&mut self, tenant: &str, key: &str, value: &str, mode: &str) -> i64 {
        self.config
            .put_config(PutConfigRequest {
                project: "vega".into(),
                tenant: tenant.into(),
                key: key.into(),
                value: value.as_bytes().to_vec(),
                format: "yaml".into(),
                mode: mode.into(),
                expected_revision: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .header
            .unwrap()
            .revision
    }

    async fn delete_layer(&mut self, tenant: &str, key: &str) -> i64 {
        self.config
            .delete_layer(DeleteLayerRequest {
                project: "vega".into(),
                tenant: tenant.into(),
                key: key.into(),
                expected_revision: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .header
            .unwrap()
            .revision
    }

    async fn watch(&mut self, tenant: &str, start_revision: i64) -> Streaming<WatchConfigResponse> {
        self.config
            .watch(WatchConfigRequest {
                project: "vega".into(),
                tenant: tenant.into(),
                keys: vec![],
                prefixes: vec![String::new()],
                start_revision,
            })
            .await
            .unwrap()
            .into_inner()
    }
}

async fn next(stream: &mut Streaming<WatchConfigResponse>) -> WatchConfigResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a push within 10 s")
        .unwrap()
        .expect("stream still open")
}

/// (key, first origin or "-" when removed) of a message.
fn summary(m: &WatchConfigResponse) -> Vec<(String, String)> {
    m.changes
        .iter()
        .map(|c| {
            let origin = c
                .value
                .as_ref()
                .map_or("-".to_owned(), |v| v.origin.join("+"));
            (c.key.clone(), origin)
        })
        .collect()
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[tokio::test]
async fn pushes_follow_the_resolved_view_and_resume_replays_exactly_what_was_missed() {
    let daemon = Daemon::start().await;
    let mut f = Fixture::new(&daemon).await;
    f.tenant("integration", "").await;
    f.tenant("feat-1", "integration").await;
    for k in ["a", "b", "c", "d"] {
        f.put("integration", k, &format!("v: {k}"), "").await;
    }
    f.put("feat-1", "a", "v: mine", "").await;

    let mut live = f.watch("feat-1", 0).await;
    let snapshot = next(&mut live).await;
    assert_eq!(snapshot.kind, Kind::Snapshot as i32);
    assert!(!snapshot.reset);
    assert_eq!(
        summary(&snapshot),
        pairs(&[
            ("a", "feat-1"),
            ("b", "integration"),
            ("c", "integration"),
            ("d", "integration")
        ])
    );

    // A change hidden by feat-1's replace layer sends nothing; the next push
    // is the visible change that follows it.
    let hidden = f.put("integration", "a", "v: changed-below", "").await;
    let visible = f.put("integration", "b", "v: b2", "").await;
    let m = next(&mut live).await;
    assert_eq!(
        (m.revision, summary(&m)),
        (visible, pairs(&[("b", "integration")]))
    );
    assert!(hidden < visible);
    let resume_from = m.revision + 1;

    // Changes while a second subscriber is away: an override appears, a
    // merge layer patches, a tombstone hides, the override disappears, and a
    // hidden change happens again.
    let mut expected = Vec::new();
    let r = f.put("feat-1", "b", "v: override", "").await;
    expected.push((r, pairs(&[("b", "feat-1")])));
    let r = f.put("feat-1", "d", "{\"extra\": 1}", "merge").await;
    expected.push((r, pairs(&[("d", "feat-1+integration")])));
    let r = f.put("feat-1", "c", "", "delete").await;
    expected.push((r, pairs(&[("c", "-")])));
    f.put("integration", "a", "v: hidden-again", "").await;
    let r = f.delete_layer("feat-1", "b").await;
    expected.push((r, pairs(&[("b", "integration")])));

    let mut seen_live = Vec::new();
    for _ in 0..expected.len() {
        let m = next(&mut live).await;
        assert_eq!(m.kind, Kind::Change as i32);
        seen_live.push((m.revision, summary(&m)));
    }
    assert_eq!(seen_live, expected, "live pushes");

    let mut resumed = f.watch("feat-1", resume_from).await;
    let mut seen_resumed = Vec::new();
    for _ in 0..expected.len() {
        let m = next(&mut resumed).await;
        assert_eq!(
            m.kind,
            Kind::Change as i32,
            "a replay, not a snapshot: {m:?}"
        );
        seen_resumed.push((m.revision, summary(&m)));
    }
    assert_eq!(
        seen_resumed, expected,
        "resume yields exactly the missed changes"
    );

    // Both streams then see the same next change, once.
    let r = f.put("integration", "d", "v: d2", "").await;
    for stream in [&mut live, &mut resumed] {
        let m = next(stream).await;
        assert_eq!(
            (m.revision, summary(&m)),
            (r, pairs(&[("d", "feat-1+integration")]))
        );
    }

    // Resuming when nothing was missed sends nothing until the next change.
    let mut caught_up = f.watch("feat-1", r + 1).await;
    let r2 = f.put("integration", "c", "v: c2", "").await;
    f.put("feat-1", "c", "v: back", "").await;
    let m = next(&mut caught_up).await;
    assert_eq!(
        summary(&m),
        pairs(&[("c", "feat-1")]),
        "the change at {r2} is hidden by the tombstone"
    );

    // Deleting the tenant tells its subscribers and ends their streams.
    f.tenants
        .delete_tenant(DeleteTenantRequest {
            project: "vega".into(),
            name: "feat-1".into(),
            force: false,
        })
        .await
        .unwrap();
    for stream in [&mut live, &mut resumed, &mut caught_up] {
        let mut m = next(stream).await;
        while !m.tenant_deleted {
            m = next(stream).await;
        }
        assert_eq!(m.changes.len(), 4, "every key is removed: {m:?}");
        assert!(m.changes.iter().all(|c| c.value.is_none()));
        let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap()
            .unwrap();
        assert!(end.is_none(), "stream ends after tenant deletion");
    }
}

#[tokio::test]
async fn resume_beyond_kept_history_gets_a_reset_snapshot() {
    let daemon = Daemon::builder()
        .env("STRATA_WATCH_JOURNAL_REVISIONS", "5")
        .start()
        .await;
    let mut f = Fixture::new(&daemon).await;
    f.tenant("integration", "").await;
    let first = f.put("integration", "k", "v: 0", "").await;
    for i in 1..=10 {
        f.put("integration", "k", &format!("v: {i}"), "").await;
    }
    let mut stream = f.watch("integration", first + 1).await;
    let m = next(&mut stream).await;
    assert_eq!(m.kind, Kind::Snapshot as i32);
    assert!(m.reset, "history no longer kept: {m:?}");
    assert_eq!(m.changes.len(), 1);
    assert_eq!(m.changes[0].value.as_ref().unwrap().value, b"v: 10");

    // A resume inside the kept history is still a replay.
    let last = f.put("integration", "k", "v: 11", "").await;
    let m = next(&mut stream).await;
    assert_eq!(m.revision, last);
    let mut replay = f.watch("integration", last).await;
    let m = next(&mut replay).await;
    assert_eq!(
        (m.kind, m.revision, m.reset),
        (Kind::Change as i32, last, false)
    );
}

#[tokio::test]
async fn watching_an_unknown_tenant_is_not_found() {
    let daemon = Daemon::start().await;
    let mut f = Fixture::new(&daemon).await;
    let err = f
        .config
        .watch(WatchConfigRequest {
            project: "vega".into(),
            tenant: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}
