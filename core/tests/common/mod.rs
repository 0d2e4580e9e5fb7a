//! Helpers shared by the integration tests.
#![allow(dead_code)]

use replited_core::wal::{encode_frame, WalHeader};

/// A tiny deterministic xorshift64 PRNG.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform-ish in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

pub fn wal_header(be: bool, page_size: u32, salt1: u32, salt2: u32) -> WalHeader {
    WalHeader {
        big_endian_checksum: be,
        page_size,
        checkpoint_seq: 0,
        salt1,
        salt2,
        checksum: (0, 0),
    }
    .with_computed_checksum()
}

/// A page whose content is derived from (pgno, version): compressible in
/// part, distinct per version.
pub fn page(page_size: u32, pgno: u32, version: u32) -> Vec<u8> {
    let mut p = vec![0u8; page_size as usize];
    let mut r = Rng::new(u64::from(pgno) << 32 | u64::from(version) | 1);
    for (i, b) in p.iter_mut().enumerate() {
        *b = if i % 64 < 16 {
            r.next() as u8
        } else {
            (i / 64) as u8
        };
    }
    p
}

/// A transaction for [`build_wal`]: (pgno, version) frames in order; the last
/// frame carries `db_pages` as the commit field when `commit` is true.
pub struct TxnSpec {
    pub frames: Vec<(u32, u32)>,
    pub db_pages: u32,
    pub commit: bool,
}

/// Builds a WAL file: header then the frames of every transaction.
pub fn build_wal(h: &WalHeader, txns: &[TxnSpec]) -> Vec<u8> {
    let mut out = h.encode().to_vec();
    let mut ck = h.checksum;
    for t in txns {
        for (k, &(pgno, version)) in t.frames.iter().enumerate() {
            let last = k + 1 == t.frames.len();
            let commit = if last && t.commit { t.db_pages } else { 0 };
            ck = encode_frame(
                h,
                ck,
                pgno,
                commit,
                &page(h.page_size, pgno, version),
                &mut out,
            );
        }
    }
    out
}
