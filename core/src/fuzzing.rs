//! Fuzzing harnesses, shared by the cargo-fuzz targets in `fuzz/` and by the
//! crate's own tests (the deterministic smoke test and the replay of saved
//! crashing inputs). Not part of the stable API.
//!
//! Every harness takes arbitrary bytes, must never panic except on a broken
//! property (each is checked with `assert!`), and returns nothing.
//!
//! ```text
//! wal_scan input:     [0] flags: bit 0 big-endian checksums, bits 1-2 page
//!                         size (512 << n), bit 3 raw mode (the rest is a WAL
//!                         file, scanned as is)
//!                     [1] frame count n (mod 64)
//!                     4 bytes per frame: pgno, commit, db size, fill
//!                     then 3-byte mutations: offset (u16), xor
//! segment_decode:     [0] bit 0: fix up the header hash and the trailer hash
//!                     [1] chunk size - 1 for the streaming pass
//!                     then the file
//! ```

use alloc::vec;
use alloc::vec::Vec;

use crate::format::{Decoder, Event, FormatError, FH_HASH, FILE_HEADER_LEN, TRAILER_LEN};
use crate::hash::page_hash;
use crate::name::FileMeta;
use crate::scan::{Frame, WalScanner, WalTxn};
use crate::wal::{encode_frame, WalHeader, WAL_HEADER_LEN};

/// `WalHeader::decode` on arbitrary bytes: a header that decodes re-encodes
/// to the same 32 bytes.
pub fn wal_header(data: &[u8]) {
    if let Ok(h) = WalHeader::decode(data) {
        assert_eq!(h.encode()[..], data[..WAL_HEADER_LEN]);
        assert_eq!(h.frame_len(), 24 + h.page_size as usize);
    }
}

/// Scans `wal` from its start to its end (or the end of the valid log),
/// checking the scanner's invariants; None when the header is invalid.
pub fn scan_wal(wal: &[u8]) -> Option<Vec<WalTxn>> {
    let h = WalHeader::decode(wal).ok()?;
    let mut s = WalScanner::new(&h);
    let mut commits: Vec<WalTxn> = Vec::new();
    let ps = h.page_size as usize;
    loop {
        let at = s.next_offset() as usize;
        let Some(frame) = wal.get(at..at + s.frame_len()) else {
            break;
        };
        match s.handle_frame(frame) {
            Frame::Pending => assert!(s.has_pending()),
            Frame::Commit(t) => {
                assert!(!s.has_pending());
                assert_eq!(s.committed(), t.end);
                assert_eq!(t.end.offset as usize, at + frame.len());
                assert!(t.db_pages > 0 && t.frames as usize >= t.pages.len());
                assert!(!t.pages.is_empty());
                assert!(t.pages.windows(2).all(|w| w[0].pgno < w[1].pgno));
                for p in &t.pages {
                    assert!(p.pgno > 0);
                    let o = p.offset as usize;
                    assert_eq!((o - WAL_HEADER_LEN - 24) % s.frame_len(), 0);
                    assert_eq!(p.hash, page_hash(p.pgno, &wal[o..o + ps]));
                }
                if let Some(prev) = commits.last() {
                    assert!(prev.end.offset < t.end.offset);
                }
                commits.push(t);
            }
            Frame::End(_) => {
                assert!(!s.has_pending());
                assert_eq!(s.next_offset(), s.committed().offset);
                break;
            }
        }
    }
    assert!(s.committed().offset as usize <= wal.len().max(WAL_HEADER_LEN));
    Some(commits)
}

/// Builds a WAL from a compact program (see the module docs) and returns it
/// with the number of transactions it commits.
pub fn build_wal(data: &[u8]) -> (Vec<u8>, usize, &[u8]) {
    let flags = data.first().copied().unwrap_or(0);
    let n = data.get(1).copied().unwrap_or(0) as usize % 64;
    let h = WalHeader {
        big_endian_checksum: flags & 1 != 0,
        page_size: 512 << ((flags >> 1) & 3),
        checkpoint_seq: 0,
        salt1: 0x5a17_0001,
        salt2: 0x5a17_0002,
        checksum: (0, 0),
    }
    .with_computed_checksum();
    let ops = data.get(2..).unwrap_or(&[]);
    let n = n.min(ops.len() / 4);
    let mut wal = h.encode().to_vec();
    let mut ck = h.checksum;
    let mut commits = 0;
    let mut page = vec![0u8; h.page_size as usize];
    for op in ops[..n * 4].chunks_exact(4) {
        let pgno = 1 + u32::from(op[0] % 16);
        let commit = if op[1] & 1 != 0 {
            commits += 1;
            1 + u32::from(op[2] % 32)
        } else {
            0
        };
        for (i, b) in page.iter_mut().enumerate() {
            *b = op[3] ^ (i as u8);
        }
        ck = encode_frame(&h, ck, pgno, commit, &page, &mut wal);
    }
    (wal, commits, &ops[n * 4..])
}

/// The `wal_scan` harness: a generated WAL scans to exactly its commits, and a
/// mutated one keeps every scanner invariant (raw mode: any bytes).
pub fn wal_scan(data: &[u8]) {
    let flags = data.first().copied().unwrap_or(0);
    if flags & 8 != 0 {
        scan_wal(&data[1..]);
        return;
    }
    let (mut wal, commits, mutations) = build_wal(data);
    let clean = scan_wal(&wal).expect("generated header");
    assert_eq!(clean.len(), commits);
    for m in mutations.chunks_exact(3) {
        let at = usize::from(u16::from_be_bytes([m[0], m[1]])) % wal.len();
        wal[at] ^= m[2];
    }
    let mutated = scan_wal(&wal);
    if mutations.len() >= 3 && mutations.len() < 6 && mutations[2] != 0 {
        // One single-byte change: SQLite's checksum always detects it (a
        // single changed 32-bit word changes the Fibonacci-weighted sums), so
        // the log ends at the changed frame or the header is rejected.
        let at = usize::from(u16::from_be_bytes([mutations[0], mutations[1]])) % wal.len();
        match mutated {
            None => assert!(at < WAL_HEADER_LEN),
            Some(m) => {
                assert!(at >= WAL_HEADER_LEN);
                assert_eq!(m[..], clean[..m.len()]);
                let before = clean
                    .iter()
                    .filter(|t| (t.end.offset as usize) <= at)
                    .count();
                assert_eq!(m.len(), before);
            }
        }
    }
}

/// The events of a decoding, page data included, or the error.
type Decoded = Result<Vec<(Event, Vec<u8>)>, FormatError>;

fn decode_in_chunks(file: &[u8], chunk: usize) -> Decoded {
    let mut d = Decoder::new();
    let mut evs = Vec::new();
    let mut pos = 0;
    let mut avail = chunk.min(file.len());
    loop {
        let (n, ev) = d.decode(&file[pos..avail])?;
        assert!(n <= avail - pos);
        pos += n;
        match ev {
            Some(e) => {
                assert!(n > 0);
                let page = match e {
                    Event::Page(_) => {
                        let h = d.header().expect("header before pages");
                        assert_eq!(d.page().len(), h.page_size as usize);
                        d.page().to_vec()
                    }
                    Event::Header(h) => {
                        assert_eq!(d.max_item_len(), 8 + h.page_size as usize);
                        Vec::new()
                    }
                    _ => Vec::new(),
                };
                assert!(n <= d.max_item_len());
                evs.push((e, page));
            }
            None => {
                assert_eq!(n, 0);
                if avail == file.len() {
                    break;
                }
                avail = (avail + chunk).min(file.len());
            }
        }
    }
    d.finish()?;
    assert!(d.is_done() && d.file_hash().is_some());
    assert_eq!(pos, file.len());
    Ok(evs)
}

/// Rewrites the header hash and the trailer hash of `file` so the decoder
/// gets past them to the structure.
pub fn fix_up_hashes(file: &mut [u8]) {
    if file.len() >= FILE_HEADER_LEN {
        let h = xxhash_rust::xxh3::xxh3_64(&file[..FH_HASH]);
        file[FH_HASH..FILE_HEADER_LEN].copy_from_slice(&h.to_be_bytes());
    }
    if file.len() >= FILE_HEADER_LEN + TRAILER_LEN {
        let n = file.len() - TRAILER_LEN;
        let h = xxhash_rust::xxh3::xxh3_64(&file[..n]);
        file[n + 8..].copy_from_slice(&h.to_be_bytes());
    }
}

/// The `segment_decode` harness: decoding all at once and in small chunks
/// gives the same events or the same error.
pub fn segment_decode(data: &[u8]) {
    let flags = data.first().copied().unwrap_or(0);
    let chunk = 1 + usize::from(data.get(1).copied().unwrap_or(0));
    let mut file = data.get(2..).unwrap_or(&[]).to_vec();
    if flags & 1 != 0 {
        fix_up_hashes(&mut file);
    }
    let whole = decode_in_chunks(&file, usize::MAX);
    let streamed = decode_in_chunks(&file, chunk);
    assert_eq!(whole, streamed);
}

/// The `file_name` harness: a name that parses is exactly the name its
/// metadata prints.
pub fn file_name(data: &[u8]) {
    if let Ok(s) = core::str::from_utf8(data) {
        if let Some(m) = FileMeta::parse_path(s) {
            assert_eq!(m.path(), s);
        }
    }
}
