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
//!
//! The directory may be shared with other users (`/tmp/strata`, a volume
//! several game servers mount), so nothing in it is trusted by name: the
//! temporary file has a random name and is created exclusively without
//! following symlinks, files are 0600 and directories the cache creates
//! 0700, and `project`/`tenant` must be DNS labels (the daemon's rule) so
//! they can never climb out of it (`..`, `/`).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strata_proto::v1::{Protocol, ResolvedValue};
use tokio::sync::Notify;

use crate::Error;
use crate::services::{Endpoint, ResolvedService, ServiceInstance};

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
    /// a warning): a cache must never stop a game server from starting. A
    /// project or tenant that is not a DNS label is refused: it would not
    /// name a file inside `dir` (`..`, `/`), and the daemon refuses it too.
    pub(crate) fn open(dir: &Path, project: &str, tenant: &str) -> Result<Self, Error> {
        check_component("project", project)?;
        check_component("tenant", tenant)?;
        let path = dir.join(project).join(format!("{tenant}.json"));
        let file = match read_no_follow(&path) {
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
        Ok(Self {
            path,
            state: Arc::new(Mutex::new(State {
                file,
                generation: 0,
            })),
            dirty: Arc::new(Notify::new()),
            writer: Mutex::new(None),
            written: Arc::new(AtomicU64::new(0)),
        })
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

/// Longest project or tenant name (a DNS label).
const MAX_NAME_LEN: usize = 63;

/// Checks that a project or tenant name is a DNS label (1–63 of `a-z`,
/// `0-9`, `-`, not starting or ending with `-`) — the daemon's rule,
/// repeated here because the SDK does not depend on the server. Such a name
/// is one plain path component: never `.`, `..`, empty, or with a `/`.
fn check_component(what: &str, name: &str) -> Result<(), Error> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "cache_dir: {what} {name:?} cannot name a disk cache file: use 1 to \
             {MAX_NAME_LEN} of a-z, 0-9 and '-', starting and ending with a letter or digit"
        )))
    }
}

/// Reads a cache file, refusing a symlink in its place (someone else who
/// can write a shared cache directory could point it at another file).
fn read_no_follow(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Creates `dir` and its missing parents as 0700. Directories that already
/// exist keep their mode: the application chose them (and may share them
/// on purpose); what the cache writes into them is 0600 anyway.
fn create_private_dirs(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates `path` as a new 0600 file. `create_new` (`O_EXCL`) fails on
/// anything already there, a planted symlink included; `O_NOFOLLOW` says
/// the same again for systems where `O_EXCL` is not enough.
fn create_private_new(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Temp file in the same directory (so the rename stays on one file
/// system), fsync, rename, fsync of the directory (so the rename itself is
/// durable).
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("cache path has no directory"))?;
    create_private_dirs(dir)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("cache.json");
    // Random rather than pid and counter: several game servers on one host
    // may share the directory, and a name others can predict is a name they
    // can occupy first.
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    // Not ours if this fails (it already existed): leave it alone.
    let mut file = create_private_new(&tmp)?;
    let result = (|| {
        file.write_all(bytes)?;
        file.sync_all()?;
        // rename replaces a symlink at `path` itself, never its target.
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
            let cache = DiskCache::open(dir.path(), "vega", "feat-1").unwrap();
            let mut view = BTreeMap::new();
            view.insert("a.json".to_string(), value("a.json", b"{\"x\":1}"));
            view.insert("bin/b".to_string(), value("bin/b", &[0, 159, 255]));
            cache.store(&["a.json".into()], &["bin/".into()], &view, 9);
        } // dropped: flushed
        let cache = DiskCache::open(dir.path(), "vega", "feat-1").unwrap();
        let (values, revision) = cache.lookup(&["a.json".into()], &[]).unwrap();
        assert_eq!(revision, 9);
        assert_eq!(values["a.json"].value, b"{\"x\":1}");
        let (values, _) = cache.lookup(&[], &["bin/".into()]).unwrap();
        assert_eq!(values["bin/b"].value, vec![0, 159, 255]);
        assert!(cache.lookup(&["missing".into()], &[]).is_none());
        // Another tenant's cache is another file.
        let other = DiskCache::open(dir.path(), "vega", "feat-2").unwrap();
        assert!(other.lookup(&["a.json".into()], &[]).is_none());
    }

    #[tokio::test]
    async fn a_snapshot_drops_keys_of_the_selection_it_no_longer_has() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), "p", "t").unwrap();
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
            let cache = DiskCache::open(dir.path(), "vega", "feat-1").unwrap();
            let mut view = BTreeMap::new();
            view.insert("a.json".to_string(), value("a.json", b"{}"));
            cache.store(&["a.json".into()], &[], &view, 9);
            cache.store_service(&resolved);
        }
        let text = std::fs::read_to_string(dir.path().join("vega/feat-1.json")).unwrap();
        assert!(text.contains("PROTOCOL_GRPC"), "{text}");
        let cache = DiskCache::open(dir.path(), "vega", "feat-1").unwrap();
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
        let cache = DiskCache::open(dir.path(), "p", "t").unwrap();
        assert!(cache.lookup(&["k".into()], &[]).is_some());
        assert!(cache.lookup_service("matchmaker").is_none());
    }

    #[test]
    fn a_torn_or_foreign_file_is_an_empty_cache() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("p")).unwrap();
        std::fs::write(dir.path().join("p/t.json"), b"{\"version\":1,").unwrap();
        let cache = DiskCache::open(dir.path(), "p", "t").unwrap();
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

    /// A client of `project`/`tenant` with its disk cache in `dir` (no
    /// daemon is contacted).
    fn cached_client(
        dir: &std::path::Path,
        project: &str,
        tenant: &str,
    ) -> Result<crate::Client, crate::Error> {
        crate::Client::builder()
            .endpoints(["127.0.0.1:1"])
            .project(project)
            .tenant(tenant)
            .cache_dir(dir)
            .build()
    }

    /// docs/security.md, "The SDK's disk cache": `project`/`tenant` were joined into the cache
    /// path as given, so `../` put the file outside the cache directory.
    #[test]
    fn sdk_cache_refuses_path_traversal_finding_8() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        for (project, tenant) in [
            ("p", "../../escaped"),
            ("..", "t"),
            ("../x", "t"),
            ("p", "a/b"),
            ("/abs", "t"),
            ("p", "."),
        ] {
            let built = cached_client(&dir, project, tenant);
            match built {
                Ok(client) => panic!(
                    "project {project:?} tenant {tenant:?} was accepted; cache file {:?}",
                    client.cache_path()
                ),
                Err(e) => {
                    let text = e.to_string();
                    assert!(matches!(e, crate::Error::Config(_)), "{text}");
                    assert!(text.contains("cache"), "names the setting: {text}");
                }
            }
        }
        // Nothing was created outside (nor inside) the cache directory.
        let names: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(names.is_empty(), "{names:?}");
        // Valid names still work.
        let client = cached_client(&dir, "vega", "feat-1").unwrap();
        assert_eq!(
            client.cache_path(),
            Some(dir.join("vega/feat-1.json").as_path())
        );
    }

    /// Finding 8: the temporary file had a predictable name
    /// (`.<name>.<pid>.<counter>.tmp`) and was opened with `File::create`,
    /// which follows a symlink planted there by whoever else can write the
    /// (possibly shared) cache directory.
    #[test]
    fn sdk_cache_temp_file_does_not_follow_a_planted_symlink_finding_8() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("shared");
        std::fs::create_dir(&cache).unwrap();
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, b"precious").unwrap();
        // Every name the old scheme could pick in this process for a while.
        let pid = std::process::id();
        for n in 0..256 {
            std::os::unix::fs::symlink(&victim, cache.join(format!(".c.json.{pid}.{n}.tmp")))
                .unwrap();
        }
        let path = cache.join("c.json");
        write_atomically(&path, b"cache").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&path).unwrap(), b"cache");
        assert!(
            !std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink(),
            "the cache file is a regular file, not a planted link"
        );
    }

    /// Finding 8: cache files and the directories created for them got the
    /// process umask (0644/0755 with umask 022), so other local users could
    /// read cached config.
    #[tokio::test]
    async fn sdk_cache_files_are_0600_and_new_dirs_0700_finding_8() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        {
            let client = cached_client(&dir, "vega", "feat-1").unwrap();
            let cache = client.inner.cache.as_ref().unwrap();
            let mut view = BTreeMap::new();
            view.insert("a".to_string(), value("a", b"1"));
            cache.store(&["a".into()], &[], &view, 1);
        } // dropped: flushed
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700, "cache dir");
        assert_eq!(mode(&dir.join("vega")), 0o700, "project dir");
        assert_eq!(mode(&dir.join("vega/feat-1.json")), 0o600, "cache file");
    }

    /// Finding 8, the name-collision half: even at the exact temporary name,
    /// a planted symlink is refused, not followed.
    #[test]
    fn sdk_cache_temp_create_refuses_a_symlink_at_its_name_finding_8() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, b"precious").unwrap();
        let link = dir.path().join(".c.json.0123456789abcdef.tmp");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let err = create_private_new(&link).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // A cache file replaced by a symlink is not read through it either.
        let cache = dir.path().join("p");
        std::fs::create_dir(&cache).unwrap();
        std::fs::write(
            &victim,
            br#"{"version":1,"project":"p","tenant":"t","revision":4,"written_at_unix_ms":0,
                "values":{"k":{"format":"text","value":"planted"}}}"#,
        )
        .unwrap();
        std::os::unix::fs::symlink(&victim, cache.join("t.json")).unwrap();
        let opened = DiskCache::open(dir.path(), "p", "t").unwrap();
        assert!(opened.lookup(&["k".into()], &[]).is_none());
    }
}
