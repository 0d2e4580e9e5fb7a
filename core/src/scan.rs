//! Groups WAL frames into whole committed transactions, sans-I/O.
//!
//! The caller reads the WAL header, builds a [`WalScanner`], then reads one
//! frame at a time at [`WalScanner::next_offset`] and feeds it to
//! [`WalScanner::handle_frame`]. The scanner validates salts and the cumulative
//! checksum exactly as SQLite does when it recovers a WAL, remembers where the
//! pages of the transaction in progress are (page data is not retained) and
//! returns a [`WalTxn`] at every commit frame.
//!
//! ```text
//! offset 0                32             32 + F          32 + 2F
//!        | WAL header (32) | frame 0 (F)  | frame 1 (F)  | ...
//! F = frame_len = 24 + page size; frame k starts at 32 + k * F and its page
//! data at 32 + k * F + 24.
//! ```

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;

use crate::hash::page_hash;
use crate::wal::{frame_checksum, FrameHeader, WalHeader, FRAME_HEADER_LEN, WAL_HEADER_LEN};

/// A committed position in a WAL: just after a commit frame (or at offset 32
/// in an empty WAL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalPos {
    /// The WAL header's salt-1.
    pub salt1: u32,
    /// The WAL header's salt-2.
    pub salt2: u32,
    /// File offset just after the commit frame (32 + k * frame_len).
    pub offset: u64,
    /// Cumulative checksum of the frame ending at `offset` (the header's
    /// checksum at offset 32).
    pub checksum: (u32, u32),
}

impl WalPos {
    /// The position at the start of the log described by `header`: offset 32,
    /// checksum = the header's.
    pub fn start(header: &WalHeader) -> WalPos {
        WalPos {
            salt1: header.salt1,
            salt2: header.salt2,
            offset: WAL_HEADER_LEN as u64,
            checksum: header.checksum,
        }
    }
}

/// Where a page of a transaction is in the WAL file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRef {
    /// Page number.
    pub pgno: u32,
    /// File offset of the page data (frame offset + 24).
    pub offset: u64,
    /// [`crate::hash::page_hash`]`(pgno, data)`.
    pub hash: u64,
}

/// One committed transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalTxn {
    /// One entry per page, the latest frame for a page wins, sorted by pgno.
    pub pages: Vec<PageRef>,
    /// Database size in pages after the commit (the commit frame's field).
    pub db_pages: u32,
    /// Position just after the commit frame.
    pub end: WalPos,
    /// Frames in the transaction, duplicates included.
    pub frames: u32,
}

/// Why the valid log ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndOfLog {
    /// The frame's salts differ from the header's (a frame left over from
    /// before the last WAL reset, or garbage).
    SaltMismatch,
    /// The frame's checksum does not continue the chain (a torn or stale
    /// frame), or the frame is otherwise one SQLite would reject (page
    /// number 0).
    ChecksumMismatch,
}

impl fmt::Display for EndOfLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndOfLog::SaltMismatch => f.write_str("salt mismatch"),
            EndOfLog::ChecksumMismatch => f.write_str("checksum mismatch"),
        }
    }
}

/// The result of feeding one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Valid, part of a transaction not yet committed.
    Pending,
    /// A valid commit frame: the transaction it completes.
    Commit(WalTxn),
    /// The valid log ends before this frame: pending frames are dropped and
    /// next_offset() is back at committed().offset.
    End(EndOfLog),
}

/// Groups WAL frames into committed transactions. See the module docs.
#[derive(Clone, Debug)]
pub struct WalScanner {
    header: WalHeader,
    committed: WalPos,
    next_offset: u64,
    running: (u32, u32),
    pending: BTreeMap<u32, (u64, u64)>,
    pending_frames: u32,
}

impl WalScanner {
    /// A scanner at offset 32, checksum seed = header.checksum.
    pub fn new(header: &WalHeader) -> WalScanner {
        let committed = WalPos::start(header);
        WalScanner {
            header: *header,
            committed,
            next_offset: committed.offset,
            running: committed.checksum,
            pending: BTreeMap::new(),
            pending_frames: 0,
        }
    }

    /// A scanner continuing from a committed position: `at`'s salts must equal
    /// the header's and `at.offset` must be 32 + k * frame_len.
    pub fn resume(header: &WalHeader, at: WalPos) -> Result<WalScanner, ScanError> {
        if (at.salt1, at.salt2) != (header.salt1, header.salt2) {
            return Err(ScanError::SaltMismatch {
                header: (header.salt1, header.salt2),
                pos: (at.salt1, at.salt2),
            });
        }
        let frame_len = header.frame_len() as u64;
        if at.offset < WAL_HEADER_LEN as u64 || (at.offset - WAL_HEADER_LEN as u64) % frame_len != 0
        {
            return Err(ScanError::BadOffset {
                offset: at.offset,
                frame_len,
            });
        }
        let mut s = WalScanner::new(header);
        s.committed = at;
        s.next_offset = at.offset;
        s.running = at.checksum;
        Ok(s)
    }

    /// The WAL header this scanner validates frames against.
    pub fn header(&self) -> &WalHeader {
        &self.header
    }

    /// The position just after the last commit frame seen (or where the
    /// scanner started).
    pub fn committed(&self) -> WalPos {
        self.committed
    }

    /// The file offset of the next frame to feed.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Length of one frame: 24 + page size.
    pub fn frame_len(&self) -> usize {
        self.header.frame_len()
    }

    /// Number of frames before the committed position:
    /// (committed().offset - 32) / frame_len.
    pub fn frames_committed(&self) -> u64 {
        (self.committed.offset - WAL_HEADER_LEN as u64) / self.frame_len() as u64
    }

    /// True when valid frames of an uncommitted transaction have been fed.
    pub fn has_pending(&self) -> bool {
        self.pending_frames > 0
    }

    fn end(&mut self, why: EndOfLog) -> Frame {
        self.pending.clear();
        self.pending_frames = 0;
        self.next_offset = self.committed.offset;
        self.running = self.committed.checksum;
        Frame::End(why)
    }

    /// Feeds the frame read at next_offset(); `frame.len()` must equal
    /// frame_len() (panics otherwise).
    pub fn handle_frame(&mut self, frame: &[u8]) -> Frame {
        assert_eq!(
            frame.len(),
            self.frame_len(),
            "handle_frame needs exactly one frame"
        );
        let fh = FrameHeader::decode(frame);
        if (fh.salt1, fh.salt2) != (self.header.salt1, self.header.salt2) {
            return self.end(EndOfLog::SaltMismatch);
        }
        let computed = frame_checksum(self.header.big_endian_checksum, self.running, frame);
        if computed != fh.checksum || fh.pgno == 0 {
            return self.end(EndOfLog::ChecksumMismatch);
        }
        let data = &frame[FRAME_HEADER_LEN..];
        let frame_offset = self.next_offset;
        self.pending.insert(
            fh.pgno,
            (
                frame_offset + FRAME_HEADER_LEN as u64,
                page_hash(fh.pgno, data),
            ),
        );
        self.pending_frames += 1;
        self.running = computed;
        self.next_offset = frame_offset + frame.len() as u64;
        if fh.commit_db_size == 0 {
            return Frame::Pending;
        }
        self.committed = WalPos {
            salt1: self.header.salt1,
            salt2: self.header.salt2,
            offset: self.next_offset,
            checksum: computed,
        };
        let pages = core::mem::take(&mut self.pending)
            .into_iter()
            .map(|(pgno, (offset, hash))| PageRef { pgno, offset, hash })
            .collect();
        let frames = core::mem::take(&mut self.pending_frames);
        Frame::Commit(WalTxn {
            pages,
            db_pages: fh.commit_db_size,
            end: self.committed,
            frames,
        })
    }
}

/// A position that cannot be resumed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScanError {
    /// The position's salts are not the header's: the WAL was reset since.
    SaltMismatch {
        /// The header's salts.
        header: (u32, u32),
        /// The position's salts.
        pos: (u32, u32),
    },
    /// The offset is not 32 + k * frame_len.
    BadOffset {
        /// The position's offset.
        offset: u64,
        /// The WAL's frame length.
        frame_len: u64,
    },
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanError::SaltMismatch { header, pos } => write!(
                f,
                "salt mismatch: wal header has 0x{:08x}/0x{:08x}, position has 0x{:08x}/0x{:08x}",
                header.0, header.1, pos.0, pos.1
            ),
            ScanError::BadOffset { offset, frame_len } => write!(
                f,
                "bad wal offset {offset}: not 32 + a multiple of the frame length {frame_len}"
            ),
        }
    }
}

impl core::error::Error for ScanError {}
