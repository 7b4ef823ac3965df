//! Connections to the file: their settings, running SQLite work from async code, and errors.

use std::path::Path;
use std::time::Duration;

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
pub(super) const WRITER_SETTINGS: &str = "pragma cache_size = -32768; pragma temp_store = memory;";

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
