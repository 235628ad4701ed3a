//! Validation of project names, tenant names and configuration keys.
//!
//! Project and tenant names are DNS labels (they end up in host names,
//! metrics labels and URLs): 1–63 characters of `a-z`, `0-9` and `-`,
//! starting and ending with a letter or digit. Keys are `/`-separated paths
//! such as `matchmaker/server.yaml`.

/// Longest project or tenant name.
pub const MAX_NAME_LEN: usize = 63;
/// Longest configuration key, in bytes.
pub const MAX_KEY_LEN: usize = 512;

/// A name or key that breaks the rules, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct NameError {
    /// `project name`, `tenant name` or `key`.
    pub what: &'static str,
    /// The offending input.
    pub value: String,
    /// Which rule it breaks.
    pub reason: String,
}

fn dns_label(what: &'static str, value: &str) -> Result<(), NameError> {
    let err = |reason: &str| NameError {
        what,
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    if value.is_empty() {
        return Err(err("must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(err(&format!("longer than {MAX_NAME_LEN} characters")));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(err(&format!(
            "character {c:?} not allowed (use a-z, 0-9 and -)"
        )));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(err("must start and end with a letter or digit"));
    }
    Ok(())
}

/// Checks a project name.
pub fn validate_project(name: &str) -> Result<(), NameError> {
    dns_label("project name", name)
}

/// Checks a tenant name.
pub fn validate_tenant(name: &str) -> Result<(), NameError> {
    dns_label("tenant name", name)
}

/// Checks a service name (a DNS label: it becomes a host name for the
/// sidecar, `svc.strata`).
pub fn validate_service(name: &str) -> Result<(), NameError> {
    dns_label("service name", name)
}

/// Longest instance id or endpoint name.
pub const MAX_ID_LEN: usize = 128;

/// Checks an instance id or an endpoint name: 1–128 characters of
/// `A-Z a-z 0-9 . _ -`.
pub fn validate_id(what: &'static str, value: &str) -> Result<(), NameError> {
    let err = |reason: String| NameError {
        what,
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(err("must not be empty".into()));
    }
    if value.len() > MAX_ID_LEN {
        return Err(err(format!("longer than {MAX_ID_LEN} characters")));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(err(format!(
            "character {c:?} not allowed (use A-Z, a-z, 0-9, '.', '_' and '-')"
        )));
    }
    Ok(())
}

/// Checks a configuration key: non-empty `/`-separated segments of
/// `A-Z a-z 0-9 . _ -`, no `.`/`..` segments, at most [`MAX_KEY_LEN`] bytes.
pub fn validate_key(key: &str) -> Result<(), NameError> {
    let err = |reason: String| NameError {
        what: "key",
        value: key.to_owned(),
        reason,
    };
    if key.is_empty() {
        return Err(err("must not be empty".into()));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(err(format!("longer than {MAX_KEY_LEN} bytes")));
    }
    for segment in key.split('/') {
        if segment.is_empty() {
            return Err(err(
                "empty path segment (leading, trailing or double '/')".into()
            ));
        }
        if segment == "." || segment == ".." {
            return Err(err(format!("segment {segment:?} not allowed")));
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(err(format!(
                "character {c:?} not allowed (use A-Z, a-z, 0-9, '.', '_', '-' and '/')"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names_are_dns_labels() {
        for ok in ["integration", "feat-1", "a", "x9", &"a".repeat(63)] {
            validate_tenant(ok).unwrap();
        }
        for bad in [
            "",
            "Feat",
            "feat_1",
            "-feat",
            "feat-",
            "feat.1",
            "fé",
            &"a".repeat(64),
        ] {
            let err = validate_tenant(bad).unwrap_err();
            assert_eq!(err.what, "tenant name");
            assert!(!err.reason.is_empty());
        }
    }

    #[test]
    fn keys_are_clean_paths() {
        for ok in ["a", "matchmaker/server.yaml", "a/b/c.d_e-f", "A/B"] {
            validate_key(ok).unwrap();
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "a/../b",
            "./a",
            "a b",
            "a\\b",
            "ä",
            &"k".repeat(513),
        ] {
            assert!(validate_key(bad).is_err(), "{bad:?} accepted");
        }
        let msg = validate_key("a//b").unwrap_err().to_string();
        assert!(msg.contains("empty path segment"), "{msg}");
    }
}
