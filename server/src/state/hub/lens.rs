//! What a watch selects ([`Selection`]) and how a kind of watch resolves
//! and reports it ([`Lens`]; [`ConfigLens`] for config keys), and the
//! resolution and diff the hub runs per group.

use super::*;

/// What a subscriber watches: exact keys and key prefixes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selection {
    pub(super) keys: Vec<String>,
    pub(super) prefixes: Vec<String>,
}

impl Selection {
    /// A selection (order and duplicates do not matter). Nothing selected
    /// means every key.
    pub fn new(mut keys: Vec<String>, mut prefixes: Vec<String>) -> Self {
        if keys.is_empty() && prefixes.is_empty() {
            prefixes.push(String::new());
        }
        keys.sort();
        keys.dedup();
        prefixes.sort();
        prefixes.dedup();
        Self { keys, prefixes }
    }

    /// Whether `key` is selected.
    pub fn matches(&self, key: &str) -> bool {
        self.keys.binary_search_by(|k| k.as_str().cmp(key)).is_ok()
            || self.prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }
}

/// Resolved entries of a selection by name (config key, service name).
pub type Resolution<V> = BTreeMap<String, V>;

/// What one change means for a selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affects<'c> {
    /// Nothing selected can have changed.
    Nothing,
    /// The entry with this name may have changed.
    Name(&'c str),
    /// Anything may have changed (the tenant chain itself changed).
    Everything,
}

/// The frame of a message: everything but its entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Replica that sends it.
    pub member: String,
    /// A whole view (`true`) or the entries that changed.
    pub snapshot: bool,
    /// Revision the message brings the subscriber to.
    pub revision: Revision,
    /// A snapshot replacing what the subscriber held (history lost).
    pub reset: bool,
    /// The subscriber's tenant was deleted; the last message.
    pub tenant_deleted: bool,
}

/// A kind of watch: what a subscriber selects, how it resolves, and the
/// messages it is sent.
pub trait Lens: Send + Sync + 'static {
    /// What a subscriber selects.
    type Selection: Clone + Eq + Hash + Send + Sync + 'static;
    /// One resolved entry.
    type Value: Clone + Send + Sync + 'static;
    /// The message on the wire.
    type Message: prost::Message + Clone + Send + Sync + 'static;

    /// Name of the kind, for metrics labels.
    const NAME: &'static str;

    /// Every selected entry that exists for `chain`, resolved.
    fn resolve_all(
        p: &ProjectView,
        chain: &[&str],
        selection: &Self::Selection,
    ) -> Resolution<Self::Value>;
    /// One entry resolved; `None` when it does not exist.
    fn resolve_one(p: &ProjectView, chain: &[&str], name: &str) -> Option<Self::Value>;
    /// What `change` (to a tenant of the subscriber's chain) may change.
    fn affects<'c>(change: &'c Change, selection: &Self::Selection) -> Affects<'c>;
    /// Whether a subscriber would see a difference between two values.
    fn same(a: &Self::Value, b: &Self::Value) -> bool;
    /// A message: `entries` are (name, new value; `None` = gone).
    fn message(frame: Frame, entries: Vec<(String, Option<Self::Value>)>) -> Self::Message;
    /// The revision a message brings the subscriber to.
    fn revision(message: &Self::Message) -> Revision;
    /// Whether a message is the last one (the tenant was deleted).
    fn is_last(message: &Self::Message) -> bool;
    /// Marks a snapshot as a reset.
    fn mark_reset(message: &mut Self::Message);
}

/// The config watch: resolved keys and prefixes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConfigLens;

impl Lens for ConfigLens {
    type Selection = Selection;
    type Value = ResolvedValue;
    type Message = WatchConfigResponse;

    const NAME: &'static str = "config";

    fn resolve_all(
        p: &ProjectView,
        chain: &[&str],
        selection: &Selection,
    ) -> Resolution<ResolvedValue> {
        p.selected_keys(chain, &selection.keys, &selection.prefixes)
            .into_iter()
            .filter_map(|k| resolve_key(p, chain, &k).map(|v| (k, v)))
            .collect()
    }

    fn resolve_one(p: &ProjectView, chain: &[&str], key: &str) -> Option<ResolvedValue> {
        resolve_key(p, chain, key)
    }

    fn affects<'c>(change: &'c Change, selection: &Selection) -> Affects<'c> {
        match &change.object {
            Object::Layer(k) if selection.matches(k) => Affects::Name(k),
            Object::Tenant => Affects::Everything,
            // Other keys, and registry objects: not in this view.
            _ => Affects::Nothing,
        }
    }

    fn same(a: &ResolvedValue, b: &ResolvedValue) -> bool {
        a.value == b.value && a.format == b.format && a.origin == b.origin
    }

    fn message(frame: Frame, entries: Vec<(String, Option<ResolvedValue>)>) -> WatchConfigResponse {
        WatchConfigResponse {
            header: Some(ResponseHeader {
                revision: frame.revision,
                member: frame.member,
            }),
            kind: if frame.snapshot {
                Kind::Snapshot
            } else {
                Kind::Change
            } as i32,
            revision: frame.revision,
            reset: frame.reset,
            changes: entries
                .into_iter()
                .map(|(key, value)| ConfigChange { key, value })
                .collect(),
            tenant_deleted: frame.tenant_deleted,
        }
    }

    fn revision(message: &WatchConfigResponse) -> Revision {
        message.revision
    }

    fn is_last(message: &WatchConfigResponse) -> bool {
        message.tenant_deleted
    }

    fn mark_reset(message: &mut WatchConfigResponse) {
        message.reset = true;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct GroupKey<S> {
    pub(super) project: String,
    pub(super) tenant: String,
    pub(super) selection: S,
}

pub(super) fn resolve_key(p: &ProjectView, chain: &[&str], key: &str) -> Option<ResolvedValue> {
    match p.resolve(chain, key) {
        Ok(Some(r)) => Some(ResolvedValue {
            key: key.to_owned(),
            value: r.value,
            format: r.format.name().to_owned(),
            origin: r.origin,
            mod_revision: r.mod_revision,
        }),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(key, error = %e, "key cannot be resolved; left out of watch pushes");
            None
        }
    }
}

/// The resolved selection, or `None` when the tenant does not exist.
pub(super) fn resolve_selection<L: Lens>(
    p: Option<&ProjectView>,
    tenant: &str,
    selection: &L::Selection,
) -> Option<Resolution<L::Value>> {
    let p = p?;
    let chain = p.chain(tenant)?;
    Some(L::resolve_all(p, &chain, selection))
}

/// Entries that turn `old` into `new`, by name.
pub(super) fn diff<L: Lens>(
    old: &Resolution<L::Value>,
    new: &Resolution<L::Value>,
) -> Vec<(String, Option<L::Value>)> {
    let mut changes = Vec::new();
    for (name, value) in new {
        if old.get(name).is_none_or(|o| !L::same(o, value)) {
            changes.push((name.clone(), Some(value.clone())));
        }
    }
    for name in old.keys() {
        if !new.contains_key(name) {
            changes.push((name.clone(), None));
        }
    }
    changes.sort_by(|a, b| a.0.cmp(&b.0));
    changes
}
