//! Who may do what: roles, token scopes, the one authorization rule, and
//! the in-memory token table requests are authenticated against.
//!
//! Every gRPC and HTTP request passes the authentication middleware
//! (`transport::layers::auth`) in front of every route. It reads
//! `authorization: Bearer strata_<id>_<secret>`, looks the id up in the
//! in-memory token table ([`Authenticator`], fed from the store by
//! [`crate::app::tokens`]), checks the secret's hash, and puts the token's
//! [`Principal`] into the request's extensions. Requests without a valid token
//! get `UNAUTHENTICATED` (HTTP 401) before any handler runs; `/healthz`,
//! `/readyz`, gRPC health and reflection stay open, and `/metrics` is open
//! unless `auth.metrics = "token"`.
//!
//! Handlers then ask the principal: [`Principal::authorize`] decides one
//! [`Action`] on one project and tenant from one table (see
//! `docs/security.md`), and refuses with `PERMISSION_DENIED` (HTTP 403)
//! before anything is read or written.
//!
//! With `--auth=off` every request gets [`Principal::anonymous`], which may
//! do everything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use strata_proto::v1::ErrorReason;

use crate::error::ApiError;
use crate::settings_error::{SettingsError, Sourced};

/// What a token may do. Each role includes `Read`; see [`Principal::authorize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Read tenants, config and the registry; watch (the SDK's role).
    Read,
    /// Manage tenants matching a name pattern: create and delete them,
    /// register and deregister instances in them, write their config (a
    /// branch's CD pipeline).
    Register,
    /// Write config in any tenant of the project.
    Write,
    /// Everything, including protected tenants, force deletes, tokens and import.
    Admin,
}

impl Role {
    /// Lowercase name (`read`, `register`, `write`, `admin`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Register => "register",
            Self::Write => "write",
            Self::Admin => "admin",
        }
    }

    /// Parses a lowercase name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "read" => Some(Self::Read),
            "register" => Some(Self::Register),
            "write" => Some(Self::Write),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A tenant-name pattern of a `register` token: `*` matches any run of
/// characters (possibly empty), everything else matches itself. `feat-*`
/// matches `feat-login` but not `integration`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantPattern(Arc<str>);

impl TenantPattern {
    /// Validates a pattern: non-empty, at most 63 characters, only
    /// lowercase letters, digits, `-` and `*`, and not `*` alone — a token
    /// for every tenant is a `write` or `admin` token.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() || pattern.len() > 63 {
            return Err("a tenant pattern has 1 to 63 characters".into());
        }
        if let Some(c) = pattern
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '*'))
        {
            return Err(format!(
                "tenant pattern {pattern:?} has {c:?}; use lowercase letters, digits, '-' and '*'"
            ));
        }
        if pattern.chars().all(|c| c == '*') {
            return Err(format!(
                "tenant pattern {pattern:?} matches every tenant; use a write or admin token instead"
            ));
        }
        Ok(Self(pattern.into()))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `tenant` matches.
    pub fn matches(&self, tenant: &str) -> bool {
        glob_match(self.0.as_bytes(), tenant.as_bytes())
    }
}

impl std::fmt::Display for TenantPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `*`-only glob match, iterative with one backtrack point (linear for the
/// short names involved, no recursion).
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// One kind of operation, as [`Principal::authorize`] judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read tenants, config, history or the registry; open a watch; status.
    Read,
    /// Create a tenant; `protected` when it would be protected.
    CreateTenant {
        /// The new tenant would be protected.
        protected: bool,
    },
    /// Change a tenant's labels or TTL.
    UpdateTenant,
    /// Delete a tenant; `force` deletes protected tenants and subtrees.
    DeleteTenant {
        /// Delete even when protected, with every descendant.
        force: bool,
    },
    /// Write, remove or roll back a config layer.
    WriteConfig,
    /// Register, deregister, drain or health-change instances, or register a
    /// branch (tenant, instances and config at once).
    Register,
    /// Renew an ephemeral registration's lease (no project or tenant named).
    Heartbeat,
    /// Administration: tokens, import, audit queries.
    Admin,
}

impl Action {
    fn describe(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::CreateTenant { protected: false } => "create tenants",
            Self::CreateTenant { protected: true } => "create protected tenants",
            Self::UpdateTenant => "update tenants",
            Self::DeleteTenant { force: false } => "delete tenants",
            Self::DeleteTenant { force: true } => "force-delete tenants",
            Self::WriteConfig => "write config",
            Self::Register => "register instances",
            Self::Heartbeat => "renew leases",
            Self::Admin => "administer",
        }
    }
}

/// Who is calling: the token a request carried, without its secret. The
/// authentication middleware puts one into every authenticated request's
/// extensions (`request.extensions().get::<Principal>()` in gRPC handlers,
/// `Extension<Principal>` in axum handlers). Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's public id (`anonymous` with auth off).
    pub token_id: Arc<str>,
    /// The token's name, as given at creation (`anonymous` with auth off).
    pub name: Arc<str>,
    /// What it may do.
    pub role: Role,
    /// The one project it is valid for; `None`: every project.
    pub project: Option<Arc<str>>,
    /// For [`Role::Register`]: the tenants it manages.
    pub tenants: Option<TenantPattern>,
}

impl Principal {
    /// The principal of every request when auth is off: may do everything.
    pub fn anonymous() -> Self {
        Self {
            token_id: "anonymous".into(),
            name: "anonymous".into(),
            role: Role::Admin,
            project: None,
            tenants: None,
        }
    }

    /// Whether this principal may do `action` on `tenant` of `project`; the
    /// one table of who may do what. Pass `""` for a tenant the action does
    /// not name (and for the project of [`Action::Heartbeat`], which names
    /// neither).
    ///
    /// | role | may |
    /// | --- | --- |
    /// | `read` | `Read` |
    /// | `register` | `Read`; in tenants matching its pattern: `CreateTenant` (not protected), `UpdateTenant`, `DeleteTenant` (not forced), `WriteConfig`, `Register`; `Heartbeat` |
    /// | `write` | `Read`; `WriteConfig` in any tenant |
    /// | `admin` | everything |
    ///
    /// A token scoped to a project may do nothing in another project.
    pub fn allows(&self, action: Action, project: &str, tenant: &str) -> bool {
        if action != Action::Heartbeat
            && let Some(own) = &self.project
            && **own != *project
        {
            return false;
        }
        let in_pattern = || self.tenants.as_ref().is_some_and(|p| p.matches(tenant));
        match (self.role, action) {
            (Role::Admin, _) | (_, Action::Read) => true,
            (Role::Write, Action::WriteConfig) => true,
            (Role::Register, Action::Heartbeat) => true,
            (
                Role::Register,
                Action::CreateTenant { protected: false }
                | Action::UpdateTenant
                | Action::DeleteTenant { force: false }
                | Action::WriteConfig
                | Action::Register,
            ) => in_pattern(),
            _ => false,
        }
    }

    /// [`Self::allows`] as a result: `PERMISSION_DENIED` naming the token,
    /// its role and scope, and what it tried (never its secret).
    pub fn authorize(&self, action: Action, project: &str, tenant: &str) -> Result<(), ApiError> {
        if self.allows(action, project, tenant) {
            return Ok(());
        }
        let mut target = String::new();
        if !project.is_empty() {
            target = format!(" in project {project:?}");
            if !tenant.is_empty() {
                target = format!(" in tenant {project}/{tenant}");
            }
        }
        Err(ApiError::new(
            ErrorReason::PermissionDenied,
            format!(
                "token {:?} ({}) may not {}{target}",
                &*self.name,
                self.scope(),
                action.describe()
            ),
        )
        .with("token_id", &*self.token_id)
        .with("role", self.role))
    }

    /// Requires an admin token valid for every project (token management,
    /// whole-store operations).
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.role == Role::Admin && self.project.is_none() {
            return Ok(());
        }
        Err(ApiError::new(
            ErrorReason::PermissionDenied,
            format!(
                "token {:?} ({}) may not do this: it needs an admin token for every project",
                &*self.name,
                self.scope()
            ),
        )
        .with("token_id", &*self.token_id)
        .with("role", self.role))
    }

    /// `role register, project vega, tenants feat-*` — for messages.
    pub fn scope(&self) -> String {
        let mut s = format!("role {}", self.role);
        match &self.project {
            Some(p) => s.push_str(&format!(", project {p}")),
            None => s.push_str(", every project"),
        }
        if let Some(t) = &self.tenants {
            s.push_str(&format!(", tenants {t}"));
        }
        s
    }
}

/// The principal the middleware put into a request's extensions. A request
/// without one was never authenticated (only possible for a route outside
/// the middleware), so its absence is `UNAUTHENTICATED`.
pub fn principal_of(extensions: &http::Extensions) -> Result<&Principal, ApiError> {
    extensions.get::<Principal>().ok_or_else(|| {
        ApiError::new(
            ErrorReason::Unauthenticated,
            "this request carried no authenticated token",
        )
    })
}

/// Authorizes a gRPC request: its principal (see [`principal_of`]) may do
/// `action` on `tenant` of `project`. Handlers call it first, before they
/// read or write anything.
pub fn allow<T>(
    request: &tonic::Request<T>,
    action: Action,
    project: &str,
    tenant: &str,
) -> Result<(), ApiError> {
    principal_of(request.extensions())?.authorize(action, project, tenant)
}

/// Whether authentication is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Every request needs a valid token (the default).
    On,
    /// Every request is [`Principal::anonymous`]; for local experiments only.
    Off,
}

/// Authentication settings (`[auth]` in the config file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// `--auth=on|off`.
    pub mode: AuthMode,
    /// Where first start writes the admin token; `None`:
    /// `<data-dir>/admin.token`.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Whether `/metrics` needs a token (any role).
    pub metrics_need_token: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::On,
            admin_token_file: None,
            metrics_need_token: false,
        }
    }
}

/// A token as the authenticator holds it: the principal it stands for, the
/// hash its secret must match, and its expiry.
#[derive(Debug, Clone)]
pub(crate) struct TokenEntry {
    pub(crate) principal: Principal,
    pub(crate) secret_hash: [u8; 32],
    /// Unix milliseconds; 0: never.
    pub(crate) expires_at_unix_ms: i64,
}

/// The `[auth]` table of the configuration file (also `--auth`,
/// `--admin-token-file`, `--metrics-auth` and their `STRATA_*` variables).
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    /// `on` or `off`.
    pub mode: Option<String>,
    /// Where first start writes the admin token.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// `open` or `token`: whether `/metrics` needs a token.
    pub metrics: Option<String>,
}

impl AuthConfig {
    /// The auth settings from their merged values: `auth.mode` on|off,
    /// `auth.metrics` open|token; errors name the setting and its source.
    pub fn from_settings(
        mode_setting: &Sourced<String>,
        admin_token_file: &Sourced<Option<std::path::PathBuf>>,
        metrics: &Sourced<String>,
    ) -> Result<Self, SettingsError> {
        let mode = match mode_setting.value.trim() {
            "on" => AuthMode::On,
            "off" => AuthMode::Off,
            other => {
                return Err(SettingsError::invalid(
                    "auth.mode",
                    &mode_setting.source,
                    format!("{other:?} is not one of: on, off"),
                ));
            }
        };
        let metrics_need_token = match metrics.value.trim() {
            "open" => false,
            "token" => true,
            other => {
                return Err(SettingsError::invalid(
                    "auth.metrics",
                    &metrics.source,
                    format!("{other:?} is not one of: open, token"),
                ));
            }
        };
        Ok(Self {
            mode,
            admin_token_file: admin_token_file.value.clone(),
            metrics_need_token,
        })
    }
}

/// Checks bearer tokens against the token table, which
/// [`crate::app::tokens::follow`] keeps equal to the store's (so a token revoked
/// through any replica is refused by every replica as soon as its watch
/// delivers the deletion).
#[derive(Debug)]
pub struct Authenticator {
    mode: AuthMode,
    /// Whether `/metrics` needs a token.
    pub(crate) metrics_need_token: bool,
    tokens: RwLock<HashMap<String, TokenEntry>>,
    loaded: AtomicBool,
    /// Bumped on every change of the table: open streams re-check their
    /// token on it.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Authenticator {
    /// Bumped on every change of the table: open streams re-check their
    /// token on it.
    pub(crate) fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

impl Authenticator {
    /// An authenticator with an empty table (nothing authenticates until
    /// the table is loaded, except with auth off).
    pub fn new(config: &AuthConfig) -> Arc<Self> {
        Arc::new(Self {
            mode: config.mode,
            metrics_need_token: config.metrics_need_token,
            tokens: RwLock::new(HashMap::new()),
            loaded: AtomicBool::new(false),
            changed: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Whether tokens are enforced.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Replaces the whole table (after a load from the store).
    pub(crate) fn replace_all(&self, entries: HashMap<String, TokenEntry>) {
        if let Ok(mut tokens) = self.tokens.write() {
            *tokens = entries;
        }
        self.loaded.store(true, Ordering::Release);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Adds or replaces one token.
    pub(crate) fn upsert(&self, id: String, entry: TokenEntry) {
        if let Ok(mut tokens) = self.tokens.write() {
            tokens.insert(id, entry);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Forgets one token (revoked).
    pub(crate) fn remove(&self, id: &str) {
        if let Ok(mut tokens) = self.tokens.write() {
            tokens.remove(id);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// When the token `id` stops being valid: `Err` with why once it is
    /// revoked, else its expiry (Unix ms; 0: none).
    pub(crate) fn validity(&self, id: &str) -> Result<i64, &'static str> {
        self.tokens
            .read()
            .ok()
            .and_then(|t| t.get(id).map(|e| e.expires_at_unix_ms))
            .ok_or("was revoked")
    }

    /// The principal of a bearer token, or why not. The message never
    /// contains the secret.
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let unauthenticated = |m: &str| ApiError::new(ErrorReason::Unauthenticated, m);
        let Some((id, secret)) = crate::domain::credentials::parse(token) else {
            return Err(unauthenticated(
                "malformed token: expected `strata_<id>_<secret>` as `authorization: Bearer <token>`",
            ));
        };
        if !self.loaded.load(Ordering::Acquire) {
            return Err(ApiError::new(
                ErrorReason::Unavailable,
                "stratad is still loading its tokens",
            ));
        }
        let entry = self
            .tokens
            .read()
            .ok()
            .and_then(|t| t.get(id).cloned())
            .ok_or_else(|| unauthenticated(&format!("unknown or revoked token (id {id})")))?;
        if !crate::domain::credentials::secret_matches(id, secret, &entry.secret_hash) {
            return Err(unauthenticated(&format!(
                "unknown or revoked token (id {id})"
            )));
        }
        if entry.expires_at_unix_ms != 0 && entry.expires_at_unix_ms <= crate::store::unix_now_ms()
        {
            return Err(unauthenticated(&format!("token {id} has expired")));
        }
        Ok(entry.principal)
    }

    /// The principal of a request's `authorization` header.
    pub(crate) fn authenticate_headers(
        &self,
        headers: &http::HeaderMap,
    ) -> Result<Principal, ApiError> {
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Err(ApiError::new(
                ErrorReason::Unauthenticated,
                "no token: send `authorization: Bearer <token>` (the CLI reads STRATA_TOKEN or --token-file)",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorReason::Unauthenticated,
                    "malformed authorization header: expected `Bearer <token>`",
                )
            })?;
        self.verify(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(role: Role, project: Option<&str>, pattern: Option<&str>) -> Principal {
        Principal {
            token_id: "t1".into(),
            name: "ci".into(),
            role,
            project: project.map(Into::into),
            tenants: pattern.map(|p| TenantPattern::parse(p).unwrap()),
        }
    }

    #[test]
    fn glob_patterns_match_whole_names() {
        let p = TenantPattern::parse("feat-*").unwrap();
        assert!(p.matches("feat-login"));
        assert!(p.matches("feat-"));
        assert!(!p.matches("integration"));
        assert!(!p.matches("xfeat-a"));
        let mid = TenantPattern::parse("a*b*c").unwrap();
        assert!(mid.matches("abc") && mid.matches("axxbyyc") && !mid.matches("axxbyy"));
        assert!(TenantPattern::parse("*").is_err());
        assert!(TenantPattern::parse("Feat-*").is_err());
    }

    #[test]
    fn register_tokens_stay_inside_their_pattern_and_project() {
        let cd = token(Role::Register, Some("vega"), Some("feat-*"));
        assert!(cd.allows(Action::WriteConfig, "vega", "feat-a"));
        assert!(cd.allows(Action::CreateTenant { protected: false }, "vega", "feat-a"));
        assert!(!cd.allows(Action::CreateTenant { protected: true }, "vega", "feat-a"));
        assert!(!cd.allows(Action::DeleteTenant { force: true }, "vega", "feat-a"));
        assert!(!cd.allows(Action::WriteConfig, "vega", "integration"));
        assert!(!cd.allows(Action::Register, "vega", "integration"));
        assert!(!cd.allows(Action::Read, "other", "feat-a"));
        assert!(!cd.allows(Action::Admin, "vega", ""));
        assert!(cd.allows(Action::Heartbeat, "", ""));
        let err = cd
            .authorize(Action::WriteConfig, "vega", "integration")
            .unwrap_err();
        assert_eq!(err.reason, ErrorReason::PermissionDenied);
        assert!(err.message.contains("vega/integration"), "{}", err.message);
    }

    #[test]
    fn write_read_and_admin_roles() {
        let w = token(Role::Write, Some("vega"), None);
        assert!(w.allows(Action::WriteConfig, "vega", "integration"));
        assert!(!w.allows(Action::CreateTenant { protected: false }, "vega", "x"));
        assert!(!w.allows(Action::Register, "vega", "x"));
        assert!(!w.allows(Action::Heartbeat, "", ""));
        let r = token(Role::Read, Some("vega"), None);
        assert!(r.allows(Action::Read, "vega", "x"));
        assert!(!r.allows(Action::WriteConfig, "vega", "x"));
        let project_admin = token(Role::Admin, Some("vega"), None);
        assert!(project_admin.allows(Action::DeleteTenant { force: true }, "vega", "x"));
        assert!(!project_admin.allows(Action::Read, "other", "x"));
        assert!(project_admin.require_admin().is_err());
        assert!(Principal::anonymous().require_admin().is_ok());
    }
}
