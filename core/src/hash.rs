//! Page hashes, the whole-database checksum and a streaming file hasher.
//!
//! ```text
//! page_hash(pgno, data) = xxh3_64_with_seed(data, seed = pgno as u64)
//! db checksum           = XOR of page_hash(pgno, content of page pgno)
//!                         for pgno in 1..=page_count, a page never written
//!                         counting as a zero-filled page (0 for 0 pages)
//! file hash             = xxh3_64 (seed 0) of a file's bytes
//! ```
//!
//! XOR makes the checksum incremental: changing page p from content a to b
//! xors out page_hash(p, a) and xors in page_hash(p, b).

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use xxhash_rust::xxh3::{xxh3_64_with_seed, Xxh3};

/// xxh3-64 of the page with the page number as seed.
pub fn page_hash(pgno: u32, page: &[u8]) -> u64 {
    xxh3_64_with_seed(page, u64::from(pgno))
}

/// The whole-database checksum: XOR of page_hash(pgno, content) for pgno in
/// 1..=page_count, a page never written counting as a zero-filled page.
/// Updated incrementally; keeps one u64 per page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbHashes {
    page_size: u32,
    hashes: Vec<u64>,
    checksum: u64,
    zeros: Vec<u8>,
}

impl DbHashes {
    /// An empty database: 0 pages, checksum 0.
    pub fn new(page_size: u32) -> DbHashes {
        DbHashes {
            page_size,
            hashes: Vec::new(),
            checksum: 0,
            zeros: vec![0u8; page_size as usize],
        }
    }

    /// The page size given to [`DbHashes::new`].
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The number of pages in the database.
    pub fn page_count(&self) -> u32 {
        self.hashes.len() as u32
    }

    /// The whole-database checksum.
    pub fn checksum(&self) -> u64 {
        self.checksum
    }

    /// The hash of page `pgno`, None when it is 0 or beyond the page count.
    pub fn get(&self, pgno: u32) -> Option<u64> {
        let i = (pgno as usize).checked_sub(1)?;
        self.hashes.get(i).copied()
    }

    /// The hash of a zero-filled page numbered `pgno`.
    pub fn zero_page_hash(&self, pgno: u32) -> u64 {
        page_hash(pgno, &self.zeros)
    }

    /// Sets page pgno's hash; pages between the old count and pgno become zero
    /// pages. Page number 0 does not exist: it is ignored (with a debug
    /// assertion).
    pub fn set(&mut self, pgno: u32, hash: u64) {
        debug_assert!(pgno >= 1, "page number 0");
        if pgno == 0 {
            return;
        }
        if pgno > self.page_count() {
            self.set_page_count(pgno - 1);
            self.hashes.push(hash);
            self.checksum ^= hash;
        } else {
            let slot = &mut self.hashes[pgno as usize - 1];
            self.checksum ^= *slot ^ hash;
            *slot = hash;
        }
    }

    /// Truncates (xoring out the dropped pages) or extends with zero pages.
    pub fn set_page_count(&mut self, n: u32) {
        let old = self.page_count();
        if n < old {
            for h in self.hashes.drain(n as usize..) {
                self.checksum ^= h;
            }
        } else {
            self.hashes.reserve((n - old) as usize);
            for pgno in old + 1..=n {
                let h = page_hash(pgno, &self.zeros);
                self.checksum ^= h;
                self.hashes.push(h);
            }
        }
    }
}

/// Streaming xxh3-64 over a file's bytes.
#[derive(Clone, Default)]
pub struct FileHasher {
    state: Xxh3,
}

impl FileHasher {
    /// A hasher that has seen no bytes.
    pub fn new() -> Self {
        FileHasher { state: Xxh3::new() }
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, b: &[u8]) {
        self.state.update(b);
    }

    /// The hash of every byte fed so far.
    pub fn finish(&self) -> u64 {
        self.state.digest()
    }
}

impl fmt::Debug for FileHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileHasher")
            .field("digest", &self.finish())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xxhash_rust::xxh3::xxh3_64;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Recomputes the checksum from a model of the page contents.
    fn from_scratch(pages: &[Option<u64>], page_size: u32) -> u64 {
        let zeros = vec![0u8; page_size as usize];
        let mut c = 0;
        for (i, p) in pages.iter().enumerate() {
            let pgno = i as u32 + 1;
            c ^= match p {
                Some(seed) => page_hash(pgno, &seed.to_be_bytes()),
                None => page_hash(pgno, &zeros),
            };
        }
        c
    }

    #[test]
    fn incremental_equals_from_scratch() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..20 {
            let page_size = [512u32, 1024, 4096][round % 3];
            let mut d = DbHashes::new(page_size);
            let mut model: Vec<Option<u64>> = Vec::new();
            for step in 0..200 {
                match rng.next() % 4 {
                    0 => {
                        let n = (rng.next() % 40) as u32;
                        d.set_page_count(n);
                        model.resize(n as usize, None);
                    }
                    _ => {
                        let pgno = (rng.next() % 40) as u32 + 1;
                        let v = rng.next();
                        d.set(pgno, page_hash(pgno, &v.to_be_bytes()));
                        if model.len() < pgno as usize {
                            model.resize(pgno as usize, None);
                        }
                        model[pgno as usize - 1] = Some(v);
                    }
                }
                assert_eq!(d.page_count() as usize, model.len());
                if step % 8 == 0 || step == 199 {
                    assert_eq!(d.checksum(), from_scratch(&model, page_size));
                }
            }
            for (i, m) in model.iter().enumerate() {
                let pgno = i as u32 + 1;
                let want = match m {
                    Some(v) => page_hash(pgno, &v.to_be_bytes()),
                    None => d.zero_page_hash(pgno),
                };
                assert_eq!(d.get(pgno), Some(want));
            }
            assert_eq!(d.get(0), None);
            assert_eq!(d.get(d.page_count() + 1), None);
        }
    }

    #[test]
    fn empty_and_zero() {
        let mut d = DbHashes::new(4096);
        assert_eq!((d.page_count(), d.checksum(), d.page_size()), (0, 0, 4096));
        d.set_page_count(3);
        d.set_page_count(0);
        assert_eq!(d.checksum(), 0);
    }

    #[test]
    fn file_hasher_streams() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut h = FileHasher::new();
        for c in data.chunks(333) {
            h.update(c);
        }
        assert_eq!(h.finish(), xxh3_64(&data));
        assert_eq!(FileHasher::new().finish(), xxh3_64(&[]));
    }
}
