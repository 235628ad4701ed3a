//! Bearer tokens in the store: format, hashing, the admin token of first
//! start, the table every replica follows, and `strata.v1.TokenService`.
//!
//! A token is `strata_<id>_<secret>`: `id` is 16 hex digits (public, the
//! lookup key and what lists, logs and audit records show), `secret` 64 hex
//! digits (256 random bits). The store keeps only
//! `SHA-256("strata-token-v1:" id ":" secret)` under `a/tokens/{id}`; a
//! secret this long cannot be guessed from its hash, so no slow
//! password hash is needed and verifying a request costs one SHA-256 of
//! ~100 bytes.
//!
//! Each replica loads every token at start and follows the store's watch
//! of `a/tokens/` ([`follow`]), so a token created or revoked through any
//! replica takes effect on all of them as soon as their watch delivers it
//! (milliseconds on etcd). `a/bootstrap` records that the admin token of
//! first start was created, so it is created once per store, not once per
//! replica or restart.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use prost::Message;
use strata_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, ErrorReason, ListTokensResponse, ResponseHeader,
    RevokeTokenRequest, RevokeTokenResponse, TokenInfo,
};
use tokio_util::sync::CancellationToken;

use crate::app::audit::{self, Operation, Target};
use crate::app::auth::{Authenticator, Principal, Role, TenantPattern, TokenEntry};
use crate::domain::credentials::{generate, id_of, is_id};
use crate::error::ApiError;
use crate::store::{Compare, EventKind, KeyRange, Store, StoreError, Txn, unix_now_ms};

/// Store prefix of token records: `a/tokens/{id}` → [`TokenRecord`].
pub const TOKENS_PREFIX: &str = "a/tokens/";
/// Present once the admin token of first start was created.
pub const BOOTSTRAP_KEY: &str = "a/bootstrap";
/// Name of the admin token created on first start.
pub const BOOTSTRAP_NAME: &str = "bootstrap-admin";

/// Stored form of a token: everything but the secret.
#[derive(Clone, PartialEq, Message)]
pub struct TokenRecord {
    /// Human name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Role name (`read`, `register`, `write`, `admin`).
    #[prost(string, tag = "2")]
    pub role: String,
    /// Project it is valid for; empty: every project.
    #[prost(string, tag = "3")]
    pub project: String,
    /// Tenant pattern of a register token.
    #[prost(string, tag = "4")]
    pub tenant_pattern: String,
    /// SHA-256 of the secret (see the module documentation).
    #[prost(bytes = "vec", tag = "5")]
    pub secret_hash: Vec<u8>,
    /// Creation time, Unix milliseconds.
    #[prost(int64, tag = "6")]
    pub created_at_unix_ms: i64,
    /// Name of the token that created it.
    #[prost(string, tag = "7")]
    pub created_by: String,
    /// Expiry, Unix milliseconds; 0: never.
    #[prost(int64, tag = "8")]
    pub expires_at_unix_ms: i64,
}

fn token_key(id: &str) -> String {
    format!("{TOKENS_PREFIX}{id}")
}

/// The principal a stored record stands for; `None` for a record this
/// version cannot read (skipped, with a warning).
fn entry_of(id: &str, record: &TokenRecord) -> Option<TokenEntry> {
    let role = Role::parse(&record.role)?;
    let secret_hash: [u8; 32] = record.secret_hash.as_slice().try_into().ok()?;
    let tenants = if record.tenant_pattern.is_empty() {
        None
    } else {
        Some(TenantPattern::parse(&record.tenant_pattern).ok()?)
    };
    Some(TokenEntry {
        principal: Principal {
            token_id: id.into(),
            name: record.name.as_str().into(),
            role,
            project: (!record.project.is_empty()).then(|| record.project.as_str().into()),
            tenants,
        },
        secret_hash,
        expires_at_unix_ms: record.expires_at_unix_ms,
    })
}

fn decode_entry(key: &[u8], value: &[u8]) -> Option<(String, TokenEntry)> {
    let id = std::str::from_utf8(key).ok()?.strip_prefix(TOKENS_PREFIX)?;
    let entry = TokenRecord::decode(value)
        .ok()
        .and_then(|r| entry_of(id, &r));
    if entry.is_none() {
        tracing::warn!(
            token_id = id,
            "skipping a token record this stratad cannot read"
        );
    }
    Some((id.to_owned(), entry?))
}

/// Loads every token into `auth`; returns the revision read.
async fn load(store: &dyn Store, auth: &Authenticator) -> Result<i64, StoreError> {
    let all = store.range(KeyRange::prefix(TOKENS_PREFIX)).await?;
    let entries: HashMap<String, TokenEntry> = all
        .kvs
        .iter()
        .filter_map(|kv| decode_entry(&kv.key, &kv.value))
        .collect();
    tracing::debug!(tokens = entries.len(), "loaded tokens");
    auth.replace_all(entries);
    Ok(all.revision)
}

/// Loads the token table, then keeps it equal to the store's until
/// `shutdown`: creations and revocations through any replica arrive
/// through the watch. When the watch breaks, the table is reloaded and
/// followed again (so nothing is missed even across compaction).
pub async fn follow(
    store: Arc<dyn Store>,
    auth: Arc<Authenticator>,
    loaded: i64,
    shutdown: CancellationToken,
) {
    let mut from = loaded + 1;
    loop {
        let mut watch = match store.watch(KeyRange::prefix(TOKENS_PREFIX), from).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch tokens; retrying");
                if pause(&shutdown).await {
                    return;
                }
                from = match load(store.as_ref(), &auth).await {
                    Ok(r) => r + 1,
                    Err(_) => from,
                };
                continue;
            }
        };
        loop {
            let batch = tokio::select! {
                () = shutdown.cancelled() => return,
                b = watch.next() => b,
            };
            match batch {
                Some(Ok(batch)) => {
                    for event in batch.events.iter() {
                        let key = &event.kv.key;
                        match event.kind {
                            EventKind::Put => {
                                if let Some((id, entry)) = decode_entry(key, &event.kv.value) {
                                    auth.upsert(id, entry);
                                }
                            }
                            EventKind::Delete => {
                                if let Some(id) = std::str::from_utf8(key)
                                    .ok()
                                    .and_then(|k| k.strip_prefix(TOKENS_PREFIX))
                                {
                                    auth.remove(id);
                                }
                            }
                        }
                    }
                    from = batch.revision + 1;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "token watch ended; reloading tokens");
                    break;
                }
                None => break,
            }
        }
        if pause(&shutdown).await {
            return;
        }
        if let Ok(r) = load(store.as_ref(), &auth).await {
            from = r + 1;
        }
    }
}

/// Waits a moment before retrying; true when shutting down.
async fn pause(shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(Duration::from_millis(500)) => false,
    }
}

/// Loads the tokens and, on a store that never had any, creates the admin
/// token and writes it to `token_file` (mode 0600). Returns the revision
/// the table was loaded at, for [`follow`].
pub async fn start(
    store: &dyn Store,
    auth: &Authenticator,
    token_file: &Path,
) -> Result<i64, String> {
    let bootstrapped = store
        .get(BOOTSTRAP_KEY.as_bytes())
        .await
        .map_err(|e| format!("cannot read tokens: {e}"))?
        .is_some();
    if !bootstrapped {
        bootstrap(store, token_file).await?;
    }
    load(store, auth)
        .await
        .map_err(|e| format!("cannot read tokens: {e}"))
}

/// Creates the admin token of first start. The token is written to a
/// temporary file beside `token_file` first, so a token is never stored
/// without its file; only the replica whose transaction wins (the store
/// was still without `a/bootstrap`) moves it into place.
async fn bootstrap(store: &dyn Store, token_file: &Path) -> Result<(), String> {
    let (id, token, digest) = generate().map_err(|e| e.message)?;
    let dir = token_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    crate::private_fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create {} for the admin token: {e}", dir.display()))?;
    let tmp = dir.join(format!(".admin.token.{id}.tmp"));
    write_private(&tmp, &token).map_err(|e| {
        format!(
            "cannot write the admin token to {}: {e} (set --admin-token-file)",
            tmp.display()
        )
    })?;
    let record = TokenRecord {
        name: BOOTSTRAP_NAME.into(),
        role: Role::Admin.name().into(),
        project: String::new(),
        tenant_pattern: String::new(),
        secret_hash: digest.to_vec(),
        created_at_unix_ms: unix_now_ms(),
        created_by: "stratad".into(),
        expires_at_unix_ms: 0,
    };
    let txn = Txn::new()
        .when(Compare::missing(BOOTSTRAP_KEY))
        .put(BOOTSTRAP_KEY, id.as_bytes().to_vec())
        .put(token_key(&id), record.encode_to_vec());
    let committed = store.txn(txn).await;
    match committed {
        Ok(r) if r.succeeded => {
            std::fs::rename(&tmp, token_file).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                format!(
                    "cannot move the admin token into {}: {e}; the stored token {id} is unusable, \
                     revoke it with auth off",
                    token_file.display()
                )
            })?;
            tracing::warn!(
                path = %token_file.display(),
                token_id = %id,
                "first start: created an admin token for every project and wrote it to this file \
                 (mode 0600); use it to create scoped tokens (`strata token create`) and keep it safe"
            );
            Ok(())
        }
        Ok(_) => {
            // Another replica bootstrapped first; its token file is the one.
            let _ = std::fs::remove_file(&tmp);
            tracing::info!("the admin token was already created by another replica");
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(format!("cannot store the admin token: {e}"))
        }
    }
}

/// Writes `text` to a new file readable only by its owner (never through
/// a symlink or into a file someone else made first).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut file = crate::private_fs::create_new_file(path)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

/// Longest token name.
const MAX_NAME: usize = 128;

fn validate_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorReason::InvalidArgument,
            format!(
                "token name {name:?}: use 1 to {MAX_NAME} letters, digits, '-', '_', '.' or '@'"
            ),
        ))
    }
}

fn info(id: &str, record: &TokenRecord) -> TokenInfo {
    let role = match Role::parse(&record.role) {
        Some(Role::Read) => strata_proto::v1::Role::Read,
        Some(Role::Register) => strata_proto::v1::Role::Register,
        Some(Role::Write) => strata_proto::v1::Role::Write,
        Some(Role::Admin) => strata_proto::v1::Role::Admin,
        None => strata_proto::v1::Role::Unspecified,
    };
    TokenInfo {
        id: id.to_owned(),
        name: record.name.clone(),
        role: role as i32,
        project: record.project.clone(),
        tenant_pattern: record.tenant_pattern.clone(),
        created_at_unix_ms: record.created_at_unix_ms,
        created_by: record.created_by.clone(),
        expires_at_unix_ms: record.expires_at_unix_ms,
    }
}

/// The token operations, shared by gRPC and any other front end.
#[derive(Debug, Clone)]
pub struct Tokens {
    store: Arc<dyn Store>,
    auth: Arc<Authenticator>,
    member: String,
}

impl Tokens {
    /// Token operations on `store`, updating `auth` at once (read-your-writes
    /// on this replica; the others follow through their watch).
    pub fn new(store: Arc<dyn Store>, auth: Arc<Authenticator>, member: String) -> Self {
        Self {
            store,
            auth,
            member,
        }
    }

    fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            revision,
            member: self.member.clone(),
        })
    }

    /// Creates a token; `by` is the creating token's name.
    pub async fn create(
        &self,
        by: &Principal,
        request: CreateTokenRequest,
    ) -> Result<CreateTokenResponse, ApiError> {
        audit::declare(
            Target::new(Operation::CreateToken, &request.project, "").subject(&request.name),
        );
        by.require_admin()?;
        let invalid = |m: String| ApiError::new(ErrorReason::InvalidArgument, m);
        validate_name(&request.name)?;
        let role = match strata_proto::v1::Role::try_from(request.role) {
            Ok(strata_proto::v1::Role::Read) => Role::Read,
            Ok(strata_proto::v1::Role::Register) => Role::Register,
            Ok(strata_proto::v1::Role::Write) => Role::Write,
            Ok(strata_proto::v1::Role::Admin) => Role::Admin,
            _ => {
                return Err(invalid(
                    "role must be read, register, write or admin".into(),
                ));
            }
        };
        if request.project.is_empty() {
            if role != Role::Admin {
                return Err(invalid(format!(
                    "a {role} token needs a project; only admin tokens may cover every project"
                )));
            }
        } else {
            crate::domain::names::validate_project(&request.project)
                .map_err(crate::app::api::name_error)?;
        }
        match (role, request.tenant_pattern.is_empty()) {
            (Role::Register, true) => {
                return Err(invalid(
                    "a register token needs a tenant pattern such as feat-*".into(),
                ));
            }
            (Role::Register, false) => {
                TenantPattern::parse(&request.tenant_pattern).map_err(invalid)?;
            }
            (_, false) => {
                return Err(invalid(format!(
                    "only register tokens take a tenant pattern, not {role} tokens"
                )));
            }
            (_, true) => {}
        }
        if request.ttl_seconds < 0 {
            return Err(invalid(
                "ttl_seconds must be 0 (no expiry) or positive".into(),
            ));
        }
        let now = unix_now_ms();
        let expires_at_unix_ms = if request.ttl_seconds == 0 {
            0
        } else {
            request
                .ttl_seconds
                .checked_mul(1000)
                .and_then(|ms| ms.checked_add(now))
                .ok_or_else(|| invalid("ttl_seconds is too large".into()))?
        };
        let (id, token, digest) = generate()?;
        let record = TokenRecord {
            name: request.name,
            role: role.name().into(),
            project: request.project,
            tenant_pattern: request.tenant_pattern,
            secret_hash: digest.to_vec(),
            created_at_unix_ms: now,
            created_by: by.name.to_string(),
            expires_at_unix_ms,
        };
        let key = token_key(&id);
        let r = self
            .store
            .txn(
                Txn::new()
                    .when(Compare::missing(key.as_str()))
                    .put(key.as_str(), record.encode_to_vec()),
            )
            .await?;
        if !r.succeeded {
            return Err(ApiError::new(
                ErrorReason::Internal,
                "a fresh token id collided with an existing one; try again",
            ));
        }
        if let Some(entry) = entry_of(&id, &record) {
            self.auth.upsert(id.clone(), entry);
        }
        tracing::info!(token_id = %id, name = %record.name, role = %record.role,
            project = %record.project, by = %by.name, "token created");
        Ok(CreateTokenResponse {
            header: self.header(r.revision),
            info: Some(info(&id, &record)),
            token,
        })
    }

    /// Every token, by id.
    pub async fn list(&self, by: &Principal) -> Result<ListTokensResponse, ApiError> {
        by.require_admin()?;
        let all = self.store.range(KeyRange::prefix(TOKENS_PREFIX)).await?;
        let tokens = all
            .kvs
            .iter()
            .filter_map(|kv| {
                let id = std::str::from_utf8(&kv.key)
                    .ok()?
                    .strip_prefix(TOKENS_PREFIX)?;
                let record = TokenRecord::decode(kv.value.as_slice()).ok()?;
                Some(info(id, &record))
            })
            .collect();
        Ok(ListTokensResponse {
            header: self.header(all.revision),
            tokens,
        })
    }

    /// Revokes a token by id (or by the whole token).
    pub async fn revoke(
        &self,
        by: &Principal,
        request: RevokeTokenRequest,
    ) -> Result<RevokeTokenResponse, ApiError> {
        // Only the id: the field also takes a whole token, whose secret must
        // not reach the log (a failed revoke leaves it valid).
        audit::declare(
            Target::new(Operation::RevokeToken, "", "").subject(id_of(request.id.trim())),
        );
        by.require_admin()?;
        let id = id_of(request.id.trim());
        if !is_id(id) {
            return Err(ApiError::new(
                ErrorReason::InvalidArgument,
                format!("{id:?} is not a token id (16 hex digits)"),
            ));
        }
        let key = token_key(id);
        let r = self
            .store
            .txn(
                Txn::new()
                    .when(Compare::exists(key.as_str()))
                    .delete(KeyRange::key(key.as_str())),
            )
            .await?;
        if !r.succeeded {
            return Err(ApiError::new(
                ErrorReason::NotFound,
                format!("no token with id {id}"),
            ));
        }
        self.auth.remove(id);
        tracing::info!(token_id = %id, by = %by.name, "token revoked");
        Ok(RevokeTokenResponse {
            header: self.header(r.revision),
        })
    }
}
