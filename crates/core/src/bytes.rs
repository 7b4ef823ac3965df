//! Finding the few bytes a text format escapes (COPY's, JSON's), eight bytes at a time: text
//! that needs no escaping, which is nearly all of it, is skipped a word at a time rather than
//! looked at byte by byte.

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

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

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
        let mut at = from;
        while let Some(word) = bytes.get(at..at + 8) {
            let word: [u8; 8] = word.try_into().unwrap_or_default();
            if self.may_hold(u64::from_le_bytes(word))
                && let Some(i) = word.iter().position(|&b| self.contains(b))
            {
                return Some(at + i);
            }
            at += 8;
        }
        let rest = bytes.get(at..).unwrap_or_default();
        rest.iter().position(|&b| self.contains(b)).map(|i| at + i)
    }

    /// False only when none of the word's eight bytes is a member (true may be a byte below
    /// 0x20 that is not one).
    fn may_hold(&self, word: u64) -> bool {
        let below = (word.wrapping_sub(ONES * self.below as u64) & !word & HIGHS) != 0;
        below || has_byte(word, self.others[0]) || has_byte(word, self.others[1])
    }
}

/// True when one of `word`'s bytes is `b`.
fn has_byte(word: u64, b: u8) -> bool {
    let x = word ^ (ONES * b as u64);
    (x.wrapping_sub(ONES) & !x & HIGHS) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Word by word finds what a byte-by-byte search finds, wherever the member sits in a
    /// word, among bytes just below and above the members, in text of every length.
    #[test]
    fn find_agrees_with_a_byte_by_byte_search() {
        const SETS: [ByteSet; 3] = [
            ByteSet::new(b"\\\n\r\t"),
            ByteSet::new(&[
                0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
                23, 24, 25, 26, 27, 28, 29, 30, 31, b'"', b'\\',
            ]),
            ByteSet::new(b","),
        ];
        let alphabet: Vec<u8> = (0u8..=255).collect();
        let mut random = crate::Xorshift::new(0x2545_f491_4f6c_dd1d);
        for set in &SETS {
            for len in 0..40 {
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
        // Every byte value in every position of a word.
        for b in 0u8..=255 {
            for at in 0..8 {
                let mut text = *b"abcdefgh";
                text[at] = b;
                let expected = text.iter().position(|&b| SETS[0].contains(b));
                assert_eq!(SETS[0].find(&text, 0), expected, "byte {b} at {at}");
            }
        }
    }
}
