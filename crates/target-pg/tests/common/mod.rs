//! Helpers shared by the target's tests.
#![allow(dead_code)]

use secrecy::SecretString;
use sluice_core::sql::{qualified, quote_ident};
use sluice_core::{Batch, Change, Provider, Record, RecordKey, Seq, StreamEntry, SyncId, Version};
use sluice_localpg::Cluster;
use sluice_target_pg::{ConnectionSettings, ConsumerTable};
use sqlx::{Connection, PgConnection};
use time::OffsetDateTime;
use uuid::Uuid;

/// A database set up the way the docs tell users to: a schema, the table from `ddl()`, and
/// a sync user with `connect, create` on the database and `usage, create` plus all table
/// privileges on the schema.
pub struct Provisioned {
    pub db: String,
    pub user: String,
    pub settings: ConnectionSettings,
    pub table: ConsumerTable,
}

pub async fn provision(pg: &Cluster, prefix: &str, schema: &str, table: &str) -> Provisioned {
    let db = pg.fresh_database(prefix).await.unwrap();
    let user = format!("{db}_sync");
    let password = "sync-user-pw";
    pg.create_role(&user, Some(password)).await.unwrap();
    let table = ConsumerTable::new(schema, table);
    let (s, u) = (quote_ident(schema), quote_ident(&user));
    pg.execute(
        &db,
        &format!(
            "grant connect, create on database {d} to {u};
             create schema if not exists {s};
             grant usage, create on schema {s} to {u};
             {ddl}
             grant all privileges on all tables in schema {s} to {u};
             alter default privileges in schema {s} grant all on tables to {u};",
            d = quote_ident(&db),
            ddl = table.ddl()
        ),
    )
    .await
    .unwrap();
    let mut settings =
        ConnectionSettings::from_url(&pg.url_as(&user, Some(password), &db, None)).unwrap();
    settings.password = Some(SecretString::from(password.to_owned()));
    Provisioned {
        db,
        user,
        settings,
        table,
    }
}

pub const SYNC: SyncId = SyncId(Uuid::from_u128(0x5151));

pub fn upsert(seq: u64, id: &str, version: u64, payload: serde_json::Value) -> StreamEntry {
    entry(seq, id, version, Change::upsert(payload).unwrap())
}

pub fn delete(seq: u64, id: &str, version: u64) -> StreamEntry {
    entry(seq, id, version, Change::Delete)
}

pub fn entry(seq: u64, id: &str, version: u64, change: Change) -> StreamEntry {
    StreamEntry {
        seq: Seq(seq),
        record: Record {
            key: RecordKey::new(SYNC, "public.orders", id),
            provider: Provider::Postgres,
            version: Version::new(version, 0),
            upstream_updated_at: OffsetDateTime::from_unix_timestamp(
                1_700_000_000 + version as i64,
            )
            .unwrap(),
            change,
        },
        payload_text: None,
    }
}

/// `(upstream_id, payload)` of every row, ordered by upstream id, checking `sequin_id` on the way.
pub async fn rows(pg: &Cluster, p: &Provisioned) -> Vec<(String, serde_json::Value)> {
    let mut conn = pg.admin(&p.db).await.unwrap();
    let sql = format!(
        "select sequin_id, sync_id, collection_id, upstream_id, payload from {} order by upstream_id",
        qualified(&p.table.schema, &p.table.table)
    );
    let rows: Vec<(Uuid, Uuid, String, String, serde_json::Value)> =
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut conn)
            .await
            .unwrap();
    rows.into_iter()
        .map(|(sequin_id, sync_id, collection, upstream, payload)| {
            let key = RecordKey::new(SyncId(sync_id), collection.as_str(), upstream.as_str());
            assert_eq!(
                sequin_id,
                key.row_id(),
                "sequin_id is the UUIDv5 of the identity"
            );
            (upstream, payload)
        })
        .collect()
}

/// `updated_at` of one row.
pub async fn updated_at(pg: &Cluster, p: &Provisioned, upstream_id: &str) -> OffsetDateTime {
    let mut conn = pg.admin(&p.db).await.unwrap();
    let sql = format!(
        "select updated_at from {} where upstream_id = $1",
        p.table.qualified()
    );
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(upstream_id)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

pub async fn connect_admin(pg: &Cluster, db: &str) -> PgConnection {
    PgConnection::connect_with(&pg.admin_options(db))
        .await
        .unwrap()
}

/// A batch moving the checkpoint to `through`.
pub fn batch_to(through: u64, entries: Vec<StreamEntry>) -> Batch {
    Batch {
        entries,
        through: Seq(through),
    }
}

/// A trigger on `table` that terminates the inserting session when the row's `column` is
/// `'poison'`: the server drops a writing connection mid-batch. Removed by
/// [`stop_dying`].
pub async fn die_on_poison(pg: &Cluster, db: &str, table: &str, column: &str) {
    pg.execute(
        db,
        &format!(
            "create function public.die() returns trigger language plpgsql as $$
             begin
               if new.{column} = 'poison' then perform pg_terminate_backend(pg_backend_pid()); end if;
               return new;
             end $$;
             create trigger die before insert on {table} for each row execute function public.die();"
        ),
    )
    .await
    .unwrap();
}

/// Removes [`die_on_poison`]'s trigger from `table`.
pub async fn stop_dying(pg: &Cluster, db: &str, table: &str) {
    pg.execute(db, &format!("drop trigger die on {table}"))
        .await
        .unwrap();
}
