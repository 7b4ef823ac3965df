//! The write-back proxy in `sluice serve`, end to end: a PostgreSQL source mirrored into the
//! target, clients writing the mirror through the proxy, each change applied to the source
//! first and then visible in the target at once; real clients (psql, sqlx, Python's psycopg,
//! Node's pg) over TLS with prepared statements; a push sync writing through its webhook.

use std::path::PathBuf;
use std::process::Command;

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{Connection, Executor, PgConnection};

mod support;
use support::*;

struct Proxied {
    env: Env,
    /// Killed when the test ends, passing or not.
    _child: Serving,
    proxy: u16,
}

async fn start(extra_proxy: &str) -> Proxied {
    start_with(extra_proxy, false).await
}

/// With `tls`, the proxy serves TLS with a certificate from a test CA written to
/// `<dir>/ca.crt`.
async fn start_with(extra_proxy: &str, tls: bool) -> Proxied {
    let env = env().await;
    let mut extra_proxy = extra_proxy.to_owned();
    if tls {
        let authority = sluice_localpg::Authority::new().unwrap();
        let (cert, key) = authority.server().unwrap();
        let dir = env.dir.path();
        std::fs::write(dir.join("proxy.crt"), cert).unwrap();
        std::fs::write(dir.join("proxy.key"), key).unwrap();
        std::fs::write(dir.join("ca.crt"), authority.cert_pem()).unwrap();
        extra_proxy.push_str(&format!(
            "\ntls = {{ certificate_file = \"{}\", key_file = \"{}\" }}\n",
            dir.join("proxy.crt").display(),
            dir.join("proxy.key").display()
        ));
    }
    env.source
        .execute(
            "postgres",
            "alter table public.orders add constraint qty_not_negative check (qty >= 0);
             create role sluice_writer login password 'writer-pw';
             grant select, insert, update, delete on public.orders to sluice_writer;",
        )
        .await
        .unwrap();
    env.target
        .execute(
            "postgres",
            "create role app_user login password 'app-pw';
             create role reader login password 'reader-pw';
             grant sluice_read to app_user, reader;
             create table public.notes (id int primary key, body text);
             grant select, insert, update, delete on public.notes to app_user;
             create table public.orders (id int primary key, qty int);
             insert into public.orders values (1, 1);
             grant select, update on public.orders to app_user;",
        )
        .await
        .unwrap();
    let writer_password = env.dir.path().join("writer-password");
    std::fs::write(&writer_password, "writer-pw").unwrap();
    let proxy = free_port();
    let text = config(
        &env,
        &format!(
            r#"
[[consumer]]
name = "app-mirror"
target = "warehouse"
filter = {{ sync = {{ name = "app" }} }}
layout = {{ kind = "schema_mirror", schema = "app" }}
batch = {{ max_records = 1000, max_wait_ms = 20 }}

[proxy]
listen = "127.0.0.1:{proxy}"
target = "warehouse"
{extra_proxy}
"#
        ),
    )
    .replace(
        "create_missing = true\n",
        &format!(
            "create_missing = true\nwriter = {{ user = \"sluice_writer\", password = {{ file = \"{}\" }} }}\n",
            writer_password.display()
        ),
    );
    let path = env.dir.path().join("sluice.toml");
    std::fs::write(&path, text).unwrap();
    let (child, _api) = serve_ready(&env, &path).await;
    wait_until("the mirror is backfilled", &env, 60, async || {
        target_count(&env, "app.orders", "true").await == 500
    })
    .await;
    env.target
        .execute(
            "postgres",
            "grant insert, update, delete on app.orders to app_user;
             alter table app.orders enable row level security;
             create policy app_user_rows on app.orders to app_user using (id <= 100 or id >= 900);
             create policy reader_rows on app.orders for select to reader using (true);",
        )
        .await
        .unwrap();
    Proxied {
        env,
        _child: child,
        proxy,
    }
}

fn options(p: &Proxied, user: &str, password: &str) -> PgConnectOptions {
    options_at(p.proxy, user, password)
}

fn options_at(port: u16, user: &str, password: &str) -> PgConnectOptions {
    PgConnectOptions::new()
        .host("127.0.0.1")
        .port(port)
        .username(user)
        .password(password)
        .database("postgres")
        .ssl_mode(PgSslMode::Disable)
}

/// The error's message and hint, as a client shows them.
fn message_and_hint(error: &sqlx::Error) -> String {
    let db = error
        .as_database_error()
        .unwrap_or_else(|| panic!("not a server error: {error}"))
        .downcast_ref::<sqlx::postgres::PgDatabaseError>();
    format!("{} (hint: {})", db.message(), db.hint().unwrap_or_default())
}

async fn source_qty(p: &Proxied, id: i32) -> Option<i32> {
    let mut conn = p.env.source.admin("postgres").await.unwrap();
    sqlx::query_scalar("select qty from public.orders where id = $1")
        .bind(id)
        .fetch_optional(&mut conn)
        .await
        .unwrap()
}

/// Runs each of `sql` with `psql -c` (one query message each).
fn psql(p: &Proxied, user: &str, password: &str, sql: &str) -> (bool, String) {
    let mut command = Command::new("psql");
    command
        .arg(format!(
            "postgres://{user}@127.0.0.1:{}/postgres?sslmode=disable",
            p.proxy
        ))
        .args(["-X", "-v", "ON_ERROR_STOP=1"]);
    for statement in sql.split_inclusive(';') {
        command.args(["-c", statement.trim()]);
    }
    let out = command.env("PGPASSWORD", password).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn writes_to_synced_tables_go_upstream_first_and_read_back_at_once() {
    let p = start("").await;
    let mut conn = PgConnection::connect_with(&options(&p, "app_user", "app-pw"))
        .await
        .unwrap();

    // sqlx: the extended protocol, binary parameters. The next read sees the write.
    let done = sqlx::query("update app.orders set qty = $1 where id = $2")
        .bind(77)
        .bind(7)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(done.rows_affected(), 1);
    let qty: i32 = sqlx::query_scalar("select qty from app.orders where id = 7")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(qty, 77, "read-your-writes");
    assert_eq!(source_qty(&p, 7).await, Some(77), "applied upstream");

    // psql: the simple protocol, RETURNING, and an upstream default-free insert.
    let (ok, out) = psql(
        &p,
        "app_user",
        "app-pw",
        "insert into app.orders (id, item, qty) values (900, 'via proxy', 3) returning id, item",
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("900 | via proxy") && out.contains("INSERT 0 1"),
        "{out}"
    );
    assert_eq!(source_qty(&p, 900).await, Some(3));
    let (ok, out) = psql(
        &p,
        "app_user",
        "app-pw",
        "update app.orders set qty = qty + 1 where id in (900, 7) returning id, qty",
    );
    assert!(ok && out.contains("UPDATE 2"), "{out}");
    assert!(
        out.contains("900 |   4") && out.contains("  7 |  78"),
        "{out}"
    );
    let (ok, out) = psql(
        &p,
        "app_user",
        "app-pw",
        "delete from app.orders where id = 900 returning item",
    );
    assert!(
        ok && out.contains("via proxy") && out.contains("DELETE 1"),
        "{out}"
    );
    assert_eq!(source_qty(&p, 900).await, None);
    assert_eq!(target_count(&p.env, "app.orders", "id = 900").await, 0);

    // The upstream's refusal comes back as an error, with its own SQLSTATE; nothing changes.
    let error = sqlx::query("update app.orders set qty = -1 where id = 7")
        .execute(&mut conn)
        .await
        .unwrap_err();
    let db = error.as_database_error().unwrap();
    assert!(
        db.message().starts_with(
            "Error updating orders: new row for relation \"orders\" violates check constraint"
        ),
        "{}",
        db.message()
    );
    assert_eq!(db.code().as_deref(), Some("23514"));
    assert_eq!(source_qty(&p, 7).await, Some(78));

    // Row-level security decides which rows a client may write: none of these is its.
    let done = sqlx::query("update app.orders set qty = 5 where id = 200")
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(done.rows_affected(), 0);
    assert_eq!(source_qty(&p, 200).await, Some(200));
    // Without UPDATE on the table, nothing at all.
    let mut reader = PgConnection::connect_with(&options(&p, "reader", "reader-pw"))
        .await
        .unwrap();
    let error = sqlx::query("update app.orders set qty = 5 where id = 1")
        .execute(&mut reader)
        .await
        .unwrap_err();
    assert_eq!(
        error.as_database_error().unwrap().code().as_deref(),
        Some("42501"),
        "{error}"
    );
    assert_eq!(source_qty(&p, 1).await, Some(1));

    // Inside BEGIN: refused by default, naming the setting.
    let mut tx = conn.begin().await.unwrap();
    let error = sqlx::query("update app.orders set qty = 9 where id = 7")
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert!(
        message_and_hint(&error).contains("writes_in_transactions"),
        "{error}"
    );
    tx.rollback().await.unwrap();
    assert_eq!(source_qty(&p, 7).await, Some(78));

    // Forms the upstream cannot take are refused with the way out.
    let error = sqlx::query(
        "insert into app.orders (id, item, qty) values (7, 'x', 1) on conflict do nothing",
    )
    .execute(&mut conn)
    .await
    .unwrap_err();
    assert!(error.to_string().contains("ON CONFLICT"), "{error}");

    // Everything else still passes through: a transaction on the client's own table.
    let mut tx = conn.begin().await.unwrap();
    tx.execute("insert into public.notes values (1, 'mine')")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let body: String = sqlx::query_scalar("select body from public.notes")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(body, "mine");
}

#[tokio::test]
async fn row_limit_and_writes_in_transactions_follow_the_config() {
    let p = start("max_rows_per_statement = 10\nwrites_in_transactions = true").await;
    let mut conn = PgConnection::connect_with(&options(&p, "app_user", "app-pw"))
        .await
        .unwrap();
    let error = sqlx::query("update app.orders set qty = 0 where id <= 50")
        .execute(&mut conn)
        .await
        .unwrap_err();
    let error = message_and_hint(&error);
    assert!(
        error.contains("50 rows") && error.contains("max_rows_per_statement"),
        "{error}"
    );
    assert_eq!(source_qty(&p, 50).await, Some(50), "nothing was sent");

    let (ok, out) = psql(
        &p,
        "app_user",
        "app-pw",
        "begin; update app.orders set qty = 11 where id = 3; rollback;",
    );
    assert!(ok, "{out}");
    assert!(out.contains("a ROLLBACK will not undo"), "{out}");
    assert_eq!(
        source_qty(&p, 3).await,
        Some(11),
        "applied at once, upstream first"
    );
}

/// What the test's webhook received: (authorization, idempotency key, body).
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, String, serde_json::Value)>>>;

/// A webhook that applies changes to nothing but remembers them: emails without `@` are
/// refused with 422, inserts get the id `u-new-<n>`.
async fn webhook() -> (String, Received) {
    use axum::http::{HeaderMap, StatusCode};
    let received: Received = Default::default();
    let app = axum::Router::new().route(
        "/changes",
        axum::routing::post({
            let received = received.clone();
            move |headers: HeaderMap, body: axum::Json<serde_json::Value>| {
                let received = received.clone();
                async move {
                    let header = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let mut all = received.lock().unwrap();
                    all.push((
                        header("authorization"),
                        header("idempotency-key"),
                        body.0.clone(),
                    ));
                    if body.0["values"]["email"]
                        .as_str()
                        .is_some_and(|e| !e.contains('@'))
                    {
                        return (
                            StatusCode::UNPROCESSABLE_ENTITY,
                            axum::Json(serde_json::json!({"error": "invalid email"})),
                        );
                    }
                    if body.0["operation"] == "insert" {
                        return (
                            StatusCode::OK,
                            axum::Json(serde_json::json!({"id": format!("u-new-{}", all.len())})),
                        );
                    }
                    (StatusCode::NO_CONTENT, axum::Json(serde_json::Value::Null))
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/changes", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

#[tokio::test]
async fn writes_to_pushed_records_go_to_the_syncs_webhook() {
    let env = env().await;
    env.target
        .execute(
            "postgres",
            "create role app_user login password 'app-pw'; grant sluice_read to app_user;",
        )
        .await
        .unwrap();
    let (url, received) = webhook().await;
    std::fs::write(env.dir.path().join("webhook-secret"), "hook-secret-1").unwrap();
    let proxy = free_port();
    let text = config(
        &env,
        &format!(
            r#"
[[consumer]]
name = "events-mirror"
target = "warehouse"
filter = {{ sync = {{ name = "events" }} }}
layout = {{ kind = "schema_mirror", schema = "events", collections = {{ signups = {{ json_schema = {{ type = "object", properties = {{ email = {{ type = "string" }}, plan = {{ type = "string" }}, seats = {{ type = "integer" }} }} }} }} }} }}
batch = {{ max_records = 1000, max_wait_ms = 20 }}

[proxy]
listen = "127.0.0.1:{proxy}"
target = "warehouse"
"#
        ),
    )
    .replace(
        r#"source = { provider = "http" }"#,
        &format!(
            r#"source = {{ provider = "http", webhook = {{ url = "{url}", secret = {{ file = "{}" }} }} }}"#,
            env.dir.path().join("webhook-secret").display()
        ),
    );
    let path = env.dir.path().join("sluice.toml");
    std::fs::write(&path, text).unwrap();
    let (mut child, api) = serve_ready(&env, &path).await;
    let (status, body) = api
        .post(
            "/v1/syncs/events/records",
            serde_json::json!({"records": [{"collection": "signups", "id": "u1", "payload": {"email": "a@example.com", "plan": "free", "seats": 1}}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_until("the pushed record is mirrored", &env, 60, async || {
        target_count(&env, "events.signups", "id = 'u1'").await == 1
    })
    .await;
    env.target
        .execute(
            "postgres",
            "grant insert, update, delete on events.signups to app_user;",
        )
        .await
        .unwrap();
    let mut conn = PgConnection::connect_with(&options_at(proxy, "app_user", "app-pw"))
        .await
        .unwrap();

    // An update is POSTed to the webhook, with the secret and an idempotency key, and the
    // record the stream holds, with the new value, is in the table before the answer.
    let done =
        sqlx::query("update events.signups set plan = $1, seats = seats + 1 where id = 'u1'")
            .bind("pro")
            .execute(&mut conn)
            .await
            .unwrap();
    assert_eq!(done.rows_affected(), 1);
    {
        let received = received.lock().unwrap();
        let (authorization, key, body) = received.last().unwrap();
        assert_eq!(authorization, "Bearer hook-secret-1");
        assert!(!key.is_empty());
        assert_eq!(
            body,
            &serde_json::json!({"sync": "events", "collection": "signups", "operation": "update", "id": "u1", "values": {"plan": "pro", "seats": 2}})
        );
    }
    let row: (String, String, i64) =
        sqlx::query_as("select email, plan, seats from events.signups where id = 'u1'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(row, ("a@example.com".into(), "pro".into(), 2));

    // The webhook's refusal is the client's error; nothing changes.
    let error = sqlx::query("update events.signups set email = 'nope' where id = 'u1'")
        .execute(&mut conn)
        .await
        .unwrap_err();
    let db = error
        .as_database_error()
        .unwrap()
        .downcast_ref::<sqlx::postgres::PgDatabaseError>();
    assert_eq!(db.message(), "Error updating signups: invalid email");
    assert_eq!(db.detail(), Some("upstream error code: 422"));
    assert_eq!(
        target_count(&env, "events.signups", "email = 'a@example.com'").await,
        1
    );

    // An insert takes the id the webhook answers with.
    let id: String = sqlx::query_scalar(
        "insert into events.signups (email, plan) values ('b@example.com', 'free') returning id",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(id, "u-new-3");
    let done = sqlx::query("delete from events.signups where id = 'u-new-3'")
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(done.rows_affected(), 1);
    assert_eq!(
        received.lock().unwrap().last().unwrap().2["operation"],
        "delete"
    );
    assert_eq!(
        target_count(&env, "events.signups", "id = 'u-new-3'").await,
        0
    );
    assert!(
        !log(&env).contains("hook-secret-1"),
        "the secret never reaches the log"
    );
    let _ = child.kill();
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(what: &str, command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what} could not start: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

const PSYCOPG: &str = r#"
import sys, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
cur = conn.cursor()
cur.execute("select qty from app.orders where id = %s", (21,), prepare=True)
assert cur.fetchone()[0] == 21
cur.execute("update app.orders set qty = %s where id = %s", (121, 21), prepare=True)
assert cur.rowcount == 1, cur.rowcount
cur.execute("select qty from app.orders where id = %s", (21,), prepare=True)
assert cur.fetchone()[0] == 121
try:
    cur.execute("update app.orders set qty = %s where id = %s", (-1, 21), prepare=True)
    raise SystemExit("the rejection did not come back")
except psycopg.errors.CheckViolation as e:
    assert "Error updating orders" in str(e), str(e)
with conn.transaction():
    cur.execute("insert into public.notes values (%s, %s)", (21, "psycopg"), prepare=True)
print("psycopg ok")
"#;

const NODE_PG: &str = r#"
const { Client } = require('pg');
const fs = require('fs');
(async () => {
  const [port, ca] = process.argv.slice(1);
  const c = new Client({ host: 'localhost', port: Number(port), user: 'app_user', password: 'app-pw',
    database: 'postgres', ssl: { ca: fs.readFileSync(ca), rejectUnauthorized: true } });
  await c.connect();
  let r = await c.query({ name: 'read', text: 'select qty from app.orders where id = $1', values: [22] });
  if (r.rows[0].qty !== 22) throw new Error('read ' + JSON.stringify(r.rows));
  r = await c.query({ name: 'write', text: 'update app.orders set qty = $1 where id = $2', values: [122, 22] });
  if (r.rowCount !== 1) throw new Error('rowCount ' + r.rowCount);
  r = await c.query({ name: 'read', text: 'select qty from app.orders where id = $1', values: [22] });
  if (r.rows[0].qty !== 122) throw new Error('read back ' + JSON.stringify(r.rows));
  try {
    await c.query({ name: 'write', text: 'update app.orders set qty = $1 where id = $2', values: [-1, 22] });
    throw new Error('the rejection did not come back');
  } catch (e) {
    if (e.code !== '23514' || !e.message.includes('Error updating orders')) throw e;
  }
  await c.query('BEGIN');
  await c.query({ name: 'note', text: 'insert into public.notes values ($1, $2)', values: [22, 'node'] });
  await c.query('COMMIT');
  // An unqualified name is resolved as the session's search_path says: the user's own
  // public.orders passes through, app.orders goes upstream.
  await c.query('set search_path = public');
  r = await c.query('update orders set qty = $1 where id = $2', [5, 1]);
  if (r.rowCount !== 1) throw new Error('public.orders rowCount ' + r.rowCount);
  await c.query('set search_path = app, public');
  r = await c.query('update orders set qty = $1 where id = $2', [125, 25]);
  if (r.rowCount !== 1) throw new Error('app.orders rowCount ' + r.rowCount);
  await c.end();
  console.log('node-pg ok');
})().catch((e) => { console.error(e); process.exit(1); });
"#;

#[tokio::test]
async fn psql_sqlx_psycopg_and_node_pg_work_through_the_proxy_over_tls() {
    let p = start_with("", true).await;
    let dir = p.env.dir.path().to_owned();
    let ca = dir.join("ca.crt");
    let url = format!(
        "postgres://app_user:app-pw@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        p.proxy,
        ca.display()
    );

    // psql: the simple protocol; PREPARE/EXECUTE for a prepared write.
    let out = run(
        "psql",
        Command::new("psql").arg(&url).args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "select qty from app.orders where id = 20",
            "-c",
            "update app.orders set qty = 120 where id = 20",
            "-c",
            "select qty from app.orders where id = 20",
            "-c",
            "begin",
            "-c",
            "insert into public.notes values (20, 'psql')",
            "-c",
            "commit",
        ]),
    );
    assert!(out.contains("UPDATE 1") && out.contains(" 120\n"), "{out}");
    let refused = Command::new("psql")
        .arg(&url)
        .args(["-X", "-c", "update app.orders set qty = -1 where id = 20"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && text.contains("Error updating orders"),
        "{text}"
    );

    // sqlx: TLS with the CA, prepared (cached) statements.
    let mut conn = PgConnection::connect_with(
        &PgConnectOptions::new()
            .host("localhost")
            .port(p.proxy)
            .username("app_user")
            .password("app-pw")
            .database("postgres")
            .ssl_mode(PgSslMode::VerifyFull)
            .ssl_root_cert(&ca),
    )
    .await
    .unwrap();
    for qty in [123, 124] {
        let done = sqlx::query("update app.orders set qty = $1 where id = $2")
            .bind(qty)
            .bind(23)
            .execute(&mut conn)
            .await
            .unwrap();
        assert_eq!(done.rows_affected(), 1);
        let read: i32 = sqlx::query_scalar("select qty from app.orders where id = $1")
            .bind(23)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(read, qty);
    }
    let error = sqlx::query("update app.orders set qty = $1 where id = $2")
        .bind(-1)
        .bind(23)
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("Error updating orders"),
        "{error}"
    );
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("insert into public.notes values ($1, $2)")
        .bind(23)
        .bind("sqlx")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // psycopg (libpq underneath), server-side prepared statements.
    let python = repo().join("target/venv/bin/python");
    assert!(
        python.exists(),
        "psycopg is installed by .ci/run into target/venv (pip install 'psycopg[binary]')"
    );
    let out = run("psycopg", Command::new(&python).args(["-c", PSYCOPG, &url]));
    assert!(out.contains("psycopg ok"), "{out}");

    // Node's pg: named prepared statements, untyped parameters.
    let modules = repo().join("target/npm/node_modules");
    assert!(
        modules.join("pg").exists(),
        "Node's pg is installed by .ci/run into target/npm (npm install --prefix target/npm pg)"
    );
    let out = run(
        "node-pg",
        Command::new("node")
            .args([
                "-e",
                NODE_PG,
                &p.proxy.to_string(),
                &ca.display().to_string(),
            ])
            .env("NODE_PATH", &modules),
    );
    assert!(out.contains("node-pg ok"), "{out}");

    // Every write reached the source, and every client's transaction committed.
    for (id, qty) in [
        (1, 1),
        (20, 120),
        (21, 121),
        (22, 122),
        (23, 124),
        (25, 125),
    ] {
        assert_eq!(source_qty(&p, id).await, Some(qty), "order {id}");
    }
    assert_eq!(
        target_count(&p.env, "public.orders", "id = 1 and qty = 5").await,
        1,
        "the user's own table"
    );
    assert_eq!(target_count(&p.env, "public.notes", "true").await, 4);
    assert!(
        !log(&p.env).contains("app-pw"),
        "passwords never reach the log"
    );
}

#[tokio::test]
async fn consumer_table_rows_are_records_written_to_their_own_sync() {
    let p = start("").await;
    wait_until("the consumer table is backfilled", &p.env, 60, async || {
        target_count(&p.env, "sluice.records", "true").await == 500
    })
    .await;
    p.env
        .target
        .execute(
            "postgres",
            "grant insert, update, delete on sluice.records to app_user;",
        )
        .await
        .unwrap();
    let mut conn = PgConnection::connect_with(&options(&p, "app_user", "app-pw"))
        .await
        .unwrap();

    // An update sends the fields of the payload that changed to the record's sync.
    let done = sqlx::query(
        "update sluice.records set payload = payload || $1::jsonb where collection_id = 'public.orders' and upstream_id = $2",
    )
    .bind(r#"{"qty": 500}"#)
    .bind("5")
    .execute(&mut conn)
    .await
    .unwrap();
    assert_eq!(done.rows_affected(), 1);
    assert_eq!(source_qty(&p, 5).await, Some(500));
    let qty: String =
        sqlx::query_scalar("select payload->>'qty' from sluice.records where upstream_id = '5'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(qty, "500", "read-your-writes");

    // An insert names the collection; the only sync is taken. RETURNING shows the new row.
    let id: String = sqlx::query_scalar(
        "insert into sluice.records (collection_id, payload) values ('public.orders', '{\"id\": 950, \"item\": \"ct\", \"qty\": 1}') returning upstream_id",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(id, "950");
    assert_eq!(source_qty(&p, 950).await, Some(1));
    let done = sqlx::query(
        "delete from sluice.records where collection_id = 'public.orders' and upstream_id = '950'",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    assert_eq!(done.rows_affected(), 1);
    assert_eq!(source_qty(&p, 950).await, None);

    // What sluice fills is not the client's to set; the upstream's refusal is its error.
    let error = sqlx::query("update sluice.records set upstream_id = 'x' where upstream_id = '5'")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(
        error.as_database_error().unwrap().code().as_deref(),
        Some("428C9"),
        "{error}"
    );
    let error = sqlx::query("update sluice.records set payload = jsonb_set(payload, '{qty}', '-3') where upstream_id = '5'")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(
        error.as_database_error().unwrap().code().as_deref(),
        Some("23514"),
        "{error}"
    );
    assert_eq!(source_qty(&p, 5).await, Some(500));
}
