//! The PostgreSQL protocol (version 3) as the proxy sees it: whole messages split off a read
//! buffer, bounds-checked readers for the few client messages it looks into, and the backend
//! messages it writes itself (encoded by `pgwire`).
//!
//! Client bytes are read with the proxy's own checks rather than `pgwire`'s decoders, which
//! trust inner length fields (a `SASLInitialResponse` or `Bind` whose counts overrun the
//! message would panic there); everything a client sends is untrusted until the target says
//! otherwise.

use bytes::{BufMut, BytesMut};
use pgwire::messages::response::{ErrorResponse, NoticeResponse};

/// The largest packet before authentication (PostgreSQL's own limit for a startup packet).
pub const STARTUP_LIMIT: usize = 10_000;
/// The largest message once logged in (PostgreSQL's own: 1 GiB less one byte).
pub const MESSAGE_LIMIT: usize = 0x3fff_ffff;

/// `SSLRequest`, `GSSENCRequest` and `CancelRequest` codes, in place of a protocol version.
pub const SSL_REQUEST: u32 = 80_877_103;
/// See [`SSL_REQUEST`].
pub const GSSENC_REQUEST: u32 = 80_877_104;
/// See [`SSL_REQUEST`].
pub const CANCEL_REQUEST: u32 = 80_877_102;

/// Why bytes on a socket are not a message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed the connection.
    #[error("the connection closed")]
    Closed,
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The bytes break the protocol.
    #[error("{0}")]
    Malformed(String),
}

/// One whole message: its type byte and its bytes (type, length and body), ready to forward.
#[derive(Debug)]
pub struct Message {
    /// The type byte (`Q`, `P`, `Z`, …); 0 for a startup-phase packet, which has none.
    pub kind: u8,
    /// The whole message as it came.
    pub raw: BytesMut,
    header: usize,
}

impl Message {
    /// The body, after the type byte and the length.
    pub fn body(&self) -> &[u8] {
        &self.raw[self.header..]
    }
}

/// Splits one typed message off the front of `buf` when it holds a whole one; messages
/// longer than `limit` are refused.
pub fn split_message(buf: &mut BytesMut, limit: usize) -> Result<Option<Message>, WireError> {
    split(buf, 1, limit)
}

/// Splits one startup-phase packet (length first, no type byte) off the front of `buf`.
pub fn split_packet(buf: &mut BytesMut) -> Result<Option<Message>, WireError> {
    split(buf, 0, STARTUP_LIMIT)
}

fn split(buf: &mut BytesMut, header: usize, limit: usize) -> Result<Option<Message>, WireError> {
    if buf.len() < header + 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([
        buf[header],
        buf[header + 1],
        buf[header + 2],
        buf[header + 3],
    ]) as usize;
    let least = if header == 0 { 8 } else { 4 };
    if len < least || len > limit {
        return Err(WireError::Malformed(format!(
            "a message of {len} bytes (the limit is {limit})"
        )));
    }
    let total = header + len;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let kind = if header == 1 { buf[0] } else { 0 };
    Ok(Some(Message {
        kind,
        raw: buf.split_to(total),
        header: header + 4,
    }))
}

/// Reads a message body front to back, refusing to run past its end.
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// A reader over `body`.
    pub fn new(body: &'a [u8]) -> Self {
        Self(body)
    }

    fn short(what: &str) -> WireError {
        WireError::Malformed(format!("a message ends inside its {what}"))
    }

    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self) -> Result<&'a str, WireError> {
        let end = self
            .0
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| Self::short("string"))?;
        let s = std::str::from_utf8(&self.0[..end])
            .map_err(|_| WireError::Malformed("a string is not UTF-8".into()))?;
        self.0 = &self.0[end + 1..];
        Ok(s)
    }

    /// A big-endian i32.
    pub fn i32(&mut self) -> Result<i32, WireError> {
        let bytes = self.take(4)?;
        Ok(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// A big-endian i16.
    pub fn i16(&mut self) -> Result<i16, WireError> {
        let bytes = self.take(2)?;
        Ok(i16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(Self::short("fields"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    /// A length-prefixed value (`-1`: NULL).
    pub fn value(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        match self.i32()? {
            -1 => Ok(None),
            n if n < 0 => Err(WireError::Malformed(format!("a value of length {n}"))),
            n => self.take(n as usize).map(Some),
        }
    }

    /// What is left.
    pub fn rest(&self) -> &'a [u8] {
        self.0
    }
}

/// The parts of an error or notice the proxy sends itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// `ERROR`, `FATAL`, `NOTICE`.
    pub severity: &'static str,
    /// The SQLSTATE (from [`sluice_pg::sqlstate`]).
    pub code: &'static str,
    /// The primary message.
    pub message: String,
    /// More about it (an upstream's own error code).
    pub detail: Option<String>,
    /// What to do about it.
    pub hint: Option<String>,
}

impl Report {
    /// An `ERROR`.
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity: "ERROR",
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// A `FATAL` error, after which the connection closes.
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity: "FATAL",
            ..Self::error(code, message)
        }
    }

    /// With a hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// With a detail.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    fn fields(&self) -> Vec<(u8, String)> {
        let mut fields = vec![
            (b'S', self.severity.to_owned()),
            (b'V', self.severity.to_owned()),
            (b'C', self.code.to_owned()),
            (b'M', self.message.clone()),
        ];
        fields.extend(self.detail.clone().map(|d| (b'D', d)));
        fields.extend(self.hint.clone().map(|h| (b'H', h)));
        fields
    }

    /// Appends it to `out` as an `ErrorResponse`.
    pub fn encode_error(&self, out: &mut BytesMut) {
        encode(&ErrorResponse::new(self.fields()), out);
    }

    /// Appends it to `out` as a `NoticeResponse`.
    pub fn encode_notice(&self, out: &mut BytesMut) {
        encode(&NoticeResponse::new(self.fields()), out);
    }
}

/// Appends `message` to `out`.
pub fn encode(message: &impl pgwire::messages::Message, out: &mut BytesMut) {
    // Encoding only fails for messages over pgwire's size limits, which the proxy's own
    // messages never reach; a truncated message is still better than a panic.
    if let Err(e) = message.encode(out) {
        tracing::error!(error = %e, "proxy: could not encode a message");
    }
}

/// Appends a raw message of type `kind` with `body` to `out`.
pub fn encode_raw(kind: u8, body: &[u8], out: &mut BytesMut) {
    out.put_u8(kind);
    out.put_u32((body.len() + 4) as u32);
    out.put_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_messages_are_split_and_partial_ones_wait() {
        let mut buf = BytesMut::new();
        encode_raw(b'Q', b"select 1\0", &mut buf);
        encode_raw(b'X', b"", &mut buf);
        buf.put_slice(b"Q\0\0");
        let first = split_message(&mut buf, MESSAGE_LIMIT).unwrap().unwrap();
        assert_eq!((first.kind, first.body()), (b'Q', &b"select 1\0"[..]));
        let second = split_message(&mut buf, MESSAGE_LIMIT).unwrap().unwrap();
        assert_eq!((second.kind, second.body()), (b'X', &b""[..]));
        assert!(split_message(&mut buf, MESSAGE_LIMIT).unwrap().is_none());
    }

    #[test]
    fn lengths_out_of_bounds_are_refused() {
        for len in [0u32, 3, 2_000_000_000] {
            let mut buf = BytesMut::new();
            buf.put_u8(b'Q');
            buf.put_u32(len);
            assert!(split_message(&mut buf, MESSAGE_LIMIT).is_err(), "{len}");
        }
        let mut buf = BytesMut::new();
        buf.put_u32(STARTUP_LIMIT as u32 + 1);
        buf.put_u32(196_608);
        assert!(split_packet(&mut buf).is_err());
    }

    #[test]
    fn readers_never_run_past_the_end() {
        let mut r = Reader::new(b"abc");
        assert!(r.cstr().is_err());
        let mut r = Reader::new(&[0, 0, 0, 9, 1]);
        assert!(r.value().is_err());
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xfe]);
        assert!(r.value().is_err());
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff, b'x', 0]);
        assert_eq!(r.value().unwrap(), None);
        assert_eq!(r.cstr().unwrap(), "x");
    }
}
