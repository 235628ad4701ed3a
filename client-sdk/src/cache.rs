//! The disk cache: the last resolved value of every key a client watches
//! and the last resolved instance set of every service it watches, kept in
//! `<dir>/<project>/<tenant>.json` so that a game server started while
//! every daemon is down can start from it.
//!
//! Writes are atomic — a temporary file in the same directory, fsync, rename
//! over the old file, fsync of the directory — so a crash leaves either the
//! old or the new file, never a torn one. Writes are coalesced: watches mark
//! the cache dirty and one background task writes the newest state, so a
//! burst of changes (or a thousand watches seeing one change) costs one
//! write.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strata_proto::v1::{Protocol, ResolvedValue};
use tokio::sync::Notify;

use crate::discovery::{Endpoint, ResolvedService, ServiceInstance};

/// Pause between a change and its write, gathering further changes into
/// the same write.
const COALESCE: Duration = Duration::from_millis(20);

/// One cached value. Text values are stored as text so the file is easy to
/// read; anything not UTF-8 is stored as hex.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CachedValue {
    format: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_hex: Option<String>,
    #[serde(default)]
    origin: Vec<String>,
    #[serde(default)]
    mod_revision: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    /// Layout version of this file.
    version: u32,
    project: String,
    tenant: String,
    /// Highest revision any watch had seen when this was written.
    revision: i64,
    written_at_unix_ms: u128,
    values: BTreeMap<String, CachedValue>,
    /// Resolved services by name. Absent in files written before services
    /// were cached; those read as no service cached.
    #[serde(default)]
    services: BTreeMap<String, CachedService>,
}

/// One cached service resolution, as [`ResolvedService`] holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CachedService {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    #[serde(default)]
    fallback: bool,
    #[serde(default)]
    instances: Vec<CachedInstance>,
    #[serde(default)]
    revision: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CachedInstance {
    id: String,
    tenant: String,
    /// Endpoints by name.
    #[serde(default)]
    endpoints: BTreeMap<String, CachedEndpoint>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    weight: u32,
    #[serde(default)]
    version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CachedEndpoint {
    address: String,
    /// The proto enum's name (`PROTOCOL_GRPC`), readable and stable across
    /// renumbering.
    protocol: String,
}

impl CachedService {
    fn from_resolved(s: &ResolvedService) -> Self {
        Self {
            tenant: s.tenant.clone(),
            fallback: s.fallback,
            instances: s
                .instances
                .iter()
                .map(|i| CachedInstance {
                    id: i.id.clone(),
                    tenant: i.tenant.clone(),
                    endpoints: i
                        .endpoints
                        .iter()
                        .map(|(name, e)| {
                            (
                                name.clone(),
                                CachedEndpoint {
                                    address: e.address.clone(),
                                    protocol: e.protocol.as_str_name().to_owned(),
                                },
                            )
                        })
                        .collect(),
                    metadata: i.metadata.clone(),
                    weight: i.weight,
                    version: i.version.clone(),
                })
                .collect(),
            revision: s.revision,
        }
    }

    fn to_resolved(&self, service: &str) -> ResolvedService {
        ResolvedService {
            service: service.to_owned(),
            tenant: self.tenant.clone(),
            fallback: self.fallback,
            instances: self
                .instances
                .iter()
                .map(|i| ServiceInstance {
                    id: i.id.clone(),
                    tenant: i.tenant.clone(),
                    endpoints: i
                        .endpoints
                        .iter()
                        .map(|(name, e)| {
                            (
                                name.clone(),
                                Endpoint {
                                    address: e.address.clone(),
                                    // A name this build does not know (a
                                    // newer SDK wrote it) reads as unspecified.
                                    protocol: Protocol::from_str_name(&e.protocol)
                                        .unwrap_or(Protocol::Unspecified),
                                },
                            )
                        })
                        .collect(),
                    metadata: i.metadata.clone(),
                    weight: i.weight,
                    version: i.version.clone(),
                })
                .collect(),
            revision: self.revision,
        }
    }
}

impl CachedValue {
    fn from_resolved(v: &ResolvedValue) -> Self {
        let (value, value_hex) = match std::str::from_utf8(&v.value) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (
                None,
                Some(v.value.iter().map(|b| format!("{b:02x}")).collect()),
            ),
        };
        Self {
            format: v.format.clone(),
            value,
            value_hex,
            origin: v.origin.clone(),
            mod_revision: v.mod_revision,
        }
    }

    fn to_resolved(&self, key: &str) -> Option<ResolvedValue> {
        let bytes = match (&self.value, &self.value_hex) {
            (Some(text), _) => text.clone().into_bytes(),
            (None, Some(hex)) => decode_hex(hex)?,
            (None, None) => return None,
        };
        Some(ResolvedValue {
            key: key.to_owned(),
            value: bytes,
            format: self.format.clone(),
            origin: self.origin.clone(),
            mod_revision: self.mod_revision,
        })
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect()
}

struct State {
    file: CacheFile,
    /// Bumped on every change; the writer compares it with what it wrote.
    generation: u64,
}

/// The cache of one client (one project and tenant).
pub(crate) struct DiskCache {
    path: PathBuf,
    state: Arc<Mutex<State>>,
    dirty: Arc<Notify>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    written: Arc<AtomicU64>,
}

impl DiskCache {
    /// Opens the cache for `project`/`tenant` under `dir`, loading what an
    /// earlier run left. A missing or unreadable file is an empty cache (and
    /// a warning): a cache must never stop a game server from starting.
    pub(crate) fn open(dir: &Path, project: &str, tenant: &str) -> Self {
        let path = dir.join(project).join(format!("{tenant}.json"));
        let file = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<CacheFile>(&bytes) {
                Ok(file) if file.project == project && file.tenant == tenant => file,
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "disk cache belongs to another project or tenant; ignoring it");
                    CacheFile::default()
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "disk cache unreadable; ignoring it");
                    CacheFile::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => CacheFile::default(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "disk cache unreadable; ignoring it");
                CacheFile::default()
            }
        };
        let file = CacheFile {
            version: 1,
            project: project.to_owned(),
            tenant: tenant.to_owned(),
            ..file
        };
        Self {
            path,
            state: Arc::new(Mutex::new(State {
                file,
                generation: 0,
            })),
            dirty: Arc::new(Notify::new()),
            writer: Mutex::new(None),
            written: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached values of a selection (exact keys and key prefixes), and
    /// the revision the cache was written at; `None` when none of the exact
    /// keys is cached and no cached key falls under a prefix.
    pub(crate) fn lookup(
        &self,
        keys: &[String],
        prefixes: &[String],
    ) -> Option<(BTreeMap<String, ResolvedValue>, i64)> {
        let state = self.lock();
        let values: BTreeMap<String, ResolvedValue> = state
            .file
            .values
            .iter()
            .filter(|(k, _)| selected(k, keys, prefixes))
            .filter_map(|(k, v)| Some((k.clone(), v.to_resolved(k)?)))
            .collect();
        let has_prefix_entry = !prefixes.is_empty() && state.file.revision > 0;
        if values.is_empty() && !has_prefix_entry {
            return None;
        }
        Some((values, state.file.revision))
    }

    /// Replaces the cached view of a selection with `view` (the selection's
    /// whole resolved view at `revision`) and schedules a write.
    pub(crate) fn store(
        &self,
        keys: &[String],
        prefixes: &[String],
        view: &BTreeMap<String, ResolvedValue>,
        revision: i64,
    ) {
        {
            let mut state = self.lock();
            state
                .file
                .values
                .retain(|k, _| !selected(k, keys, prefixes) || view.contains_key(k));
            for (k, v) in view {
                state
                    .file
                    .values
                    .insert(k.clone(), CachedValue::from_resolved(v));
            }
            state.file.revision = state.file.revision.max(revision);
            state.generation += 1;
        }
        self.ensure_writer();
        self.dirty.notify_one();
    }

    /// The cached resolution of a service, if one was ever stored.
    pub(crate) fn lookup_service(&self, service: &str) -> Option<ResolvedService> {
        self.lock()
            .file
            .services
            .get(service)
            .map(|s| s.to_resolved(service))
    }

    /// Replaces the cached resolution of a service and schedules a write
    /// (the same coalesced, atomic write as config values: one file).
    pub(crate) fn store_service(&self, resolved: &ResolvedService) {
        {
            let mut state = self.lock();
            state.file.services.insert(
                resolved.service.clone(),
                CachedService::from_resolved(resolved),
            );
            state.file.revision = state.file.revision.max(resolved.revision);
            state.generation += 1;
        }
        self.ensure_writer();
        self.dirty.notify_one();
    }

    /// Starts the background writer on first use (building a client needs
    /// no runtime; storing happens inside one).
    fn ensure_writer(&self) {
        let mut writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if writer.is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let state = Arc::clone(&self.state);
        let dirty = Arc::clone(&self.dirty);
        let written = Arc::clone(&self.written);
        let path = self.path.clone();
        *writer = Some(runtime.spawn(async move {
            loop {
                dirty.notified().await;
                tokio::time::sleep(COALESCE).await;
                let Some((bytes, generation)) = snapshot(&state, &written) else {
                    continue;
                };
                let target = path.clone();
                let result =
                    tokio::task::spawn_blocking(move || write_atomically(&target, &bytes)).await;
                match result {
                    Ok(Ok(())) => written.store(generation, Ordering::Release),
                    Ok(Err(e)) => {
                        metrics::counter!("strata_sdk_cache_write_errors_total").increment(1);
                        tracing::warn!(path = %path.display(), error = %e, "cannot write the disk cache");
                    }
                    Err(e) => tracing::warn!(error = %e, "disk cache writer failed"),
                }
            }
        }));
    }

    /// Writes now if anything changed since the last write (on drop, so the
    /// newest state survives a clean shutdown).
    fn flush_blocking(&self) {
        if let Some((bytes, generation)) = snapshot(&self.state, &self.written) {
            match write_atomically(&self.path, &bytes) {
                Ok(()) => self.written.store(generation, Ordering::Release),
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot write the disk cache")
                }
            }
        }
    }
}

impl Drop for DiskCache {
    fn drop(&mut self) {
        if let Some(writer) = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            writer.abort();
        }
        self.flush_blocking();
    }
}

/// The encoded file when it changed since the last write.
fn snapshot(state: &Mutex<State>, written: &AtomicU64) -> Option<(Vec<u8>, u64)> {
    let mut state = state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if state.generation == written.load(Ordering::Acquire) {
        return None;
    }
    state.file.written_at_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let bytes = serde_json::to_vec_pretty(&state.file).ok()?;
    Some((bytes, state.generation))
}

fn selected(key: &str, keys: &[String], prefixes: &[String]) -> bool {
    keys.iter().any(|k| k == key) || prefixes.iter().any(|p| key.starts_with(p.as_str()))
}

/// Temp file in the same directory (so the rename stays on one file
/// system), fsync, rename, fsync of the directory (so the rename itself is
/// durable).
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("cache path has no directory"))?;
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("cache.json");
    // Unique per process and write: several game servers on one host may
    // share a cache directory.
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(key: &str, text: &[u8]) -> ResolvedValue {
        ResolvedValue {
            key: key.into(),
            value: text.to_vec(),
            format: "json".into(),
            origin: vec!["integration".into()],
            mod_revision: 7,
        }
    }

    #[tokio::test]
    async fn values_survive_a_reopen_including_binary_ones() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = DiskCache::open(dir.path(), "vega", "feat-1");
            let mut view = BTreeMap::new();
            view.insert("a.json".to_string(), value("a.json", b"{\"x\":1}"));
            view.insert("bin/b".to_string(), value("bin/b", &[0, 159, 255]));
            cache.store(&["a.json".into()], &["bin/".into()], &view, 9);
        } // dropped: flushed
        let cache = DiskCache::open(dir.path(), "vega", "feat-1");
        let (values, revision) = cache.lookup(&["a.json".into()], &[]).unwrap();
        assert_eq!(revision, 9);
        assert_eq!(values["a.json"].value, b"{\"x\":1}");
        let (values, _) = cache.lookup(&[], &["bin/".into()]).unwrap();
        assert_eq!(values["bin/b"].value, vec![0, 159, 255]);
        assert!(cache.lookup(&["missing".into()], &[]).is_none());
        // Another tenant's cache is another file.
        let other = DiskCache::open(dir.path(), "vega", "feat-2");
        assert!(other.lookup(&["a.json".into()], &[]).is_none());
    }

    #[tokio::test]
    async fn a_snapshot_drops_keys_of_the_selection_it_no_longer_has() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), "p", "t");
        let mut view = BTreeMap::new();
        view.insert("m/a".to_string(), value("m/a", b"1"));
        view.insert("m/b".to_string(), value("m/b", b"2"));
        cache.store(&[], &["m/".into()], &view, 3);
        view.remove("m/a");
        cache.store(&[], &["m/".into()], &view, 4);
        let (values, _) = cache.lookup(&[], &["m/".into()]).unwrap();
        assert_eq!(values.keys().collect::<Vec<_>>(), ["m/b"]);
    }

    #[tokio::test]
    async fn service_sets_survive_a_reopen_next_to_config_values() {
        let dir = tempfile::tempdir().unwrap();
        let mut endpoints = BTreeMap::new();
        endpoints.insert(
            "main".to_string(),
            Endpoint {
                address: "10.0.0.9:8080".into(),
                protocol: Protocol::Grpc,
            },
        );
        let resolved = ResolvedService {
            service: "matchmaker".into(),
            tenant: Some("integration".into()),
            fallback: true,
            instances: vec![ServiceInstance {
                id: "mm-1".into(),
                tenant: "integration".into(),
                endpoints,
                metadata: [("region".to_string(), "eu".to_string())].into(),
                weight: 300,
                version: "1.2.3".into(),
            }],
            revision: 12,
        };
        {
            let cache = DiskCache::open(dir.path(), "vega", "feat-1");
            let mut view = BTreeMap::new();
            view.insert("a.json".to_string(), value("a.json", b"{}"));
            cache.store(&["a.json".into()], &[], &view, 9);
            cache.store_service(&resolved);
        }
        let text = std::fs::read_to_string(dir.path().join("vega/feat-1.json")).unwrap();
        assert!(text.contains("PROTOCOL_GRPC"), "{text}");
        let cache = DiskCache::open(dir.path(), "vega", "feat-1");
        assert_eq!(cache.lookup_service("matchmaker"), Some(resolved));
        assert!(cache.lookup_service("other").is_none());
        // The config value is still there: one file holds both.
        let (values, revision) = cache.lookup(&["a.json".into()], &[]).unwrap();
        assert_eq!(values["a.json"].value, b"{}");
        assert_eq!(revision, 12);
    }

    #[test]
    fn a_file_without_services_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("p")).unwrap();
        std::fs::write(
            dir.path().join("p/t.json"),
            br#"{"version":1,"project":"p","tenant":"t","revision":4,"written_at_unix_ms":0,
                "values":{"k":{"format":"text","value":"v"}}}"#,
        )
        .unwrap();
        let cache = DiskCache::open(dir.path(), "p", "t");
        assert!(cache.lookup(&["k".into()], &[]).is_some());
        assert!(cache.lookup_service("matchmaker").is_none());
    }

    #[test]
    fn a_torn_or_foreign_file_is_an_empty_cache() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("p")).unwrap();
        std::fs::write(dir.path().join("p/t.json"), b"{\"version\":1,").unwrap();
        let cache = DiskCache::open(dir.path(), "p", "t");
        assert!(cache.lookup(&["k".into()], &[]).is_none());
    }

    #[test]
    fn atomic_write_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x/c.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("x"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["c.json"]);
    }
}
