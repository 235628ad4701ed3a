//! The journal: what changed at each recent revision, with before-images,
//! so the hub can roll a project back and replay what a resuming watcher
//! missed.

use super::*;

/// A domain object as it was or is (for undo and replay).
#[derive(Debug, Clone, PartialEq)]
pub enum Image {
    /// A tenant.
    Tenant(TenantEntry),
    /// A config layer.
    Layer(LayerEntry),
    /// A service instance.
    Instance(InstanceEntry),
    /// A probe verdict.
    Health(HealthEntry),
}

/// Which object of a tenant changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// The tenant itself.
    Tenant,
    /// Its layer of a config key.
    Layer(String),
    /// An instance of a service.
    Instance {
        /// Service.
        service: String,
        /// Instance id.
        id: String,
    },
    /// The probe verdict on an instance of a service.
    Health {
        /// Service.
        service: String,
        /// Instance id.
        id: String,
    },
}

impl Object {
    /// The service, for instance and health objects.
    pub fn service(&self) -> Option<&str> {
        match self {
            Object::Instance { service, .. } | Object::Health { service, .. } => Some(service),
            Object::Tenant | Object::Layer(_) => None,
        }
    }
}

/// One object changed at one revision, with its images before and after.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Project.
    pub project: String,
    /// Tenant (for tenant objects: the tenant itself).
    pub tenant: String,
    /// The object of the tenant that changed.
    pub object: Object,
    /// The object before the revision (`None`: it did not exist).
    pub before: Option<Image>,
    /// The object after the revision (`None`: it was deleted).
    pub after: Option<Image>,
}

/// Every domain change of one revision.
#[derive(Debug, Clone, PartialEq)]
pub struct JournalEntry {
    /// The revision.
    pub revision: Revision,
    /// Changes in the order the store applied them.
    pub changes: Vec<Change>,
}

impl JournalEntry {
    fn approx_bytes(&self) -> usize {
        let image = |i: &Option<Image>| match i {
            Some(Image::Layer(l)) => l.value.len() + 64,
            Some(Image::Tenant(_) | Image::Health(_)) => 128,
            Some(Image::Instance(i)) => 256 + i.record.metadata.len() * 64,
            None => 0,
        };
        self.changes
            .iter()
            .map(|c| 96 + image(&c.before) + image(&c.after))
            .sum()
    }
}

/// How much recent history the view keeps for replaying watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalLimits {
    /// Most revisions kept.
    pub max_revisions: usize,
    /// Most bytes of before/after images kept (approximate).
    pub max_bytes: usize,
}

impl Default for JournalLimits {
    fn default() -> Self {
        Self {
            max_revisions: 100_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

pub(super) fn set_nested<T>(
    map: &mut BTreeMap<String, ByService<T>>,
    tenant: &str,
    service: &str,
    id: &str,
    entry: Option<T>,
) {
    match entry {
        Some(entry) => {
            map.entry(tenant.to_owned())
                .or_default()
                .entry(service.to_owned())
                .or_default()
                .insert(id.to_owned(), entry);
        }
        None => {
            let Some(services) = map.get_mut(tenant) else {
                return;
            };
            if let Some(ids) = services.get_mut(service) {
                ids.remove(id);
                if ids.is_empty() {
                    services.remove(service);
                }
            }
            if services.is_empty() {
                map.remove(tenant);
            }
        }
    }
}

/// Recent revisions with undo/redo images, so a watch can resume from a
/// revision the subscriber names.
#[derive(Debug, Clone, Default)]
pub struct Journal {
    pub(super) entries: std::collections::VecDeque<Arc<JournalEntry>>,
    pub(super) bytes: usize,
    pub(super) limits: JournalLimits,
    /// Revisions at or after this one are all in the journal.
    pub(super) covers_from: Revision,
}

impl Journal {
    pub(super) fn push(&mut self, entry: JournalEntry) -> Arc<JournalEntry> {
        let entry = Arc::new(entry);
        self.bytes += entry.approx_bytes();
        self.entries.push_back(Arc::clone(&entry));
        while self.entries.len() > self.limits.max_revisions || self.bytes > self.limits.max_bytes {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(old.approx_bytes());
            self.covers_from = old.revision + 1;
        }
        entry
    }

    /// Whether every revision from `revision` on is in the journal.
    pub fn covers(&self, revision: Revision) -> bool {
        revision >= self.covers_from
    }

    /// Entries with a revision of at least `from`, oldest first.
    pub fn since(&self, from: Revision) -> impl DoubleEndedIterator<Item = &Arc<JournalEntry>> {
        let skip = self.entries.partition_point(|e| e.revision < from);
        self.entries.range(skip..)
    }
}
