//! Writing rows with `COPY`, shared by both layouts: the text format's escaping, the binary
//! format, `COPY` of rows sent in pieces as they are encoded (also
//! inside a savepoint, for rows assumed new), the plan of a statement that joins staged rows to
//! their table, encoding on several threads, and the count of records whose NUL characters had
//! to be replaced (PostgreSQL cannot store NUL in text or `jsonb`).

use sluice_core::bytes::ByteSet;
use sluice_core::{RecordKey, Status};
use sqlx::PgConnection;

/// Copies `rows` (COPY text format) with `statement` (`copy … from stdin`).
pub(crate) async fn copy(
    conn: &mut PgConnection,
    statement: &str,
    rows: &[u8],
) -> Result<u64, sqlx::Error> {
    let mut copy = conn.copy_in_raw(statement).await?;
    copy.send(rows).await?;
    copy.finish().await
}

/// Rows in `COPY`'s binary format: per row, the field count, then each field's length and
/// bytes in the column type's binary form (`uuid`: 16 bytes; `text`: its UTF-8; `jsonb`: a
/// version byte and the JSON text; `timestamptz`: [`pg_micros`] as 8 bytes). The server then
/// parses neither uuids nor times and undoes no escapes: a consumer table's 200,000 rows
/// took 0.82–0.94 s of COPY in binary against 1.24–1.26 s as text (PostgreSQL 15).
pub mod binary {
    /// The signature, no flags, no header extension.
    pub const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
    /// A field count of -1.
    pub const TRAILER: &[u8] = &[0xff, 0xff];

    /// Starts a row of `fields` fields.
    pub fn tuple(out: &mut Vec<u8>, fields: i16) {
        out.extend_from_slice(&fields.to_be_bytes());
    }

    /// One field's bytes, after their length.
    pub fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        out.extend_from_slice(bytes);
    }

    /// A `text` field, NUL replaced; returns whether anything was replaced.
    pub fn text(out: &mut Vec<u8>, text: &str) -> bool {
        super::replacing_nul(text, |bytes| field(out, bytes))
    }

    /// A `jsonb` field: format version 1, then the JSON text.
    pub fn jsonb(out: &mut Vec<u8>, json: &str) {
        out.extend_from_slice(&(json.len() as i32 + 1).to_be_bytes());
        out.push(1);
        out.extend_from_slice(json.as_bytes());
    }
}

/// `t` as PostgreSQL's binary `timestamptz`: microseconds since 2000-01-01 00:00 UTC. A
/// fraction of a microsecond is rounded as PostgreSQL rounds the fraction of a second in a
/// time given as text (read as a double, times a million, to the nearest, ties to even), so
/// a time lands exactly as its RFC 3339 text did before rows went in binary. A year outside
/// 0–9999 (which RFC 3339 cannot write) is the Unix epoch, as it was then.
pub fn pg_micros(t: time::OffsetDateTime) -> i64 {
    const UNIX_TO_2000: i64 = 946_684_800;
    if !(0..=9999).contains(&t.year()) {
        return -UNIX_TO_2000 * 1_000_000;
    }
    // The whole seconds and the nanoseconds past them (never negative): what dividing
    // `unix_timestamp_nanos()` by 10^9 (floored) gives, without its 128-bit division (0.4% of
    // sluice's CPU in the initial load, `perf`).
    (t.unix_timestamp() - UNIX_TO_2000) * 1_000_000 + rounded_micros(t.nanosecond())
}

/// `nanos` (below 10^9) as whole microseconds, rounded as [`pg_micros`] says.
fn rounded_micros(nanos: u32) -> i64 {
    if nanos.is_multiple_of(1000) {
        i64::from(nanos / 1000)
    } else {
        let fraction: f64 = format!("0.{nanos:09}").parse().unwrap_or(0.0);
        (fraction * 1e6).round_ties_even() as i64
    }
}

/// Why copying rows encoded piece by piece failed.
pub(crate) enum CopyFailure<E> {
    /// The server's (or the connection's) error.
    Server(sqlx::Error),
    /// A piece could not be encoded; the COPY was aborted.
    Encoding(E),
}

/// Rows per piece of a [`copy_pieces`]: each piece is sent as soon as it is encoded, so the
/// server stores one while the next is encoded (before, a batch was encoded whole, on two
/// threads, while the server waited).
pub(crate) const PIECE_ROWS: usize = 1000;

/// Copies rows with `statement` (`copy … from stdin`), piece by piece: `encode(piece, out)`
/// writes a piece's COPY text (or binary rows, between the format's header and trailer, when
/// `binary`) into `out`, and each piece is sent as soon as it is encoded, so
/// the server parses one piece while the next is encoded. A piece that cannot be encoded
/// aborts the COPY.
pub(crate) async fn copy_pieces<P: Copy, E>(
    conn: &mut PgConnection,
    statement: &str,
    binary: bool,
    pieces: impl IntoIterator<Item = P>,
    mut encode: impl FnMut(P, &mut Vec<u8>) -> Result<(), E>,
) -> Result<u64, CopyFailure<E>> {
    let mut pieces = pieces.into_iter();
    let take_all = |piece, out: &mut Vec<u8>| encode(piece, out).map(|()| true);
    let (copied, _) = copy_until(conn, statement, binary, &mut pieces, take_all).await?;
    Ok(copied)
}

/// Rows copied piece by piece (see [`copy_pieces`]) in `COPY`'s binary format for as long as
/// `encode(piece, true, out)` can write each piece in it, then as text. `encode` returns
/// `Ok(false)`, having written nothing, for a piece that must go as text: the binary `COPY`
/// then ends, and a second one (`text_statement`) takes that piece and the rest, each encoded
/// with `encode(piece, false, out)`. With no `binary_statement`, all go as text. The rows land
/// the same either way; those sent in binary spare the server parsing their values.
pub(crate) async fn copy_pieces_binary_first<P: Copy, E>(
    conn: &mut PgConnection,
    binary_statement: Option<&str>,
    text_statement: &str,
    pieces: impl IntoIterator<Item = P>,
    mut encode: impl FnMut(P, bool, &mut Vec<u8>) -> Result<bool, E>,
) -> Result<u64, CopyFailure<E>> {
    let mut pieces = pieces.into_iter();
    let (mut copied, mut declined) = (0, None);
    if let Some(statement) = binary_statement {
        let in_binary = |piece, out: &mut Vec<u8>| encode(piece, true, out);
        (copied, declined) = copy_until(conn, statement, true, &mut pieces, in_binary).await?;
        if declined.is_none() {
            return Ok(copied);
        }
    }
    let mut rest = declined.into_iter().chain(pieces);
    let as_text = |piece, out: &mut Vec<u8>| encode(piece, false, out).map(|_| true);
    let (in_text, _) = copy_until(conn, text_statement, false, &mut rest, as_text).await?;
    Ok(copied + in_text)
}

/// The one loop of [`copy_pieces`] and [`copy_pieces_binary_first`]: each piece of `pieces`
/// encoded and sent in turn, until `encode` declines one (`Ok(false)`, having written
/// nothing). The `COPY` then ends before that piece, which is returned beside the rows copied;
/// the pieces after it stay in `pieces`. No `COPY` starts when there are no pieces or the first
/// is declined. A piece that cannot be encoded aborts the `COPY`.
async fn copy_until<P: Copy, E>(
    conn: &mut PgConnection,
    statement: &str,
    binary: bool,
    pieces: &mut impl Iterator<Item = P>,
    mut encode: impl FnMut(P, &mut Vec<u8>) -> Result<bool, E>,
) -> Result<(u64, Option<P>), CopyFailure<E>> {
    let mut out = Vec::new();
    let Some(first) = pieces.next() else {
        return Ok((0, None));
    };
    if !encode(first, &mut out).map_err(CopyFailure::Encoding)? {
        return Ok((0, Some(first)));
    }
    let mut copy = conn
        .copy_in_raw(statement)
        .await
        .map_err(CopyFailure::Server)?;
    if binary {
        copy.send(binary::HEADER)
            .await
            .map_err(CopyFailure::Server)?;
    }
    copy.send(out.as_slice())
        .await
        .map_err(CopyFailure::Server)?;
    let mut declined = None;
    for piece in pieces.by_ref() {
        out.clear();
        match encode(piece, &mut out) {
            Ok(true) => {
                copy.send(out.as_slice())
                    .await
                    .map_err(CopyFailure::Server)?;
            }
            Ok(false) => {
                declined = Some(piece);
                break;
            }
            Err(e) => {
                // The server answers an abort with an error, which is the expected outcome.
                let _ = copy.abort("sluice: a row could not be encoded").await;
                return Err(CopyFailure::Encoding(e));
            }
        }
    }
    if binary {
        copy.send(binary::TRAILER)
            .await
            .map_err(CopyFailure::Server)?;
    }
    let copied = copy.finish().await.map_err(CopyFailure::Server)?;
    Ok((copied, declined))
}

/// `statement`, a join of a staging table with its target on the target's key, run so that it
/// probes the key's index once per staged row: hash and merge joins off, and JIT off, for
/// this statement only (`set local`, then `reset`, in one round trip; run it with `raw_sql`).
/// Only for a target whose key has a unique index: without one, a forced nested loop would
/// scan the table once per staged row.
///
/// Why: a staging table is new in every transaction and never analysed, so the planner guesses
/// its size from its pages (tens of thousands of rows for 5,000) and, on a target of any size,
/// hashes the whole target: a sequential scan of every row the table holds, per batch.
/// Measured on PostgreSQL 15, 5,000 staged rows merged into a 200,000-row table: 306 ms
/// hashing, 55–70 ms probing; the gap grows with the table. The over-estimate also lifts the
/// probing plan's cost over `jit_above_cost`, and compiling it cost about 10 ms per batch.
pub(crate) fn probing_key_index(statement: &str) -> String {
    format!(
        "set local enable_hashjoin = off; set local enable_mergejoin = off; set local jit = off; \
         {statement}; reset enable_hashjoin; reset enable_mergejoin; reset jit"
    )
}

/// `f` over every item, one thread each (CPU-bound encoding). On a multi-threaded runtime the
/// calling worker is marked busy, so other tasks move elsewhere meanwhile.
pub(crate) fn map_in_parallel<I: Sync, T: Send + Default>(
    items: &[I],
    f: impl Fn(&I) -> T + Sync,
) -> Vec<T> {
    let run = || {
        std::thread::scope(|scope| {
            let handles: Vec<_> = items.iter().map(|item| scope.spawn(|| f(item))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect::<Vec<_>>()
        })
    };
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(run),
        _ => run(),
    }
}

/// Records whose NULs were replaced (the NUL policy): how many, and the latest one's key.
#[derive(Clone, Debug, Default)]
pub(crate) struct NulReplacements {
    pub count: u64,
    pub latest: Option<RecordKey>,
}

impl NulReplacements {
    /// Counts `keys`, in the order they were written.
    pub fn add(&mut self, keys: &[RecordKey]) {
        if let Some(last) = keys.last() {
            self.count += keys.len() as u64;
            self.latest = Some(last.clone());
        }
    }

    /// The target's `payload` health check: status, message and fix.
    pub fn check(&self) -> (Status, String, Option<String>) {
        payload_check(self.count, self.latest.as_ref())
    }
}

fn payload_check(count: u64, latest: Option<&RecordKey>) -> (Status, String, Option<String>) {
    match latest {
        Some(key) if count > 0 => (
            Status::Warning,
            format!(
                "{count} record(s) contained NUL characters, which PostgreSQL cannot store; they were \
                 written with U+FFFD in their place (latest: {} / {} / {})",
                key.sync_id, key.collection_id, key.upstream_id
            ),
            Some("remove NUL characters from the upstream data".to_owned()),
        ),
        _ => (
            Status::Healthy,
            "no payload needed changing".to_owned(),
            None,
        ),
    }
}

/// Pushes text for COPY, replacing NUL; returns whether anything was replaced.
pub(crate) fn push_text(out: &mut Vec<u8>, text: &str) -> bool {
    replacing_nul(text, |bytes| push_escaped(out, bytes))
}

/// Hands `text` to `push` with each NUL replaced by U+FFFD (PostgreSQL stores no NUL in text);
/// returns whether anything was replaced.
fn replacing_nul(text: &str, push: impl FnOnce(&[u8])) -> bool {
    if text.contains('\0') {
        push(text.replace('\0', "\u{FFFD}").as_bytes());
        true
    } else {
        push(text.as_bytes());
        false
    }
}

/// COPY text format: backslash, newline, carriage return and tab are escaped.
pub(crate) fn push_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    static SPECIAL: ByteSet = ByteSet::new(b"\\\n\r\t");
    let mut start = 0;
    while let Some(i) = SPECIAL.find(bytes, start) {
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(match bytes[i] {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => b"\\t",
        });
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_microseconds_since_2000_and_other_years_the_epoch() {
        use time::macros::datetime;
        assert_eq!(pg_micros(datetime!(2000-01-01 0:00 UTC)), 0);
        assert_eq!(
            pg_micros(datetime!(2000-01-01 0:00:00.000001 +01:00)),
            -3_600_000_000 + 1
        );
        assert_eq!(
            pg_micros(time::OffsetDateTime::UNIX_EPOCH),
            -946_684_800_000_000
        );
        // Before 1970: the fraction still counts forward from the second.
        assert_eq!(
            pg_micros(datetime!(1969-12-31 23:59:59.25 UTC)),
            -946_684_800_000_000 - 750_000
        );
        assert_eq!(
            pg_micros(datetime!(2000-01-01 0:00:00.123456789 UTC)),
            123_457
        );
        for outside in [
            datetime!(-0001-06-01 0:00 UTC),
            datetime!(-9999-01-01 0:00 UTC),
        ] {
            assert_eq!(pg_micros(outside), -946_684_800_000_000);
        }
        // Seconds and their fraction as the nanoseconds since 1970 floor-divided by 10^9 say
        // them, at any time of years 1–9999, in any offset, before 1970 and after.
        let mut random = sluice_core::Xorshift::new(0x9e37_79b9_7f4a_7c15);
        let (first, last) = (
            datetime!(0001-01-01 0:00 UTC).unix_timestamp_nanos(),
            datetime!(9999-12-31 12:00 UTC).unix_timestamp_nanos(),
        );
        for _ in 0..20_000 {
            let nanos = first
                + (u128::from(random.next_u64()) << 32 | u128::from(random.next_u64())) as i128
                    % (last - first);
            let offset = (random.next_u64() % (2 * 50_000)) as i32 - 50_000;
            let t = time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
                .unwrap()
                .to_offset(time::UtcOffset::from_whole_seconds(offset).unwrap());
            let (seconds, fraction) = (
                nanos.div_euclid(1_000_000_000) as i64,
                nanos.rem_euclid(1_000_000_000) as u32,
            );
            let micros = rounded_micros(fraction);
            if (0..=9999).contains(&t.year()) {
                assert_eq!(
                    pg_micros(t),
                    (seconds - 946_684_800) * 1_000_000 + micros,
                    "{t}"
                );
            }
        }
    }

    #[test]
    fn a_binary_header_is_the_signature_and_two_empty_words() {
        assert_eq!(binary::HEADER.len(), 19);
        assert_eq!(&binary::HEADER[..11], b"PGCOPY\n\xff\r\n\0");
        let mut out = Vec::new();
        binary::tuple(&mut out, 2);
        binary::field(&mut out, b"ab");
        assert!(binary::text(&mut out, "x\0"));
        binary::jsonb(&mut out, "{}");
        assert_eq!(
            out,
            [
                &[0, 2][..],
                &[0, 0, 0, 2, b'a', b'b'],
                &[0, 0, 0, 4, b'x', 0xef, 0xbf, 0xbd],
                &[0, 0, 0, 3, 1, b'{', b'}']
            ]
            .concat()
        );
    }

    #[test]
    fn copy_text_escapes_the_four_special_bytes() {
        let mut out = Vec::new();
        push_escaped(&mut out, b"a\\b\nc\rd\te");
        assert_eq!(out, b"a\\\\b\\nc\\rd\\te");
    }
}
