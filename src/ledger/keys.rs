//! Account ids as hash-map keys: inline for short ids, with a map that can
//! start loading an entry before it is needed.

use std::hash::BuildHasher;

use hashbrown::HashTable;

/// A hash map from account id to `V` (foldhash: several times faster than
/// SipHash on short keys, still seeded per process), with a
/// [`AccountMap::prefetch`] that starts loading an entry without waiting,
/// which `std`'s map cannot offer.
pub struct AccountMap<V> {
    table: HashTable<(AccountKey, V)>,
    hasher: foldhash::fast::RandomState,
}

impl<V> Default for AccountMap<V> {
    fn default() -> Self {
        AccountMap { table: HashTable::new(), hasher: foldhash::fast::RandomState::default() }
    }
}

impl<V> AccountMap<V> {
    /// An empty map with room for `n` entries.
    #[must_use]
    pub fn with_capacity(n: usize) -> Self {
        AccountMap { table: HashTable::with_capacity(n), hasher: foldhash::fast::RandomState::default() }
    }

    /// [`AccountMap::with_capacity`], with the table's memory written once
    /// (filled with `blank` entries, then emptied): the first touch of its
    /// pages (the kernel zeroing them; on a virtual machine, the host
    /// backing them) is paid here, where a start-up makes its maps while
    /// the database opens, not by the inserts of the load that fills them
    /// (~4 s of a 10M-account start).
    #[must_use]
    pub fn with_capacity_touched(n: usize, blank: impl Fn() -> V) -> Self {
        let mut map = AccountMap::with_capacity(n);
        let AccountMap { table, hasher } = &mut map;
        let room = table.capacity();
        for i in 0..room {
            // Hashes in order put the blanks bucket after bucket (the
            // table starts probing at its hash's low bits), spread over all
            // the buckets (of a large table, room is 7/8 of them); only the
            // speed relies on it.
            let hash = i as u64 * 8 / 7;
            table.insert_unique(hash, (AccountKey::from(""), blank()), |(k, _)| hasher.hash_one(k.as_str()));
        }
        table.clear();
        map
    }

    /// Makes room for `additional` more entries.
    pub fn reserve(&mut self, additional: usize) {
        let AccountMap { table, hasher } = self;
        table.reserve(additional, |(k, _)| hasher.hash_one(k.as_str()));
    }

    #[must_use]
    pub fn get(&self, id: &str) -> Option<&V> {
        self.table.find(self.hasher.hash_one(id), |(k, _)| k.as_str() == id).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut V> {
        self.table.find_mut(self.hasher.hash_one(id), |(k, _)| k.as_str() == id).map(|(_, v)| v)
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, key: AccountKey, value: V) -> Option<V> {
        let AccountMap { table, hasher } = self;
        let hash = hasher.hash_one(key.as_str());
        match table.entry(hash, |(k, _)| *k == key, |(k, _)| hasher.hash_one(k.as_str())) {
            hashbrown::hash_table::Entry::Occupied(mut e) => Some(std::mem::replace(&mut e.get_mut().1, value)),
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert((key, value));
                None
            }
        }
    }

    pub fn remove(&mut self, id: &str) -> Option<V> {
        let hash = self.hasher.hash_one(id);
        let entry = self.table.find_entry(hash, |(k, _)| k.as_str() == id).ok()?;
        Some(entry.remove().0 .1)
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.table.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Brings the table's probe group for `id` into the cache, and starts
    /// loading the first entry whose hash tag matches without reading it;
    /// see [`Book::prefetch`](super::Book::prefetch). Finding the group
    /// reads it, so that part waits for its cache miss: asked a few
    /// accounts ahead (loading), it waits beside the other lines on their
    /// way, and the later insert or lookup finds the group cached. An id not
    /// in the map yet (loading's case) has only its group brought in.
    pub fn prefetch(&self, id: &str) {
        if let Some(e) = self.table.iter_hash(self.hasher.hash_one(id)).next() {
            prefetch_lines(e);
        }
    }
}

/// Longest id kept inside an [`AccountKey`] itself.
const KEY_INLINE_BYTES: usize = 30;

/// An account id as a map key. Ids of up to 30 bytes (nearly all) are kept
/// inline, so a lookup compares bytes next to the hash table's own entry
/// instead of following a pointer to a separate heap block: with 100,000
/// accounts that extra cache miss showed up in perf as ~13% of the server's
/// CPU (inside `memcmp`, called from the shards' and the book's lookups).
///
/// The representation is private: the only ways in are the `From`
/// conversions from `&str` and `Box<str>`, which is what makes the
/// unchecked UTF-8 read in [`AccountKey::as_str`] sound.
#[derive(Clone)]
pub struct AccountKey(KeyRepr);

#[derive(Clone)]
enum KeyRepr {
    Inline { len: u8, bytes: [u8; KEY_INLINE_BYTES] },
    Heap(Box<str>),
}

impl AccountKey {
    #[must_use]
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // SAFETY: `bytes[..len]` was copied whole from a `&str` (see
            // `From<&str>`, the only constructor of `Inline`, unreachable
            // from outside this module), so it is valid UTF-8; skipping the
            // check saves a scan on every hash-map probe.
            KeyRepr::Inline { len, bytes } => unsafe { std::str::from_utf8_unchecked(&bytes[..usize::from(*len)]) },
            KeyRepr::Heap(s) => s,
        }
    }
}

impl From<&str> for AccountKey {
    fn from(s: &str) -> Self {
        if s.len() <= KEY_INLINE_BYTES {
            let mut bytes = [0u8; KEY_INLINE_BYTES];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            // `s.len() <= 30`, so the length fits in a u8.
            AccountKey(KeyRepr::Inline { len: s.len() as u8, bytes })
        } else {
            AccountKey(KeyRepr::Heap(s.into()))
        }
    }
}

impl From<Box<str>> for AccountKey {
    fn from(s: Box<str>) -> Self {
        if s.len() <= KEY_INLINE_BYTES {
            AccountKey::from(&*s)
        } else {
            AccountKey(KeyRepr::Heap(s))
        }
    }
}

impl std::borrow::Borrow<str> for AccountKey {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl std::ops::Deref for AccountKey {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

// Hashes and compares exactly as the `str` it holds, as `Borrow` requires.
impl std::hash::Hash for AccountKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialEq for AccountKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for AccountKey {}

impl std::fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

/// Asks the CPU to bring the cache lines of `*p` in: its first and last
/// byte's, which covers values up to 65 bytes (a hint: it never faults and
/// changes nothing).
#[inline]
pub(crate) fn prefetch_lines<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let first = std::ptr::from_ref(p).cast::<i8>();
        let last = first.wrapping_add(std::mem::size_of::<T>().saturating_sub(1));
        // SAFETY: `_mm_prefetch` only hints the cache; both addresses are
        // inside the value `p` refers to.
        unsafe {
            _mm_prefetch::<{ _MM_HINT_T0 }>(first);
            _mm_prefetch::<{ _MM_HINT_T0 }>(last);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
