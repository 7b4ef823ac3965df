//! The file's tables, and the one step that brings a file written by an older sluice to them.

use super::*;

/// Everything but the records and their payloads.
const SCHEMA: &str = "
create table if not exists cursors (
    consumer text primary key,
    provider text,
    sync_id blob,
    collections text,
    seq integer not null
);
create table if not exists meta (key text primary key, value integer not null);
create table if not exists source_state (owner text primary key, value text not null);
create table if not exists collection_schemas (
    sync_id blob not null,
    collection_id text not null,
    schema text not null,
    primary key (sync_id, collection_id)
);
insert or ignore into meta (key, value) values ('head', 0);
create table if not exists collections (
    id integer primary key,
    provider text not null,
    sync_id blob not null,
    collection_id text not null,
    unique (sync_id, collection_id)
);
";

/// The records, one row each (its collection by id: `collections.rs`; its payload in a
/// segment: `segment.rs`), and the segments with
/// the triggers that keep each one's count of records naming it (a segment named by none is
/// deleted at the end of the write: `segment::drop_unused`).
const RECORDS: &str = "
create table if not exists records (
    seq integer primary key,
    collection integer not null,
    upstream_id text not null,
    version_major integer not null,
    version_minor integer not null,
    upstream_updated_at_ns integer not null,
    deleted integer not null,
    segment integer,
    slot integer,
    appended_at_ns integer not null,
    unique (collection, upstream_id)
);
-- Reads by provider or sync scan by seq from the reader's position: an index per filter cost
-- every append two more b-tree inserts (dropped from files made before).
drop index if exists records_by_provider;
drop index if exists records_by_sync;
create index if not exists tombstones on records (seq) where deleted = 1;
-- A segment's counts and its body are two rows: a count changes with every record replaced,
-- and rewriting a row reads all of it (a body is many overflow pages). A segment's times are
-- its records' where their own say 0 (see `segment::Times`).
create table if not exists segments (
    id integer primary key,
    records integer not null,
    live integer not null,
    appended_at_ns integer,
    updated_at_ns integer
);
create table if not exists segment_bodies (segment integer primary key, body blob not null);
create index if not exists sparse_segments on segments (id) where live * 2 < records;
create trigger if not exists payload_replaced after update of segment, slot on records
when old.segment is not null
 and (new.segment is null or new.segment != old.segment or new.slot != old.slot)
begin
    update segments set live = live - 1 where id = old.segment;
end;
create trigger if not exists payload_deleted after delete on records
when old.segment is not null
begin
    update segments set live = live - 1 where id = old.segment;
end;
";

/// Records per step of the migration.
const MIGRATION_CHUNK: usize = 1000;

/// Creates the tables a new file needs, and moves the payloads of a file written before
/// segments (a `payload` column in `records`) into segments, in one transaction: a crash
/// half-way leaves the file as it was. Nothing else about a record changes, its seq included.
pub(super) fn prepare(conn: &mut Connection) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .or_storage("opening the file")?;
    tx.execute_batch(SCHEMA).or_storage("creating tables")?;
    let inline = tx
        .prepare("select 1 from pragma_table_info('records') where name = 'payload'")
        .and_then(|mut s| s.exists([]))
        .or_storage("reading the file's tables")?;
    if inline {
        tx.execute_batch(
            "alter table records rename to records_inline; drop index if exists tombstones;",
        )
        .or_storage("migrating the records table")?;
    }
    tx.execute_batch(RECORDS).or_storage("creating tables")?;
    // Segments made before they held times (their records hold their own).
    let timeless = !tx
        .prepare("select 1 from pragma_table_info('segments') where name = 'updated_at_ns'")
        .and_then(|mut s| s.exists([]))
        .or_storage("reading the file's tables")?;
    if timeless {
        tx.execute_batch(
            "alter table segments add column appended_at_ns integer; \
             alter table segments add column updated_at_ns integer;",
        )
        .or_storage("adding the segments' times")?;
    }
    if inline {
        migrate(&tx)?;
    }
    tx.commit().or_storage("committing the file's tables")
}

/// Copies `records_inline` (the old table) into `records`: collections named by id, payloads
/// into segments.
fn migrate(tx: &Connection) -> Result<()> {
    let what = "migrating the records table to payload segments";
    tx.execute(
        "insert into collections (provider, sync_id, collection_id) \
         select max(provider), sync_id, collection_id from records_inline group by sync_id, collection_id",
        [],
    )
    .or_storage(what)?;
    let moved = tx
        .execute(
            "insert into records (seq, collection, upstream_id, version_major, version_minor, \
               upstream_updated_at_ns, deleted, segment, slot, appended_at_ns) \
             select r.seq, k.id, r.upstream_id, r.version_major, r.version_minor, \
               r.upstream_updated_at_ns, r.deleted, null, null, r.appended_at_ns \
             from records_inline r join collections k \
               on k.sync_id = r.sync_id and k.collection_id = r.collection_id",
            [],
        )
        .or_storage(what)?;
    let mut payloads = tx
        .prepare("select seq, payload from records_inline where payload is not null order by seq")
        .or_storage(what)?;
    let mut rows = payloads.query([]).or_storage(what)?;
    let mut place = tx
        .prepare("update records set segment = ?, slot = ? where seq = ?")
        .or_storage(what)?;
    let mut chunk: Vec<(i64, String)> = Vec::with_capacity(MIGRATION_CHUNK);
    let mut done = false;
    while !done {
        chunk.clear();
        while chunk.len() < MIGRATION_CHUNK {
            match rows.next().or_storage(what)? {
                Some(row) => {
                    chunk.push((row.get(0).or_storage(what)?, row.get(1).or_storage(what)?))
                }
                None => {
                    done = true;
                    break;
                }
            }
        }
        if chunk.is_empty() {
            break;
        }
        let body = segment::encode(chunk.iter().map(|(seq, text)| (*seq, text.as_str())));
        let id = segment::insert(tx, &body, chunk.len(), Times::OWN)?;
        for (slot, (seq, _)) in chunk.iter().enumerate() {
            place.execute((id, slot as i64, seq)).or_storage(what)?;
        }
    }
    drop(rows);
    drop(payloads);
    drop(place);
    tx.execute_batch("drop table records_inline")
        .or_storage(what)?;
    tracing::info!(
        records = moved,
        "records stream: moved the stream's payloads into compressed segments (a one-time step)"
    );
    Ok(())
}
