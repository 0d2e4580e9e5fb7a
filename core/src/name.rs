//! Storage object names.
//!
//! Each database's storage directory holds one subdirectory per generation;
//! names sort as text in txid order:
//!
//! ```text
//! segment:  {generation:016x}/{first:016x}-{last:016x}-{first_time:016x}-{last_time:016x}.l{level}.seg
//! snapshot: {generation:016x}/{txid:016x}-{time:016x}.snap
//!
//! hex: exactly 16 lowercase digits; level: decimal, no leading zero
//! (unless it is 0), fits a u32
//! ```
//!
//! The same rules as the file header apply: generation >= 1, first txid >= 1,
//! last >= first, last time >= first time. A name that breaks any of them is
//! not a replited file ([`FileMeta::parse_path`] returns None).

use alloc::format;
use alloc::string::String;

use crate::format::{FileHeader, Kind};

/// Length of a 64-bit value in hex in a name.
pub const HEX_LEN: usize = 16;
/// Suffix of snapshot names.
pub const SNAPSHOT_SUFFIX: &str = ".snap";
/// Suffix of segment names.
pub const SEGMENT_SUFFIX: &str = ".seg";

/// What a file's name says about it (everything [`crate::plan`] needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileMeta {
    /// Snapshot or segment.
    pub kind: Kind,
    /// Generation (>= 1).
    pub generation: u64,
    /// Compaction level (0 for snapshots).
    pub level: u32,
    /// First txid (the txid for a snapshot).
    pub first_txid: u64,
    /// Last txid (the txid for a snapshot).
    pub last_txid: u64,
    /// First commit time in ms (the time for a snapshot).
    pub first_time_ms: u64,
    /// Last commit time in ms (the time for a snapshot).
    pub last_time_ms: u64,
}

fn parse_hex(s: &str) -> Option<u64> {
    if s.len() != HEX_LEN || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

fn parse_level(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

impl FileMeta {
    /// The metadata of a file with this header.
    pub fn from_header(h: &FileHeader) -> FileMeta {
        FileMeta {
            kind: h.kind,
            generation: h.generation,
            level: h.level,
            first_txid: h.first_txid,
            last_txid: h.last_txid,
            first_time_ms: h.first_time_ms,
            last_time_ms: h.last_time_ms,
        }
    }

    /// The file's path relative to the database's storage directory.
    pub fn path(&self) -> String {
        match self.kind {
            Kind::Snapshot => format!(
                "{:016x}/{:016x}-{:016x}{}",
                self.generation, self.first_txid, self.first_time_ms, SNAPSHOT_SUFFIX
            ),
            Kind::Segment => format!(
                "{:016x}/{:016x}-{:016x}-{:016x}-{:016x}.l{}{}",
                self.generation,
                self.first_txid,
                self.last_txid,
                self.first_time_ms,
                self.last_time_ms,
                self.level,
                SEGMENT_SUFFIX
            ),
        }
    }

    /// The generation's directory name: `{generation:016x}`.
    pub fn generation_dir(generation: u64) -> String {
        format!("{generation:016x}")
    }

    /// The inverse of [`FileMeta::path`]; None for anything else (temporary
    /// files, other names, a name breaking the header's rules). Strict: exact
    /// hex widths, lowercase, `/` as the only separator.
    pub fn parse_path(path: &str) -> Option<FileMeta> {
        let (gen, name) = path.split_once('/')?;
        let generation = parse_hex(gen)?;
        let meta = if let Some(stem) = name.strip_suffix(SNAPSHOT_SUFFIX) {
            let (txid, time) = stem.split_once('-')?;
            let txid = parse_hex(txid)?;
            let time = parse_hex(time)?;
            FileMeta {
                kind: Kind::Snapshot,
                generation,
                level: 0,
                first_txid: txid,
                last_txid: txid,
                first_time_ms: time,
                last_time_ms: time,
            }
        } else if let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) {
            let (ranges, level) = stem.split_once(".l")?;
            let level = parse_level(level)?;
            let mut parts = ranges.split('-');
            let first_txid = parse_hex(parts.next()?)?;
            let last_txid = parse_hex(parts.next()?)?;
            let first_time_ms = parse_hex(parts.next()?)?;
            let last_time_ms = parse_hex(parts.next()?)?;
            if parts.next().is_some() {
                return None;
            }
            FileMeta {
                kind: Kind::Segment,
                generation,
                level,
                first_txid,
                last_txid,
                first_time_ms,
                last_time_ms,
            }
        } else {
            return None;
        };
        if meta.generation == 0
            || meta.first_txid == 0
            || meta.last_txid < meta.first_txid
            || meta.last_time_ms < meta.first_time_ms
        {
            return None;
        }
        Some(meta)
    }

    /// True when a header read from the file agrees with its name.
    pub fn matches(&self, h: &FileHeader) -> bool {
        *self == FileMeta::from_header(h)
    }

    /// For a snapshot, its txid (its first txid otherwise).
    pub fn txid(&self) -> u64 {
        self.first_txid
    }

    /// For a snapshot, its time (its first time otherwise).
    pub fn time_ms(&self) -> u64 {
        self.first_time_ms
    }

    /// True for a snapshot.
    pub fn is_snapshot(&self) -> bool {
        self.kind == Kind::Snapshot
    }

    /// True for a segment.
    pub fn is_segment(&self) -> bool {
        self.kind == Kind::Segment
    }
}
