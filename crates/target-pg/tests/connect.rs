//! Connection settings and diagnosed failures, each against a real server set up to produce it.

use std::sync::LazyLock;
use std::time::Duration;

use secrecy::SecretString;
use sluice_core::{ErrorClass, SslMode};
use sluice_localpg::{Auth, Cluster, Tls};
use sluice_target_pg::{ConnectError, ConnectionSettings, catalog};

/// TLS offered (not required), also listening on 127.0.0.2, a name its certificate lacks.
static TLS: LazyLock<Cluster> = LazyLock::new(|| {
    Cluster::options()
        .tls(Tls::Optional)
        .setting("listen_addresses", "'127.0.0.1,127.0.0.2'")
        .hba_line("host all all 127.0.0.2/32 scram-sha-256")
        .hba_line("host all mallory 127.0.0.1/32 reject")
        .start()
        .expect("start the TLS cluster")
});
/// TLS required: plain connections are rejected.
static TLS_REQUIRED: LazyLock<Cluster> = LazyLock::new(|| {
    Cluster::options()
        .tls(Tls::Required)
        .start()
        .expect("start the TLS-required cluster")
});
/// No TLS at all, trust authentication (so a missing role is reported as such).
static PLAIN: LazyLock<Cluster> = LazyLock::new(|| {
    Cluster::options()
        .auth(Auth::Trust)
        .hba_line("host all mallory 127.0.0.1/32 reject")
        .start()
        .expect("start the plain cluster")
});

fn settings(pg: &Cluster, mode: SslMode) -> ConnectionSettings {
    let mut s = ConnectionSettings::new("127.0.0.1", pg.port(), "postgres", "postgres");
    s.password = Some(SecretString::from(pg.superuser_password().to_owned()));
    s.ssl_mode = mode;
    s.root_cert = pg.ca_cert();
    s.connect_timeout = Duration::from_secs(5);
    s
}

async fn ssl_in_use(s: &ConnectionSettings) -> bool {
    let mut conn = s.connect().await.unwrap_or_else(|e| panic!("{s:?}: {e}"));
    catalog::server_facts(&mut conn).await.unwrap().ssl
}

#[tokio::test]
async fn each_tls_mode_checks_what_it_promises() {
    assert!(!ssl_in_use(&settings(&TLS, SslMode::Disable)).await);
    assert!(ssl_in_use(&settings(&TLS, SslMode::Prefer)).await);
    assert!(ssl_in_use(&settings(&TLS, SslMode::VerifyCa)).await);
    assert!(ssl_in_use(&settings(&TLS, SslMode::VerifyFull)).await);

    // `require` encrypts but does not verify: another cluster's CA is accepted.
    let mut wrong_ca = settings(&TLS, SslMode::Require);
    wrong_ca.root_cert = TLS_REQUIRED.ca_cert();
    assert!(ssl_in_use(&wrong_ca).await);

    // `verify-ca` and `verify-full` reject a certificate from an unknown CA.
    for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
        wrong_ca.ssl_mode = mode;
        let err = wrong_ca.connect().await.unwrap_err();
        assert!(
            matches!(err, ConnectError::CertificateRejected { .. }),
            "{mode:?}: {err}"
        );
        assert!(err.to_string().contains("root certificate"), "{err}");
    }

    // 127.0.0.2 is not a name in the certificate: verify-ca accepts, verify-full refuses.
    let mut other_name = settings(&TLS, SslMode::VerifyCa);
    other_name.host = "127.0.0.2".into();
    assert!(ssl_in_use(&other_name).await);
    other_name.ssl_mode = SslMode::VerifyFull;
    let err = other_name.connect().await.unwrap_err();
    assert!(
        matches!(err, ConnectError::CertificateRejected { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn the_four_tls_permutations() {
    // sluice wants TLS, the database has none: refused, and the message says which side wants what.
    let err = settings(&PLAIN, SslMode::Require)
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::TlsUnsupportedByServer { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("sluice is configured to use TLS (sslmode=require), but the database")
    );
    // sluice wants TLS, the database supports it: fine.
    assert!(ssl_in_use(&settings(&TLS_REQUIRED, SslMode::VerifyFull)).await);
    // sluice does not want TLS, the database does not require it: fine.
    assert!(!ssl_in_use(&settings(&PLAIN, SslMode::Disable)).await);
    // sluice does not want TLS, the database requires it: refused, with the fix.
    let err = settings(&TLS_REQUIRED, SslMode::Disable)
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::TlsRequiredByServer { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("the database requires TLS, but sluice is configured not to use it")
    );
    assert_eq!(err.class(), ErrorClass::FixConfiguration);
}

#[tokio::test]
async fn client_certificates_are_required_and_used() {
    let pg = Cluster::options()
        .tls(Tls::ClientCertRequired)
        .start()
        .unwrap();
    let mut s = settings(&pg, SslMode::VerifyFull);
    let err = s.connect().await.unwrap_err();
    assert!(
        matches!(err, ConnectError::ClientCertificateRequired { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("client_cert and client_key"));
    let cert = pg.client_cert("postgres").unwrap();
    s.client_cert = Some(cert.cert);
    s.client_key = Some(cert.key);
    assert!(ssl_in_use(&s).await);
}

#[tokio::test]
async fn a_closed_port_is_refused_and_names_host_and_port() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = ConnectionSettings::new("127.0.0.1", port, "postgres", "postgres");
    let err = s.connect().await.unwrap_err();
    assert!(matches!(err, ConnectError::Refused { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}"))
            && err.to_string().contains("host and port")
    );
    assert_eq!(err.class(), ErrorClass::Retry);
}

#[tokio::test]
async fn a_listener_that_never_answers_times_out_with_the_reachability_check() {
    // Accepts TCP (the kernel completes the handshake) but never speaks: like a black hole.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut s = ConnectionSettings::new("127.0.0.1", port, "postgres", "postgres");
    s.ssl_mode = SslMode::Disable;
    s.connect_timeout = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let err = s.connect().await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the timeout is honoured"
    );
    assert!(
        matches!(err, ConnectError::Timeout { secs: 1, .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains(&format!("nc -vz 127.0.0.1 {port}")),
        "{err}"
    );
    assert!(err.to_string().contains("firewall"));
    drop(listener);
}

#[tokio::test]
async fn an_unknown_host_name_is_a_dns_failure() {
    let mut s = ConnectionSettings::new("no-such-host.invalid", 5432, "postgres", "postgres");
    s.connect_timeout = Duration::from_secs(10);
    let err = s.connect().await.unwrap_err();
    assert!(matches!(err, ConnectError::Dns { .. }), "{err}");
    assert!(err.to_string().contains("\"no-such-host.invalid\""));
}

#[tokio::test]
async fn a_wrong_password_is_named_and_never_echoed() {
    let mut s = settings(&TLS, SslMode::VerifyFull);
    s.password = Some(SecretString::from("Wr0ng-Pa55word-Xyzzy".to_owned()));
    let err = s.connect().await.unwrap_err();
    assert!(matches!(err, ConnectError::WrongPassword { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("password authentication failed for postgres")
    );
    assert!(!format!("{err} {err:?}").contains("Xyzzy"));
}

#[tokio::test]
async fn a_pg_hba_rejection_is_invalid_authorization_specification() {
    for pg in [&*PLAIN, &*TLS] {
        let mut s = settings(pg, SslMode::Disable);
        s.user = "mallory".into();
        let err = s.connect().await.unwrap_err();
        assert!(matches!(err, ConnectError::NoHbaEntry { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.starts_with("invalid_authorization_specification"),
            "{text}"
        );
        assert!(
            text.contains("pg_hba.conf") && text.contains("scram-sha-256"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn a_missing_role_or_database_is_named() {
    let mut s = settings(&PLAIN, SslMode::Disable);
    s.user = "ghost".into();
    let err = s.connect().await.unwrap_err();
    assert!(matches!(err, ConnectError::RoleMissing { .. }), "{err}");

    let mut s = settings(&PLAIN, SslMode::Disable);
    s.database = "no_such_database".into();
    let err = s.connect().await.unwrap_err();
    assert!(matches!(err, ConnectError::DatabaseMissing { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("\"no_such_database\" does not exist")
    );
}

#[tokio::test]
async fn a_missing_connect_privilege_comes_with_the_grant() {
    let db = PLAIN.fresh_database("noconnect").await.unwrap();
    PLAIN.create_role("outsider", None).await.unwrap();
    PLAIN
        .execute(
            "postgres",
            &format!("revoke connect on database {db} from public"),
        )
        .await
        .unwrap();
    let mut s = settings(&PLAIN, SslMode::Disable);
    s.user = "outsider".into();
    s.database = db.clone();
    let err = s.connect().await.unwrap_err();
    assert!(
        matches!(err, ConnectError::NoConnectPrivilege { .. }),
        "{err}"
    );
    assert_eq!(
        err.fix_sql(),
        Some(format!("grant connect on database \"{db}\" to \"outsider\";").as_str())
    );
}

#[tokio::test]
async fn settings_from_a_url_connect_like_settings_from_fields() {
    let s = ConnectionSettings::from_url(&TLS_REQUIRED.url("postgres")).unwrap();
    assert_eq!(s.ssl_mode, SslMode::VerifyFull);
    assert!(ssl_in_use(&s).await);
}
