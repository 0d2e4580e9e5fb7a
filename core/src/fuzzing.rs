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

// --- The replication protocol (docs/PROTOCOL.md) ---
//
// ```text
// proto_frame:    [0] chunk size - 1 for the streaming pass, then a byte
//                     stream of frames
// proto_primary / proto_replica: a program of operations, each one byte of
//                     kind and its arguments (see `Ops`); missing bytes read
//                     as 0
// ```

use alloc::string::String;

use crate::pos::Pos;
use crate::primary::{PrimaryConfig, PrimaryEvent, PrimarySession, PrimaryState};
use crate::proto::{
    decode_payload, encode_frame as encode_message, validate, validate_pages, ErrorCode,
    FrameDecoder, Message, ProtoError, Txn, TxnInfo, FRAME_HEADER_LEN, MAX_FRAME_LEN,
    MAX_REPLICA_FRAME_LEN,
};
use crate::replica::{Applied, Replica, ReplicaConfig, ReplicaEvent, ReplicaState, RestoreStep};

/// Messages decoded from a byte stream pushed in pieces of `chunk` bytes, the
/// error that ended it (sticky), and the bytes left buffered.
type Stream = (Vec<Message>, Option<ProtoError>, usize);

fn decode_stream(bytes: &[u8], chunk: usize) -> Stream {
    decode_stream_with(FrameDecoder::new(), MAX_FRAME_LEN, bytes, chunk)
}

fn decode_stream_with(mut d: FrameDecoder, limit: u32, bytes: &[u8], chunk: usize) -> Stream {
    let mut msgs = Vec::new();
    for piece in bytes.chunks(chunk) {
        d.push(piece);
        loop {
            match d.poll() {
                Ok(Some(m)) => msgs.push(m),
                Ok(None) => break,
                Err(e) => {
                    // Sticky, and nothing is kept.
                    assert_eq!(d.poll(), Err(e));
                    d.push(b"more");
                    assert_eq!(d.buffered(), 0);
                    return (msgs, Some(e), 0);
                }
            }
        }
        // A decoder never holds more than one frame in progress, within its limit.
        assert!(d.buffered() < FRAME_HEADER_LEN + limit as usize);
    }
    (msgs, None, d.buffered())
}

/// The `proto_frame` harness: a byte stream decodes to the same messages and
/// the same error whether it arrives at once or in small pieces (through a
/// decoder with the default limit or, when bit 7 of the first byte is set,
/// a decoder limited to a replica's frames, which refuses a longer frame
/// before any of it is buffered); every decoded message encodes and decodes
/// back to itself, and validating it never panics.
pub fn proto_frame(data: &[u8]) {
    let flags = data.first().copied().unwrap_or(0);
    let chunk = 1 + usize::from(flags & 0x7f);
    let limit = if flags & 0x80 != 0 {
        MAX_REPLICA_FRAME_LEN
    } else {
        MAX_FRAME_LEN
    };
    let stream = data.get(1..).unwrap_or(&[]);
    let decode = |chunk| decode_stream_with(FrameDecoder::with_limit(limit), limit, stream, chunk);
    let whole = decode(usize::MAX);
    let pieces = decode(chunk);
    assert_eq!(whole, pieces);
    if let Some(ProtoError::FrameAboveLimit { len, limit: l }) = whole.1 {
        assert!(len > l && l == limit);
    }
    for m in &whole.0 {
        let mut f = Vec::new();
        encode_message(m, &mut f).expect("a decoded message fits in a frame");
        let (again, err, left) = decode_stream(&f, usize::MAX);
        assert_eq!((err, left), (None, 0));
        assert_eq!(again.len(), 1);
        assert_eq!(&again[0], m);
        let _ = validate(m, None);
        let _ = validate(m, Some(512));
        let _ = m.name();
    }
}

/// A reader of fuzz bytes: past the end, every read is 0.
struct Ops<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Ops<'a> {
    fn new(data: &'a [u8]) -> Ops<'a> {
        Ops { data, at: 0 }
    }
    fn done(&self) -> bool {
        self.at >= self.data.len()
    }
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        // Mostly small values, sometimes wide ones.
        match self.u8() % 4 {
            0 => 0,
            1 | 2 => u64::from(self.u8()),
            _ => u64::from_be_bytes([
                self.u8(),
                self.u8(),
                self.u8(),
                self.u8(),
                self.u8(),
                self.u8(),
                self.u8(),
                self.u8(),
            ]),
        }
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.at.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.at += n;
        &self.data[start..end]
    }
}

/// A page of `size` bytes whose content derives from `seed`.
fn fuzz_page(size: u32, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Decodes every frame in `out`; each must be a whole, valid message.
fn sent_messages(out: &[u8], page_size: Option<u32>) -> Vec<Message> {
    let (msgs, err, left) = decode_stream(out, usize::MAX);
    assert_eq!((err, left), (None, 0), "a state machine sent a bad frame");
    for m in &msgs {
        validate(m, page_size).expect("a state machine sent an invalid message");
    }
    msgs
}

/// Page size of the primary harness's database.
const FUZZ_PAGE_SIZE: u32 = 512;
/// The flow-control window of the primary harness: small, so it matters.
const FUZZ_WINDOW: usize = 4096;

/// The `proto_primary` harness: a primary session fed a program of messages
/// from a replica (structured or raw postcard), commits, new generations and
/// clock ticks, its daemon answering every event as the real one does. It
/// must never panic, never send an invalid frame, send the transactions of
/// a conversation consecutively and in order, keep the flow-control window,
/// and send nothing once closed.
pub fn proto_primary(data: &[u8]) {
    let mut ops = Ops::new(data);
    let cfg = PrimaryConfig {
        max_in_flight_bytes: FUZZ_WINDOW,
        heartbeat_ms: 1_000,
        idle_timeout_ms: 10_000,
    };
    let mut now = 1_000u64;
    let mut s = PrimarySession::with_config("data.db", FUZZ_PAGE_SIZE, cfg, now);
    // The daemon's history: every committed transaction of the current
    // generation (txids from `first`).
    let mut generation = 1u64;
    let mut history: Vec<Txn> = Vec::new();
    let mut first = 1u64;
    let mut checksum = 7u64;
    s.set_position(generation, 1, checksum);
    first += 1;
    let mut last_txn_sent: Option<Pos> = None;
    let mut closed_drained = false;
    let mut steps = 0;
    while !ops.done() && steps < 256 {
        steps += 1;
        now += 1;
        match ops.u8() % 10 {
            0 => {
                let n = usize::from(ops.u8());
                if let Ok(m) = decode_payload(ops.bytes(n)) {
                    s.handle_message(now, m);
                }
            }
            1 => {
                let flags = ops.u8();
                let db = match flags % 4 {
                    0 | 1 => String::from("data.db"),
                    2 => String::from("../data.db"),
                    _ => String::from_utf8_lossy(ops.bytes(usize::from(flags >> 2))).into_owned(),
                };
                let version = if flags & 0x40 != 0 { ops.u16() } else { 1 };
                let pos = (flags & 0x80 != 0).then(|| Pos {
                    generation: if ops.u8() % 4 == 0 {
                        ops.u64()
                    } else {
                        generation
                    },
                    txid: ops.u64(),
                });
                let db_checksum = pos.and_then(|_| (ops.u8() % 2 == 0).then_some(checksum));
                s.handle_message(
                    now,
                    Message::Hello {
                        version,
                        db,
                        pos,
                        db_checksum,
                    },
                );
            }
            2 => {
                let g = if ops.u8() % 4 == 0 {
                    ops.u64()
                } else {
                    generation
                };
                let base = last_txn_sent.map_or(0, |p| p.txid);
                let txid = match ops.u8() % 3 {
                    0 => base,
                    1 => base.saturating_sub(u64::from(ops.u8())),
                    _ => ops.u64(),
                };
                s.handle_message(
                    now,
                    Message::Ack {
                        generation: g,
                        txid,
                        applied_at_ms: now,
                    },
                );
            }
            3 => {
                let m = match ops.u8() % 5 {
                    0 => Message::RestoreConfigRequest,
                    1 => Message::SnapshotRequest,
                    2 => Message::Heartbeat {
                        now_ms: now,
                        txid: ops.u64(),
                    },
                    3 => Message::Error {
                        code: ErrorCode::HistoryUnavailable,
                        message: String::new(),
                    },
                    _ => Message::Error {
                        code: ErrorCode::Internal,
                        message: String::from("x"),
                    },
                };
                s.handle_message(now, m);
            }
            4 => {
                now += u64::from(ops.u16());
                s.handle_timeout(now);
            }
            5 | 6 => {
                // A commit: 1..=3 pages, sometimes a big one beyond the window.
                let txid = first + history.len() as u64;
                let n = 1 + u32::from(ops.u8() % 12);
                let db_pages = n + u32::from(ops.u8() % 4);
                checksum = checksum.wrapping_mul(31).wrapping_add(txid);
                let t = Txn {
                    generation,
                    header: TxnInfo {
                        txid,
                        time_ms: now,
                        db_pages,
                        db_checksum: checksum,
                    },
                    pages: (1..=n)
                        .map(|p| (p, fuzz_page(FUZZ_PAGE_SIZE, txid ^ u64::from(p))))
                        .collect(),
                };
                history.push(t.clone());
                s.push_txn(t);
            }
            7 => {
                // A new generation (restarted capture).
                let txid = first + history.len() as u64;
                generation += 1;
                history.clear();
                first = txid + 1;
                checksum = checksum.wrapping_add(generation);
                s.set_position(generation, txid, checksum);
            }
            8 => {
                // The daemon lost its history (answers the next NeedTxns
                // with history_unavailable by dropping its memory).
                first += history.len() as u64;
                history.clear();
                s.history_unavailable();
            }
            _ => {
                let n = usize::from(ops.u8());
                let mut f = Vec::new();
                f.extend_from_slice(ops.bytes(n));
                // Raw frames through a decoder, as the transport does.
                let (msgs, _, _) = decode_stream(&f, usize::MAX);
                for m in msgs {
                    s.handle_message(now, m);
                }
            }
        }
        // The daemon answers what the session asks.
        while let Some(ev) = s.poll_event() {
            match ev {
                PrimaryEvent::NeedTxns { after } => {
                    let cur = first + history.len() as u64 - 1;
                    if after.generation == generation
                        && after.txid.saturating_add(1) >= first
                        && after.txid <= cur
                    {
                        let from = (after.txid + 1 - first) as usize;
                        for t in &history[from..] {
                            s.push_txn(t.clone());
                        }
                    } else {
                        s.history_unavailable();
                    }
                }
                PrimaryEvent::RestoreConfigRequested => {
                    if ops.u8() % 2 == 0 {
                        s.send_restore_config(Vec::from(&b"type = \"fs\"\n"[..]))
                            .expect("welcomed after a restore request");
                    } else {
                        stream_fuzz_snapshot(&mut s, generation, first + history.len() as u64 - 1);
                    }
                }
                PrimaryEvent::NeedSnapshot => {
                    stream_fuzz_snapshot(&mut s, generation, first + history.len() as u64 - 1)
                }
                // An acknowledgement is never beyond the primary's position.
                PrimaryEvent::Acked { txid, .. } => {
                    assert!(
                        txid < first + history.len() as u64,
                        "ack beyond the position"
                    );
                }
                PrimaryEvent::Error(_) => {}
            }
        }
        let mut out = Vec::new();
        let sent = s.poll_transmit(&mut out);
        assert_eq!(sent, !out.is_empty());
        if closed_drained {
            assert!(out.is_empty(), "a closed session sent more frames");
        }
        for m in sent_messages(&out, Some(FUZZ_PAGE_SIZE)) {
            match m {
                Message::Welcome { .. } => last_txn_sent = None,
                Message::Txn(t) => {
                    if let Some(p) = last_txn_sent {
                        if p.generation == t.generation {
                            assert_eq!(t.header.txid, p.txid + 1, "transactions out of order");
                        }
                    }
                    last_txn_sent = Some(t.pos());
                }
                Message::SnapshotBegin { .. } => last_txn_sent = None,
                _ => {}
            }
        }
        // The window: never more than one transaction beyond it.
        assert!(s.in_flight_bytes() <= FUZZ_WINDOW + 12 * FUZZ_PAGE_SIZE as usize + 64);
        if s.is_closed() {
            assert_eq!(s.state(), PrimaryState::Closed);
            closed_drained = true;
        }
    }
}

/// The daemon's side of a snapshot: a database of 1..=3 pages at `txid`.
fn stream_fuzz_snapshot(s: &mut PrimarySession, generation: u64, txid: u64) {
    let db_pages = 1 + (txid % 3) as u32;
    s.send_snapshot_begin(generation, txid, db_pages, 99)
        .expect("welcomed after a snapshot request");
    for p in 1..=db_pages {
        s.send_snapshot_pages(alloc::vec![(p, fuzz_page(FUZZ_PAGE_SIZE, u64::from(p)))])
            .expect("pages in order");
    }
    s.send_snapshot_end().expect("every page sent");
}

/// The `proto_replica` harness: a replica fed a program of messages from a
/// primary (structured or raw postcard), new connections, restores, local
/// writes and clock ticks, its daemon applying what it is told to (with the
/// right checksum or, when the program says so, a wrong one). It must never
/// panic, never send an invalid frame, hand out transactions to apply exactly
/// once and consecutively from the database's position, each well-formed,
/// and acknowledge only what was applied.
pub fn proto_replica(data: &[u8]) {
    let mut ops = Ops::new(data);
    let mut now = 1_000u64;
    let start = match ops.u8() % 3 {
        0 => None,
        _ => Some(Applied {
            pos: Pos {
                generation: 1,
                txid: 5,
            },
            db_checksum: 50,
        }),
    };
    let mut r = Replica::new(ReplicaConfig::new("data.db"), start, now);
    // What the daemon's database holds: the position the next Apply must
    // continue (None: no database to continue; only a restore or snapshot
    // makes one).
    let mut base: Option<Pos> = start.map(|a| a.pos);
    let mut confirmed: Option<Pos> = start.map(|a| a.pos);
    let mut wrong_checksums = false;
    let mut generation = 1u64;
    let mut next_txid = 6u64;
    let mut steps = 0;
    while !ops.done() && steps < 256 {
        steps += 1;
        now += 1;
        let page_size = r.page_size().unwrap_or(FUZZ_PAGE_SIZE);
        match ops.u8() % 12 {
            0 => {
                let n = usize::from(ops.u8());
                if let Ok(m) = decode_payload(ops.bytes(n)) {
                    r.handle_message(now, m);
                }
            }
            1 => {
                if ops.u8() % 4 == 0 {
                    generation = 1 + ops.u64() % 4;
                }
                let txid = match ops.u8() % 3 {
                    0 => next_txid.saturating_sub(1).max(1),
                    1 => next_txid + u64::from(ops.u8()),
                    _ => ops.u64(),
                };
                let page_size = if ops.u8() % 8 == 0 {
                    u32::from(ops.u16())
                } else {
                    FUZZ_PAGE_SIZE
                };
                r.handle_message(
                    now,
                    Message::Welcome {
                        version: if ops.u8() % 16 == 0 { 2 } else { 1 },
                        generation,
                        txid,
                        db_checksum: ops.u64(),
                        page_size,
                    },
                );
            }
            2 | 3 => {
                // A transaction: usually the next one.
                let txid = match ops.u8() % 4 {
                    0 => next_txid.saturating_sub(u64::from(ops.u8() % 3)),
                    1 => next_txid + u64::from(ops.u8() % 3),
                    _ => next_txid,
                };
                let n = u32::from(ops.u8() % 4);
                let db_pages = n.max(1) + u32::from(ops.u8() % 3);
                let len = if ops.u8() % 16 == 0 { 100 } else { page_size };
                let t = Txn {
                    generation,
                    header: TxnInfo {
                        txid,
                        time_ms: now,
                        db_pages,
                        db_checksum: txid * 3,
                    },
                    pages: (1..=n).map(|p| (p, fuzz_page(len, txid))).collect(),
                };
                next_txid = next_txid.max(txid + 1);
                r.handle_message(now, Message::Txn(t));
            }
            4 => {
                let txid = next_txid;
                let from = 1 + u32::from(ops.u8() % 4);
                let n = u32::from(ops.u8() % 3);
                r.handle_message(
                    now,
                    Message::TxnPart {
                        generation,
                        txid,
                        pages: (from..from + n)
                            .map(|p| (p, fuzz_page(page_size, txid)))
                            .collect(),
                    },
                );
            }
            5 => {
                let db_pages = 1 + u32::from(ops.u8() % 3);
                let txid = next_txid;
                next_txid += 1;
                r.handle_message(
                    now,
                    Message::SnapshotBegin {
                        generation,
                        txid,
                        page_size: FUZZ_PAGE_SIZE,
                        db_pages,
                        db_checksum: txid * 3,
                    },
                );
                let k = u32::from(ops.u8() % 4);
                for p in 1..=k {
                    r.handle_message(
                        now,
                        Message::SnapshotPages {
                            pages: alloc::vec![(p, fuzz_page(FUZZ_PAGE_SIZE, u64::from(p)))],
                        },
                    );
                }
                if ops.u8() % 4 != 0 {
                    r.handle_message(now, Message::SnapshotEnd);
                }
            }
            6 => {
                let m = match ops.u8() % 6 {
                    0 => Message::RestoreConfig {
                        storage: Vec::from(ops.bytes(8)),
                    },
                    1 => Message::Heartbeat {
                        now_ms: now,
                        txid: ops.u64(),
                    },
                    2 => Message::Error {
                        code: ErrorCode::HistoryUnavailable,
                        message: String::new(),
                    },
                    3 => Message::Error {
                        code: ErrorCode::Diverged,
                        message: String::new(),
                    },
                    4 => Message::Error {
                        code: ErrorCode::DatabaseNotFound,
                        message: String::from("Database not found: data.db"),
                    },
                    _ => Message::Ack {
                        generation,
                        txid: 1,
                        applied_at_ms: now,
                    },
                };
                r.handle_message(now, m);
            }
            7 => {
                now += u64::from(ops.u16());
                r.handle_timeout(now);
            }
            8 => r.reset(now),
            9 => r.local_write_detected(now),
            10 => {
                if r.state()
                    == (ReplicaState::Restoring {
                        step: RestoreStep::Storage,
                    })
                {
                    if ops.u8() % 3 == 0 {
                        r.restore_failed(now);
                    } else {
                        let pos = Pos {
                            generation,
                            txid: next_txid.saturating_sub(1).max(1),
                        };
                        r.handle_restored(now, pos, pos.txid * 3);
                        base = Some(pos);
                        confirmed = Some(pos);
                    }
                }
            }
            _ => wrong_checksums = ops.u8() % 4 == 0,
        }
        // The daemon does what it is told, in order.
        while let Some(ev) = r.poll_event() {
            match ev {
                ReplicaEvent::Apply { txn } => {
                    let b = base.expect("Apply without a database to apply it to");
                    assert_eq!(txn.generation, b.generation, "Apply of another generation");
                    assert_eq!(txn.header.txid, b.txid + 1, "Apply out of sequence");
                    validate_pages(&txn.pages, 0, Some(txn.header.db_pages), r.page_size())
                        .expect("a well-formed transaction");
                    base = Some(txn.pos());
                    let ck = if wrong_checksums {
                        !txn.header.db_checksum
                    } else {
                        txn.header.db_checksum
                    };
                    let before = r.applied();
                    r.handle_applied(now, txn.header.txid, ck);
                    if r.applied() != before {
                        confirmed = r.applied().map(|a| a.pos);
                    }
                }
                ReplicaEvent::StartSnapshot { .. } => base = None,
                ReplicaEvent::FinishSnapshot { pos, db_checksum } => {
                    base = Some(pos);
                    r.handle_applied(now, pos.txid, db_checksum);
                    confirmed = r.applied().map(|a| a.pos);
                }
                ReplicaEvent::Rebuild { .. } => {
                    base = None;
                    confirmed = None;
                }
                ReplicaEvent::Restore { .. } => base = None,
                _ => {}
            }
        }
        let mut out = Vec::new();
        let sent = r.poll_transmit(&mut out);
        assert_eq!(sent, !out.is_empty());
        for m in sent_messages(&out, None) {
            if let Message::Ack {
                generation, txid, ..
            } = m
            {
                let c = confirmed.expect("an ack without anything applied");
                assert_eq!(
                    (generation, txid),
                    (c.generation, c.txid),
                    "an ack for what is not applied"
                );
            }
        }
    }
}
