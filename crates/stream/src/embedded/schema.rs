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

/// The records: a row per key (its collection by id: `collections.rs`) naming its newest
/// seq and segment, and the segments holding every record (`packed.rs`), with the seqs of
/// records no longer live and the triggers through which they and each segment's live count
/// are kept.
const KEYS: &str = "
create table if not exists keys (
    collection integer not null,
    -- No declared type: an id is held as an integer or as text (see `ids.rs`), as bound. A file
    -- made before declares `text`, which turns an integer bound to it into its text: the same
    -- rows and answers, in text order.
    upstream_id not null,
    seq integer not null,
    version_major integer not null,
    version_minor integer not null,
    deleted integer not null,
    segment integer not null,
    primary key (collection, upstream_id)
) without rowid;
create index if not exists tombstones on keys (seq) where deleted = 1;
-- A segment's counts and its body are two rows: a count changes with every record replaced,
-- and rewriting a row reads all of it (a body is many overflow pages). A segment's times are
-- its records' where their own say 0 (see `segment::Times`).
create table if not exists segments (
    id integer primary key,
    records integer not null,
    live integer not null,
    appended_at_ns integer,
    updated_at_ns integer,
    first_seq integer not null,
    last_seq integer not null,
    -- The collection of every entry, when they share one (null when they do not).
    collection integer
);
create index if not exists segments_by_last on segments (last_seq);
create index if not exists sparse_segments on segments (id) where live * 2 < records;
create table if not exists segment_bodies (segment integer primary key, body blob not null);
create table if not exists dead (seq integer primary key);
-- A key row replaced is reported to the writing connection, which marks its entry dead with
-- the others of the append at once (`connection::Replaced`); a row deleted is marked here.
create trigger if not exists key_replaced after update of seq on keys
begin
    select sluice_key_replaced(old.segment, old.seq);
end;
create trigger if not exists key_deleted after delete on keys
begin
    update segments set live = live - 1 where id = old.segment;
    insert into dead (seq) values (old.seq);
end;
";

/// Records per step of the migration.
const MIGRATION_CHUNK: usize = 1000;

/// The layouts of files written before this one.
enum Older {
    /// A row per record with its payload inline and its collection by name.
    Inline,
    /// A row per record naming its payload's segment and slot.
    Segments,
}

/// The file's format, kept in `meta` under `format`. It is raised with any change that a
/// sluice which knows only an older format would misread or miswrite; such a sluice then
/// refuses the file instead (a sluice from before the format was kept does not look). `meta`
/// and its `format` row keep their shape in every format, so that any sluice can read them.
/// 1: a row per key and packed segments, their counts kept by triggers (2026-12-06).
/// 2: the `key_replaced` trigger reports each replaced row to the writing connection, which
/// keeps the counts for it once per append (2026-12-06, later). A sluice that knows only
/// format 1 refuses the file; one from before formats were kept can read it, and its first
/// upsert of a key already held fails ("no such function: sluice_key_replaced"), so that
/// nothing is miscounted.
pub(super) const FORMAT: i64 = 2;

/// Creates the tables a new file needs, and moves the records of a file written before into
/// them, in one transaction: a crash half-way leaves the file as it was. Nothing about a
/// record changes, its seq included. A file in a newer [`FORMAT`] than this sluice's is
/// refused, and left as it was.
pub(super) fn prepare(conn: &mut Connection, path: &Path) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .or_storage("opening the file")?;
    tx.execute_batch(SCHEMA).or_storage("creating tables")?;
    let format: Option<i64> = tx
        .query_row("select value from meta where key = 'format'", [], |r| {
            r.get(0)
        })
        .optional()
        .or_storage("reading the file's format")?;
    if let Some(format) = format.filter(|&f| f > FORMAT) {
        // Dropping the transaction rolls back the tables made above: nothing is changed.
        return Err(Error::configuration(
            format!(
                "the records stream {} was written by a newer sluice (file format {format}; \
                 this sluice knows formats up to {FORMAT})",
                path.display()
            ),
            "run the sluice version that wrote it, or a newer one: an older sluice would \
             misread the file",
        ));
    }
    let column = |table: &str, column: &str| {
        tx.prepare(&format!(
            "select 1 from pragma_table_info('{table}') where name = '{column}'"
        ))
        .and_then(|mut s| s.exists([]))
        .or_storage("reading the file's tables")
    };
    let older = if column("records", "payload")? {
        tx.execute_batch(
            "alter table records rename to records_inline; drop index if exists tombstones;",
        )
        .or_storage("migrating the records table")?;
        Some(Older::Inline)
    } else if column("records", "seq")? {
        if !column("segments", "updated_at_ns")? {
            // Segments made before they held times (their records hold their own).
            tx.execute_batch(
                "alter table segments add column appended_at_ns integer; \
                 alter table segments add column updated_at_ns integer;",
            )
            .or_storage("adding the segments' times")?;
        }
        tx.execute_batch(
            "drop trigger if exists payload_replaced; drop trigger if exists payload_deleted; \
             drop index if exists tombstones; drop index if exists sparse_segments; \
             drop index if exists records_by_provider; drop index if exists records_by_sync; \
             alter table records rename to records_by_seq; \
             alter table segments rename to segments_by_slot; \
             alter table segment_bodies rename to segment_bodies_by_slot;",
        )
        .or_storage("migrating the records table")?;
        Some(Older::Segments)
    } else {
        None
    };
    if format.is_none_or(|f| f < 2) {
        // The trigger as format 1 made it, if the file has it: `KEYS` makes it anew.
        tx.execute_batch("drop trigger if exists key_replaced")
            .or_storage("replacing a trigger")?;
    }
    tx.execute_batch(KEYS).or_storage("creating tables")?;
    match older {
        Some(Older::Inline) => migrate_inline(&tx)?,
        Some(Older::Segments) => migrate_segments(&tx)?,
        None => {}
    }
    tx.execute(
        "insert into meta (key, value) values ('format', ?) \
         on conflict (key) do update set value = excluded.value",
        [FORMAT],
    )
    .or_storage("storing the file's format")?;
    tx.commit().or_storage("committing the file's tables")
}

/// One record of an older file, as the migration moves it.
struct Moved {
    seq: i64,
    collection: i64,
    key: String,
    version: Version,
    deleted: bool,
    updated_at: i64,
    appended_at: i64,
    text: Option<String>,
}

/// Writes `moved` (in seq order) into segments and key rows.
fn store(tx: &Connection, moved: &[Moved]) -> Result<()> {
    let entries: Vec<packed::Entry<'_>> = moved
        .iter()
        .map(|m| packed::Entry {
            seq: m.seq,
            collection: m.collection,
            key: &m.key,
            version: m.version,
            deleted: m.deleted,
            updated_at: m.updated_at,
            appended_at: m.appended_at,
            text: m.text.as_deref().unwrap_or(""),
        })
        .collect();
    let places = packed::write(tx, &entries)?;
    let mut key = tx
        .prepare_cached(
            "insert into keys (collection, upstream_id, seq, version_major, version_minor, \
             deleted, segment) values (?, ?, ?, ?, ?, ?, ?)",
        )
        .or_storage(MIGRATING)?;
    for (entry, segment) in entries.iter().zip(places) {
        key.execute((
            entry.collection,
            StoredId::of(entry.key),
            entry.seq,
            entry.version.major as i64,
            entry.version.minor as i64,
            entry.deleted,
            segment,
        ))
        .or_storage(MIGRATING)?;
    }
    Ok(())
}

const MIGRATING: &str = "moving the stream's records into packed segments";

/// Moves every row `rows` gives (in seq order), [`MIGRATION_CHUNK`] at a time; how many.
fn move_all(tx: &Connection, mut rows: impl FnMut() -> Result<Option<Moved>>) -> Result<usize> {
    let mut chunk = Vec::with_capacity(MIGRATION_CHUNK);
    let mut moved = 0;
    loop {
        let row = rows()?;
        let done = row.is_none();
        chunk.extend(row);
        if chunk.len() >= MIGRATION_CHUNK || (done && !chunk.is_empty()) {
            store(tx, &chunk)?;
            moved += chunk.len();
            chunk.clear();
        }
        if done {
            return Ok(moved);
        }
    }
}

/// Moves `records_inline` (payloads inline, collections by name) into the file's tables.
fn migrate_inline(tx: &Connection) -> Result<()> {
    tx.execute(
        "insert into collections (provider, sync_id, collection_id) \
         select max(provider), sync_id, collection_id from records_inline group by sync_id, collection_id",
        [],
    )
    .or_storage(MIGRATING)?;
    let mut statement = tx
        .prepare(
            "select r.seq, k.id, r.upstream_id, r.version_major, r.version_minor, \
               r.upstream_updated_at_ns, r.deleted, r.appended_at_ns, r.payload \
             from records_inline r join collections k \
               on k.sync_id = r.sync_id and k.collection_id = r.collection_id order by r.seq",
        )
        .or_storage(MIGRATING)?;
    let mut rows = statement.query([]).or_storage(MIGRATING)?;
    let moved = move_all(tx, || {
        let Some(row) = rows.next().or_storage(MIGRATING)? else {
            return Ok(None);
        };
        let get = |at: usize| row.get::<_, i64>(at).or_storage(MIGRATING);
        Ok(Some(Moved {
            seq: get(0)?,
            collection: get(1)?,
            key: row.get(2).or_storage(MIGRATING)?,
            version: Version::new(get(3)? as u64, get(4)? as u64),
            updated_at: get(5)?,
            deleted: get(6)? != 0,
            appended_at: get(7)?,
            text: row.get(8).or_storage(MIGRATING)?,
        }))
    })?;
    drop(rows);
    drop(statement);
    tx.execute_batch("drop table records_inline")
        .or_storage(MIGRATING)?;
    tracing::info!(
        records = moved,
        "records stream: moved the stream's records into packed segments (a one-time step)"
    );
    Ok(())
}

/// Moves `records_by_seq` (a row per record naming its payload's segment and slot) into the
/// file's tables.
fn migrate_segments(tx: &Connection) -> Result<()> {
    let mut statement = tx
        .prepare(
            "select seq, collection, upstream_id, version_major, version_minor, \
               upstream_updated_at_ns, deleted, appended_at_ns, segment, slot \
             from records_by_seq order by seq",
        )
        .or_storage(MIGRATING)?;
    let mut rows = statement.query([]).or_storage(MIGRATING)?;
    let mut bodies = tx
        .prepare(
            "select s.appended_at_ns, s.updated_at_ns, b.body from segments_by_slot s \
             join segment_bodies_by_slot b on b.segment = s.id where s.id = ?",
        )
        .or_storage(MIGRATING)?;
    let mut cached: Option<(i64, segment::Segment)> = None;
    let moved = move_all(tx, || {
        let Some(row) = rows.next().or_storage(MIGRATING)? else {
            return Ok(None);
        };
        let get = |at: usize| row.get::<_, i64>(at).or_storage(MIGRATING);
        let place: (Option<i64>, Option<i64>) = (
            row.get(8).or_storage(MIGRATING)?,
            row.get(9).or_storage(MIGRATING)?,
        );
        let (mut updated_at, mut appended_at) = (get(5)?, get(7)?);
        let mut text = None;
        if let (Some(id), Some(slot)) = place {
            if cached.as_ref().is_none_or(|(cached, _)| *cached != id) {
                let (appended, updated, body): (Option<i64>, Option<i64>, Vec<u8>) = bodies
                    .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .or_storage(MIGRATING)?;
                let times = Times {
                    appended_at: appended,
                    updated_at: updated,
                };
                cached = Some((id, segment::decode(&body, times)?));
            }
            let (_, decoded) = cached.as_ref().expect("a segment was just decoded");
            let payload = decoded.payload(slot).ok_or_else(|| {
                Error::invalid(format!(
                    "records stream: payload segment {id} lacks a slot a record names"
                ))
            })?;
            text = Some(payload.as_str().to_owned());
            updated_at = decoded.times.updated_at(updated_at);
            appended_at = decoded.times.appended_at(appended_at);
        }
        Ok(Some(Moved {
            seq: get(0)?,
            collection: get(1)?,
            key: row.get(2).or_storage(MIGRATING)?,
            version: Version::new(get(3)? as u64, get(4)? as u64),
            deleted: get(6)? != 0,
            updated_at,
            appended_at,
            text,
        }))
    })?;
    drop(rows);
    drop(statement);
    drop(bodies);
    tx.execute_batch(
        "drop table records_by_seq; drop table segments_by_slot; drop table segment_bodies_by_slot;",
    )
    .or_storage(MIGRATING)?;
    tracing::info!(
        records = moved,
        "records stream: moved the stream's records into packed segments (a one-time step)"
    );
    Ok(())
}
