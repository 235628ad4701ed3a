use super::*;
use crate::state::keyspace::EndpointRecord;

fn persistent(address: &str) -> InstanceRecord {
    InstanceRecord {
        endpoints: [(
            "main".to_owned(),
            EndpointRecord {
                address: address.into(),
                protocol: "http".into(),
            },
        )]
        .into(),
        weight: 100,
        persistent: true,
        registered_at_unix_ms: 1,
        ..InstanceRecord::default()
    }
}

fn http_check(interval_ms: u32) -> CheckRecord {
    CheckRecord {
        kind: "http".into(),
        http_path: "/healthz".into(),
        endpoint: "main".into(),
        interval_ms,
        timeout_ms: 100,
        failure_threshold: 1,
        success_threshold: 1,
        ..CheckRecord::default()
    }
}

/// An import stores only what a registration could: the same limits,
/// check rules and probe policy.
#[test]
fn imported_instances_pass_the_registration_rules() {
    let limits = registry::RegistrationLimits {
        max_endpoints: 4,
        max_metadata_entries: 1,
        max_metadata_bytes: 64,
    };
    let policy = crate::probe::policy::ProbePolicy::default();
    let ok = persistent("10.0.0.1:80");
    assert_eq!(validate_imported(&ok, &limits, &policy), Ok(()));

    let mut crowded = ok.clone();
    crowded.metadata = [("a".into(), "1".into()), ("b".into(), "2".into())].into();
    let refused = validate_imported(&crowded, &limits, &policy).unwrap_err();
    assert_eq!(refused.reason, ErrorReason::LimitExceeded, "{refused}");

    let mut fast = ok.clone();
    fast.check = Some(http_check(10));
    let refused = validate_imported(&fast, &limits, &policy).unwrap_err();
    assert_eq!(refused.reason, ErrorReason::InvalidArgument, "{refused}");

    let mut metadata = persistent("169.254.169.254:80");
    metadata.check = Some(http_check(1000));
    let refused = validate_imported(&metadata, &limits, &policy).unwrap_err();
    assert_eq!(refused.reason, ErrorReason::PermissionDenied, "{refused}");
    // Without a check nothing connects there: the address is data.
    metadata.check = None;
    assert_eq!(validate_imported(&metadata, &limits, &policy), Ok(()));
}

#[test]
fn checks_become_probe_targets_on_their_endpoint() {
    let record = persistent("10.0.0.1:80");
    let target = probe_target(&http_check(1000), &record.endpoints).unwrap();
    assert_eq!(target.address, "10.0.0.1:80");
    assert_eq!(
        target.spec.kind,
        ProbeKind::Http {
            path: "/healthz".into(),
            expected_status: None
        }
    );
    let mut elsewhere = http_check(1000);
    elsewhere.endpoint = "admin".into();
    assert!(probe_target(&elsewhere, &record.endpoints).is_none());
}
