//! A small generator (xorshift64): retry jitter, and tests that want varied inputs that are
//! the same on every run. Not for anything that must be unpredictable.

/// xorshift64 (Marsaglia's 13, 7, 17).
#[derive(Clone, Debug)]
pub struct Xorshift(u64);

impl Xorshift {
    /// A generator starting from `seed`, which must not be zero (zero would repeat forever).
    pub const fn new(seed: u64) -> Self {
        assert!(seed != 0, "a xorshift seed must not be zero");
        Self(seed)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut s = self.0;
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        self.0 = s;
        s
    }

    /// The next number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let mut a = Xorshift::new(0x2545_f491_4f6c_dd1d);
        let mut b = a.clone();
        let first: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        assert_eq!(first, (0..5).map(|_| b.next_u64()).collect::<Vec<_>>());
        // xorshift64 never yields zero from a non-zero state, and does not repeat soon.
        assert!(first.iter().all(|&v| v != 0));
        assert_eq!(
            first.iter().collect::<std::collections::HashSet<_>>().len(),
            5
        );
        assert!((0..1000).all(|_| a.below(7) < 7));
    }
}
