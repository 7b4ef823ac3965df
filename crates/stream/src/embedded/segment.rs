//! Payload segments as files written before packed segments hold them (`packed.rs`), read
//! only to move such a file's records on opening it (`schema.rs`); and what both formats
//! share: the LZ4 body, varints, segment sizes and the times a segment holds for its records.
//!
//! Such a body: a format byte ([`LZ4`]), then the LZ4 block (its size first) of
//! `text · header · u32 LE header length`, where the header is, as LEB128 varints, the slot
//! count and then each slot's seq (as the step from the previous one) and text length.

use super::*;

/// Payloads per segment at most.
pub(super) const SEGMENT_RECORDS: usize = 1000;

/// A segment is closed once its text reaches this many bytes (so a read of one record
/// decompresses at most about this much).
pub(super) const SEGMENT_BYTES: usize = 1 << 20;

/// The body's format byte: an LZ4 block with its uncompressed size first.
pub(super) const LZ4: u8 = 1;

/// The times a segment's row gives those of its records that hold 0 for them: the append's
/// time (every record of an append has it), and its first record's update time (a PostgreSQL
/// source's records of one page or one transaction all have it), so that each record need not
/// repeat them. `None` where the records hold their own: when one's time is 0 among others
/// (it could not be told from the shared time), and in segments written before segments held
/// times.
#[derive(Clone, Copy, Debug)]
pub(super) struct Times {
    pub(super) appended_at: Option<i64>,
    pub(super) updated_at: Option<i64>,
}

impl Times {
    /// A record's update time, from what its row holds.
    pub(super) fn updated_at(self, stored: i64) -> i64 {
        resolve(self.updated_at, stored)
    }

    /// A record's append time, from what its row holds.
    pub(super) fn appended_at(self, stored: i64) -> i64 {
        resolve(self.appended_at, stored)
    }
}

fn resolve(shared: Option<i64>, stored: i64) -> i64 {
    match shared {
        Some(shared) if stored == 0 => shared,
        _ => stored,
    }
}

/// What a row holds for `own`, given the segment's `shared` time: 0 when they are equal.
/// A segment shares no time that a record's 0 would be mistaken for (`packed::write_one`).
pub(super) fn stored(shared: Option<i64>, own: i64) -> i64 {
    match shared {
        Some(shared) if shared == own => 0,
        _ => own,
    }
}

/// A decoded segment: its text, each slot's seq and range in it, and its shared times.
pub(super) struct Segment {
    text: Arc<String>,
    slots: Vec<(u64, Range<usize>)>,
    pub(super) times: Times,
}

impl Segment {
    /// The payload in `slot`.
    pub(super) fn payload(&self, slot: i64) -> Option<PayloadText> {
        let (_, range) = self.slots.get(usize::try_from(slot).ok()?)?;
        PayloadText::new(self.text.clone(), range.clone())
    }
}

/// Encodes payloads (each with the seq of the record naming it) as a segment body.
#[cfg(test)]
pub(super) fn encode<'a>(payloads: impl ExactSizeIterator<Item = (i64, &'a str)>) -> Vec<u8> {
    let mut raw = Vec::with_capacity(payloads.len() * 300);
    let mut header = Vec::with_capacity(payloads.len() * 4 + 4);
    varint(&mut header, payloads.len() as u64);
    let mut previous = 0u64;
    for (seq, text) in payloads {
        raw.extend_from_slice(text.as_bytes());
        varint(&mut header, (seq as u64).wrapping_sub(previous));
        varint(&mut header, text.len() as u64);
        previous = seq as u64;
    }
    seal(raw, &header, <[u8]>::to_vec)
}

/// Decodes a segment body (whose row holds `times`); a body that does not decode is reported
/// as a corrupt file.
pub(super) fn decode(body: &[u8], times: Times) -> Result<Segment> {
    let (text, header) = open(body)?;
    let mut header = &header[..];
    let count = read_varint(&mut header).ok_or_else(corrupt)?;
    let mut slots = Vec::with_capacity((count as usize).min(SEGMENT_RECORDS * 4));
    let (mut seq, mut start) = (0u64, 0usize);
    for _ in 0..count {
        seq = seq.wrapping_add(read_varint(&mut header).ok_or_else(corrupt)?);
        let len = read_varint(&mut header).ok_or_else(corrupt)? as usize;
        let end = start.checked_add(len).filter(|&e| e <= text.len());
        let end = end.ok_or_else(corrupt)?;
        slots.push((seq, start..end));
        start = end;
    }
    // Every slot must start and end on a character boundary for `PayloadText::new`.
    if slots
        .iter()
        .any(|(_, r)| !text.is_char_boundary(r.start) || !text.is_char_boundary(r.end))
    {
        return Err(corrupt());
    }
    Ok(Segment {
        text: Arc::new(text),
        slots,
        times,
    })
}

pub(super) fn corrupt() -> Error {
    Error::invalid("records stream: corrupt payload segment")
}

/// How hard LZ4's compressor looks for matches: 1 is its default, higher skips ahead faster
/// where it finds none. At 8 a segment of the initial-load benchmark's payloads compressed
/// in half the instructions of `lz4_flex` (which has no such setting) and no larger
/// (ARCHITECTURE.md, "LZ4 from C, with acceleration").
const ACCELERATION: i32 = 8;

/// A body of either format: `raw` (the text, then the header, then the header's length)
/// compressed, after the format byte, lent to `with_body` (which stores a copy). The block is
/// LZ4's own C compressor's output, its size first as `lz4_flex` writes it (any LZ4 decoder
/// reads it, and [`open`] reads blocks of either). Input the C compressor does not take (about
/// 2 GB or more) is compressed by `lz4_flex`.
///
/// The C compressor writes only into bytes already set, so a buffer made for each segment was
/// zeroed first, all of its bound (about 300 KB a segment of the initial load's rows: 63 M of
/// the 3,900 M instructions of 200,000 rows, `callgrind`). The thread keeps its buffer
/// ([`BODY`]) instead, and zeroes only what it adds to it.
pub(super) fn seal<R>(mut raw: Vec<u8>, header: &[u8], with_body: impl FnOnce(&[u8]) -> R) -> R {
    raw.extend_from_slice(header);
    raw.extend_from_slice(&(header.len() as u32).to_le_bytes());
    let Ok(bound) = lz4::block::compress_bound(raw.len()) else {
        return with_body(&flex_body(&raw));
    };
    let size = 1 + 4 + bound;
    let kept = size <= KEPT_BODY;
    // Taken, not borrowed: a seal within `with_body` would find an empty buffer, not a panic.
    let mut body = if kept { BODY.take() } else { Vec::new() };
    if body.len() < size {
        body.resize(size, 0);
    }
    body[0] = LZ4;
    let mode = Some(lz4::block::CompressionMode::FAST(ACCELERATION));
    let sealed = match lz4::block::compress_to_buffer(&raw, mode, true, &mut body[1..size]) {
        Ok(written) => with_body(&body[..1 + written]),
        Err(_) => with_body(&flex_body(&raw)),
    };
    if kept {
        BODY.set(body);
    }
    sealed
}

thread_local! {
    /// The buffer [`seal`] compresses into on this thread.
    static BODY: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A body larger than this (a segment of a few very large records) is compressed into a buffer
/// of its own, so that no thread keeps more than this.
const KEPT_BODY: usize = 2 * SEGMENT_BYTES;

/// `raw` compressed by `lz4_flex`, after the format byte.
fn flex_body(raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(raw.len() / 2 + 16);
    body.push(LZ4);
    body.extend_from_slice(&lz4_flex::block::compress_prepend_size(raw));
    body
}

/// A body's text (checked to be UTF-8) and header, as [`seal`] put them.
pub(super) fn open(body: &[u8]) -> Result<(String, Vec<u8>)> {
    let (&format, compressed) = body.split_first().ok_or_else(corrupt)?;
    if format != LZ4 {
        return Err(corrupt());
    }
    let mut raw = decompress(compressed).ok_or_else(corrupt)?;
    let len_at = raw.len().checked_sub(4).ok_or_else(corrupt)?;
    let header_len = u32::from_le_bytes(raw[len_at..].try_into().map_err(|_| corrupt())?);
    let text_len = len_at
        .checked_sub(header_len as usize)
        .ok_or_else(corrupt)?;
    let header = raw[text_len..len_at].to_vec();
    raw.truncate(text_len);
    let text = String::from_utf8(raw).map_err(|_| corrupt())?;
    Ok((text, header))
}

/// An LZ4 block after its size (u32 LE), decoded, when it decodes to exactly that size. LZ4's
/// C decoder (`LZ4_decompress_safe`, which reads and writes only inside the buffers it is
/// given, whatever its input) took 67–70 µs for a segment of the benchmark's rows where
/// `lz4_flex` took 112–129 µs; a block it does not take (its size 2 GB or more, which only
/// `lz4_flex` writes) goes to `lz4_flex`.
fn decompress(compressed: &[u8]) -> Option<Vec<u8>> {
    let size = u32::from_le_bytes(compressed.get(..4)?.try_into().ok()?) as usize;
    let raw = match lz4::block::decompress(compressed, None) {
        Ok(raw) => raw,
        Err(_) => lz4_flex::block::decompress_size_prepended(compressed).ok()?,
    };
    (raw.len() == size).then_some(raw)
}

pub(super) fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

pub(super) fn read_varint(input: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: Times = Times {
        appended_at: None,
        updated_at: None,
    };

    #[test]
    fn a_segment_decodes_to_the_payloads_it_was_given() {
        let texts = ["{\"a\":1}", "", "{\"é\":\"\\u0000 ☃\"}", &"x".repeat(5000)];
        let body = encode(
            texts
                .iter()
                .enumerate()
                .map(|(i, t)| (i as i64 * 300 + 7, *t)),
        );
        let segment = decode(&body, OWN).unwrap();
        for (slot, text) in texts.iter().enumerate() {
            assert_eq!(segment.payload(slot as i64).unwrap().as_str(), *text);
            assert_eq!(segment.slots[slot].0, slot as u64 * 300 + 7);
        }
        assert!(segment.payload(4).is_none());
        assert!(body.len() < 200, "{} bytes", body.len());
    }

    /// Bodies compressed by LZ4's C library decode to what was sealed, however compressible
    /// (nothing but the header, text that repeats, bytes that do not); bodies `lz4_flex`
    /// compressed, as every file written before holds them, decode as before; and for rows like
    /// the initial-load benchmark's the C body is no larger than `lz4_flex`'s, give or take 2%.
    #[test]
    fn bodies_from_either_compressor_decode_to_what_was_sealed() {
        let mut random = sluice_core::Xorshift::new(0x9e37_79b9_7f4a_7c15);
        let mut noise = || char::from(b'!' + random.below(90) as u8);
        let random: String = (0..300_000).map(|_| noise()).collect();
        let rows: String = (0..1000)
            .map(|i| {
                let digest: String = (0..32).map(|_| noise()).collect();
                format!(r#"{{"id":{i},"name":"customer {i}","email":"c{i}@example.com","digest":"{digest}","created_at":"2026-12-06T10:{:02}:00+00:00"}}"#, i % 60)
            })
            .collect();
        for text in ["", "{\"a\":1}", &"abc".repeat(100_000), &random, &rows] {
            let sealed = encode([(7, text)].into_iter());
            assert_eq!(
                decode(&sealed, OWN).unwrap().payload(0).unwrap().as_str(),
                text
            );
            // The same bytes as `seal` laid them out, compressed as files written before hold them.
            let raw = decompress(&sealed[1..]).unwrap();
            let before = [&[LZ4][..], &lz4_flex::block::compress_prepend_size(&raw)].concat();
            assert_eq!(
                decode(&before, OWN).unwrap().payload(0).unwrap().as_str(),
                text
            );
            if text == rows {
                assert!(
                    sealed.len() * 100 <= before.len() * 102,
                    "{} bytes against {}",
                    sealed.len(),
                    before.len()
                );
            }
        }
    }

    /// The buffer a thread keeps between seals carries nothing of one body into the next: a
    /// small body sealed after a large one is, byte for byte, the body a new thread seals. The
    /// thread keeps one buffer, the size of the largest body it sealed, never above
    /// [`KEPT_BODY`].
    #[test]
    fn a_thread_seals_into_one_buffer_and_carries_nothing_over() {
        let mut random = sluice_core::Xorshift::new(7);
        let mut noise = |len: usize| -> String {
            (0..len)
                .map(|_| char::from(b'!' + random.below(90) as u8))
                .collect()
        };
        let (large, small, huge) = (noise(300_000), "{\"a\":1}".to_owned(), noise(3 << 20));
        let alone = {
            let small = small.clone();
            std::thread::spawn(move || encode([(9, small.as_str())].into_iter()))
                .join()
                .unwrap()
        };
        let first = encode([(1, large.as_str())].into_iter());
        let kept = BODY.take();
        assert!(
            kept.len() > large.len() && kept.len() <= KEPT_BODY,
            "{}",
            kept.len()
        );
        BODY.set(kept);
        let after = encode([(9, small.as_str())].into_iter());
        assert_eq!(after, alone);
        let beyond = encode([(3, huge.as_str())].into_iter());
        assert!(BODY.take().len() <= KEPT_BODY);
        for (body, text) in [(&first, &large), (&after, &small), (&beyond, &huge)] {
            assert_eq!(
                decode(body, OWN).unwrap().payload(0).unwrap().as_str(),
                text
            );
        }
    }

    /// A block decodes only to the size written before it: one byte more or less is refused,
    /// and so is a size with no block after it.
    #[test]
    fn a_block_decodes_only_to_its_stated_size() {
        let raw = "{\"a\":1}".repeat(100);
        let block = lz4::block::compress(raw.as_bytes(), None, true).unwrap();
        assert_eq!(decompress(&block).unwrap(), raw.as_bytes());
        for size in [raw.len() - 1, raw.len() + 1] {
            let stated = [&(size as u32).to_le_bytes()[..], &block[4..]].concat();
            assert_eq!(decompress(&stated), None, "stated {size}");
        }
        assert_eq!(decompress(&block[..4]), None);
        assert_eq!(decompress(&block[..3]), None);
    }

    #[test]
    fn a_damaged_segment_is_reported_not_misread() {
        let body = encode([(1, "{\"a\":1}"), (2, "{\"b\":2}")].into_iter());
        for damaged in [
            Vec::new(),
            vec![9],
            body[..body.len() - 1].to_vec(),
            [&body[..2], &[0xff; 8][..]].concat(),
        ] {
            let error = decode(&damaged, OWN).err().expect("a damaged body decoded");
            assert!(error.to_string().contains("corrupt"), "{error}");
        }
    }
}
