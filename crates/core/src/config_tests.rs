//! Tests of the configuration types (`config.rs`).

use super::*;

const EXAMPLE: &str = r#"
    data_dir = "/var/lib/sluice"

    [[target]]
    name = "warehouse"

    [target.connection]
    host = "db.internal"
    database = "app"
    user = "sluice"
    password = { env = "SLUICE_TARGET_PASSWORD" }
    ssl = { mode = "verify-full", root_cert = "/etc/sluice/ca.pem" }
    tunnel = { kind = "bastion", host = "bastion.example.com", user = "tunnel", key_file = "/etc/sluice/id_ed25519" }

    [[sync]]
    name = "app"
    id = "6f1c2a7e-0000-4000-8000-000000000001"
    source = { provider = "postgres", create_missing = true, connection = { host = "127.0.0.1", database = "app", user = "replicator", password = { file = "/run/secrets/pg" } } }

    [[consumer]]
    name = "orders"
    target = "warehouse"
    filter = { sync = { name = "app", collections = ["public.orders"] } }
    layout = { kind = "consumer_table", schema = "sluice", table = "records" }
"#;

#[test]
fn example_config_parses_with_defaults() {
    let config: Config = toml::from_str(EXAMPLE).unwrap();
    let target = &config.targets[0];
    assert_eq!(target.connection.port, 5432);
    assert_eq!(target.connection.ssl.mode, SslMode::VerifyFull);
    assert_eq!(target.read_role, "sluice_read");
    // Batches of up to 20,000 records: the initial load's batches cost it round trips and
    // commits (docs/records-stream-and-consumers.md).
    let batch = BatchConfig {
        max_records: 20_000,
        max_wait_ms: 50,
    };
    assert_eq!(config.consumers[0].batch, batch);
    let SourceConfig::Postgres {
        publication,
        slot,
        create_missing,
        ..
    } = &config.syncs[0].source
    else {
        panic!("expected a postgres source");
    };
    assert_eq!(
        (publication.as_str(), slot.as_str(), *create_missing),
        ("sluice_publication", "sluice_slot", true)
    );

    let filter = config.consumers[0].filter.resolve(&config.syncs).unwrap();
    assert!(matches!(filter, RecordFilter::Sync { sync_id, .. } if sync_id == config.syncs[0].id));
}

#[test]
fn inline_passwords_and_unknown_fields_are_rejected() {
    let inline = EXAMPLE.replace(r#"{ env = "SLUICE_TARGET_PASSWORD" }"#, r#""hunter2""#);
    assert!(
        toml::from_str::<Config>(&inline).is_err(),
        "a password must name its source"
    );

    let typo = EXAMPLE.replace(
        "database = \"app\"\n    user",
        "databse = \"app\"\n    user",
    );
    let err = toml::from_str::<Config>(&typo).unwrap_err().to_string();
    assert!(err.contains("databse"), "{err}");
}

#[test]
fn secret_sources_name_the_variable_not_the_value() {
    let missing = SecretSource::Env("SLUICE_TEST_SURELY_UNSET_VARIABLE".into());
    let err = missing.resolve().unwrap_err();
    assert!(
        err.to_string()
            .contains("SLUICE_TEST_SURELY_UNSET_VARIABLE")
    );
    assert_eq!(err.class(), crate::ErrorClass::FixConfiguration);

    let dir = std::env::temp_dir().join(format!("sluice-secret-{}", std::process::id()));
    std::fs::write(&dir, "s3cret-value\n").unwrap();
    let secret = SecretSource::File(dir.clone()).resolve().unwrap();
    std::fs::remove_file(&dir).unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(secret.expose_secret(), "s3cret-value");
    assert!(
        !format!("{secret:?}").contains("s3cret"),
        "Debug must not show the secret"
    );
}

#[test]
fn unknown_sync_in_a_filter_names_the_known_ones() {
    let config: Config = toml::from_str(EXAMPLE).unwrap();
    let filter = FilterConfig::Sync {
        name: "nope".into(),
        collections: None,
    };
    let err = filter.resolve(&config.syncs).unwrap_err();
    assert!(
        err.to_string().contains("\"nope\"") && err.to_string().contains("[\"app\"]"),
        "{err}"
    );
}

#[test]
fn backfill_readers_outside_1_to_16_is_a_problem_with_its_fix() {
    let with = |readers: &str| {
        let text = EXAMPLE.replace(
            "create_missing = true,",
            &format!("create_missing = true, {readers}"),
        );
        toml::from_str::<Config>(&text).unwrap().problems()
    };
    assert!(with("").is_empty(), "{:?}", with(""));
    assert!(with("backfill_readers = 16,").is_empty());
    for bad in ["0", "17"] {
        let problems = with(&format!("backfill_readers = {bad},"));
        assert_eq!(problems.len(), 1, "{problems:?}");
        let text = problems[0].to_string();
        assert!(
            text.contains(&format!("asks for {bad} backfill readers"))
                && text.contains("between 1 and 16"),
            "{text}"
        );
    }
}

#[test]
fn write_connections_outside_1_to_16_is_a_problem_with_its_fix() {
    let with = |connections: &str| {
        let text = EXAMPLE.replace(
            r#"table = "records" }"#,
            &format!(r#"table = "records"{connections} }}"#),
        );
        toml::from_str::<Config>(&text).unwrap().problems()
    };
    assert!(with("").is_empty(), "{:?}", with(""));
    assert!(with(", connections = 16").is_empty());
    let parsed: Config = toml::from_str(&EXAMPLE.replace(
        r#"table = "records" }"#,
        r#"table = "records", connections = 4 }"#,
    ))
    .unwrap();
    assert!(matches!(
        parsed.consumers[0].layout,
        LayoutConfig::ConsumerTable {
            connections: Some(4),
            ..
        }
    ));
    for bad in ["0", "17"] {
        let problems = with(&format!(", connections = {bad}"));
        assert_eq!(problems.len(), 1, "{problems:?}");
        let text = problems[0].to_string();
        assert!(
            text.contains(&format!("\"orders\" asks for {bad} connections"))
                && text.contains("between 1 and 16"),
            "{text}"
        );
    }
    // The schema mirror takes the same setting, within the same bounds.
    let mirror = |connections: &str| {
        let text = EXAMPLE.replace(
            r#"{ kind = "consumer_table", schema = "sluice", table = "records" }"#,
            &format!(r#"{{ kind = "schema_mirror", schema = "app"{connections} }}"#),
        );
        toml::from_str::<Config>(&text).unwrap()
    };
    assert!(matches!(
        mirror(", connections = 2").consumers[0].layout,
        LayoutConfig::SchemaMirror {
            connections: Some(2),
            ..
        }
    ));
    assert!(mirror("").problems().is_empty());
    let problems = mirror(", connections = 17").problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].to_string().contains("asks for 17 connections"),
        "{problems:?}"
    );
}
