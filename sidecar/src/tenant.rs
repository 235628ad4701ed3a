//! The tenant of a request (docs/sidecar.md): the W3C `baggage` entry
//! `strata-tenant`, else the `x-strata-tenant` header, else the sidecar's
//! own tenant — and making sure the forwarded request carries it as
//! baggage, so the next hop (and the next sidecar) sees it too.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use strata_client::propagation::{self, TENANT_HEADER, Tenant};

const BAGGAGE: HeaderName = HeaderName::from_static("baggage");

/// Where a request's tenant came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The `baggage` header (already carried on).
    Baggage,
    /// The `x-strata-tenant` header.
    Header,
    /// Nothing on the request: the sidecar's own tenant.
    Own,
}

/// The tenant a request names, borrowed from its headers, and where it
/// came from; `None` when it names none.
pub fn tenant_of(headers: &HeaderMap) -> Option<(&str, Origin)> {
    for value in headers.get_all(BAGGAGE) {
        if let Some(t) = value
            .to_str()
            .ok()
            .and_then(propagation::tenant_from_baggage)
        {
            return Some((t, Origin::Baggage));
        }
    }
    headers
        .get(TENANT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(|t| (t, Origin::Header))
}

/// The baggage value naming only `tenant` (`None` for a name that cannot
/// be a header value; [`valid`] names always can).
pub fn baggage_value(tenant: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("{}={tenant}", propagation::BAGGAGE_KEY)).ok()
}

/// Checks a tenant name from a request (it goes back into a header and a
/// metric label, so it must be a clean name).
pub fn valid(name: &str) -> bool {
    Tenant::new(name).is_ok()
}

/// Makes sure `headers` carry `tenant` as the baggage entry
/// `strata-tenant`, keeping other baggage entries. No allocation in the two
/// common cases: the only baggage header already names it (a hop that
/// propagates), or there is no baggage at all (`cached` is the prebuilt
/// `strata-tenant=<tenant>` value).
pub fn carry(headers: &mut HeaderMap, tenant: &str, origin: Origin, cached: &HeaderValue) {
    if !headers.contains_key(BAGGAGE) {
        headers.insert(BAGGAGE, cached.clone());
        return;
    }
    if origin == Origin::Baggage {
        let mut values = headers.get_all(BAGGAGE).iter();
        let first = values.next();
        if values.next().is_none()
            && first
                .and_then(|v| v.to_str().ok())
                .and_then(propagation::tenant_from_baggage)
                == Some(tenant)
        {
            return;
        }
    }
    if let Ok(tenant) = Tenant::new(tenant) {
        propagation::set_tenant(headers, &tenant);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cached(t: &str) -> HeaderValue {
        baggage_value(t).unwrap()
    }

    #[test]
    fn baggage_wins_then_header_then_nothing() {
        let mut h = HeaderMap::new();
        assert_eq!(tenant_of(&h), None);
        h.insert(TENANT_HEADER, HeaderValue::from_static("perf"));
        assert_eq!(tenant_of(&h), Some(("perf", Origin::Header)));
        h.insert(
            BAGGAGE,
            HeaderValue::from_static("k=v, strata-tenant=feat-1;x=y"),
        );
        assert_eq!(tenant_of(&h), Some(("feat-1", Origin::Baggage)));
    }

    #[test]
    fn carrying_keeps_other_entries_and_replaces_ours() {
        let mut h = HeaderMap::new();
        carry(&mut h, "feat-1", Origin::Own, &cached("feat-1"));
        assert_eq!(h[BAGGAGE], "strata-tenant=feat-1");

        let mut h = HeaderMap::new();
        h.insert(
            BAGGAGE,
            HeaderValue::from_static("userId=42,strata-tenant=feat-1"),
        );
        carry(&mut h, "feat-1", Origin::Baggage, &cached("feat-1"));
        assert_eq!(h[BAGGAGE], "userId=42,strata-tenant=feat-1", "untouched");

        let mut h = HeaderMap::new();
        h.insert(BAGGAGE, HeaderValue::from_static("userId=42"));
        h.insert(TENANT_HEADER, HeaderValue::from_static("feat-2"));
        carry(&mut h, "feat-2", Origin::Header, &cached("feat-2"));
        assert_eq!(h[BAGGAGE], "userId=42,strata-tenant=feat-2");
        assert!(valid("feat-2") && !valid("a,b"));
    }
}
