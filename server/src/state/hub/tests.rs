use std::time::Duration;

use super::*;
use crate::app::api::{Api, Limits, NewTenant, PutLayer};
use crate::domain::document::{Format, Mode};
use crate::state::view::JournalLimits;
use crate::store::Store;
use crate::store::embedded::EmbeddedStore;

/// A real embedded store, its view following it, a config hub and the
/// API that writes through it.
struct Rig {
    api: Api,
    hub: Arc<Hub<ConfigLens>>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let view = View::load(store.as_ref(), JournalLimits::default())
            .await
            .unwrap();
        let hub = Hub::<ConfigLens>::new(Arc::clone(&view), "m1".into(), 2);
        let shutdown = CancellationToken::new();
        tokio::spawn(Arc::clone(&view).follow(Arc::clone(&store), shutdown.clone()));
        let api = Api::new(store, view, Limits::default());
        Self {
            api,
            hub,
            shutdown,
            _dir: dir,
        }
    }

    async fn tenant(&self, name: &str, parent: &str) {
        self.api
            .create_tenant(NewTenant {
                project: "p".into(),
                name: name.into(),
                parent: parent.into(),
                ..NewTenant::default()
            })
            .await
            .unwrap();
    }

    async fn put(&self, tenant: &str, key: &str, value: &str) -> Revision {
        self.api
            .put_layer(PutLayer {
                project: "p".into(),
                tenant: tenant.into(),
                key: key.into(),
                value: value.as_bytes().to_vec(),
                format: Some(Format::Text),
                mode: Mode::Replace,
                expected_revision: None,
            })
            .await
            .unwrap()
            .1
    }

    async fn subscribe(&self, tenant: &str, key: &str) -> Subscription<ConfigLens> {
        self.hub
            .subscribe(
                "p".into(),
                tenant.into(),
                Selection::new(vec![key.into()], vec![]),
                0,
                self.shutdown.clone(),
                None,
            )
            .await
            .unwrap()
    }

    fn groups(&self) -> usize {
        self.hub
            .groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn next(s: &mut Subscription<ConfigLens>) -> WatchConfigResponse {
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("a message within 10 s")
        .expect("the stream goes on")
        .expect("a message, not an error")
}

/// A resolved value as (text, origin); `None`: the key is gone.
type Seen = Option<(String, Vec<String>)>;

/// (key, what it resolves to) for each change of a message.
fn entries(m: &WatchConfigResponse) -> Vec<(String, Seen)> {
    m.changes
        .iter()
        .map(|c| {
            let v = c.value.as_ref().map(|v| {
                (
                    String::from_utf8(v.value.clone()).unwrap(),
                    v.origin.clone(),
                )
            });
            (c.key.clone(), v)
        })
        .collect()
}

fn value(text: &str, origin: &str) -> Seen {
    Some((text.to_owned(), vec![origin.to_owned()]))
}

#[test]
fn selection_matches_keys_and_prefixes() {
    let s = Selection::new(vec!["a/x.yaml".into()], vec!["b/".into()]);
    assert!(s.matches("a/x.yaml") && s.matches("b/y") && !s.matches("a/y") && !s.matches("c"));
    assert!(Selection::new(vec![], vec![]).matches("anything"));
}

#[tokio::test]
async fn subscribers_of_one_tenant_and_key_share_one_group_and_get_the_same_push() {
    let rig = Rig::new().await;
    rig.tenant("base", "").await;
    rig.put("base", "a.txt", "v1").await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        let mut s = rig.subscribe("base", "a.txt").await;
        let snapshot = next(&mut s).await;
        assert_eq!(snapshot.kind, Kind::Snapshot as i32);
        assert_eq!(
            entries(&snapshot),
            vec![("a.txt".into(), value("v1", "base"))]
        );
        subs.push(s);
    }
    assert_eq!(rig.groups(), 1, "one group for one (tenant, selection)");
    let revision = rig.put("base", "a.txt", "v2").await;
    for s in &mut subs {
        let m = next(s).await;
        assert_eq!((m.kind, m.revision), (Kind::Change as i32, revision));
        assert_eq!(entries(&m), vec![("a.txt".into(), value("v2", "base"))]);
    }
}

#[tokio::test]
async fn tenants_with_and_without_an_override_get_their_own_pushes_and_nothing_they_cannot_see() {
    let rig = Rig::new().await;
    rig.tenant("integration", "").await;
    rig.tenant("feat-1", "integration").await;
    rig.put("integration", "a.txt", "base-1").await;
    let mut parent = rig.subscribe("integration", "a.txt").await;
    let mut child = rig.subscribe("feat-1", "a.txt").await;
    let mut child2 = rig.subscribe("feat-1", "a.txt").await;
    for s in [&mut parent, &mut child, &mut child2] {
        assert_eq!(
            entries(&next(s).await),
            vec![("a.txt".into(), value("base-1", "integration"))]
        );
    }
    assert_eq!(rig.groups(), 2, "one group per tenant");

    // The override changes only the child's view.
    let overridden = rig.put("feat-1", "a.txt", "feat").await;
    for s in [&mut child, &mut child2] {
        let m = next(s).await;
        assert_eq!(m.revision, overridden);
        assert_eq!(entries(&m), vec![("a.txt".into(), value("feat", "feat-1"))]);
    }
    // The parent's change is hidden from the child by its override.
    let hidden = rig.put("integration", "a.txt", "base-2").await;
    let m = next(&mut parent).await;
    assert_eq!(m.revision, hidden);
    assert_eq!(
        entries(&m),
        vec![("a.txt".into(), value("base-2", "integration"))]
    );
    // The parent's first push is this one: the override sent it nothing.
    assert!(overridden < hidden);

    // The next thing the children see is the override going away, not
    // the hidden change.
    let removed = rig
        .api
        .delete_layer("p", "feat-1", "a.txt", None)
        .await
        .unwrap();
    for s in [&mut child, &mut child2] {
        let m = next(s).await;
        assert_eq!(m.revision, removed, "no push for the hidden change");
        assert_eq!(
            entries(&m),
            vec![("a.txt".into(), value("base-2", "integration"))]
        );
    }
    // Removing the override does not change the parent's view: its next
    // push is the next change of its own.
    let last = rig.put("integration", "a.txt", "base-3").await;
    let m = next(&mut parent).await;
    assert_eq!(
        m.revision, last,
        "no push for the child's override going away"
    );
    assert_eq!(
        entries(&m),
        vec![("a.txt".into(), value("base-3", "integration"))]
    );
}

#[tokio::test]
async fn a_stream_ends_with_unavailable_when_the_daemon_shuts_down() {
    let rig = Rig::new().await;
    rig.tenant("base", "").await;
    let mut s = rig.subscribe("base", "a.txt").await;
    assert_eq!(next(&mut s).await.kind, Kind::Snapshot as i32);
    let waiting = tokio::spawn(async move {
        let end = s.next().await;
        (end, s.next().await)
    });
    // Let the stream register for the signal first.
    tokio::time::sleep(Duration::from_millis(50)).await;
    rig.shutdown.cancel();
    let (end, after) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap();
    let status = end.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(after.is_none(), "the stream is over");
}

#[tokio::test]
async fn groups_without_subscribers_are_dropped() {
    let rig = Rig::new().await;
    rig.tenant("base", "").await;
    let mut s = rig.subscribe("base", "a.txt").await;
    next(&mut s).await;
    assert_eq!(rig.groups(), 1);
    drop(s);
    // The next revision sweeps the group away.
    rig.put("base", "b.txt", "x").await;
    assert_eq!(rig.groups(), 0);
}

#[tokio::test]
async fn encoded_streams_carry_the_same_messages_and_share_one_encoding_per_push() {
    use prost::Message as _;
    let rig = Rig::new().await;
    rig.tenant("base", "").await;
    rig.put("base", "a.txt", "v1").await;
    let mut plain = rig.subscribe("base", "a.txt").await;
    let mut encoded = Vec::new();
    for _ in 0..2 {
        encoded.push(rig.subscribe("base", "a.txt").await.into_encoded_stream());
    }
    let snapshot = next(&mut plain).await;
    for s in &mut encoded {
        let bytes = futures::StreamExt::next(s).await.unwrap().unwrap().0;
        assert_eq!(WatchConfigResponse::decode(bytes).unwrap(), snapshot);
    }
    rig.put("base", "a.txt", "v2").await;
    let push = next(&mut plain).await;
    let mut seen = Vec::new();
    for s in &mut encoded {
        let bytes = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(s))
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .0;
        assert_eq!(WatchConfigResponse::decode(bytes.clone()).unwrap(), push);
        seen.push(bytes);
    }
    // Both subscribers were handed the very same buffer.
    assert_eq!(seen[0].as_ptr(), seen[1].as_ptr());
}

/// The threat model's "Unbounded watches" (docs/security.md): a token holds a bounded number of
/// distinct selections (each keeps its own resolved copy); the same
/// selection again is free, and closing one frees its slot.
#[tokio::test]
async fn a_token_watches_a_bounded_number_of_selections_finding_6() {
    let rig = Rig::new().await;
    rig.tenant("base", "").await;
    let owner: Arc<str> = "t1".into();
    let watch = |key: &str| {
        rig.hub.subscribe(
            "p".into(),
            "base".into(),
            Selection::new(vec![key.into()], vec![]),
            0,
            rig.shutdown.clone(),
            Some(Arc::clone(&owner)),
        )
    };
    let a = watch("a").await.unwrap();
    let _b = watch("b").await.unwrap();
    let _a_again = watch("a").await.unwrap();
    let Err(refused) = watch("c").await else {
        panic!("a third distinct selection must be refused");
    };
    assert_eq!(refused.reason, ErrorReason::LimitExceeded);
    assert!(
        refused
            .to_string()
            .contains("limits.max_watch_selections_per_token"),
        "{refused}"
    );
    // Another token is not charged for this one's selections.
    rig.hub
        .subscribe(
            "p".into(),
            "base".into(),
            Selection::new(vec!["c".into()], vec![]),
            0,
            rig.shutdown.clone(),
            Some("t2".into()),
        )
        .await
        .unwrap();
    drop(a);
    assert!(watch("c").await.is_err(), "'a' is still watched once");
    drop(_a_again);
    watch("c").await.unwrap();
}

/// Finding 6: a start revision this replica never reaches is refused
/// after a bounded wait instead of parking the stream forever.
#[tokio::test]
async fn a_start_revision_from_the_future_is_refused_finding_6() {
    let rig = Rig::new().await;
    rig.tenant("base", "").await;
    let started = std::time::Instant::now();
    let Err(refused) = rig
        .hub
        .subscribe(
            "p".into(),
            "base".into(),
            Selection::new(vec!["a".into()], vec![]),
            i64::MAX / 2,
            rig.shutdown.clone(),
            None,
        )
        .await
    else {
        panic!("a revision from the future must be refused");
    };
    assert_eq!(refused.reason, ErrorReason::Unavailable);
    assert!(
        refused.to_string().contains("ahead of this replica"),
        "{refused}"
    );
    assert!(started.elapsed() < CATCH_UP_WAIT + std::time::Duration::from_secs(5));
}
