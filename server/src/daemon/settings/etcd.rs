//! The `[etcd]` section: endpoints, key prefix, TLS and authentication,
//! checked together (a setting that only applies with another one names
//! what is missing).

use std::path::PathBuf;

use serde::Deserialize;

use super::{Merged, SettingsError, Sourced};

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EtcdLayer {
    pub(super) endpoints: Option<Endpoints>,
    pub(super) prefix: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) cert_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
    pub(super) username: Option<String>,
    pub(super) password_file: Option<PathBuf>,
}

/// etcd client URLs: a TOML array, or one comma-separated string (as the
/// flag and the environment variable take them).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum Endpoints {
    List(Vec<String>),
    Joined(String),
}

impl Endpoints {
    pub(super) fn urls(&self) -> Vec<String> {
        let split = |s: &str| -> Vec<String> {
            s.split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect()
        };
        match self {
            Self::List(list) => list.iter().flat_map(|s| split(s)).collect(),
            Self::Joined(s) => split(s),
        }
    }
}

impl Merged {
    /// The etcd settings, validated together: `None` without endpoints.
    pub(super) fn etcd(&self) -> Result<Option<crate::store::etcd::EtcdOptions>, SettingsError> {
        use crate::store::etcd::{EtcdAuth, EtcdOptions, EtcdTls};
        let invalid =
            |setting: &'static str, source: &str, message: String| SettingsError::Invalid {
                setting,
                source_name: source.to_owned(),
                message,
            };
        let endpoints = &self.etcd_endpoints;
        if endpoints.value.is_empty() {
            // Without endpoints every other etcd setting would be ignored;
            // say so instead of silently running on the embedded store.
            let stray = [
                (
                    "etcd.ca_file",
                    &self.etcd_ca_file.source,
                    self.etcd_ca_file.value.is_some(),
                ),
                (
                    "etcd.cert_file",
                    &self.etcd_cert_file.source,
                    self.etcd_cert_file.value.is_some(),
                ),
                (
                    "etcd.key_file",
                    &self.etcd_key_file.source,
                    self.etcd_key_file.value.is_some(),
                ),
                (
                    "etcd.username",
                    &self.etcd_username.source,
                    self.etcd_username.value.is_some(),
                ),
                (
                    "etcd.password_file",
                    &self.etcd_password_file.source,
                    self.etcd_password_file.value.is_some(),
                ),
                (
                    "etcd.prefix",
                    &self.etcd_prefix.source,
                    !self.etcd_prefix.value.is_empty(),
                ),
            ];
            if let Some((setting, source, _)) = stray.into_iter().find(|(_, _, set)| *set) {
                return Err(invalid(
                    setting,
                    source,
                    "only applies with etcd.endpoints (--etcd-endpoints, STRATA_ETCD_ENDPOINTS)"
                        .into(),
                ));
            }
            return Ok(None);
        }
        let mut https = 0;
        for url in &endpoints.value {
            let parsed = url
                .parse::<http::Uri>()
                .ok()
                .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
            let Some(parsed) = parsed else {
                return Err(invalid(
                    "etcd.endpoints",
                    &endpoints.source,
                    format!(
                        "{url:?} is not an http:// or https:// URL (e.g. http://127.0.0.1:2379)"
                    ),
                ));
            };
            if parsed.scheme_str() == Some("https") {
                https += 1;
            }
        }
        let file = |setting: &'static str, v: &Sourced<Option<PathBuf>>| match &v.value {
            Some(path) if !path.is_file() => Err(invalid(
                setting,
                &v.source,
                format!("{} is not a readable file", path.display()),
            )),
            other => Ok(other.clone()),
        };
        let ca_file = file("etcd.ca_file", &self.etcd_ca_file)?;
        let cert_file = file("etcd.cert_file", &self.etcd_cert_file)?;
        let key_file = file("etcd.key_file", &self.etcd_key_file)?;
        let tls = if https == 0 {
            if let Some((setting, v)) = [
                ("etcd.ca_file", &self.etcd_ca_file),
                ("etcd.cert_file", &self.etcd_cert_file),
                ("etcd.key_file", &self.etcd_key_file),
            ]
            .into_iter()
            .find(|(_, v)| v.value.is_some())
            {
                return Err(invalid(
                    setting,
                    &v.source,
                    "TLS needs https:// etcd endpoints".into(),
                ));
            }
            None
        } else if https < endpoints.value.len() {
            return Err(invalid(
                "etcd.endpoints",
                &endpoints.source,
                "mixes http:// and https:// URLs".into(),
            ));
        } else {
            let Some(ca_file) = ca_file else {
                return Err(invalid(
                    "etcd.ca_file",
                    &self.etcd_ca_file.source,
                    "https:// etcd endpoints need the CA certificate that signed etcd's".into(),
                ));
            };
            if cert_file.is_some() != key_file.is_some() {
                let (setting, source) = if cert_file.is_some() {
                    ("etcd.key_file", &self.etcd_key_file.source)
                } else {
                    ("etcd.cert_file", &self.etcd_cert_file.source)
                };
                return Err(invalid(
                    setting,
                    source,
                    "the client certificate and key go together".into(),
                ));
            }
            Some(EtcdTls {
                ca_file,
                cert_file,
                key_file,
            })
        };
        let auth = match (&self.etcd_username.value, &self.etcd_password_file.value) {
            (None, None) => None,
            (Some(username), Some(path)) => {
                let password = std::fs::read_to_string(path).map_err(|e| {
                    invalid(
                        "etcd.password_file",
                        &self.etcd_password_file.source,
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                Some(EtcdAuth {
                    username: username.clone(),
                    password: password.trim_end_matches(['\n', '\r']).to_owned(),
                })
            }
            (Some(_), None) => {
                return Err(invalid(
                    "etcd.password_file",
                    &self.etcd_password_file.source,
                    "etcd.username needs a password file".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "etcd.username",
                    &self.etcd_username.source,
                    "etcd.password_file needs a user name".into(),
                ));
            }
        };
        let mut options = EtcdOptions::new(endpoints.value.clone())
            .with_prefix(self.etcd_prefix.value.clone().into_bytes());
        options.tls = tls;
        options.auth = auth;
        Ok(Some(options))
    }
}
