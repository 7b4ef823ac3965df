//! Reading a streaming replication connection: messages taken in place from one buffer that
//! each read fills with all the socket holds.

use sluice_core::Error;
use sluice_pg::tls::Io;
use tokio::io::{AsyncReadExt, BufStream};

use super::{Lsn, Reader, Replication, body_len, lost, query_error};

/// How much the reader asks the socket for at once: every message already sent, up to this
/// (the connection's own read buffer is as large, so reads bypass it).
pub(super) const READ_ROOM: usize = 256 * 1024;

/// The reading side of a streaming replication connection. Each read takes as much as the
/// socket holds into one buffer, and messages are then taken from it in place: one read
/// brings many changes, and [`Self::has_message`] tells whether the next one is already
/// here (so a caller can gather what arrived together and hand it on at once).
pub(crate) struct ReplicationReader {
    io: tokio::io::ReadHalf<BufStream<Box<dyn Io>>>,
    /// Bytes read; `buf[at..]` is not taken yet.
    buf: Vec<u8>,
    at: usize,
}

impl ReplicationReader {
    pub(super) fn new(io: tokio::io::ReadHalf<BufStream<Box<dyn Io>>>) -> Self {
        Self {
            io,
            buf: Vec::new(),
            at: 0,
        }
    }

    /// The next replication message; `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<Replication<'_>>, Error> {
        // XLogData's header: its type byte, the start and end of its WAL and the server's time.
        const DATA_HEADER: usize = 1 + 8 + 8 + 8;
        let data = loop {
            let (kind, size) = self.frame().await?;
            let body = self.at + 5..self.at + size;
            self.at += size;
            let body_bytes = &self.buf[body.clone()];
            match kind {
                b'd' => {
                    let mut r = Reader::new(body_bytes);
                    match r.u8()? {
                        b'w' if body_bytes.len() >= DATA_HEADER => break body,
                        b'w' => {
                            return Err(Error::invalid(
                                "replication connection: a WAL data message cut short",
                            ));
                        }
                        b'k' => {
                            let end = Lsn(r.i64()? as u64);
                            let _time = r.i64()?;
                            let reply = r.u8()? == 1;
                            return Ok(Some(Replication::Keepalive { end, reply }));
                        }
                        _ => {}
                    }
                }
                b'c' | b'C' | b'Z' => return Ok(None),
                b'E' => return Err(query_error(body_bytes)),
                _ => {}
            }
        };
        Ok(Some(Replication::Data {
            payload: &self.buf[data.start + DATA_HEADER..data.end],
        }))
    }

    /// Whether the next message is already read whole (or is already known to be malformed):
    /// [`Self::next`] then answers without waiting for the socket, unless that message is
    /// one it passes over.
    pub fn has_message(&self) -> bool {
        !matches!(self.framed(), Ok(None))
    }

    /// The type byte and whole size of the message at `at`, once its header is buffered.
    fn header(&self) -> Result<Option<(u8, usize)>, Error> {
        let Some(header) = self.buf[self.at..].get(..5) else {
            return Ok(None);
        };
        let len = i32::from_be_bytes(header[1..5].try_into().expect("4 bytes"));
        Ok(Some((header[0], 5 + body_len(len)?)))
    }

    /// The type byte and whole size of the message at `at`, when all of it is buffered.
    fn framed(&self) -> Result<Option<(u8, usize)>, Error> {
        let whole = |&(_, size): &(u8, usize)| self.buf.len() - self.at >= size;
        Ok(self.header()?.filter(whole))
    }

    /// Reads until the message at `at` is whole; returns its type byte and size.
    async fn frame(&mut self) -> Result<(u8, usize), Error> {
        loop {
            if let Some(frame) = self.framed()? {
                return Ok(frame);
            }
            // What is left of the buffer moves to its front; the room after it is at least
            // the rest of this message.
            self.buf.drain(..self.at);
            self.at = 0;
            let needed = self.header()?.map_or(5, |(_, size)| size);
            if self.buf.capacity() > 4 * READ_ROOM && needed <= READ_ROOM {
                // A large message's room is not kept for the small ones after it.
                self.buf.shrink_to(READ_ROOM);
            }
            // Room for the whole of the connection's buffer: a read then goes straight
            // from the socket into this buffer.
            self.buf.reserve((needed - self.buf.len()).max(READ_ROOM));
            let read = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| lost("reading", e))?;
            if read == 0 {
                let what = if self.buf.is_empty() {
                    "the server closed the connection"
                } else {
                    "the server closed the connection in the middle of a message"
                };
                return Err(lost(what, std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ReplicationConnection, frame};
    use super::*;
    use sluice_core::Xorshift;
    use tokio::io::AsyncWriteExt;
    use tokio::io::DuplexStream;

    /// A reader over one end of an in-memory pipe, as `split` makes it.
    fn reader(io: DuplexStream) -> ReplicationReader {
        let io: Box<dyn Io> = Box::new(io);
        ReplicationConnection {
            io: BufStream::with_capacity(READ_ROOM, 64 * 1024, io),
        }
        .split()
        .0
    }

    /// A CopyData message holding XLogData whose pgoutput message is `payload`.
    fn wal(payload: &[u8]) -> Vec<u8> {
        let mut body = vec![b'w'];
        body.extend_from_slice(&[0; 24]);
        body.extend_from_slice(payload);
        frame(b'd', &body)
    }

    fn keepalive(end: u64, reply: bool) -> Vec<u8> {
        let mut body = vec![b'k'];
        body.extend_from_slice(&end.to_be_bytes());
        body.extend_from_slice(&0i64.to_be_bytes());
        body.push(reply as u8);
        frame(b'd', &body)
    }

    /// What `next` gave, owned: a payload, or a keepalive's end.
    async fn take(r: &mut ReplicationReader) -> Result<Option<Result<Vec<u8>, u64>>, Error> {
        Ok(r.next().await?.map(|m| match m {
            Replication::Data { payload } => Ok(payload.to_vec()),
            Replication::Keepalive { end, .. } => Err(end.0),
        }))
    }

    #[tokio::test]
    async fn messages_that_arrived_together_are_taken_without_waiting_for_the_socket() {
        let (mut server, client) = tokio::io::duplex(1 << 20);
        let mut r = reader(client);
        let mut sent = Vec::new();
        for i in 0..300u32 {
            sent.extend(wal(format!("change {i}").as_bytes()));
        }
        sent.extend(keepalive(77, false));
        server.write_all(&sent).await.unwrap();

        assert!(!r.has_message(), "nothing is read before the first wait");
        assert_eq!(take(&mut r).await.unwrap(), Some(Ok(b"change 0".to_vec())));
        for i in 1..300 {
            // All of it came in the first read: each next message is already here.
            assert!(r.has_message(), "message {i}");
            let got = take(&mut r).await.unwrap();
            assert_eq!(got, Some(Ok(format!("change {i}").into_bytes())));
        }
        assert!(r.has_message());
        assert_eq!(take(&mut r).await.unwrap(), Some(Err(77)));
        assert!(!r.has_message(), "nothing more was sent");

        server.write_all(&frame(b'c', &[])).await.unwrap();
        assert_eq!(
            take(&mut r).await.unwrap(),
            None,
            "CopyDone ends the stream"
        );
    }

    #[tokio::test]
    async fn messages_cut_anywhere_and_one_larger_than_a_read_arrive_whole_and_in_order() {
        let (mut server, client) = tokio::io::duplex(64 * 1024);
        let mut r = reader(client);
        let mut rng = Xorshift::new(0x5eed);
        let mut expected: Vec<Result<Vec<u8>, u64>> = Vec::new();
        let mut sent = Vec::new();
        for i in 0..2000u64 {
            let payload: Vec<u8> = match i {
                // Larger than a read (and than four of them): the buffer grows for it.
                700 => (0..5 * READ_ROOM).map(|b| b as u8).collect(),
                _ if i % 97 == 0 => {
                    sent.extend(keepalive(i, i % 2 == 0));
                    expected.push(Err(i));
                    continue;
                }
                _ => (0..rng.below(600)).map(|_| rng.next_u64() as u8).collect(),
            };
            sent.extend(wal(&payload));
            expected.push(Ok(payload));
        }
        // Written in pieces of 1 to 8 bytes or up to 20,000, so that reads end inside
        // message headers and bodies alike.
        let writer = tokio::spawn(async move {
            let mut rest = sent.as_slice();
            while !rest.is_empty() {
                let n = match rng.below(2) {
                    0 => 1 + rng.below(8),
                    _ => 1 + rng.below(20_000),
                } as usize;
                let (piece, after) = rest.split_at(n.min(rest.len()));
                server.write_all(piece).await.unwrap();
                rest = after;
                tokio::task::yield_now().await;
            }
            server
        });
        for (i, want) in expected.iter().enumerate() {
            let got = take(&mut r).await.unwrap().expect("a message");
            assert!(&got == want, "message {i} differs");
            if i == 720 {
                // The large message's room is given back once small ones follow.
                assert!(r.buf.capacity() <= 2 * READ_ROOM, "{}", r.buf.capacity());
            }
        }
        assert!(!r.has_message());
        drop(writer.await.unwrap());
        let closed = take(&mut r).await.unwrap_err().to_string();
        assert!(
            closed.contains("the server closed the connection"),
            "{closed}"
        );
    }

    #[tokio::test]
    async fn a_connection_closed_inside_a_message_or_a_bad_length_is_an_error() {
        let (mut server, client) = tokio::io::duplex(1024);
        let mut r = reader(client);
        let whole = wal(b"cut short");
        server.write_all(&whole[..whole.len() - 3]).await.unwrap();
        drop(server);
        let e = take(&mut r).await.unwrap_err().to_string();
        assert!(e.contains("in the middle of a message"), "{e}");

        let (mut server, client) = tokio::io::duplex(1024);
        let mut r = reader(client);
        server.write_all(&[b'd', 0, 0, 0, 2]).await.unwrap();
        take(&mut r).await.unwrap_err();
        assert!(r.has_message(), "a bad length is known without waiting");
        let e = take(&mut r).await.unwrap_err().to_string();
        assert!(e.contains("bad message length 2"), "{e}");
    }
}
