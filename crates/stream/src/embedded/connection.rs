//! Connections to the file: their settings, running SQLite work from async code, and errors.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::functions::FunctionFlags;
use rusqlite::{Connection, OpenFlags};
use sluice_core::{Error, Result};

/// Read connections kept open between reads.
pub(super) const IDLE_READERS: usize = 4;

/// Every connection's settings. `page_size` applies when the file is created: 16 KiB pages
/// pack ~1 KB records better, and appends measured 35% faster than with 4 KiB
/// (crates/stream/benches/stream.rs).
const SETTINGS: &str = "pragma page_size = 16384; pragma journal_mode = wal; \
                        pragma synchronous = full; pragma cache_size = -16384;";

/// The writing connection's own settings. It keeps a larger page cache (32 MiB): every write
/// goes through it. Its statement journal (the pages a multi-row insert changed, kept until the
/// statement ends) is held in memory: SQLite otherwise spills it to a temporary file past
/// 64 KiB (four 16 KiB pages, which one multi-row insert soon changes), and then writes each page
/// there with a system call.
///
/// Its triggers may call the function [`Replaced`] registers (`trusted_schema`, SQLite's
/// default, said rather than assumed).
pub(super) const WRITER_SETTINGS: &str =
    "pragma cache_size = -32768; pragma temp_store = memory; pragma trusted_schema = on;";

/// The SQL function through which the file's `key_replaced` trigger reports each key row an
/// upsert replaces: `sluice_key_replaced(segment, seq)` of the row before.
pub(super) const KEY_REPLACED: &str = "sluice_key_replaced";

/// The entries of the key rows the writing connection's upserts replaced, as (segment, seq):
/// the `key_replaced` trigger reports each through [`KEY_REPLACED`], and the append marks them
/// dead once for all (`write::insert`, `packed::kill_all`): one multi-row insert into `dead`
/// and one lowered count per segment, where the trigger did both a row at a time (an update
/// costs 21% less, `callgrind`). Only the writing connection defines the function: another
/// connection's upsert that replaces a key fails, rather than leaving the counts behind.
#[derive(Clone, Default)]
pub(super) struct Replaced(Arc<std::sync::Mutex<Vec<(i64, i64)>>>);

impl Replaced {
    /// Defines [`KEY_REPLACED`] on `conn`, reporting into `self`.
    pub fn register(&self, conn: &Connection) -> rusqlite::Result<()> {
        let replaced = self.clone();
        conn.create_scalar_function(KEY_REPLACED, 2, FunctionFlags::SQLITE_UTF8, move |ctx| {
            let entry = (ctx.get::<i64>(0)?, ctx.get::<i64>(1)?);
            replaced.entries().push(entry);
            Ok(0i64)
        })
    }

    /// The entries reported since the last call.
    pub fn take(&self) -> Vec<(i64, i64)> {
        std::mem::take(&mut *self.entries())
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<(i64, i64)>> {
        // A panic while the lock was held leaves a plain vector, emptied before each append.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

const HEAD: &str = "select value from meta where key = 'head'";

pub(super) fn storage(what: &str, error: rusqlite::Error) -> Error {
    Error::unavailable(format!("records stream: {what}"), error)
}

/// A SQLite result as the stream's: a failure is the store being unavailable for `what`.
pub(super) trait OrStorage<T> {
    fn or_storage(self, what: &str) -> Result<T>;
}

impl<T> OrStorage<T> for rusqlite::Result<T> {
    fn or_storage(self, what: &str) -> Result<T> {
        self.map_err(|e| storage(what, e))
    }
}

/// Runs `f`, which reads or syncs the file. On a multi-threaded runtime the worker's other
/// tasks move to another thread meanwhile (`block_in_place`); elsewhere `f` just runs.
pub(super) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Opens a connection to the file, creating it if needed, with [`SETTINGS`] and `extra`.
pub(super) fn connect(path: &Path, extra: &str) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.set_prepared_statement_cache_capacity(32);
    conn.execute_batch(SETTINGS)?;
    conn.execute_batch(extra)?;
    Ok(conn)
}

pub(super) fn read_head(conn: &Connection) -> Result<i64> {
    conn.prepare_cached(HEAD)
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .or_storage("reading the head")
}
