//! Finding the few bytes a text format escapes (COPY's, JSON's), sixteen bytes at a time: text
//! that needs no escaping, which is nearly all of it, is skipped a block at a time rather than
//! looked at byte by byte. On x86-64 a block is tested with SSE2 (part of every x86-64 CPU),
//! through `safe_arch`'s safe functions; elsewhere byte by byte.

/// A set of bytes to find: control bytes (below 0x20) and up to two others.
pub struct ByteSet {
    members: [bool; 256],
    /// Every member below 0x20 is below this (0: none is).
    below: u8,
    /// The members from 0x20 up (a member twice when there is only one).
    others: [u8; 2],
}

/// The bytes a JSON string escapes: control characters, `"` and `\\`. A string holding none
/// of them is its own JSON text between quotes.
pub static JSON_ESCAPED: ByteSet = ByteSet::new(&[
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    26, 27, 28, 29, 30, 31, b'"', b'\\',
]);

/// The bytes looked at together.
const BLOCK: usize = 16;

impl ByteSet {
    /// The set of `members`: any bytes below 0x20, and at most two from 0x20 up (at least one).
    pub const fn new(members: &[u8]) -> Self {
        let mut set = [false; 256];
        let mut below = 0;
        let mut others = [0u8; 2];
        let mut n_others = 0;
        let mut i = 0;
        while i < members.len() {
            let b = members[i];
            set[b as usize] = true;
            if b < 0x20 {
                if b + 1 > below {
                    below = b + 1;
                }
            } else {
                assert!(
                    n_others < 2,
                    "a ByteSet holds at most two bytes from 0x20 up"
                );
                others[n_others] = b;
                n_others += 1;
            }
            i += 1;
        }
        assert!(
            n_others > 0,
            "a ByteSet holds at least one byte from 0x20 up"
        );
        if n_others == 1 {
            others[1] = others[0];
        }
        Self {
            members: set,
            below,
            others,
        }
    }

    /// True when `b` is in the set.
    pub fn contains(&self, b: u8) -> bool {
        self.members[b as usize]
    }

    /// The position of the first member of the set in `bytes` at or after `from`.
    pub fn find(&self, bytes: &[u8], from: usize) -> Option<usize> {
        let rest = bytes.get(from..)?;
        let (blocks, tail) = rest.as_chunks::<BLOCK>();
        if blocks.is_empty() {
            // Shorter than a block: byte by byte.
            return rest
                .iter()
                .position(|&b| self.contains(b))
                .map(|i| from + i);
        }
        for (n, block) in blocks.iter().enumerate() {
            if let Some(i) = self.first_in(block) {
                return Some(from + n * BLOCK + i);
            }
        }
        if tail.is_empty() {
            return None;
        }
        // The last block's worth of bytes: those before the tail hold no member.
        let last = rest.last_chunk::<BLOCK>()?;
        self.first_in(last).map(|i| from + rest.len() - BLOCK + i)
    }

    /// The position of the first member in `block`.
    #[inline(always)]
    fn first_in(&self, block: &[u8; BLOCK]) -> Option<usize> {
        let mut candidates = self.candidates(block);
        while candidates != 0 {
            let i = candidates.trailing_zeros() as usize;
            if self.contains(block[i]) {
                return Some(i);
            }
            // A byte below 0x20 that is not a member: look on past it.
            candidates &= candidates - 1;
        }
        None
    }

    /// A bit for each byte of the block that may be a member (every member, and bytes below
    /// 0x20 that are not), lowest bit first.
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    #[inline(always)]
    fn candidates(&self, block: &[u8; BLOCK]) -> u32 {
        use safe_arch::*;
        let bytes = load_unaligned_m128i(block);
        let splat = |b: u8| set_splat_i8_m128i(i8::from_ne_bytes([b]));
        // `b < below` is `max(b, below) != b`, which also holds for no `b` when `below` is 0.
        let not_below = cmp_eq_mask_i8_m128i(max_u8_m128i(bytes, splat(self.below)), bytes);
        let first = cmp_eq_mask_i8_m128i(bytes, splat(self.others[0]));
        let second = cmp_eq_mask_i8_m128i(bytes, splat(self.others[1]));
        let below = move_mask_i8_m128i(not_below) as u32 ^ 0xffff;
        below | move_mask_i8_m128i(first | second) as u32
    }

    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
    #[inline(always)]
    fn candidates(&self, block: &[u8; BLOCK]) -> u32 {
        self.candidates_by_byte(block)
    }

    /// What `candidates` gives, a byte at a time: the other CPUs' way, and the tests' reference.
    #[cfg(any(test, not(all(target_arch = "x86_64", target_feature = "sse2"))))]
    fn candidates_by_byte(&self, block: &[u8; BLOCK]) -> u32 {
        let mut bits = 0;
        for (i, &b) in block.iter().enumerate() {
            let may = b < self.below || b == self.others[0] || b == self.others[1];
            bits |= u32::from(may) << i;
        }
        bits
    }
}

/// `text` split around the first `byte`, as `str::split_once` splits it: found by a plain
/// loop, which for the short values it is used on (the space in a time, the point in a number)
/// costs less than `split_once`'s searcher takes to set up (`CharSearcher::next_match`: 0.75%
/// of sluice's CPU in the initial load, `perf`). `None` also for a `byte` that is not ASCII
/// found inside a character.
pub fn split_once_byte(text: &str, byte: u8) -> Option<(&str, &str)> {
    let at = text.bytes().position(|b| b == byte)?;
    Some((text.get(..at)?, text.get(at + 1..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Block by block finds what a byte-by-byte search finds, wherever the member sits in a
    /// block or in the tail after the last whole one, after bytes below 0x20 that are not
    /// members, in text of every length and from every position.
    #[test]
    fn find_agrees_with_a_byte_by_byte_search() {
        const SETS: [ByteSet; 4] = [
            ByteSet::new(b"\\\n\r\t"),
            ByteSet::new(&[
                0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
                23, 24, 25, 26, 27, 28, 29, 30, 31, b'"', b'\\',
            ]),
            ByteSet::new(b","),
            ByteSet::new(b" !"),
        ];
        let alphabet: Vec<u8> = (0u8..=255).collect();
        let mut random = crate::Xorshift::new(0x2545_f491_4f6c_dd1d);
        for set in &SETS {
            for len in 0..56 {
                for _ in 0..300 {
                    let text: Vec<u8> = (0..len)
                        .map(|_| {
                            let state = random.next_u64();
                            // Mostly plain text, now and then any byte at all.
                            if state.is_multiple_of(16) {
                                alphabet[(state >> 8) as usize % 256]
                            } else {
                                b'a' + (state >> 8) as u8 % 26
                            }
                        })
                        .collect();
                    for from in 0..=len {
                        let expected = text[from..]
                            .iter()
                            .position(|&b| set.contains(b))
                            .map(|i| from + i);
                        assert_eq!(set.find(&text, from), expected, "{text:?} from {from}");
                    }
                }
            }
        }
        // The block test marks what a byte-by-byte test marks, for every byte value.
        for set in &SETS {
            for _ in 0..2000 {
                let mut block = [0u8; BLOCK];
                for b in &mut block {
                    *b = random.next_u64() as u8;
                }
                assert_eq!(
                    set.candidates(&block),
                    set.candidates_by_byte(&block),
                    "{block:?}"
                );
            }
        }
        // Every byte value in every position of a block and of a tail, alone and after a
        // byte below 0x20 that is not a member.
        for set in &SETS {
            for b in 0u8..=255 {
                for at in 0..21 {
                    for before in [b'a', 0x0b] {
                        let mut text = *b"abcdefghijklmnopqrstu";
                        text[at] = b;
                        if at > 0 {
                            text[at - 1] = before;
                        }
                        let expected = text.iter().position(|&b| set.contains(b));
                        assert_eq!(set.find(&text, 0), expected, "byte {b} at {at}");
                    }
                }
            }
        }
    }

    /// Split around an ASCII byte, a text's parts are those `split_once` gives, wherever the
    /// byte is (or is not) and whatever characters are around it.
    #[test]
    fn split_once_byte_agrees_with_split_once() {
        let mut random = crate::Xorshift::new(0x51ce_d0ff_00d5_ba11);
        let alphabet = ['a', ' ', '.', '-', 'é', '☃', '0', '\u{0}'];
        for _ in 0..5000 {
            let len = random.below(12) as usize;
            let text: String = (0..len)
                .map(|_| alphabet[random.below(alphabet.len() as u64) as usize])
                .collect();
            for byte in [b' ', b'.', b'-', 0] {
                assert_eq!(
                    split_once_byte(&text, byte),
                    text.split_once(char::from(byte)),
                    "{text:?} at {byte}"
                );
            }
        }
        // A byte inside a character (é is C3 A9) splits nothing.
        assert_eq!(split_once_byte("é", 0xa9), None);
    }
}
