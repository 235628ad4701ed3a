//! Carrying the tenant on outgoing calls, as docs/sidecar.md routes by
//! it: the W3C `baggage` header entry `strata-tenant=<tenant>`, so any
//! OpenTelemetry-instrumented service forwards it for free, and the Strata
//! sidecar routes the call to that tenant's instance (falling back along
//! its chain).
//!
//! ```
//! use strata_client::propagation::{Tenant, WithTenant};
//!
//! let tenant = Tenant::new("feat-login")?;
//! let request = http::Request::builder()
//!     .uri("http://matchmaker/queue")
//!     .header("baggage", "userId=42")
//!     .with_tenant(&tenant)
//!     .body(())?;
//! assert_eq!(request.headers()["baggage"], "userId=42,strata-tenant=feat-login");
//!
//! let grpc = tonic::Request::new(()).with_tenant(&tenant);
//! assert_eq!(grpc.metadata().get("baggage").unwrap(), "strata-tenant=feat-login");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! On the receiving side, [`tenant_from_headers`] reads the tenant a call
//! carries, so a server can pass it on to its own outgoing calls.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

use crate::Error;

/// The baggage entry key.
pub const BAGGAGE_KEY: &str = "strata-tenant";

/// The header Strata also accepts (docs/sidecar.md), read but never
/// written by this module.
pub const TENANT_HEADER: &str = "x-strata-tenant";

const BAGGAGE: HeaderName = HeaderName::from_static("baggage");

/// A tenant name checked to be safe as a baggage value (`A-Z a-z 0-9 . _ -`,
/// 1 to 63 characters), so adding it to a request cannot fail.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tenant(String);

impl Tenant {
    /// Checks a tenant name.
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if valid {
            Ok(Self(name))
        } else {
            Err(Error::InvalidTenant(name))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `existing` baggage (one header value, possibly empty) with its
/// `strata-tenant` entry set to `tenant`: other entries are kept in order,
/// an earlier `strata-tenant` entry is replaced.
pub fn baggage_with_tenant(existing: &str, tenant: &Tenant) -> String {
    let mut entries: Vec<&str> = existing
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty() && entry_key(e) != Some(BAGGAGE_KEY))
        .collect();
    let ours = format!("{BAGGAGE_KEY}={}", tenant.0);
    entries.push(&ours);
    entries.join(",")
}

fn entry_key(entry: &str) -> Option<&str> {
    entry.split_once('=').map(|(k, _)| k.trim())
}

/// The tenant named by a baggage header value, if any.
pub fn tenant_from_baggage(baggage: &str) -> Option<&str> {
    baggage.split(',').find_map(|entry| {
        let (key, value) = entry.split_once('=')?;
        if key.trim() != BAGGAGE_KEY {
            return None;
        }
        // Drop entry properties (`;…`).
        let value = value.split(';').next().unwrap_or("").trim();
        (!value.is_empty()).then_some(value)
    })
}

/// The tenant an incoming request carries: its `baggage` entry, else the
/// `x-strata-tenant` header.
pub fn tenant_from_headers(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(BAGGAGE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(tenant_from_baggage)
        .or_else(|| headers.get(TENANT_HEADER).and_then(|v| v.to_str().ok()))
        .map(str::to_owned)
}

/// Sets the tenant in `headers`' baggage, merging every existing `baggage`
/// header into one.
pub fn set_tenant(headers: &mut HeaderMap, tenant: &Tenant) {
    let existing: Vec<String> = headers
        .get_all(BAGGAGE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect();
    let merged = baggage_with_tenant(&existing.join(","), tenant);
    if let Ok(value) = HeaderValue::from_str(&merged) {
        headers.insert(BAGGAGE, value);
    }
}

/// Adds the tenant to an outgoing request.
pub trait WithTenant: Sized {
    /// The request with `strata-tenant=<tenant>` in its baggage.
    fn with_tenant(self, tenant: &Tenant) -> Self;
}

impl WithTenant for http::request::Builder {
    fn with_tenant(mut self, tenant: &Tenant) -> Self {
        if let Some(headers) = self.headers_mut() {
            set_tenant(headers, tenant);
        }
        self
    }
}

impl<B> WithTenant for http::Request<B> {
    fn with_tenant(mut self, tenant: &Tenant) -> Self {
        set_tenant(self.headers_mut(), tenant);
        self
    }
}

impl<T> WithTenant for tonic::Request<T> {
    fn with_tenant(mut self, tenant: &Tenant) -> Self {
        let existing = self
            .metadata()
            .get_all("baggage")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        let merged = baggage_with_tenant(&existing, tenant);
        if let Ok(value) = merged.parse() {
            self.metadata_mut().insert("baggage", value);
        }
        self
    }
}

impl crate::Client {
    /// This client's tenant, checked for propagation.
    pub fn propagated_tenant(&self) -> Result<Tenant, Error> {
        Tenant::new(self.tenant())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_tenant_entry_is_replaced_and_others_kept() {
        let t = Tenant::new("feat-1").unwrap();
        assert_eq!(baggage_with_tenant("", &t), "strata-tenant=feat-1");
        assert_eq!(
            baggage_with_tenant("a=1, strata-tenant=integration;p=x ,b=2", &t),
            "a=1,b=2,strata-tenant=feat-1"
        );
    }

    #[test]
    fn incoming_tenant_from_baggage_or_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(tenant_from_headers(&headers), None);
        headers.insert(TENANT_HEADER, HeaderValue::from_static("perf"));
        assert_eq!(tenant_from_headers(&headers).as_deref(), Some("perf"));
        headers.append(BAGGAGE, HeaderValue::from_static("x=1"));
        headers.append(
            BAGGAGE,
            HeaderValue::from_static("strata-tenant=feat-2;ttl=3"),
        );
        assert_eq!(
            tenant_from_headers(&headers).as_deref(),
            Some("feat-2"),
            "baggage wins"
        );
        set_tenant(&mut headers, &Tenant::new("feat-3").unwrap());
        assert_eq!(
            headers.get_all(BAGGAGE).iter().count(),
            1,
            "merged into one"
        );
        assert_eq!(headers[BAGGAGE], "x=1,strata-tenant=feat-3");
    }

    #[test]
    fn names_that_would_break_the_header_are_refused() {
        for bad in ["", "a,b", "a=b", "a b", "ü", &"x".repeat(64)] {
            assert!(Tenant::new(bad).is_err(), "{bad:?}");
        }
    }
}
