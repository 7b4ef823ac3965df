//! `sluice demo`: the whole product on throwaway local databases, with no setup.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use sluice_core::{Error, SslMode};
use sluice_localpg::Cluster;
use sluice_provisioning::{SchemaUse, SetupSpec};
use sluice_target_pg::ConnectionSettings;
use tokio::sync::watch;

use crate::progress::Progress;
use crate::server::Server;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Stop after this many seconds of live syncing (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<u64>,
    /// Rows in the sample source table.
    #[arg(long, default_value_t = 20_000)]
    rows: u64,
}

fn step(text: &str) {
    sayln!("\n== {text}");
}

fn local(e: impl std::fmt::Display) -> Error {
    Error::configuration(
        format!("the demo could not start a local PostgreSQL: {e}"),
        "install PostgreSQL server binaries (Debian: apt-get install -y postgresql), or set SLUICE_PG_BIN",
    )
}

fn settings(pg: &Cluster, user: &str, password: &SecretString) -> ConnectionSettings {
    let mut s = ConnectionSettings::new("127.0.0.1", pg.port(), "postgres", user);
    s.password = Some(password.clone());
    s.ssl_mode = SslMode::Disable;
    s
}

pub async fn run(args: Args) -> Result<ExitCode, Error> {
    let dir = tempfile::tempdir().map_err(|e| Error::invalid(format!("temp dir: {e}")))?;
    step("Starting two throwaway PostgreSQL clusters (a source and a target)");
    let source = Cluster::options()
        .logical_replication()
        .start()
        .map_err(local)?;
    let target = Cluster::start_default().map_err(local)?;
    let server = |pg: &Cluster| {
        format!(
            "PostgreSQL {} from {}",
            pg.binaries().release().unwrap_or("?"),
            pg.binaries().dir().display()
        )
    };
    sayln!(
        "source: 127.0.0.1:{} ({}; wal_level = logical)",
        source.port(),
        server(&source)
    );
    sayln!("target: 127.0.0.1:{} ({})", target.port(), server(&target));

    step("Provisioning the target: a sync user that owns schema \"sluice\", and a read role");
    let admin = SecretString::from(target.superuser_password().to_owned());
    let spec = SetupSpec::new("postgres").schema("sluice", SchemaUse::Owned);
    let applied = sluice_provisioning::apply(&settings(&target, "postgres", &admin), &spec).await?;
    drop(admin); // lent for setup only
    sayln!("{}", applied.plan.script(false));
    let sync_password = applied
        .generated_password
        .ok_or_else(|| Error::invalid("the demo expected to create the sync user"))?;

    step(&format!(
        "Creating public.orders on the source with {} sample rows",
        args.rows
    ));
    source
        .execute(
            "postgres",
            &format!(
                "create type status as enum ('new', 'paid', 'shipped');
                 create table public.orders (id bigint primary key, customer text not null,
                   total numeric(12,2) not null, status status not null default 'new',
                   tags text[], created_at timestamptz not null default now());
                 insert into public.orders (id, customer, total, tags)
                   select i, 'customer ' || (i % 97), round((i % 1000) * 1.37, 2), array['demo']
                   from generate_series(1, {}) i;",
                args.rows
            ),
        )
        .await
        .map_err(local)?;

    step(
        "Creating the source's replication user the way docs/postgres-source.md says: it may replicate and read the published tables, nothing else",
    );
    let replication_password = sluice_provisioning::generate_password();
    let replication_sql = format!(
        "create role sluice_replication with login replication password '{}';
         grant select on all tables in schema public to sluice_replication;
         create publication sluice_publication for all tables;",
        replication_password.expose_secret()
    );
    source
        .execute("postgres", &replication_sql)
        .await
        .map_err(local)?;
    sayln!(
        "{}",
        replication_sql.replace(replication_password.expose_secret(), "<generated>")
    );

    // Secrets go to private files the config points at: nothing secret is in the config.
    let secret = |name: &str, value: &str| -> Result<std::path::PathBuf, Error> {
        let path = dir.path().join(name);
        sluice_localpg::write_private(&path, value).map_err(local)?;
        Ok(path)
    };
    let token = sluice_provisioning::generate_password();
    let token_file = secret("api-token", token.expose_secret())?;
    let target_pw = secret("target-password", sync_password.expose_secret())?;
    let source_pw = secret("source-password", replication_password.expose_secret())?;
    let api_port = free_port()?;
    let config_path = dir.path().join("sluice.toml");
    std::fs::write(
        &config_path,
        demo_config(
            dir.path(),
            api_port,
            &source,
            &target,
            &token_file,
            &target_pw,
            &source_pw,
        ),
    )
    .map_err(|e| Error::invalid(format!("writing the demo config: {e}")))?;
    let config =
        sluice_core::Config::load(&config_path).map_err(|e| Error::invalid(e.to_string()))?;

    step("Starting sluice: backfill, then real time");
    sayln!("config: {}", config_path.display());
    let server = Server::open(&config).await?;
    let _ = server.config_path.set(config_path.clone());
    server.reconcile(&config).await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", api_port))
        .await
        .map_err(|e| Error::invalid(format!("cannot listen for the API: {e}")))?;
    let app = crate::api::router(
        server.clone(),
        token,
        None,
        false,
        config.api.max_body_bytes,
    );
    let (stop_api, api_stopped) = watch::channel(false);
    let api = crate::server::spawn_api(listener, app, api_stopped);

    let mut conn = target.admin("postgres").await.map_err(local)?;
    let count = async |conn: &mut sqlx::PgConnection, cond: &str| -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select count(*) from sluice.records where {cond}"
        )))
        .fetch_one(conn)
        .await
        .unwrap_or(0)
    };
    let mut progress = Progress::new("backfill into sluice.records", args.rows);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let n = count(&mut conn, "true").await;
        progress.set(n as u64);
        if n as u64 >= args.rows {
            break;
        }
        if Instant::now() > deadline {
            progress.finish();
            return Err(Error::invalid(format!(
                "the backfill did not finish in 5 minutes ({n} of {} rows); health:\n{}",
                args.rows,
                crate::status::table(&server.health_now().await)
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    progress.finish();
    sayln!("{}", crate::status::table(&server.health_now().await));

    step("Live changes on the source: an update, an insert and a delete");
    source
        .execute(
            "postgres",
            "update public.orders set status = 'paid', total = 99.95 where id = 1;
             insert into public.orders (id, customer, total) values (1000001, 'a new customer', 12.50);
             delete from public.orders where id = 2;",
        )
        .await
        .map_err(local)?;
    let live = Instant::now();
    loop {
        let paid = count(
            &mut conn,
            "upstream_id = '1' and payload->>'status' = 'paid'",
        )
        .await;
        let inserted = count(&mut conn, "upstream_id = '1000001'").await;
        let deleted = count(&mut conn, "upstream_id = '2'").await == 0;
        if paid == 1 && inserted == 1 && deleted {
            break;
        }
        if live.elapsed() > Duration::from_secs(60) {
            return Err(Error::invalid(
                "live changes did not arrive within a minute",
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sayln!(
        "arrived in the target after {} ms:",
        live.elapsed().as_millis()
    );
    let rows: Vec<(String, String)> = sqlx::query_as(
        "select upstream_id, payload::text from sluice.records where upstream_id in ('1', '1000001') order by upstream_id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap_or_default();
    for (id, payload) in rows {
        sayln!("  {id}: {payload}");
    }
    sayln!("  2: deleted");

    step("Connect while it runs");
    sayln!(
        "target (synced data in sluice.records): psql '{}'",
        target.url("postgres")
    );
    sayln!(
        "source (change something and watch it arrive): psql '{}'",
        source.url("postgres")
    );
    sayln!(
        "API: curl -H \"Authorization: Bearer $(cat {})\" http://127.0.0.1:{api_port}/v1/status",
        token_file.display()
    );
    sayln!(
        "console: http://127.0.0.1:{api_port}/ (log in with the token in {})",
        token_file.display()
    );
    // The binary as it was started (a `cargo run`, an installed one, a path), so the hint
    // works when pasted.
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "sluice".to_owned());
    sayln!("status: {exe} status --config {}", config_path.display());
    let stop = async {
        match args.duration {
            Some(secs) => {
                sayln!("\n(stopping in {secs} s)");
                tokio::time::sleep(Duration::from_secs(secs)).await;
            }
            None => {
                sayln!("\nPress Ctrl-C to stop; the databases are removed when the demo ends.");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    sayln!("Changes you make on the source appear here as they arrive:");
    tokio::select! {
        _ = stop => {}
        _ = watch_changes(&server) => {}
    }
    step("Stopping: batches finish, checkpoints are written, the throwaway databases are removed");
    sayln!("{}", crate::status::table(&server.health_now().await));
    server.shutdown().await;
    stop_api.send_replace(true);
    let _ = api.await;
    Ok(ExitCode::SUCCESS)
}

/// Prints each change as it arrives in the records stream, until cancelled.
async fn watch_changes(server: &Server) {
    use sluice_core::{Change, Provider, RecordFilter, RecordStream};
    let stream = &server.stream;
    let filter = RecordFilter::Provider(Provider::Postgres);
    let mut after = stream.head().await.unwrap_or_default();
    loop {
        stream.wait_past(after).await;
        let Ok(read) = stream.read(&filter, after, 100).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        for entry in &read.entries {
            let key = &entry.record.key;
            match &entry.record.change {
                Change::Delete => sayln!("  -> {} {}: deleted", key.collection_id, key.upstream_id),
                Change::Upsert { payload } => sayln!(
                    "  -> {} {}: {}",
                    key.collection_id,
                    key.upstream_id,
                    serde_json::Value::Object(payload.clone())
                ),
            }
        }
        after = read.through.max(after);
    }
}

fn free_port() -> Result<u16, Error> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::invalid(format!("no free port: {e}")))
}

fn demo_config(
    dir: &Path,
    api_port: u16,
    source: &Cluster,
    target: &Cluster,
    token: &Path,
    target_pw: &Path,
    source_pw: &Path,
) -> String {
    format!(
        r#"# Written by `sluice demo`. Secrets are in files next to it, never in here.
data_dir = "{data}"

[api]
listen = "127.0.0.1:{api_port}"
token = {{ file = "{token}" }}

[[target]]
name = "demo-target"
[target.connection]
host = "127.0.0.1"
port = {tport}
database = "postgres"
user = "sluice"
password = {{ file = "{target_pw}" }}
ssl = {{ mode = "disable" }}

[[sync]]
name = "demo-source"
id = "{sync_id}"
[sync.source]
provider = "postgres"
create_missing = true
[sync.source.connection]
host = "127.0.0.1"
port = {sport}
database = "postgres"
user = "sluice_replication"
password = {{ file = "{source_pw}" }}
ssl = {{ mode = "disable" }}

[[consumer]]
name = "demo"
target = "demo-target"
filter = {{ sync = {{ name = "demo-source" }} }}
layout = {{ kind = "consumer_table", schema = "sluice", table = "records" }}
batch = {{ max_records = 20000, max_wait_ms = 20 }}
"#,
        data = dir.join("data").display(),
        token = token.display(),
        target_pw = target_pw.display(),
        source_pw = source_pw.display(),
        tport = target.port(),
        sport = source.port(),
        sync_id = uuid::Uuid::new_v4(),
    )
}
