//! SQLite's write-ahead log format
//! (<https://www.sqlite.org/fileformat2.html#walformat>).
//!
//! ```text
//! WAL header (32 bytes, big-endian integers):
//!  0  4  magic: 0x377f0682 (checksums on little-endian words)
//!                or 0x377f0683 (checksums on big-endian words)
//!  4  4  file format version = 3007000
//!  8  4  database page size (power of two, 512..=65536; 65536 is stored as is)
//! 12  4  checkpoint sequence number
//! 16  4  salt-1
//! 20  4  salt-2
//! 24  4  checksum-1 \ wal_checksum over bytes 0..24, seed (0, 0)
//! 28  4  checksum-2 /
//!
//! Then frames, each a 24-byte header followed by one page:
//!  0  4  page number (>= 1)
//!  4  4  for a commit frame, the database size in pages after the commit;
//!        0 for every other frame
//!  8  4  salt-1 (copied from the WAL header)
//! 12  4  salt-2 (copied from the WAL header)
//! 16  4  checksum-1 \ cumulative: wal_checksum over this frame's bytes 0..8
//! 20  4  checksum-2 /  and then its page, seeded with the previous frame's
//!                      checksum (the WAL header's checksum for the first frame)
//! 24  page size bytes of page data
//! ```
//!
//! A frame is valid when its salts equal the header's, its checksum matches
//! and its page number is not 0; the valid log ends at the first frame that is
//! not. Only frames up to the last valid commit frame are part of the database.

use alloc::vec::Vec;
use core::fmt;

/// Length of the WAL header.
pub const WAL_HEADER_LEN: usize = 32;
/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 24;
/// WAL magic for checksums computed on little-endian 32-bit words.
pub const WAL_MAGIC_LE: u32 = 0x377f0682;
/// WAL magic for checksums computed on big-endian 32-bit words.
pub const WAL_MAGIC_BE: u32 = 0x377f0683;
/// The only WAL format version.
pub const WAL_VERSION: u32 = 3007000;
/// Smallest SQLite page size.
pub const MIN_PAGE_SIZE: u32 = 512;
/// Largest SQLite page size.
pub const MAX_PAGE_SIZE: u32 = 65536;

/// Offset of the magic in the WAL header.
pub const HDR_MAGIC: usize = 0;
/// Offset of the format version in the WAL header.
pub const HDR_VERSION: usize = 4;
/// Offset of the page size in the WAL header.
pub const HDR_PAGE_SIZE: usize = 8;
/// Offset of the checkpoint sequence number in the WAL header.
pub const HDR_CHECKPOINT_SEQ: usize = 12;
/// Offset of salt-1 in the WAL header.
pub const HDR_SALT1: usize = 16;
/// Offset of salt-2 in the WAL header.
pub const HDR_SALT2: usize = 20;
/// Offset of checksum-1 in the WAL header.
pub const HDR_CHECKSUM1: usize = 24;
/// Offset of checksum-2 in the WAL header.
pub const HDR_CHECKSUM2: usize = 28;

/// Offset of the page number in a frame header.
pub const FRAME_PGNO: usize = 0;
/// Offset of the commit database size in a frame header.
pub const FRAME_COMMIT_DB_SIZE: usize = 4;
/// Offset of salt-1 in a frame header.
pub const FRAME_SALT1: usize = 8;
/// Offset of salt-2 in a frame header.
pub const FRAME_SALT2: usize = 12;
/// Offset of checksum-1 in a frame header.
pub const FRAME_CHECKSUM1: usize = 16;
/// Offset of checksum-2 in a frame header.
pub const FRAME_CHECKSUM2: usize = 20;
/// Number of frame-header bytes covered by the frame checksum.
pub const FRAME_CHECKSUMMED_LEN: usize = 8;

/// True when `page_size` is a valid SQLite page size: a power of two in
/// 512..=65536.
pub fn valid_page_size(page_size: u32) -> bool {
    page_size.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size)
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The WAL file header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalHeader {
    /// True for magic 0x377f0683: checksums are computed on big-endian words.
    pub big_endian_checksum: bool,
    /// Database page size in bytes.
    pub page_size: u32,
    /// Checkpoint sequence number.
    pub checkpoint_seq: u32,
    /// Salt-1: changes at every WAL reset.
    pub salt1: u32,
    /// Salt-2: a new random value at every WAL reset.
    pub salt2: u32,
    /// The header checksum (over bytes 0..24), which seeds the first frame's.
    pub checksum: (u32, u32),
}

impl WalHeader {
    /// Parses and validates the 32-byte header: magic, format version 3007000,
    /// page size (power of two 512..=65536), header checksum over bytes 0..24.
    pub fn decode(bytes: &[u8]) -> Result<WalHeader, WalError> {
        if bytes.len() < WAL_HEADER_LEN {
            return Err(WalError::Truncated { len: bytes.len() });
        }
        let magic = be32(bytes, HDR_MAGIC);
        let big_endian_checksum = match magic {
            WAL_MAGIC_LE => false,
            WAL_MAGIC_BE => true,
            other => return Err(WalError::BadMagic(other)),
        };
        let version = be32(bytes, HDR_VERSION);
        if version != WAL_VERSION {
            return Err(WalError::BadVersion(version));
        }
        let page_size = be32(bytes, HDR_PAGE_SIZE);
        if !valid_page_size(page_size) {
            return Err(WalError::BadPageSize(page_size));
        }
        let stored = (be32(bytes, HDR_CHECKSUM1), be32(bytes, HDR_CHECKSUM2));
        let computed = wal_checksum(big_endian_checksum, (0, 0), &bytes[..HDR_CHECKSUM1]);
        if stored != computed {
            return Err(WalError::HeaderChecksum { stored, computed });
        }
        Ok(WalHeader {
            big_endian_checksum,
            page_size,
            checkpoint_seq: be32(bytes, HDR_CHECKPOINT_SEQ),
            salt1: be32(bytes, HDR_SALT1),
            salt2: be32(bytes, HDR_SALT2),
            checksum: stored,
        })
    }

    /// Encodes, computing the checksum field from the other fields (the
    /// `checksum` field of self is ignored and the computed one is written).
    pub fn encode(&self) -> [u8; WAL_HEADER_LEN] {
        let mut b = [0u8; WAL_HEADER_LEN];
        let magic = if self.big_endian_checksum {
            WAL_MAGIC_BE
        } else {
            WAL_MAGIC_LE
        };
        b[HDR_MAGIC..HDR_MAGIC + 4].copy_from_slice(&magic.to_be_bytes());
        b[HDR_VERSION..HDR_VERSION + 4].copy_from_slice(&WAL_VERSION.to_be_bytes());
        b[HDR_PAGE_SIZE..HDR_PAGE_SIZE + 4].copy_from_slice(&self.page_size.to_be_bytes());
        b[HDR_CHECKPOINT_SEQ..HDR_CHECKPOINT_SEQ + 4]
            .copy_from_slice(&self.checkpoint_seq.to_be_bytes());
        b[HDR_SALT1..HDR_SALT1 + 4].copy_from_slice(&self.salt1.to_be_bytes());
        b[HDR_SALT2..HDR_SALT2 + 4].copy_from_slice(&self.salt2.to_be_bytes());
        let (c1, c2) = wal_checksum(self.big_endian_checksum, (0, 0), &b[..HDR_CHECKSUM1]);
        b[HDR_CHECKSUM1..HDR_CHECKSUM1 + 4].copy_from_slice(&c1.to_be_bytes());
        b[HDR_CHECKSUM2..HDR_CHECKSUM2 + 4].copy_from_slice(&c2.to_be_bytes());
        b
    }

    /// The header as [`WalHeader::encode`] writes it: with its checksum field
    /// computed from the other fields.
    pub fn with_computed_checksum(&self) -> WalHeader {
        let mut h = *self;
        let b = self.encode();
        h.checksum = (be32(&b, HDR_CHECKSUM1), be32(&b, HDR_CHECKSUM2));
        h
    }

    /// Length of one frame: 24 + page_size.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + self.page_size as usize
    }
}

/// A WAL frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Page number (0 never appears in a valid frame).
    pub pgno: u32,
    /// Database size in pages after the commit for a commit frame, else 0.
    pub commit_db_size: u32,
    /// Salt-1, valid only when equal to the WAL header's.
    pub salt1: u32,
    /// Salt-2, valid only when equal to the WAL header's.
    pub salt2: u32,
    /// Cumulative checksum up to and including this frame.
    pub checksum: (u32, u32),
}

impl FrameHeader {
    /// Decodes a frame header from the first 24 bytes of `bytes`; panics when
    /// `bytes.len() < 24`. Performs no validation.
    pub fn decode(bytes: &[u8]) -> FrameHeader {
        assert!(
            bytes.len() >= FRAME_HEADER_LEN,
            "frame header needs 24 bytes, got {}",
            bytes.len()
        );
        FrameHeader {
            pgno: be32(bytes, FRAME_PGNO),
            commit_db_size: be32(bytes, FRAME_COMMIT_DB_SIZE),
            salt1: be32(bytes, FRAME_SALT1),
            salt2: be32(bytes, FRAME_SALT2),
            checksum: (be32(bytes, FRAME_CHECKSUM1), be32(bytes, FRAME_CHECKSUM2)),
        }
    }

    /// Encodes this frame header as is.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[FRAME_PGNO..FRAME_PGNO + 4].copy_from_slice(&self.pgno.to_be_bytes());
        b[FRAME_COMMIT_DB_SIZE..FRAME_COMMIT_DB_SIZE + 4]
            .copy_from_slice(&self.commit_db_size.to_be_bytes());
        b[FRAME_SALT1..FRAME_SALT1 + 4].copy_from_slice(&self.salt1.to_be_bytes());
        b[FRAME_SALT2..FRAME_SALT2 + 4].copy_from_slice(&self.salt2.to_be_bytes());
        b[FRAME_CHECKSUM1..FRAME_CHECKSUM1 + 4].copy_from_slice(&self.checksum.0.to_be_bytes());
        b[FRAME_CHECKSUM2..FRAME_CHECKSUM2 + 4].copy_from_slice(&self.checksum.1.to_be_bytes());
        b
    }
}

/// SQLite's WAL checksum: for each 8-byte chunk, x0,x1 = two u32 in the given
/// byte order; s0 += x0 + s1; s1 += x1 + s0 (wrapping). `data.len()` must be a
/// multiple of 8 (a trailing partial chunk is ignored, with a debug assertion).
pub fn wal_checksum(big_endian: bool, seed: (u32, u32), data: &[u8]) -> (u32, u32) {
    debug_assert!(
        data.len() % 8 == 0,
        "wal checksum over {} bytes",
        data.len()
    );
    let (mut s0, mut s1) = seed;
    let chunks = data.chunks_exact(8);
    if big_endian {
        for c in chunks {
            let x0 = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
            let x1 = u32::from_be_bytes([c[4], c[5], c[6], c[7]]);
            s0 = s0.wrapping_add(x0).wrapping_add(s1);
            s1 = s1.wrapping_add(x1).wrapping_add(s0);
        }
    } else {
        for c in chunks {
            let x0 = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            let x1 = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
            s0 = s0.wrapping_add(x0).wrapping_add(s1);
            s1 = s1.wrapping_add(x1).wrapping_add(s0);
        }
    }
    (s0, s1)
}

/// The checksum of a frame: [`wal_checksum`] over its header's bytes 0..8,
/// then over its page, seeded with `prev`.
pub fn frame_checksum(big_endian: bool, prev: (u32, u32), frame: &[u8]) -> (u32, u32) {
    let s = wal_checksum(big_endian, prev, &frame[..FRAME_CHECKSUMMED_LEN]);
    wal_checksum(big_endian, s, &frame[FRAME_HEADER_LEN..])
}

/// Builds one frame (24-byte header + page) continuing the cumulative checksum
/// `prev`, appends it to `out` and returns the frame's checksum. The salts are
/// the header's. For tests, fuzzers and benchmarks. Panics when `page.len()`
/// is not the header's page size.
pub fn encode_frame(
    header: &WalHeader,
    prev: (u32, u32),
    pgno: u32,
    commit_db_size: u32,
    page: &[u8],
    out: &mut Vec<u8>,
) -> (u32, u32) {
    assert_eq!(page.len(), header.page_size as usize, "page length");
    let mut head = FrameHeader {
        pgno,
        commit_db_size,
        salt1: header.salt1,
        salt2: header.salt2,
        checksum: (0, 0),
    }
    .encode();
    let s = wal_checksum(
        header.big_endian_checksum,
        prev,
        &head[..FRAME_CHECKSUMMED_LEN],
    );
    let s = wal_checksum(header.big_endian_checksum, s, page);
    head[FRAME_CHECKSUM1..FRAME_CHECKSUM1 + 4].copy_from_slice(&s.0.to_be_bytes());
    head[FRAME_CHECKSUM2..FRAME_CHECKSUM2 + 4].copy_from_slice(&s.1.to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(page);
    s
}

/// An invalid WAL header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WalError {
    /// Fewer than 32 bytes.
    Truncated {
        /// The number of bytes given.
        len: usize,
    },
    /// The magic is neither 0x377f0682 nor 0x377f0683.
    BadMagic(u32),
    /// The format version is not 3007000.
    BadVersion(u32),
    /// The page size is not a power of two in 512..=65536.
    BadPageSize(u32),
    /// The header checksum does not match bytes 0..24.
    HeaderChecksum {
        /// The checksum stored in the header.
        stored: (u32, u32),
        /// The checksum computed over bytes 0..24.
        computed: (u32, u32),
    },
}

impl fmt::Display for WalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalError::Truncated { len } => {
                write!(f, "truncated wal header: {len} bytes, need 32")
            }
            WalError::BadMagic(m) => write!(f, "bad wal magic 0x{m:08x}"),
            WalError::BadVersion(v) => write!(f, "unsupported wal version {v}"),
            WalError::BadPageSize(p) => write!(f, "bad wal page size {p}"),
            WalError::HeaderChecksum { stored, computed } => write!(
                f,
                "wal header checksum mismatch: stored 0x{:08x}{:08x}, computed 0x{:08x}{:08x}",
                stored.0, stored.1, computed.0, computed.1
            ),
        }
    }
}

impl core::error::Error for WalError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(be: bool, page_size: u32) -> WalHeader {
        WalHeader {
            big_endian_checksum: be,
            page_size,
            checkpoint_seq: 7,
            salt1: 0x1234_5678,
            salt2: 0x9abc_def0,
            checksum: (0, 0),
        }
        .with_computed_checksum()
    }

    #[test]
    fn header_round_trip() {
        for be in [false, true] {
            for ps in [512, 1024, 4096, 32768, 65536] {
                let h = header(be, ps);
                let b = h.encode();
                assert_eq!(WalHeader::decode(&b).unwrap(), h);
                assert_eq!(h.frame_len(), 24 + ps as usize);
            }
        }
    }

    #[test]
    fn header_errors() {
        let b = header(false, 4096).encode();
        assert_eq!(
            WalHeader::decode(&b[..31]),
            Err(WalError::Truncated { len: 31 })
        );
        let mut x = b;
        x[3] = 0x84;
        assert_eq!(WalHeader::decode(&x), Err(WalError::BadMagic(0x377f0684)));
        let mut x = b;
        x[7] ^= 1;
        assert!(matches!(
            WalHeader::decode(&x),
            Err(WalError::BadVersion(_))
        ));
        for ps in [0u32, 256, 1000, 131072, 1] {
            let mut h = header(true, 4096);
            h.page_size = ps;
            assert_eq!(
                WalHeader::decode(&h.encode()),
                Err(WalError::BadPageSize(ps))
            );
        }
        for i in [12, 16, 20, 24, 31] {
            let mut x = b;
            x[i] ^= 0x10;
            assert!(matches!(
                WalHeader::decode(&x),
                Err(WalError::HeaderChecksum { .. })
            ));
        }
    }

    #[test]
    fn checksum_byte_order() {
        let data = [1u8, 0, 0, 0, 2, 0, 0, 0];
        assert_eq!(wal_checksum(false, (0, 0), &data), (1, 3));
        assert_eq!(
            wal_checksum(true, (0, 0), &data),
            (1 << 24, (2 << 24) + (1 << 24))
        );
        // Wrapping.
        let data = [0xff; 16];
        let _ = wal_checksum(false, (u32::MAX, u32::MAX), &data);
    }

    #[test]
    fn frame_encoding() {
        let h = header(false, 512);
        let mut out = Vec::new();
        let page = [7u8; 512];
        let c = encode_frame(&h, h.checksum, 3, 5, &page, &mut out);
        assert_eq!(out.len(), h.frame_len());
        let fh = FrameHeader::decode(&out);
        assert_eq!(fh.pgno, 3);
        assert_eq!(fh.commit_db_size, 5);
        assert_eq!((fh.salt1, fh.salt2), (h.salt1, h.salt2));
        assert_eq!(fh.checksum, c);
        assert_eq!(frame_checksum(false, h.checksum, &out), c);
        assert_eq!(FrameHeader::decode(&fh.encode()), fh);
    }

    #[test]
    fn display() {
        let e = WalError::HeaderChecksum {
            stored: (1, 2),
            computed: (3, 4),
        };
        assert_eq!(
            alloc::format!("{e}"),
            "wal header checksum mismatch: stored 0x0000000100000002, computed 0x0000000300000004"
        );
    }
}
