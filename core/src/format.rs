//! replited's one file format, for both snapshots and segments.
//!
//! ```text
//! All integers big-endian.
//!
//! File header (104 bytes):
//!  0   4  magic b"RPLT"
//!  4   2  version: 2 for an lz4 segment of more than one transaction (its
//!         page records may be deltas, below), else 1
//!  6   1  kind: 1 = snapshot, 2 = segment
//!  7   1  compression: 0 = none, 1 = lz4 (each page its own lz4 block)
//!  8   4  page size (power of two, 512..=65536)
//! 12   4  level (compaction level; 0 for segments written at sync time and
//!         for snapshots)
//! 16   8  generation (>= 1)
//! 24   8  first txid (>= 1)
//! 32   8  last txid (>= first; == first for a snapshot)
//! 40   8  first commit time (ms since the Unix epoch)
//! 48   8  last commit time (>= first; == first for a snapshot)
//! 56   4  WAL salt1 after the last transaction (0 when unknown)
//! 60   4  WAL salt2
//! 64   8  WAL offset just after the last transaction's commit frame
//!         (0 when unknown, and then bytes 56..80 are all zero;
//!         else 32 + k * (24 + page size))
//! 72   4  WAL checksum1 at that offset
//! 76   4  WAL checksum2
//! 80   8  whole-database checksum after the last transaction (equal to the
//!         last transaction header's)
//! 88   4  database size in pages after the last transaction (likewise)
//! 92   4  reserved, must be zero
//! 96   8  xxh3-64 of bytes 0..96
//!
//! Then one record per transaction, txid = first..=last, each exactly once,
//! in order:
//!  Transaction header (32 bytes):
//!   0  8  txid
//!   8  8  commit time (ms); non-decreasing, within [first time, last time]
//!  16  4  database size in pages after the commit (>= 1)
//!  20  4  number of page records that follow (n <= database size)
//!  24  8  whole-database checksum after the commit (DbHashes::checksum)
//!  n page records, page numbers strictly increasing, each <= the database
//!  size:
//!   0  4  page number (>= 1)
//!   4  4  stored length L: L == page size means raw bytes; 0 < L < page size
//!         means an lz4 block that decompresses to exactly page size (only in
//!         an lz4 file); L == 0x8000_0000 | D with D < page size means a delta
//!         of D bytes (only in a version 2 file); anything else is invalid
//!   8  L  data (D for a delta)
//!
//!  A delta is the page as its earlier version in this file with patches
//!  applied. The earlier version is the last record of the same page number,
//!  which must be in the window: the encoder and the decoder each keep the
//!  last record of the DELTA_WINDOW_BYTES / page size (at least 1) most
//!  recently recorded page numbers, recording every page record of every
//!  transaction but the file's last. Patches, in order, none overlapping:
//!   0  2  offset in the page
//!   2  2  length - 1
//!   4  n  the bytes at that offset
//!
//! Trailer (16 bytes):
//!  0  8  magic b"RPLTEND\0"
//!  8  8  xxh3-64 of every byte from offset 0 to the start of the trailer
//! ```
//!
//! A snapshot holds exactly one transaction whose n == database size with
//! pages 1..=n all present; its database checksum is verified against its
//! pages by both the encoder and the decoder. In an lz4 file a page that does
//! not shrink is stored raw (L == page size).
//!
//! Deltas make a segment of many transactions small and cheap: a page that
//! several transactions change (a table's last leaf, a counter) is stored
//! whole once and then as the bytes that changed.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::hash::page_hash;
use crate::scan::WalPos;
use crate::wal::{valid_page_size, FRAME_HEADER_LEN, WAL_HEADER_LEN};

/// Length of the file header.
pub const FILE_HEADER_LEN: usize = 104;
/// Length of a transaction header.
pub const TXN_HEADER_LEN: usize = 32;
/// Length of a page record's header (page number and stored length).
pub const PAGE_RECORD_HEADER_LEN: usize = 8;
/// Length of the trailer.
pub const TRAILER_LEN: usize = 16;

/// File magic.
pub const MAGIC: [u8; 4] = *b"RPLT";
/// Trailer magic.
pub const TRAILER_MAGIC: [u8; 8] = *b"RPLTEND\0";
/// The format version of a file that cannot hold delta records.
pub const VERSION: u16 = 1;
/// The format version of a file that may hold delta records (an lz4 segment of more than one
/// transaction).
pub const VERSION_DELTAS: u16 = 2;
/// Stored-length flag of a delta record.
pub const DELTA_FLAG: u32 = 0x8000_0000;
/// Bytes of earlier page versions delta records may refer to: the window holds the last record
/// of `DELTA_WINDOW_BYTES / page size` (at least 1) page numbers, the most recently recorded.
pub const DELTA_WINDOW_BYTES: usize = 1 << 20;
/// Length of a delta patch's header (offset, length - 1).
pub const PATCH_HEADER_LEN: usize = 4;
/// Equal bytes in a row that end a patch (fewer are carried inside it: a patch header costs 4).
const PATCH_GAP: usize = 8;

/// Offset of the magic in the file header.
pub const FH_MAGIC: usize = 0;
/// Offset of the version in the file header.
pub const FH_VERSION: usize = 4;
/// Offset of the kind in the file header.
pub const FH_KIND: usize = 6;
/// Offset of the compression in the file header.
pub const FH_COMPRESSION: usize = 7;
/// Offset of the page size in the file header.
pub const FH_PAGE_SIZE: usize = 8;
/// Offset of the level in the file header.
pub const FH_LEVEL: usize = 12;
/// Offset of the generation in the file header.
pub const FH_GENERATION: usize = 16;
/// Offset of the first txid in the file header.
pub const FH_FIRST_TXID: usize = 24;
/// Offset of the last txid in the file header.
pub const FH_LAST_TXID: usize = 32;
/// Offset of the first commit time in the file header.
pub const FH_FIRST_TIME: usize = 40;
/// Offset of the last commit time in the file header.
pub const FH_LAST_TIME: usize = 48;
/// Offset of the WAL salt1 in the file header.
pub const FH_WAL_SALT1: usize = 56;
/// Offset of the WAL salt2 in the file header.
pub const FH_WAL_SALT2: usize = 60;
/// Offset of the WAL offset in the file header.
pub const FH_WAL_OFFSET: usize = 64;
/// Offset of the WAL checksum1 in the file header.
pub const FH_WAL_CHECKSUM1: usize = 72;
/// Offset of the WAL checksum2 in the file header.
pub const FH_WAL_CHECKSUM2: usize = 76;
/// Offset of the whole-database checksum after the last transaction.
pub const FH_DB_CHECKSUM: usize = 80;
/// Offset of the database size after the last transaction.
pub const FH_DB_PAGES: usize = 88;
/// Offset of the reserved bytes in the file header.
pub const FH_RESERVED: usize = 92;
/// Offset of the header hash in the file header.
pub const FH_HASH: usize = 96;

/// Offset of the txid in a transaction header.
pub const TX_TXID: usize = 0;
/// Offset of the commit time in a transaction header.
pub const TX_TIME: usize = 8;
/// Offset of the database size in a transaction header.
pub const TX_DB_PAGES: usize = 16;
/// Offset of the page record count in a transaction header.
pub const TX_PAGE_COUNT: usize = 20;
/// Offset of the whole-database checksum in a transaction header.
pub const TX_DB_CHECKSUM: usize = 24;

/// Offset of the page number in a page record.
pub const PR_PGNO: usize = 0;
/// Offset of the stored length in a page record.
pub const PR_LEN: usize = 4;

/// Offset of the magic in the trailer.
pub const TR_MAGIC: usize = 0;
/// Offset of the file hash in the trailer.
pub const TR_HASH: usize = 8;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    crate::wal::be32(b, at)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// The payload length a page record's stored-length field gives (a delta's without its flag).
fn stored_len(field: u32) -> u32 {
    field & !DELTA_FLAG
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// What a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The whole database at one transaction.
    Snapshot,
    /// The pages changed by a run of consecutive transactions.
    Segment,
}

impl Kind {
    /// The byte stored in the header.
    pub fn to_byte(self) -> u8 {
        match self {
            Kind::Snapshot => 1,
            Kind::Segment => 2,
        }
    }

    /// The kind for a header byte.
    pub fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Snapshot),
            2 => Some(Kind::Segment),
            _ => None,
        }
    }
}

/// How page data is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Every page raw.
    None,
    /// Every page its own lz4 block, or raw when it does not shrink.
    Lz4,
}

impl Compression {
    /// The byte stored in the header.
    pub fn to_byte(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
        }
    }

    /// The compression for a header byte.
    pub fn from_byte(b: u8) -> Option<Compression> {
        match b {
            0 => Some(Compression::None),
            1 => Some(Compression::Lz4),
            _ => None,
        }
    }
}

/// The 104-byte file header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHeader {
    /// Snapshot or segment.
    pub kind: Kind,
    /// How pages are stored.
    pub compression: Compression,
    /// The database page size.
    pub page_size: u32,
    /// Compaction level: 0 for segments written at sync time and snapshots.
    pub level: u32,
    /// Generation (>= 1).
    pub generation: u64,
    /// First transaction id (>= 1).
    pub first_txid: u64,
    /// Last transaction id (>= first; == first for a snapshot).
    pub last_txid: u64,
    /// First commit time, ms since the Unix epoch.
    pub first_time_ms: u64,
    /// Last commit time (>= first; == first for a snapshot).
    pub last_time_ms: u64,
    /// WAL position after the last transaction, if known.
    pub wal: Option<WalPos>,
    /// Whole-database checksum after the last transaction (so the state a file ends at is
    /// known from its header alone).
    pub db_checksum: u64,
    /// Database size in pages after the last transaction.
    pub db_pages: u32,
}

impl FileHeader {
    /// Checks every rule of the header fields.
    pub fn validate(&self) -> Result<(), FormatError> {
        if !valid_page_size(self.page_size) {
            return Err(FormatError::BadPageSize(self.page_size));
        }
        if self.generation == 0 {
            return Err(FormatError::ZeroGeneration);
        }
        if self.first_txid == 0 {
            return Err(FormatError::ZeroTxid);
        }
        if self.db_pages == 0 {
            return Err(FormatError::ZeroDbSize {
                txid: self.last_txid,
            });
        }
        if self.last_txid < self.first_txid {
            return Err(FormatError::TxidRange {
                first: self.first_txid,
                last: self.last_txid,
            });
        }
        if self.last_time_ms < self.first_time_ms {
            return Err(FormatError::TimeRange {
                first: self.first_time_ms,
                last: self.last_time_ms,
            });
        }
        if self.kind == Kind::Snapshot {
            if self.last_txid != self.first_txid {
                return Err(FormatError::SnapshotTxidRange {
                    first: self.first_txid,
                    last: self.last_txid,
                });
            }
            if self.last_time_ms != self.first_time_ms {
                return Err(FormatError::SnapshotTimeRange {
                    first: self.first_time_ms,
                    last: self.last_time_ms,
                });
            }
            if self.level != 0 {
                return Err(FormatError::SnapshotLevel(self.level));
            }
        }
        if let Some(w) = self.wal {
            let frame_len = (FRAME_HEADER_LEN + self.page_size as usize) as u64;
            let base = WAL_HEADER_LEN as u64;
            if w.offset < base || (w.offset - base) % frame_len != 0 {
                return Err(FormatError::BadWalOffset {
                    offset: w.offset,
                    frame_len,
                });
            }
        }
        Ok(())
    }

    /// Whether the file's page records may be deltas: an lz4 segment of more than one
    /// transaction (written as version 2, which older readers refuse).
    pub fn has_deltas(&self) -> bool {
        self.kind == Kind::Segment
            && self.compression == Compression::Lz4
            && self.last_txid > self.first_txid
    }

    /// The format version such a file is written with: [`VERSION_DELTAS`] when its records
    /// may be deltas, else [`VERSION`].
    pub fn version(&self) -> u16 {
        if self.has_deltas() {
            VERSION_DELTAS
        } else {
            VERSION
        }
    }

    /// Encodes the header, computing its hash. Does not validate.
    pub fn encode(&self) -> [u8; FILE_HEADER_LEN] {
        let mut b = [0u8; FILE_HEADER_LEN];
        b[FH_MAGIC..FH_MAGIC + 4].copy_from_slice(&MAGIC);
        b[FH_VERSION..FH_VERSION + 2].copy_from_slice(&self.version().to_be_bytes());
        b[FH_KIND] = self.kind.to_byte();
        b[FH_COMPRESSION] = self.compression.to_byte();
        put32(&mut b, FH_PAGE_SIZE, self.page_size);
        put32(&mut b, FH_LEVEL, self.level);
        put64(&mut b, FH_GENERATION, self.generation);
        put64(&mut b, FH_FIRST_TXID, self.first_txid);
        put64(&mut b, FH_LAST_TXID, self.last_txid);
        put64(&mut b, FH_FIRST_TIME, self.first_time_ms);
        put64(&mut b, FH_LAST_TIME, self.last_time_ms);
        if let Some(w) = self.wal {
            put32(&mut b, FH_WAL_SALT1, w.salt1);
            put32(&mut b, FH_WAL_SALT2, w.salt2);
            put64(&mut b, FH_WAL_OFFSET, w.offset);
            put32(&mut b, FH_WAL_CHECKSUM1, w.checksum.0);
            put32(&mut b, FH_WAL_CHECKSUM2, w.checksum.1);
        }
        put64(&mut b, FH_DB_CHECKSUM, self.db_checksum);
        put32(&mut b, FH_DB_PAGES, self.db_pages);
        let h = xxh3_64(&b[..FH_HASH]);
        put64(&mut b, FH_HASH, h);
        b
    }

    /// Decodes and validates a header from the first 104 bytes of `b`.
    pub fn decode(b: &[u8]) -> Result<FileHeader, FormatError> {
        if b.len() >= 4 && b[..4] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        if b.len() < FILE_HEADER_LEN {
            return Err(FormatError::Truncated);
        }
        let version = be16(b, FH_VERSION);
        if version != VERSION && version != VERSION_DELTAS {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let stored = be64(b, FH_HASH);
        let computed = xxh3_64(&b[..FH_HASH]);
        if stored != computed {
            return Err(FormatError::HeaderChecksum { stored, computed });
        }
        let kind = Kind::from_byte(b[FH_KIND]).ok_or(FormatError::BadKind(b[FH_KIND]))?;
        let compression = Compression::from_byte(b[FH_COMPRESSION])
            .ok_or(FormatError::BadCompression(b[FH_COMPRESSION]))?;
        if be32(b, FH_RESERVED) != 0 {
            return Err(FormatError::ReservedNotZero);
        }
        let wal = WalPos {
            salt1: be32(b, FH_WAL_SALT1),
            salt2: be32(b, FH_WAL_SALT2),
            offset: be64(b, FH_WAL_OFFSET),
            checksum: (be32(b, FH_WAL_CHECKSUM1), be32(b, FH_WAL_CHECKSUM2)),
        };
        let wal = if wal.offset == 0 {
            if b[FH_WAL_SALT1..FH_DB_CHECKSUM].iter().any(|&x| x != 0) {
                return Err(FormatError::UnknownWalPosNotZero);
            }
            None
        } else {
            Some(wal)
        };
        let h = FileHeader {
            kind,
            compression,
            page_size: be32(b, FH_PAGE_SIZE),
            level: be32(b, FH_LEVEL),
            generation: be64(b, FH_GENERATION),
            first_txid: be64(b, FH_FIRST_TXID),
            last_txid: be64(b, FH_LAST_TXID),
            first_time_ms: be64(b, FH_FIRST_TIME),
            last_time_ms: be64(b, FH_LAST_TIME),
            wal,
            db_checksum: be64(b, FH_DB_CHECKSUM),
            db_pages: be32(b, FH_DB_PAGES),
        };
        h.validate()?;
        if version != h.version() {
            return Err(FormatError::WrongVersion {
                version,
                expected: h.version(),
            });
        }
        Ok(h)
    }

    /// The largest number of bytes one item of such a file can take: a page
    /// record with a raw page.
    pub fn max_item_len(&self) -> usize {
        PAGE_RECORD_HEADER_LEN + self.page_size as usize
    }
}

/// A transaction header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnHeader {
    /// Transaction id.
    pub txid: u64,
    /// Commit time, ms since the Unix epoch.
    pub time_ms: u64,
    /// Database size in pages after the commit (>= 1).
    pub db_pages: u32,
    /// Number of page records that follow.
    pub page_count: u32,
    /// Whole-database checksum after the commit ([`crate::DbHashes::checksum`]).
    pub db_checksum: u64,
}

impl TxnHeader {
    /// Encodes the transaction header.
    pub fn encode(&self) -> [u8; TXN_HEADER_LEN] {
        let mut b = [0u8; TXN_HEADER_LEN];
        put64(&mut b, TX_TXID, self.txid);
        put64(&mut b, TX_TIME, self.time_ms);
        put32(&mut b, TX_DB_PAGES, self.db_pages);
        put32(&mut b, TX_PAGE_COUNT, self.page_count);
        put64(&mut b, TX_DB_CHECKSUM, self.db_checksum);
        b
    }

    /// Decodes a transaction header from the first 32 bytes of `b` (panics
    /// when shorter). Does not validate.
    pub fn decode(b: &[u8]) -> TxnHeader {
        TxnHeader {
            txid: be64(b, TX_TXID),
            time_ms: be64(b, TX_TIME),
            db_pages: be32(b, TX_DB_PAGES),
            page_count: be32(b, TX_PAGE_COUNT),
            db_checksum: be64(b, TX_DB_CHECKSUM),
        }
    }
}

/// Sequencing state shared by the encoder and the decoder.
#[derive(Clone, Debug)]
struct Seq {
    header: FileHeader,
    next_txid: u64,
    prev_time: u64,
    txn: TxnHeader,
    remaining: u32,
    last_pgno: u32,
    /// XOR of the page hashes of the current snapshot transaction.
    xor: u64,
}

impl Seq {
    fn new(header: FileHeader) -> Seq {
        Seq {
            header,
            next_txid: header.first_txid,
            prev_time: header.first_time_ms,
            txn: TxnHeader {
                txid: 0,
                time_ms: 0,
                db_pages: 0,
                page_count: 0,
                db_checksum: 0,
            },
            remaining: 0,
            last_pgno: 0,
            xor: 0,
        }
    }

    fn all_txns_done(&self) -> bool {
        self.remaining == 0 && self.next_txid > self.header.last_txid
    }

    /// Checks a transaction header against the sequence; does not change state.
    fn check_txn(&self, t: &TxnHeader) -> Result<(), FormatError> {
        let h = &self.header;
        if self.remaining != 0 {
            return Err(FormatError::TxnIncomplete {
                txid: self.txn.txid,
                missing: self.remaining,
            });
        }
        if self.next_txid > h.last_txid {
            return Err(FormatError::TooManyTxns {
                txid: t.txid,
                last: h.last_txid,
            });
        }
        if t.txid != self.next_txid {
            return Err(FormatError::TxidOutOfSequence {
                expected: self.next_txid,
                found: t.txid,
            });
        }
        if t.time_ms < h.first_time_ms || t.time_ms > h.last_time_ms {
            return Err(FormatError::TimeOutOfRange {
                txid: t.txid,
                time: t.time_ms,
                first: h.first_time_ms,
                last: h.last_time_ms,
            });
        }
        if t.time_ms < self.prev_time {
            return Err(FormatError::TimeDecreasing {
                txid: t.txid,
                time: t.time_ms,
                previous: self.prev_time,
            });
        }
        if t.db_pages == 0 {
            return Err(FormatError::ZeroDbSize { txid: t.txid });
        }
        if t.page_count > t.db_pages {
            return Err(FormatError::PageCountExceedsDbSize {
                txid: t.txid,
                page_count: t.page_count,
                db_pages: t.db_pages,
            });
        }
        if t.txid == h.last_txid && (t.db_checksum, t.db_pages) != (h.db_checksum, h.db_pages) {
            return Err(FormatError::LastTxnMismatch {
                txid: t.txid,
                checksum: t.db_checksum,
                db_pages: t.db_pages,
            });
        }
        if h.kind == Kind::Snapshot && t.page_count != t.db_pages {
            return Err(FormatError::SnapshotIncomplete {
                page_count: t.page_count,
                db_pages: t.db_pages,
            });
        }
        Ok(())
    }

    fn start_txn(&mut self, t: &TxnHeader) {
        self.txn = *t;
        self.next_txid += 1;
        self.prev_time = t.time_ms;
        self.remaining = t.page_count;
        self.last_pgno = 0;
        self.xor = 0;
    }

    /// Checks a page number against the current transaction.
    fn check_pgno(&self, pgno: u32) -> Result<(), FormatError> {
        if self.remaining == 0 {
            return Err(FormatError::NoPageExpected { pgno });
        }
        if pgno == 0 {
            return Err(FormatError::ZeroPageNumber {
                txid: self.txn.txid,
            });
        }
        if pgno <= self.last_pgno {
            return Err(FormatError::PageOutOfOrder {
                pgno,
                previous: self.last_pgno,
            });
        }
        if pgno > self.txn.db_pages {
            return Err(FormatError::PageBeyondDbSize {
                pgno,
                db_pages: self.txn.db_pages,
            });
        }
        Ok(())
    }

    /// For a snapshot, the running XOR including this page, checked against
    /// the stored database checksum when it is the last page.
    /// A snapshot's running database checksum with this page (`hash`, its page hash), checked
    /// against the transaction's at its last page.
    fn check_page_data(&self, hash: Option<u64>) -> Result<u64, FormatError> {
        let Some(hash) = hash else {
            return Ok(0);
        };
        let xor = self.xor ^ hash;
        if self.remaining == 1 && xor != self.txn.db_checksum {
            return Err(FormatError::DbChecksumMismatch {
                txid: self.txn.txid,
                stored: self.txn.db_checksum,
                computed: xor,
            });
        }
        Ok(xor)
    }

    fn accept_page(&mut self, pgno: u32, xor: u64) {
        self.last_pgno = pgno;
        self.remaining -= 1;
        self.xor = xor;
    }
}

/// The earlier page versions delta records of one file refer to (see the module's layout):
/// the last record of each of the most recently recorded page numbers, `cap` at most. The
/// encoder and the decoder keep the same one.
#[derive(Clone, Debug)]
struct Window {
    cap: usize,
    stamp: u64,
    /// Page number → (when last recorded, its data then).
    pages: BTreeMap<u32, (u64, Vec<u8>)>,
    /// When last recorded → page number.
    order: BTreeMap<u64, u32>,
}

impl Window {
    fn new(page_size: u32) -> Window {
        Window {
            cap: (DELTA_WINDOW_BYTES / page_size as usize).max(1),
            stamp: 0,
            pages: BTreeMap::new(),
            order: BTreeMap::new(),
        }
    }

    fn base(&self, pgno: u32) -> Option<&[u8]> {
        self.pages.get(&pgno).map(|(_, d)| d.as_slice())
    }

    fn record(&mut self, pgno: u32, data: &[u8]) {
        self.stamp += 1;
        let stamp = self.stamp;
        if let Some((at, d)) = self.pages.get_mut(&pgno) {
            self.order.remove(at);
            *at = stamp;
            d.copy_from_slice(data);
            self.order.insert(stamp, pgno);
            return;
        }
        let d = if self.pages.len() >= self.cap {
            // The least recently recorded page number leaves; its buffer is reused.
            let (_, old) = self.order.pop_first().expect("a full window is not empty");
            let (_, mut d) = self.pages.remove(&old).expect("the order names pages held");
            d.copy_from_slice(data);
            d
        } else {
            data.to_vec()
        };
        self.pages.insert(pgno, (stamp, d));
        self.order.insert(stamp, pgno);
    }
}

/// Index of the first byte from `i` on where `a` and `b` differ, or their length.
fn first_difference(a: &[u8], b: &[u8], mut i: usize) -> usize {
    let n = a.len();
    // Equal 64-byte blocks are skipped with a slice comparison (a vectorized memcmp), then the
    // first difference is found a word at a time.
    while i + 64 <= n && a[i..i + 64] == b[i..i + 64] {
        i += 64;
    }
    while i + 8 <= n {
        let x = u64::from_le_bytes(a[i..i + 8].try_into().expect("8 bytes"))
            ^ u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if x != 0 {
            return i + (x.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// Writes into `out` the patches that turn `base` into `data` (same length, at most 65536),
/// unless they take `limit` bytes or more: then false.
pub fn delta_into(base: &[u8], data: &[u8], out: &mut Vec<u8>, limit: usize) -> bool {
    debug_assert_eq!(base.len(), data.len());
    out.clear();
    let n = data.len();
    let mut i = first_difference(base, data, 0);
    while i < n {
        let start = i;
        // The patch ends before PATCH_GAP equal bytes in a row, or at the page's end.
        let mut end = i + 1;
        let mut j = end;
        while j < n && j - end < PATCH_GAP {
            if base[j] != data[j] {
                end = j + 1;
            }
            j += 1;
        }
        if out.len() + PATCH_HEADER_LEN + (end - start) >= limit {
            return false;
        }
        out.extend_from_slice(&(start as u16).to_be_bytes());
        out.extend_from_slice(&((end - start - 1) as u16).to_be_bytes());
        out.extend_from_slice(&data[start..end]);
        i = first_difference(base, data, end);
    }
    true
}

/// Writes into `page` its `base` with the `patches` applied; false when a patch runs outside the
/// page, overlaps the one before or is cut short.
pub fn apply_delta(base: &[u8], patches: &[u8], page: &mut [u8]) -> bool {
    if base.len() != page.len() {
        return false;
    }
    page.copy_from_slice(base);
    let mut p = 0;
    let mut min = 0;
    while p < patches.len() {
        if patches.len() - p < PATCH_HEADER_LEN {
            return false;
        }
        let off = be16(patches, p) as usize;
        let len = be16(patches, p + 2) as usize + 1;
        p += PATCH_HEADER_LEN;
        if off < min || off + len > page.len() || patches.len() - p < len {
            return false;
        }
        page[off..off + len].copy_from_slice(&patches[p..p + len]);
        p += len;
        min = off + len;
    }
    true
}

/// Streaming encoder: the caller owns the output buffer and may drain it to a
/// file between calls (memory stays bounded by one page). Every call checks
/// the layout's rules before writing anything, except that a snapshot's
/// database checksum is compared once its last page has been appended.
#[derive(Clone)]
pub struct Encoder {
    seq: Seq,
    hasher: Xxh3,
    scratch: Vec<u8>,
    /// Earlier versions of pages, in a file that may hold deltas.
    window: Option<Window>,
    /// The current transaction's pages go into the window (it is not the file's last).
    recording: bool,
    /// The last delta's patches.
    delta: Vec<u8>,
}

impl fmt::Debug for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoder").field("seq", &self.seq).finish()
    }
}

impl Encoder {
    /// Validates `header` and appends it to `out`.
    pub fn new(header: &FileHeader, out: &mut Vec<u8>) -> Result<Encoder, FormatError> {
        header.validate()?;
        let b = header.encode();
        let mut hasher = Xxh3::new();
        hasher.update(&b);
        out.extend_from_slice(&b);
        let scratch = match header.compression {
            Compression::None => Vec::new(),
            Compression::Lz4 => {
                vec![0u8; lz4_flex::block::get_maximum_output_size(header.page_size as usize)]
            }
        };
        Ok(Encoder {
            seq: Seq::new(*header),
            hasher,
            scratch,
            window: header.has_deltas().then(|| Window::new(header.page_size)),
            recording: false,
            delta: Vec::new(),
        })
    }

    /// The header the encoder was created with.
    pub fn header(&self) -> &FileHeader {
        &self.seq.header
    }

    /// Starts the next transaction: checks the previous one is complete, the
    /// txid is the expected one, the time rules and the page count.
    pub fn begin_txn(&mut self, txn: &TxnHeader, out: &mut Vec<u8>) -> Result<(), FormatError> {
        self.seq.check_txn(txn)?;
        self.seq.start_txn(txn);
        self.recording = self.window.is_some() && txn.txid < self.seq.header.last_txid;
        let b = txn.encode();
        self.hasher.update(&b);
        out.extend_from_slice(&b);
        Ok(())
    }

    /// Appends one page record: checks `data.len()` == page size, page order,
    /// the record count and the database size.
    pub fn page(&mut self, pgno: u32, data: &[u8], out: &mut Vec<u8>) -> Result<(), FormatError> {
        self.page_as_stored(pgno, data, None, out)
    }

    /// Like [`Encoder::page`], with `stored` the payload another file holds for exactly
    /// `data` ([`Decoder::stored`], which checked it decompresses to `data`): a compressed
    /// one is copied as it is instead of compressing `data` again (when this file is
    /// compressed too, and the page is not stored as a delta here).
    ///
    /// In a file that may hold deltas, a page whose earlier version is in the window is stored
    /// as a delta when its patches take less than a quarter of a page (about what lz4 leaves of
    /// a typical page).
    pub fn page_as_stored(
        &mut self,
        pgno: u32,
        data: &[u8],
        stored: Option<&[u8]>,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let page_size = self.seq.header.page_size;
        self.seq.check_pgno(pgno)?;
        if data.len() != page_size as usize {
            return Err(FormatError::PageDataLength {
                pgno,
                len: data.len(),
                page_size,
            });
        }
        let xor = self.seq.check_page_data(
            (self.seq.header.kind == Kind::Snapshot).then(|| page_hash(pgno, data)),
        );
        let delta = match self.window.as_ref().and_then(|w| w.base(pgno)) {
            Some(base) => delta_into(base, data, &mut self.delta, data.len() / 4),
            None => false,
        };
        let (stored, len): (&[u8], u32) = if delta {
            (&self.delta, DELTA_FLAG | self.delta.len() as u32)
        } else {
            let s = match (self.seq.header.compression, stored) {
                (Compression::None, _) => data,
                (Compression::Lz4, Some(s)) if !s.is_empty() && s.len() < data.len() => s,
                (Compression::Lz4, _) => {
                    match lz4_flex::block::compress_into(data, &mut self.scratch) {
                        Ok(n) if n > 0 && n < data.len() => &self.scratch[..n],
                        _ => data,
                    }
                }
            };
            (s, s.len() as u32)
        };
        let mut rec = [0u8; PAGE_RECORD_HEADER_LEN];
        put32(&mut rec, PR_PGNO, pgno);
        put32(&mut rec, PR_LEN, len);
        self.hasher.update(&rec);
        self.hasher.update(stored);
        out.extend_from_slice(&rec);
        out.extend_from_slice(stored);
        let xor = xor?;
        self.seq.accept_page(pgno, xor);
        if self.recording {
            if let Some(w) = self.window.as_mut() {
                w.record(pgno, data);
            }
        }
        Ok(())
    }

    /// Checks every transaction was written, appends the trailer and returns
    /// the file hash stored in it: xxh3-64 of every byte before the trailer
    /// (what a [`crate::FileHasher`] fed those bytes returns).
    pub fn finish(self, out: &mut Vec<u8>) -> Result<u64, FormatError> {
        if self.seq.remaining != 0 {
            return Err(FormatError::TxnIncomplete {
                txid: self.seq.txn.txid,
                missing: self.seq.remaining,
            });
        }
        if !self.seq.all_txns_done() {
            return Err(FormatError::MissingTxns {
                next: self.seq.next_txid,
                last: self.seq.header.last_txid,
            });
        }
        let hash = self.hasher.digest();
        let mut b = [0u8; TRAILER_LEN];
        b[TR_MAGIC..TR_MAGIC + 8].copy_from_slice(&TRAILER_MAGIC);
        put64(&mut b, TR_HASH, hash);
        out.extend_from_slice(&b);
        Ok(hash)
    }
}

/// One decoded item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The file header.
    Header(FileHeader),
    /// A transaction header; its page records follow.
    Txn(TxnHeader),
    /// A page record for this page number; the data is in
    /// [`Decoder::page`].
    Page(u32),
    /// The trailer, verified.
    End,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Header,
    Txn,
    Page,
    Done,
}

/// Streaming decoder, sans-I/O: the caller passes the unread bytes; each call
/// consumes at most one item. Every rule of the layout is checked as items are
/// decoded (for a snapshot, its database checksum against its pages); the
/// file hash is checked at the trailer.
#[derive(Clone)]
pub struct Decoder {
    state: State,
    seq: Option<Seq>,
    hasher: Xxh3,
    page: Vec<u8>,
    /// The last page record's lz4 payload when it was compressed, else empty (the payload is
    /// then `page` itself, not copied twice).
    stored: Vec<u8>,
    /// The last page's [`page_hash`], when the decoder computed it (in a snapshot).
    page_hash: Option<u64>,
    file_hash: Option<u64>,
    /// Earlier versions of pages, in a file that may hold deltas.
    window: Option<Window>,
    /// The current transaction's pages go into the window (it is not the file's last).
    recording: bool,
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder")
            .field("state", &self.state)
            .field("seq", &self.seq)
            .finish()
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    /// A decoder at the start of a file.
    pub fn new() -> Decoder {
        Decoder {
            state: State::Header,
            seq: None,
            hasher: Xxh3::new(),
            page: Vec::new(),
            stored: Vec::new(),
            page_hash: None,
            file_hash: None,
            window: None,
            recording: false,
        }
    }

    /// Returns (bytes consumed, Some(event)), or (0, None) when `input`
    /// doesn't hold a whole next item (the caller appends more bytes and calls
    /// again). Every invariant of the layout is checked as items are decoded;
    /// the trailer's hash is checked at End. After End, any further input is
    /// an error (TrailingBytes). After an error the decoder is unchanged:
    /// the caller should give up on the file.
    pub fn decode(&mut self, input: &[u8]) -> Result<(usize, Option<Event>), FormatError> {
        match self.state {
            State::Header => self.decode_header(input),
            State::Txn => self.decode_txn_or_trailer(input),
            State::Page => self.decode_page(input, None),
            State::Done => {
                if input.is_empty() {
                    Ok((0, None))
                } else {
                    Err(FormatError::TrailingBytes)
                }
            }
        }
    }

    fn decode_header(&mut self, input: &[u8]) -> Result<(usize, Option<Event>), FormatError> {
        if input.len() < FILE_HEADER_LEN {
            if input.len() >= 4 && input[..4] != MAGIC {
                return Err(FormatError::BadMagic);
            }
            return Ok((0, None));
        }
        let h = FileHeader::decode(&input[..FILE_HEADER_LEN])?;
        self.hasher.update(&input[..FILE_HEADER_LEN]);
        self.seq = Some(Seq::new(h));
        self.window = h.has_deltas().then(|| Window::new(h.page_size));
        self.page = vec![0u8; h.page_size as usize];
        self.state = State::Txn;
        Ok((FILE_HEADER_LEN, Some(Event::Header(h))))
    }

    fn decode_txn_or_trailer(
        &mut self,
        input: &[u8],
    ) -> Result<(usize, Option<Event>), FormatError> {
        let Some(seq) = self.seq.as_mut() else {
            return Err(FormatError::Truncated);
        };
        if seq.all_txns_done() {
            if input.len() < TRAILER_LEN {
                return Ok((0, None));
            }
            if input[TR_MAGIC..TR_MAGIC + 8] != TRAILER_MAGIC {
                return Err(FormatError::BadTrailerMagic);
            }
            let stored = be64(input, TR_HASH);
            let computed = self.hasher.digest();
            if stored != computed {
                return Err(FormatError::ChecksumMismatch { stored, computed });
            }
            self.file_hash = Some(computed);
            self.state = State::Done;
            return Ok((TRAILER_LEN, Some(Event::End)));
        }
        if input.len() < TXN_HEADER_LEN {
            return Ok((0, None));
        }
        let t = TxnHeader::decode(input);
        seq.check_txn(&t)?;
        seq.start_txn(&t);
        self.recording = self.window.is_some() && t.txid < seq.header.last_txid;
        self.hasher.update(&input[..TXN_HEADER_LEN]);
        self.state = if t.page_count > 0 {
            State::Page
        } else {
            State::Txn
        };
        Ok((TXN_HEADER_LEN, Some(Event::Txn(t))))
    }

    /// The page number of the next item when it is a page record held whole in `input` (with
    /// a length within the page size): the caller may then have its data decoded into a buffer
    /// of its own with [`Decoder::decode_page_into`]. None otherwise ([`Decoder::decode`]
    /// takes it from there, errors included).
    pub fn next_page(&self, input: &[u8]) -> Option<u32> {
        let seq = self.seq.as_ref()?;
        if self.state != State::Page || input.len() < PAGE_RECORD_HEADER_LEN {
            return None;
        }
        let len = stored_len(be32(input, PR_LEN));
        if len > seq.header.page_size || input.len() < PAGE_RECORD_HEADER_LEN + len as usize {
            return None;
        }
        Some(be32(input, PR_PGNO))
    }

    /// Decodes the page record [`Decoder::next_page`] announced, its data written into `dest`
    /// (page-size bytes) instead of the decoder's own buffer: one copy less for a caller that
    /// gathers pages (a restore's runs of pages to write). Checks everything
    /// [`Decoder::decode`] does; [`Decoder::page`] and [`Decoder::stored`] do not hold this
    /// page ([`Decoder::page_hash`] does, in a snapshot). On an error `dest` may be partly
    /// written and the decoder is unchanged.
    ///
    /// # Panics
    /// If `dest` is not one page long.
    pub fn decode_page_into(
        &mut self,
        input: &[u8],
        dest: &mut [u8],
    ) -> Result<(usize, Option<Event>), FormatError> {
        match self.state {
            State::Page => self.decode_page(input, Some(dest)),
            _ => self.decode(input),
        }
    }

    fn decode_page(
        &mut self,
        input: &[u8],
        dest: Option<&mut [u8]>,
    ) -> Result<(usize, Option<Event>), FormatError> {
        let Some(seq) = self.seq.as_mut() else {
            return Err(FormatError::Truncated);
        };
        if input.len() < PAGE_RECORD_HEADER_LEN {
            return Ok((0, None));
        }
        let pgno = be32(input, PR_PGNO);
        let field = be32(input, PR_LEN);
        seq.check_pgno(pgno)?;
        let page_size = seq.header.page_size;
        let delta = field & DELTA_FLAG != 0;
        let len = stored_len(field);
        if delta {
            if len >= page_size {
                return Err(FormatError::BadPageLength {
                    pgno,
                    len: field,
                    page_size,
                });
            }
        } else if len == 0 || len > page_size {
            return Err(FormatError::BadPageLength {
                pgno,
                len,
                page_size,
            });
        } else if len < page_size && seq.header.compression == Compression::None {
            return Err(FormatError::UnexpectedCompression { pgno, len });
        }
        let base = match (delta, self.window.as_ref()) {
            (false, _) => None,
            (true, Some(w)) => Some(w.base(pgno).ok_or(FormatError::DeltaWithoutBase { pgno })?),
            (true, None) => return Err(FormatError::UnexpectedDelta { pgno }),
        };
        let total = PAGE_RECORD_HEADER_LEN + len as usize;
        if input.len() < total {
            return Ok((0, None));
        }
        let data = &input[PAGE_RECORD_HEADER_LEN..total];
        let own = dest.is_none();
        let page: &mut [u8] = match dest {
            Some(d) => {
                assert_eq!(d.len(), page_size as usize, "a page-size buffer");
                d
            }
            None => &mut self.page,
        };
        if let Some(base) = base {
            if !apply_delta(base, data, page) {
                return Err(FormatError::BadDelta { pgno });
            }
        } else if len == page_size {
            page.copy_from_slice(data);
        } else {
            match lz4_flex::block::decompress_into(data, page) {
                Ok(n) if n == page_size as usize => {}
                _ => return Err(FormatError::Decompress { pgno }),
            }
        }
        let hash = (seq.header.kind == Kind::Snapshot).then(|| page_hash(pgno, page));
        let xor = seq.check_page_data(hash)?;
        seq.accept_page(pgno, xor);
        self.page_hash = hash;
        self.hasher.update(&input[..total]);
        self.stored.clear();
        if !delta && len < page_size && own {
            self.stored.extend_from_slice(data);
        }
        if self.recording {
            if let Some(w) = self.window.as_mut() {
                w.record(pgno, page);
            }
        }
        if seq.remaining == 0 {
            self.state = State::Txn;
        }
        Ok((total, Some(Event::Page(pgno))))
    }

    /// The data of the page of the last [`Event::Page`] (page size bytes).
    pub fn page(&self) -> &[u8] {
        &self.page
    }

    /// [`page_hash`] of the last [`Event::Page`]'s data when the decoder computed it to check a
    /// snapshot's database checksum (None in segments): a caller that needs it too need not
    /// hash the page again.
    pub fn page_hash(&self) -> Option<u64> {
        self.page_hash
    }

    /// The last [`Event::Page`]'s record payload as stored: lz4 of [`Decoder::page`] when
    /// shorter than a page, else the page itself (also for a delta: its patches are of no use
    /// without this file's earlier versions). [`Encoder::page_as_stored`] takes it to copy
    /// a page from one file to another without compressing it again.
    pub fn stored(&self) -> &[u8] {
        if self.stored.is_empty() {
            &self.page
        } else {
            &self.stored
        }
    }

    /// The file header, once decoded.
    pub fn header(&self) -> Option<&FileHeader> {
        self.seq.as_ref().map(|s| &s.header)
    }

    /// The verified file hash (xxh3-64 of every byte before the trailer), once
    /// End was reached.
    pub fn file_hash(&self) -> Option<u64> {
        self.file_hash
    }

    /// True once the trailer has been verified.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Call when the input is exhausted: Ok if End was reached,
    /// Err(Truncated) otherwise.
    pub fn finish(&self) -> Result<(), FormatError> {
        if self.state == State::Done {
            Ok(())
        } else {
            Err(FormatError::Truncated)
        }
    }

    /// The largest number of bytes one item can need (so callers size their
    /// read buffer), valid once the header is decoded (96 before).
    pub fn max_item_len(&self) -> usize {
        match &self.seq {
            Some(s) => s.header.max_item_len().max(FILE_HEADER_LEN),
            None => FILE_HEADER_LEN,
        }
    }
}

/// A violated rule of the file format, or a misuse of the encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// The input ends before the trailer.
    Truncated,
    /// The file does not start with "RPLT".
    BadMagic,
    /// A format version other than 1 and 2.
    UnsupportedVersion(u16),
    /// A kind byte other than 1 or 2.
    BadKind(u8),
    /// A compression byte other than 0 or 1.
    BadCompression(u8),
    /// A page size that is not a power of two in 512..=65536.
    BadPageSize(u32),
    /// Generation 0.
    ZeroGeneration,
    /// First txid 0.
    ZeroTxid,
    /// Last txid before first txid.
    TxidRange {
        /// First txid.
        first: u64,
        /// Last txid.
        last: u64,
    },
    /// Last time before first time.
    TimeRange {
        /// First time.
        first: u64,
        /// Last time.
        last: u64,
    },
    /// A snapshot whose first and last txids differ.
    SnapshotTxidRange {
        /// First txid.
        first: u64,
        /// Last txid.
        last: u64,
    },
    /// A snapshot whose first and last times differ.
    SnapshotTimeRange {
        /// First time.
        first: u64,
        /// Last time.
        last: u64,
    },
    /// A snapshot with a nonzero level.
    SnapshotLevel(u32),
    /// A known WAL offset that is not 32 + k * frame length.
    BadWalOffset {
        /// The offset.
        offset: u64,
        /// 24 + page size.
        frame_len: u64,
    },
    /// WAL offset 0 (unknown) but nonzero salts or checksum.
    UnknownWalPosNotZero,
    /// Reserved header bytes are not zero.
    ReservedNotZero,
    /// The header hash does not match bytes 0..88.
    HeaderChecksum {
        /// Stored hash.
        stored: u64,
        /// Computed hash.
        computed: u64,
    },
    /// A transaction id other than the next expected one.
    TxidOutOfSequence {
        /// The expected txid.
        expected: u64,
        /// The txid found.
        found: u64,
    },
    /// A transaction beyond the header's last txid (encoder).
    TooManyTxns {
        /// The txid given.
        txid: u64,
        /// The header's last txid.
        last: u64,
    },
    /// A commit time outside the header's [first time, last time].
    TimeOutOfRange {
        /// The transaction.
        txid: u64,
        /// Its commit time.
        time: u64,
        /// The header's first time.
        first: u64,
        /// The header's last time.
        last: u64,
    },
    /// The last transaction's database checksum or size differ from the header's.
    LastTxnMismatch {
        /// The transaction.
        txid: u64,
        /// Its database checksum.
        checksum: u64,
        /// Its database size.
        db_pages: u32,
    },
    /// A commit time before the previous transaction's.
    TimeDecreasing {
        /// The transaction.
        txid: u64,
        /// Its commit time.
        time: u64,
        /// The previous transaction's commit time.
        previous: u64,
    },
    /// A database size of 0 pages.
    ZeroDbSize {
        /// The transaction.
        txid: u64,
    },
    /// More page records than pages in the database.
    PageCountExceedsDbSize {
        /// The transaction.
        txid: u64,
        /// Its page record count.
        page_count: u32,
        /// Its database size.
        db_pages: u32,
    },
    /// A snapshot transaction that does not hold every page.
    SnapshotIncomplete {
        /// Page record count.
        page_count: u32,
        /// Database size.
        db_pages: u32,
    },
    /// A page record for page 0.
    ZeroPageNumber {
        /// The transaction.
        txid: u64,
    },
    /// A page number not greater than the previous one in its transaction.
    PageOutOfOrder {
        /// The page number.
        pgno: u32,
        /// The previous page number.
        previous: u32,
    },
    /// A page number beyond the transaction's database size.
    PageBeyondDbSize {
        /// The page number.
        pgno: u32,
        /// The database size.
        db_pages: u32,
    },
    /// A stored length of 0 or more than the page size.
    BadPageLength {
        /// The page number.
        pgno: u32,
        /// The stored length.
        len: u32,
        /// The page size.
        page_size: u32,
    },
    /// A compressed page (stored length < page size) in an uncompressed file.
    UnexpectedCompression {
        /// The page number.
        pgno: u32,
        /// The stored length.
        len: u32,
    },
    /// An lz4 block that does not decompress to exactly the page size.
    Decompress {
        /// The page number.
        pgno: u32,
    },
    /// A delta record in a file that cannot hold one (version 1, uncompressed, a snapshot, a
    /// single transaction).
    UnexpectedDelta {
        /// The page number.
        pgno: u32,
    },
    /// A delta record for a page with no earlier version in the window.
    DeltaWithoutBase {
        /// The page number.
        pgno: u32,
    },
    /// A delta whose patches run outside the page, overlap or are cut short.
    BadDelta {
        /// The page number.
        pgno: u32,
    },
    /// A file header whose version is not the one its fields call for (2 exactly for an lz4
    /// segment of more than one transaction).
    WrongVersion {
        /// The version stored.
        version: u16,
        /// The version the fields call for.
        expected: u16,
    },
    /// Page data given to the encoder is not page size bytes long.
    PageDataLength {
        /// The page number.
        pgno: u32,
        /// The data length.
        len: usize,
        /// The page size.
        page_size: u32,
    },
    /// A page record where none is expected (no transaction begun, or all its
    /// records written).
    NoPageExpected {
        /// The page number.
        pgno: u32,
    },
    /// A transaction whose page records are not all written.
    TxnIncomplete {
        /// The transaction.
        txid: u64,
        /// How many records are missing.
        missing: u32,
    },
    /// The encoder finished before every transaction was written.
    MissingTxns {
        /// The next txid expected.
        next: u64,
        /// The header's last txid.
        last: u64,
    },
    /// A snapshot's database checksum does not match its pages.
    DbChecksumMismatch {
        /// The transaction.
        txid: u64,
        /// Stored checksum.
        stored: u64,
        /// Checksum computed from the pages.
        computed: u64,
    },
    /// The trailer does not start with "RPLTEND\0".
    BadTrailerMagic,
    /// The trailer's file hash does not match the file.
    ChecksumMismatch {
        /// Stored hash.
        stored: u64,
        /// Computed hash.
        computed: u64,
    },
    /// Bytes after the trailer.
    TrailingBytes,
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use FormatError::*;
        match *self {
            Truncated => f.write_str("truncated: the file ends before its trailer"),
            BadMagic => f.write_str("bad magic"),
            UnsupportedVersion(v) => write!(f, "unsupported version {v}"),
            BadKind(k) => write!(f, "bad kind {k}"),
            BadCompression(c) => write!(f, "bad compression {c}"),
            BadPageSize(p) => write!(f, "bad page size {p}"),
            ZeroGeneration => f.write_str("generation 0: generations start at 1"),
            ZeroTxid => f.write_str("first txid 0: txids start at 1"),
            TxidRange { first, last } => {
                write!(f, "last txid {last} before first txid {first}")
            }
            TimeRange { first, last } => {
                write!(f, "last time {last} before first time {first}")
            }
            SnapshotTxidRange { first, last } => write!(
                f,
                "snapshot spans txids {first}..={last}: a snapshot holds one transaction"
            ),
            SnapshotTimeRange { first, last } => write!(
                f,
                "snapshot first time {first} != last time {last}: a snapshot holds one transaction"
            ),
            SnapshotLevel(l) => write!(f, "snapshot at level {l}: snapshots are level 0"),
            BadWalOffset { offset, frame_len } => write!(
                f,
                "bad wal offset {offset}: not 32 + a multiple of the frame length {frame_len}"
            ),
            UnknownWalPosNotZero => {
                f.write_str("wal offset 0 (unknown) with nonzero salts or checksum")
            }
            ReservedNotZero => f.write_str("reserved header bytes are not zero"),
            HeaderChecksum { stored, computed } => write!(
                f,
                "header checksum mismatch: stored 0x{stored:016x}, computed 0x{computed:016x}"
            ),
            TxidOutOfSequence { expected, found } => {
                write!(f, "txid {found} out of sequence: expected {expected}")
            }
            TooManyTxns { txid, last } => write!(f, "txid {txid} after the last txid {last}"),
            TimeOutOfRange {
                txid,
                time,
                first,
                last,
            } => write!(
                f,
                "txid {txid}: commit time {time} outside the file's [{first}, {last}]"
            ),
            LastTxnMismatch {
                txid,
                checksum,
                db_pages,
            } => write!(
                f,
                "txid {txid}: database checksum {checksum:#018x} / size {db_pages} differ from the file header's"
            ),
            TimeDecreasing {
                txid,
                time,
                previous,
            } => write!(
                f,
                "txid {txid}: commit time {time} before the previous {previous}"
            ),
            ZeroDbSize { txid } => write!(f, "txid {txid}: database size 0"),
            PageCountExceedsDbSize {
                txid,
                page_count,
                db_pages,
            } => write!(
                f,
                "txid {txid}: {page_count} page records for a {db_pages}-page database"
            ),
            SnapshotIncomplete {
                page_count,
                db_pages,
            } => write!(
                f,
                "snapshot holds {page_count} pages of a {db_pages}-page database"
            ),
            ZeroPageNumber { txid } => write!(f, "txid {txid}: page number 0"),
            PageOutOfOrder { pgno, previous } => {
                write!(f, "page {pgno} out of order after page {previous}")
            }
            PageBeyondDbSize { pgno, db_pages } => {
                write!(f, "page {pgno} beyond the database size {db_pages}")
            }
            BadPageLength {
                pgno,
                len,
                page_size,
            } => write!(
                f,
                "page {pgno}: stored length {len} invalid for page size {page_size}"
            ),
            UnexpectedCompression { pgno, len } => write!(
                f,
                "page {pgno}: compressed (stored length {len}) in an uncompressed file"
            ),
            Decompress { pgno } => write!(
                f,
                "page {pgno}: lz4 block does not decompress to exactly the page size"
            ),
            UnexpectedDelta { pgno } => write!(
                f,
                "page {pgno}: a delta record in a file that cannot hold deltas"
            ),
            DeltaWithoutBase { pgno } => write!(
                f,
                "page {pgno}: a delta record with no earlier version of the page to apply it to"
            ),
            BadDelta { pgno } => write!(
                f,
                "page {pgno}: a delta record whose patches run outside the page or overlap"
            ),
            WrongVersion { version, expected } => write!(
                f,
                "version {version} in a header whose fields call for version {expected}"
            ),
            PageDataLength {
                pgno,
                len,
                page_size,
            } => write!(
                f,
                "page {pgno}: {len} bytes of data, page size {page_size}"
            ),
            NoPageExpected { pgno } => write!(
                f,
                "page {pgno}: no page record expected (transaction complete or not begun)"
            ),
            TxnIncomplete { txid, missing } => {
                write!(f, "txid {txid} incomplete: {missing} page records missing")
            }
            MissingTxns { next, last } => {
                write!(f, "file incomplete: txids {next}..={last} not written")
            }
            DbChecksumMismatch {
                txid,
                stored,
                computed,
            } => write!(
                f,
                "txid {txid}: database checksum mismatch: stored 0x{stored:016x}, computed 0x{computed:016x}"
            ),
            BadTrailerMagic => f.write_str("bad trailer magic"),
            ChecksumMismatch { stored, computed } => write!(
                f,
                "checksum mismatch: stored 0x{stored:016x}, computed 0x{computed:016x}"
            ),
            TrailingBytes => f.write_str("trailing bytes after the trailer"),
        }
    }
}

impl core::error::Error for FormatError {}
