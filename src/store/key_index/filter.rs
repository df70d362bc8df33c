//! A blocked Bloom filter of key hashes: "certainly not there" or "maybe".
//!
//! Each hash, spread by a finalizer, picks one 512-bit block (one cache
//! line) and sets [`BITS_PER_KEY`] bits in it, so a probe costs one cache
//! miss. Bits are atomics: the journal's sorter and a filter being built
//! from the table add to it while shards probe it. A filter never forgets,
//! so it has no false negatives however full it gets; past its capacity
//! only its false positives grow (and a fuller filter is replaced, see
//! `key_index`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// Bits set per key, within its block.
const BITS_PER_KEY: u32 = 8;
/// Filter bits per key of capacity (~1% false positives when full).
const BITS_PER_CAPACITY: usize = 12;

pub struct Filter {
    blocks: Box<[[AtomicU64; 8]]>,
    capacity: usize,
    added: AtomicUsize,
}

impl Filter {
    /// A filter for about `capacity` keys.
    pub fn new(capacity: usize) -> Filter {
        let blocks = (capacity.max(1) * BITS_PER_CAPACITY).div_ceil(512).next_power_of_two();
        Filter { blocks: (0..blocks).map(|_| Default::default()).collect(), capacity, added: AtomicUsize::new(0) }
    }

    pub fn insert(&self, hash: u64) {
        let hash = spread(hash);
        let block = &self.blocks[self.block(hash)];
        for (word, bit) in Self::bits(hash) {
            block[word].fetch_or(bit, Relaxed);
        }
        self.added.fetch_add(1, Relaxed);
    }

    /// `false`: `hash` was certainly never inserted.
    pub fn may_contain(&self, hash: u64) -> bool {
        let hash = spread(hash);
        let block = &self.blocks[self.block(hash)];
        Self::bits(hash).all(|(word, bit)| block[word].load(Relaxed) & bit != 0)
    }

    /// Whether more keys went in than it was sized for.
    pub fn is_full(&self) -> bool {
        self.added.load(Relaxed) > self.capacity
    }

    fn block(&self, hash: u64) -> usize {
        // The high bits pick the block; the bits within it come from a
        // remix, so that the two are independent.
        (hash >> 32) as usize & (self.blocks.len() - 1)
    }

    /// The (word, bit) pairs of `hash` within its block: 9 bits each of a
    /// remixed hash.
    fn bits(hash: u64) -> impl Iterator<Item = (usize, u64)> {
        let mut h = hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (hash >> 29);
        (0..BITS_PER_KEY).map(move |_| {
            let pos = (h & 511) as usize;
            h = h.rotate_right(9);
            (pos / 64, 1u64 << (pos % 64))
        })
    }
}

/// MurmurHash3's 64-bit finalizer: every input bit reaches every output
/// bit. A fast hasher keeps distinct keys distinct but may leave close keys
/// with close hashes; spread out, they pick independent blocks and bits.
fn spread(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    /// The false positives stay near 1% whatever the hasher's seeds, for
    /// keys shaped as they come (sequential numbers; an account and a
    /// client's key): some of foldhash's process-wide seeds map sequential
    /// numbers to hashes whose high bits barely differ, which filled a few
    /// blocks and answered "maybe" to a third of all probes.
    #[test]
    fn false_positives_stay_low_for_every_seed_and_key_shape() {
        let pairs_text: Vec<(String, String)> =
            (0..14_000u64).map(|i| (format!("acct-{}", i % 64), format!("order-{i}"))).collect();
        for seed in 0..400u64 {
            let shared = Box::leak(Box::new(foldhash::SharedSeed::from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))));
            let s = foldhash::fast::SeedableRandomState::with_seed(seed, shared);
            let numbers = Filter::new(4_000);
            let pairs = Filter::new(4_000);
            let pair = |i: u64| {
                let (account, key) = &pairs_text[i as usize];
                s.hash_one((account.as_str(), key.as_str()))
            };
            for i in 0..4_000u64 {
                numbers.insert(s.hash_one(i));
                pairs.insert(pair(i));
            }
            let numbers_fp = (4_000..14_000u64).filter(|&i| numbers.may_contain(s.hash_one(i))).count();
            let pairs_fp = (4_000..14_000u64).filter(|&i| pairs.may_contain(pair(i))).count();
            assert!(numbers_fp < 200 && pairs_fp < 200, "seed {seed}: {numbers_fp} and {pairs_fp} of 10,000");
        }
    }

    /// No false negatives, full or overfull; false positives near 1% at
    /// capacity.
    #[test]
    fn what_went_in_is_always_found_and_little_else_is() {
        let s = foldhash::fast::RandomState::default();
        let f = Filter::new(10_000);
        for i in 0..10_000u64 {
            f.insert(s.hash_one(i));
        }
        assert!((0..10_000u64).all(|i| f.may_contain(s.hash_one(i))));
        let false_positives = (10_000..110_000u64).filter(|i| f.may_contain(s.hash_one(i))).count();
        assert!(false_positives < 2_000, "{false_positives} of 100,000");
        assert!(!f.is_full());
        for i in 10_000..40_000u64 {
            f.insert(s.hash_one(i));
        }
        assert!(f.is_full());
        assert!((0..40_000u64).all(|i| f.may_contain(s.hash_one(i))));
    }
}
