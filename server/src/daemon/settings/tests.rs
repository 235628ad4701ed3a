use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn defaults_apply_without_any_source() {
    let config = Config::load(&Flags::default(), env(&[])).unwrap();
    assert_eq!(config.listen, DEFAULT_LISTEN.parse().unwrap());
    assert_eq!(config.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    assert_eq!(config.shutdown_grace, Duration::from_secs(10));
    assert_eq!(config.log.format, LogFormat::Text);
}

#[test]
fn layers_override_in_order_file_env_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stratad.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:1000\"\ndata_dir = \"/from/file\"\nshutdown_grace = \"3s\"\n[log]\nformat = \"json\"\n",
    )
    .unwrap();
    let flags = Flags {
        config: Some(file),
        listen: Some("127.0.0.1:3000".into()),
        ..Flags::default()
    };
    let config = Config::load(
        &flags,
        env(&[
            ("STRATA_LISTEN", "127.0.0.1:2000"),
            ("STRATA_DATA_DIR", "/from/env"),
            ("HOME", "/x"),
        ]),
    )
    .unwrap();
    assert_eq!(
        config.listen,
        "127.0.0.1:3000".parse().unwrap(),
        "flag beats env and file"
    );
    assert_eq!(
        config.data_dir,
        PathBuf::from("/from/env"),
        "env beats file"
    );
    assert_eq!(
        config.shutdown_grace,
        Duration::from_secs(3),
        "file beats default"
    );
    assert_eq!(config.log.format, LogFormat::Json);
}

#[test]
fn config_file_can_come_from_env() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "data_dir = \"/d\"\n").unwrap();
    let config = Config::load(
        &Flags::default(),
        env(&[("STRATA_CONFIG", file.to_str().unwrap())]),
    )
    .unwrap();
    assert_eq!(config.data_dir, PathBuf::from("/d"));
}

#[test]
fn errors_name_the_setting_and_its_source() {
    let flags = Flags {
        listen: Some("nonsense".into()),
        ..Flags::default()
    };
    let err = Config::load(&flags, env(&[])).unwrap_err().to_string();
    assert!(
        err.contains("listen") && err.contains("--listen") && err.contains("nonsense"),
        "{err}"
    );

    let err = Config::load(&Flags::default(), env(&[("STRATA_LOG_FORMAT", "xml")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("log.format") && err.contains("STRATA_LOG_FORMAT"),
        "{err}"
    );

    let err = Config::load(&Flags::default(), env(&[("STRATA_SHUTDOWN_GRACE", "soon")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("shutdown_grace"), "{err}");
}

#[test]
fn unknown_file_keys_and_bad_toml_are_rejected_with_position() {
    let path = Path::new("bad.toml");
    let err = parse_file(path, "listen = \"127.0.0.1:1\"\nlisten_addr = 3\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("listen_addr") && err.contains("line 2"),
        "{err}"
    );
    let err = parse_file(path, "listen = \n").unwrap_err().to_string();
    assert!(err.contains("bad.toml") && err.contains("line 1"), "{err}");
}

#[test]
fn missing_config_file_is_a_read_error() {
    let flags = Flags {
        config: Some("/nonexistent/stratad.toml".into()),
        ..Flags::default()
    };
    let err = Config::load(&flags, env(&[])).unwrap_err();
    assert!(matches!(err, SettingsError::Read { .. }), "{err}");
}

#[test]
fn etcd_endpoints_select_etcd_and_layer_like_any_setting() {
    let config = Config::load(&Flags::default(), env(&[])).unwrap();
    assert_eq!(config.etcd, None, "the embedded store is the default");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stratad.toml");
    std::fs::write(
        &file,
        "[etcd]\nendpoints = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\"]\nprefix = \"/s/\"\n",
    )
    .unwrap();
    let flags = Flags {
        config: Some(file.clone()),
        ..Flags::default()
    };
    let etcd = Config::load(&flags, env(&[])).unwrap().etcd.unwrap();
    assert_eq!(etcd.endpoints, ["http://127.0.0.1:1", "http://127.0.0.1:2"]);
    assert_eq!(etcd.prefix, b"/s/");
    assert_eq!((etcd.tls, etcd.auth), (None, None));

    let from_env = env(&[("STRATA_ETCD_ENDPOINTS", "http://a:3, http://b:4,")]);
    let etcd = Config::load(&flags, from_env.clone())
        .unwrap()
        .etcd
        .unwrap();
    assert_eq!(
        etcd.endpoints,
        ["http://a:3", "http://b:4"],
        "env beats file"
    );
    assert_eq!(etcd.prefix, b"/s/", "the file's prefix stays");

    let flags = Flags {
        etcd_endpoints: Some("http://c:5".into()),
        ..flags
    };
    let etcd = Config::load(&flags, from_env).unwrap().etcd.unwrap();
    assert_eq!(etcd.endpoints, ["http://c:5"], "flag beats env");
}

#[test]
fn etcd_settings_are_checked_together() {
    let err = |flags: &Flags, pairs: &[(&str, &str)]| {
        Config::load(flags, env(pairs)).unwrap_err().to_string()
    };
    let flags = Flags {
        etcd_endpoints: Some("127.0.0.1:2379".into()),
        ..Flags::default()
    };
    let e = err(&flags, &[]);
    assert!(
        e.contains("etcd.endpoints") && e.contains("--etcd-endpoints"),
        "{e}"
    );

    let e = err(&Flags::default(), &[("STRATA_ETCD_PREFIX", "/x/")]);
    assert!(
        e.contains("etcd.prefix") && e.contains("STRATA_ETCD_PREFIX"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "pem").unwrap();
    let ca = ca.to_str().unwrap();
    let plain = Flags {
        etcd_endpoints: Some("http://127.0.0.1:2379".into()),
        ..Flags::default()
    };
    let e = err(&plain, &[("STRATA_ETCD_CA_FILE", ca)]);
    assert!(e.contains("etcd.ca_file") && e.contains("https"), "{e}");

    let tls = Flags {
        etcd_endpoints: Some("https://127.0.0.1:2379".into()),
        ..Flags::default()
    };
    let e = err(&tls, &[]);
    assert!(e.contains("etcd.ca_file"), "{e}");
    let e = err(&tls, &[("STRATA_ETCD_CA_FILE", "/nonexistent/ca.pem")]);
    assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    let e = err(
        &tls,
        &[("STRATA_ETCD_CA_FILE", ca), ("STRATA_ETCD_CERT_FILE", ca)],
    );
    assert!(e.contains("etcd.key_file"), "{e}");
    let config = Config::load(&tls, env(&[("STRATA_ETCD_CA_FILE", ca)])).unwrap();
    let etcd = config.etcd.unwrap();
    assert_eq!(etcd.tls.unwrap().ca_file, PathBuf::from(ca));

    let mixed = Flags {
        etcd_endpoints: Some("https://a:1,http://b:2".into()),
        ..Flags::default()
    };
    assert!(err(&mixed, &[("STRATA_ETCD_CA_FILE", ca)]).contains("mixes"));

    let password = dir.path().join("password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let e = err(&plain, &[("STRATA_ETCD_USERNAME", "strata")]);
    assert!(e.contains("etcd.password_file"), "{e}");
    let config = Config::load(
        &plain,
        env(&[
            ("STRATA_ETCD_USERNAME", "strata"),
            ("STRATA_ETCD_PASSWORD_FILE", password.to_str().unwrap()),
        ]),
    )
    .unwrap();
    let auth = config.etcd.unwrap().auth.unwrap();
    assert_eq!(
        (auth.username.as_str(), auth.password.as_str()),
        ("strata", "s3cret")
    );
    assert!(
        !format!("{auth:?}").contains("s3cret"),
        "the password stays out of Debug"
    );
}

#[test]
fn shipped_example_etcd_section_parses_when_uncommented() {
    // Settings in the example's [etcd] section are commented as `#key`
    // (prose as `# text`), so removing the `#` enables them.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/stratad.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut in_etcd = false;
    let enabled: String = text
        .lines()
        .map(|line| {
            if line.starts_with("#[") || line.starts_with('[') {
                in_etcd = line == "#[etcd]";
            }
            let uncomment =
                in_etcd && line.len() > 1 && line.starts_with('#') && !line.starts_with("# ");
            format!("{}\n", if uncomment { &line[1..] } else { line })
        })
        .collect();
    assert!(
        enabled.contains("\n[etcd]\n"),
        "the example documents [etcd]"
    );
    let layer = parse_layer(&path, &enabled).unwrap();
    let endpoints = layer.etcd.endpoints.unwrap().urls();
    assert!(endpoints.len() >= 2, "{endpoints:?}");
    assert!(layer.etcd.prefix.is_some());
}

#[test]
fn tls_settings_layer_like_any_setting_and_are_checked_together() {
    let err = |flags: &Flags, pairs: &[(&str, &str)]| {
        Config::load(flags, env(pairs)).unwrap_err().to_string()
    };
    assert_eq!(Config::load(&Flags::default(), env(&[])).unwrap().tls, None);

    let cert_only = Flags {
        tls_cert: Some("/x/cert.pem".into()),
        ..Flags::default()
    };
    let e = err(&cert_only, &[]);
    assert!(e.contains("tls.key") && e.contains("--tls-key"), "{e}");
    let e = err(&Flags::default(), &[("STRATA_TLS_KEY", "/x/key.pem")]);
    assert!(
        e.contains("tls.cert") && e.contains("STRATA_TLS_KEY"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stratad.toml");
    std::fs::write(
        &file,
        "[tls]\ncert = \"/file/cert.pem\"\nkey = \"/file/key.pem\"\n",
    )
    .unwrap();
    let from_file = Flags {
        config: Some(file.clone()),
        ..Flags::default()
    };
    let e = err(&from_file, &[]);
    assert!(
        e.contains("tls.cert") && e.contains("/file/cert.pem") && e.contains("stratad.toml"),
        "the file's unreadable certificate is named with its source: {e}"
    );
    let e = err(&from_file, &[("STRATA_TLS_CERT", "/env/cert.pem")]);
    assert!(
        e.contains("/env/cert.pem") && e.contains("STRATA_TLS_CERT"),
        "env beats file: {e}"
    );
    let flags = Flags {
        tls_cert: Some("/flag/cert.pem".into()),
        ..from_file
    };
    let e = err(&flags, &[("STRATA_TLS_CERT", "/env/cert.pem")]);
    assert!(
        e.contains("/flag/cert.pem") && e.contains("--tls-cert"),
        "flag beats env: {e}"
    );

    std::fs::write(&file, "[tls]\nclient_ca = \"/file/ca.pem\"\n").unwrap();
    let e = err(
        &Flags {
            config: Some(file),
            ..Flags::default()
        },
        &[],
    );
    assert!(
        e.contains("tls.client_ca") && e.contains("need TLS"),
        "client certificates without TLS: {e}"
    );
}

#[test]
fn shipped_example_tls_section_parses_when_uncommented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/stratad.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut in_tls = false;
    let enabled: String = text
        .lines()
        .map(|line| {
            if line.starts_with("#[") || line.starts_with('[') {
                in_tls = line == "#[tls]";
            }
            let uncomment =
                in_tls && line.len() > 1 && line.starts_with('#') && !line.starts_with("# ");
            format!("{}\n", if uncomment { &line[1..] } else { line })
        })
        .collect();
    assert!(enabled.contains("\n[tls]\n"), "the example documents [tls]");
    let tls = parse_layer(&path, &enabled).unwrap().tls;
    assert!(tls.cert.is_some() && tls.key.is_some() && tls.client_ca.is_some());
}

#[test]
fn shipped_example_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/stratad.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let config = parse_file(&path, &text).unwrap();
    assert_eq!(config.listen, DEFAULT_LISTEN.parse().unwrap());
    assert_eq!(config.compaction.retain_revisions, 100_000);
    assert_eq!(config.limits.history_versions, 50);
}
