//! Everything that does not write a synced table passes through the proxy unchanged, as the
//! client's own role: logins (and refused logins), simple and extended queries, transactions,
//! COPY both ways, LISTEN/NOTIFY, cancel requests, errors; TLS to clients; and bad bytes on the
//! socket never take the proxy down.

use std::net::SocketAddr;
use std::time::Duration;

use sluice_localpg::{Auth, Cluster};
use sluice_pg::ConnectionSettings;
use sluice_proxy::Proxy;
use sqlx::postgres::{PgConnectOptions, PgListener, PgSslMode};
use sqlx::{Connection, Executor, PgConnection, Row};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PASSWORD: &str = "app secret 1";

struct Setup {
    cluster: Cluster,
    database: String,
    proxy: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn proxy_for(
    cluster: &Cluster,
    database: &str,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let target = ConnectionSettings::from_url(&cluster.url(database)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy = Proxy::new(target, tls);
    tokio::spawn(async move {
        proxy
            .serve(
                listener,
                Box::pin(async move {
                    let _ = stopped.await;
                }),
            )
            .await;
    });
    (address, stop)
}

async fn setup(cluster: Cluster) -> Setup {
    let database = cluster.fresh_database("proxy").await.unwrap();
    let _ = cluster.create_role("app", Some(PASSWORD)).await;
    cluster
        .execute(
            &database,
            "create table notes (id int primary key, body text, data bytea);
             grant select, insert, update, delete on notes to app;
             create table secret (id int);",
        )
        .await
        .unwrap();
    let (proxy, stop) = proxy_for(&cluster, &database, None).await;
    Setup {
        cluster,
        database,
        proxy,
        _stop: stop,
    }
}

fn through(s: &Setup, user: &str, password: &str) -> PgConnectOptions {
    PgConnectOptions::new()
        .host("127.0.0.1")
        .port(s.proxy.port())
        .username(user)
        .password(password)
        .database(&s.database)
        .ssl_mode(PgSslMode::Disable)
}

#[tokio::test]
async fn queries_transactions_copy_and_errors_pass_through_as_the_clients_role() {
    let s = setup(Cluster::start_default().unwrap()).await;
    let mut conn = PgConnection::connect_with(&through(&s, "app", PASSWORD))
        .await
        .unwrap();

    // The session is the client's own role.
    let who: String = sqlx::query_scalar("select current_user::text")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(who, "app");

    // Extended protocol with binary parameters and results; NUL-free text, bytes with zeros.
    let data = vec![0u8, 1, 2, 255, 0];
    sqlx::query("insert into notes values ($1, $2, $3)")
        .bind(1)
        .bind("first ✓")
        .bind(&data)
        .execute(&mut conn)
        .await
        .unwrap();
    let row = sqlx::query("select body, data from notes where id = $1")
        .bind(1)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(row.get::<String, _>(0), "first ✓");
    assert_eq!(row.get::<Vec<u8>, _>(1), data);

    // Simple protocol, several statements at once.
    conn.execute("insert into notes values (2, 'two'); insert into notes values (3, 'three')")
        .await
        .unwrap();

    // Transactions: a rollback leaves nothing, a commit keeps it.
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("insert into notes values (4, 'rolled back')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("insert into notes values (5, 'kept')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let ids: Vec<i32> = sqlx::query_scalar("select id from notes order by id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(ids, [1, 2, 3, 5]);

    // COPY in and out.
    let mut copy = conn
        .copy_in_raw("copy notes (id, body) from stdin")
        .await
        .unwrap();
    copy.send(b"10\tcopied\n11\talso copied\n".as_slice())
        .await
        .unwrap();
    assert_eq!(copy.finish().await.unwrap(), 2);
    let mut out = conn
        .copy_out_raw("copy (select id, body from notes where id >= 10 order by id) to stdout")
        .await
        .unwrap();
    let mut copied = Vec::new();
    while let Some(chunk) = futures_util::StreamExt::next(&mut out).await {
        copied.extend_from_slice(&chunk.unwrap());
    }
    drop(out);
    assert_eq!(
        String::from_utf8(copied).unwrap(),
        "10\tcopied\n11\talso copied\n"
    );

    // Errors come back as the target's, and the session goes on.
    let error = sqlx::query("select 1/0")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(
        error.as_database_error().unwrap().code().as_deref(),
        Some("22012")
    );
    let denied = sqlx::query("select * from secret")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(
        denied.as_database_error().unwrap().code().as_deref(),
        Some("42501"),
        "the client's own privileges apply"
    );
    let one: i32 = sqlx::query_scalar("select 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn listen_notify_and_cancel_pass_through() {
    let s = setup(Cluster::start_default().unwrap()).await;
    let mut listener = PgListener::connect_with(&sqlx::PgPool::connect_lazy_with(through(
        &s, "app", PASSWORD,
    )))
    .await
    .unwrap();
    listener.listen("news").await.unwrap();
    let mut conn = PgConnection::connect_with(&through(&s, "app", PASSWORD))
        .await
        .unwrap();
    conn.execute("notify news, 'hello'").await.unwrap();
    let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((note.channel(), note.payload()), ("news", "hello"));

    // psql sends a cancel request on SIGINT, to the address it connected to: the proxy.
    let psql = std::process::Command::new("psql")
        .arg(format!(
            "postgres://app@127.0.0.1:{}/{}?sslmode=disable",
            s.proxy.port(),
            s.database
        ))
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-c", "select pg_sleep(60)"])
        .env("PGPASSWORD", PASSWORD)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut admin = s.cluster.admin(&s.database).await.unwrap();
    let started = std::time::Instant::now();
    loop {
        let sleeping: i64 = sqlx::query_scalar("select count(*) from pg_stat_activity where query = 'select pg_sleep(60)' and state = 'active'")
            .fetch_one(&mut admin)
            .await
            .unwrap();
        if sleeping == 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "psql never started its query"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = psql.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let output = tokio::task::spawn_blocking(move || psql.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
}

#[tokio::test]
async fn logins_are_checked_by_the_target_and_nothing_else_gets_in() {
    let s = setup(Cluster::start_default().unwrap()).await;
    // A wrong password: the target's own error.
    let error = PgConnection::connect_with(&through(&s, "app", "wrong"))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("password authentication failed"),
        "{error}"
    );
    // No password at all.
    let error = PgConnection::connect_with(&through(&s, "app", ""))
        .await
        .unwrap_err();
    assert!(
        error
            .as_database_error()
            .is_some_and(|e| e.code().as_deref() == Some("28P01"))
            || error.to_string().contains("password"),
        "{error}"
    );
    // Replication connections are not carried.
    let mut raw = TcpStream::connect(s.proxy).await.unwrap();
    raw.write_all(&startup(&[
        ("user", "app"),
        ("database", &s.database),
        ("replication", "database"),
    ]))
    .await
    .unwrap();
    let answer = read_all(&mut raw).await;
    assert!(
        String::from_utf8_lossy(&answer).contains("replication"),
        "{answer:?}"
    );

    // A target that lets a role in without a password: the proxy refuses.
    let trusting = Cluster::options().auth(Auth::Trust).start().unwrap();
    let database = trusting.fresh_database("proxy").await.unwrap();
    trusting.create_role("app", Some(PASSWORD)).await.unwrap();
    let (proxy, _stop) = proxy_for(&trusting, &database, None).await;
    let error = PgConnection::connect_with(
        &PgConnectOptions::new()
            .host("127.0.0.1")
            .port(proxy.port())
            .username("app")
            .password(PASSWORD)
            .database(&database)
            .ssl_mode(PgSslMode::Disable),
    )
    .await
    .unwrap_err();
    assert!(error.to_string().contains("without a password"), "{error}");
}

#[tokio::test]
async fn clients_reach_the_proxy_over_tls_and_plain_text_is_refused() {
    let cluster = Cluster::start_default().unwrap();
    let database = cluster.fresh_database("proxy").await.unwrap();
    cluster.create_role("app", Some(PASSWORD)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let authority = sluice_localpg::Authority::new().unwrap();
    let (cert, key) = authority.server().unwrap();
    std::fs::write(dir.path().join("proxy.crt"), cert).unwrap();
    std::fs::write(dir.path().join("proxy.key"), key).unwrap();
    std::fs::write(dir.path().join("ca.crt"), authority.cert_pem()).unwrap();
    let acceptor = sluice_pg::tls::acceptor(
        "[proxy] tls",
        &dir.path().join("proxy.crt"),
        &dir.path().join("proxy.key"),
        &[],
    )
    .unwrap();
    let (proxy, _stop) = proxy_for(&cluster, &database, Some(acceptor)).await;
    let options = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(proxy.port())
        .username("app")
        .password(PASSWORD)
        .database(&database);
    let mut conn = PgConnection::connect_with(
        &options
            .clone()
            .ssl_mode(PgSslMode::VerifyFull)
            .ssl_root_cert(dir.path().join("ca.crt")),
    )
    .await
    .unwrap();
    let one: i32 = sqlx::query_scalar("select $1")
        .bind(1)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    let error = PgConnection::connect_with(&options.ssl_mode(PgSslMode::Disable))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("only TLS"), "{error}");
}

#[tokio::test]
async fn random_bytes_and_oversized_messages_never_take_the_proxy_down() {
    let s = setup(Cluster::start_default().unwrap()).await;
    let mut random = sluice_core::Xorshift::new(0x2545_f491_4f6c_dd1d);
    let mut next = move || random.next_u64();
    // Before login: random packets, and random bytes after a well-formed start.
    for round in 0..300 {
        let mut raw = TcpStream::connect(s.proxy).await.unwrap();
        let len = (next() % 64) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if round % 3 == 0 {
            let mut packet = startup(&[("user", "app"), ("database", &s.database)]);
            packet.extend_from_slice(&bytes);
            bytes = packet;
        }
        if round % 5 == 0 {
            // A length field claiming far more than the limit.
            bytes = [&[0x7f, 0xff, 0xff, 0xff][..], &bytes].concat();
        }
        let _ = raw.write_all(&bytes).await;
        let _ = tokio::time::timeout(Duration::from_millis(200), read_all(&mut raw)).await;
    }
    // After login: malformed and oversized messages get an error.
    for bad in [
        vec![b'Q', 0, 0, 0, 1],
        vec![b'Q', 0x7f, 0xff, 0xff, 0xff],
        vec![b'P', 0, 0, 0, 6, 0xff, 0xfe, b'S', 0, 0, 0, 4],
    ] {
        let mut raw = login_raw(&s).await;
        raw.write_all(&bad).await.unwrap();
        let (kind, body) = tokio::time::timeout(Duration::from_secs(10), read_message(&mut raw))
            .await
            .unwrap();
        // The proxy refuses what it cannot frame; the target refuses the rest. Either way the
        // client hears an error.
        assert_eq!(kind, b'E', "{}", String::from_utf8_lossy(&body));
    }
    // Still serving.
    let mut conn = PgConnection::connect_with(&through(&s, "app", PASSWORD))
        .await
        .unwrap();
    let one: i32 = sqlx::query_scalar("select 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
}

fn startup(parameters: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in parameters {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    [&((body.len() + 4) as u32).to_be_bytes()[..], &body].concat()
}

async fn read_all(raw: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = raw.read_to_end(&mut all).await;
    all
}

/// Logs in through the proxy on a raw socket with SCRAM-SHA-256 (no channel binding, as RFC
/// 5802 describes it), returning the socket after the first ReadyForQuery.
async fn login_raw(s: &Setup) -> TcpStream {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut raw = TcpStream::connect(s.proxy).await.unwrap();
    raw.write_all(&startup(&[("user", "app"), ("database", &s.database)]))
        .await
        .unwrap();
    let (kind, _) = read_message(&mut raw).await;
    assert_eq!(kind, b'R');
    let first_bare = "n=,r=rOprNGfwEbeRWgbNEkqO";
    let first = format!("n,,{first_bare}");
    let mut body = b"SCRAM-SHA-256\0".to_vec();
    body.extend_from_slice(&(first.len() as i32).to_be_bytes());
    body.extend_from_slice(first.as_bytes());
    write_message(&mut raw, b'p', &body).await;
    let (_, server_first) = read_message(&mut raw).await;
    let server_first = String::from_utf8(server_first[4..].to_vec()).unwrap();
    let field = |name: &str| {
        server_first
            .split(',')
            .find_map(|f| f.strip_prefix(name))
            .unwrap()
            .to_owned()
    };
    let salt = b64.decode(field("s=")).unwrap();
    let iterations = field("i=").parse::<u32>().unwrap();
    let mut salted = [0u8; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(iterations).unwrap(),
        &salt,
        PASSWORD.as_bytes(),
        &mut salted,
    );
    let mac = |key: &[u8], data: &[u8]| {
        ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), data)
            .as_ref()
            .to_vec()
    };
    let client_key = mac(&salted, b"Client Key");
    let stored_key = ring::digest::digest(&ring::digest::SHA256, &client_key);
    let without_proof = format!("c=biws,r={}", field("r="));
    let auth_message = format!("{first_bare},{server_first},{without_proof}");
    let signature = mac(stored_key.as_ref(), auth_message.as_bytes());
    let proof: Vec<u8> = client_key
        .iter()
        .zip(&signature)
        .map(|(a, b)| a ^ b)
        .collect();
    let last = format!("{without_proof},p={}", b64.encode(proof));
    write_message(&mut raw, b'p', last.as_bytes()).await;
    loop {
        let (kind, body) = read_message(&mut raw).await;
        assert_ne!(
            kind,
            b'E',
            "login failed: {}",
            String::from_utf8_lossy(&body)
        );
        if kind == b'Z' {
            return raw;
        }
    }
}

async fn write_message(raw: &mut TcpStream, kind: u8, body: &[u8]) {
    let mut m = vec![kind];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    raw.write_all(&m).await.unwrap();
}

async fn read_message(raw: &mut TcpStream) -> (u8, Vec<u8>) {
    let kind = raw.read_u8().await.unwrap();
    let len = raw.read_u32().await.unwrap() as usize;
    let mut body = vec![0; len - 4];
    raw.read_exact(&mut body).await.unwrap();
    (kind, body)
}

#[tokio::test]
async fn a_target_on_tls_is_reached_with_its_own_tls_mode() {
    let cluster = Cluster::options()
        .tls(sluice_localpg::Tls::Required)
        .start()
        .unwrap();
    let database = cluster.fresh_database("proxy").await.unwrap();
    cluster.create_role("app", Some(PASSWORD)).await.unwrap();
    // The target's settings say verify-full with the cluster's CA; the proxy follows them.
    let (proxy, _stop) = proxy_for(&cluster, &database, None).await;
    let mut conn = PgConnection::connect_with(
        &PgConnectOptions::new()
            .host("127.0.0.1")
            .port(proxy.port())
            .username("app")
            .password(PASSWORD)
            .database(&database)
            .ssl_mode(PgSslMode::Disable),
    )
    .await
    .unwrap();
    let tls: bool = sqlx::query_scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(tls, "the proxy reached the target over TLS");
}
