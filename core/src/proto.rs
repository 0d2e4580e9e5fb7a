//! The replication wire protocol: messages, framing and validation.
//!
//! ```text
//! frame = length L (4 bytes, big-endian, 1 ..= MAX_FRAME_LEN)
//!         L bytes: one postcard-encoded Message
//! ```
//!
//! One reliable, ordered byte stream carries one database. The replica speaks
//! first ([`Message::Hello`]); see `docs/PROTOCOL.md` for the handshakes and
//! [`crate::replica`] / [`crate::primary`] for the two state machines. Every
//! decoded message should go through [`validate`] before it is acted on (the
//! state machines do this themselves).

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

use crate::format::TxnHeader;
use crate::pos::Pos;
use crate::wal::valid_page_size;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The largest frame payload: 16 MiB + 64 KiB (room for a batch of pages of
/// the largest page size plus the message overhead).
pub const MAX_FRAME_LEN: u32 = 16 * 1024 * 1024 + 64 * 1024;
/// Length of the frame length prefix.
pub const FRAME_HEADER_LEN: usize = 4;
/// The longest database name, in bytes.
pub const MAX_DB_NAME_LEN: usize = 255;
/// The longest [`Message::Error`] message, in bytes.
pub const MAX_ERROR_MESSAGE_LEN: usize = 4096;
/// The largest frame payload a primary accepts from a replica: 64 KiB. A
/// replica's messages (Hello, Ack, Heartbeat, requests, an Error of at most
/// [`MAX_ERROR_MESSAGE_LEN`] bytes) are small; refusing anything longer as
/// soon as its length is in bounds what a peer can make a primary buffer and
/// decode ([`FrameDecoder::with_limit`]).
pub const MAX_REPLICA_FRAME_LEN: u32 = 64 * 1024;
/// Page data carried by one `Txn` or `TxnPart` message at most: a larger
/// transaction is sent as `TxnPart`s followed by its `Txn`.
pub const MAX_MESSAGE_DATA: usize = 8 * 1024 * 1024;

/// Why a peer refused or ended a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The primary does not replicate a database of that name; the session is
    /// closed.
    DatabaseNotFound,
    /// The peers speak different protocol versions; the session is closed.
    VersionMismatch,
    /// The primary no longer has the transactions after the replica's
    /// position; the replica must rebuild (the session stays open).
    HistoryUnavailable,
    /// The replica's position is not in the primary's history (its checksum
    /// differs, or it is ahead); the replica must rebuild (the session stays
    /// open).
    Diverged,
    /// The peer broke the protocol (an unexpected or invalid message); the
    /// session is closed.
    ProtocolViolation,
    /// Anything else on the sender's side; the session is closed.
    Internal,
}

impl ErrorCode {
    /// True when the sender closes the session after sending this code.
    pub fn is_fatal(self) -> bool {
        !matches!(self, ErrorCode::HistoryUnavailable | ErrorCode::Diverged)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorCode::DatabaseNotFound => "Database not found",
            ErrorCode::VersionMismatch => "Version mismatch",
            ErrorCode::HistoryUnavailable => "History unavailable",
            ErrorCode::Diverged => "Diverged",
            ErrorCode::ProtocolViolation => "Protocol violation",
            ErrorCode::Internal => "Internal error",
        })
    }
}

/// A transaction's header on the wire; mirrors [`TxnHeader`] without the page
/// count (the page list carries it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TxnInfo {
    /// Transaction id (>= 1).
    pub txid: u64,
    /// Commit time on the primary, ms since the Unix epoch.
    pub time_ms: u64,
    /// Database size in pages after the commit (>= 1).
    pub db_pages: u32,
    /// Whole-database checksum after the commit ([`crate::DbHashes::checksum`]).
    pub db_checksum: u64,
}

impl From<&TxnHeader> for TxnInfo {
    fn from(h: &TxnHeader) -> TxnInfo {
        TxnInfo {
            txid: h.txid,
            time_ms: h.time_ms,
            db_pages: h.db_pages,
            db_checksum: h.db_checksum,
        }
    }
}

/// One committed transaction: the pages it changed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Txn {
    /// The generation the transaction belongs to (>= 1).
    pub generation: u64,
    /// Header fields.
    pub header: TxnInfo,
    /// (page number, page data) with page numbers strictly increasing, each in
    /// 1..=db_pages, each data exactly one page long.
    #[serde(with = "page_list")]
    pub pages: Vec<(u32, Vec<u8>)>,
}

impl Txn {
    /// The transaction's position.
    pub fn pos(&self) -> Pos {
        Pos {
            generation: self.generation,
            txid: self.header.txid,
        }
    }

    /// The header in the file format's terms.
    pub fn file_header(&self) -> TxnHeader {
        TxnHeader {
            txid: self.header.txid,
            time_ms: self.header.time_ms,
            db_pages: self.header.db_pages,
            page_count: self.pages.len() as u32,
            db_checksum: self.header.db_checksum,
        }
    }

    /// One transaction with the effect of `batch` (consecutive transactions that
    /// each [`joins_batch`] the one before; at least one): the newest copy of
    /// every page they changed and the last one's header. None for an empty
    /// batch.
    pub fn merged(batch: Vec<Txn>) -> Option<Txn> {
        let mut it = batch.into_iter();
        let first = it.next()?;
        let mut rest = it.peekable();
        if rest.peek().is_none() {
            return Some(first);
        }
        let generation = first.generation;
        let mut header = first.header;
        let mut pages: BTreeMap<u32, Vec<u8>> = first.pages.into_iter().collect();
        for t in rest {
            header = t.header;
            pages.extend(t.pages);
        }
        Some(Txn {
            generation,
            header,
            pages: pages.into_iter().collect(),
        })
    }

    /// Page bytes carried (the unit of the primary's flow-control window).
    pub fn data_len(&self) -> usize {
        self.pages.iter().map(|(_, d)| d.len()).sum()
    }
}

/// Whether transaction `next` may be applied in one database transaction
/// with the transactions before it, the last of them `prev`, which carried
/// `bytes` of page data together: it follows `prev` directly in the same
/// generation, the database does not shrink (a shrink followed by growth would
/// leave pages the transactions never wrote), and the page data stays within
/// `limit`. Merging such a run (the newest copy of each page, the last
/// header) gives the state after `next`, which its checksum then verifies.
pub fn joins_batch(prev: &Txn, next: &Txn, bytes: usize, limit: usize) -> bool {
    next.generation == prev.generation
        && prev.header.txid.checked_add(1) == Some(next.header.txid)
        && next.header.db_pages >= prev.header.db_pages
        && bytes.saturating_add(next.data_len()) <= limit
}

/// Serde for `Option<Pos>` without deriving on [`Pos`].
mod opt_pos {
    use super::Pos;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(p: &Option<Pos>, s: S) -> Result<S::Ok, S::Error> {
        p.map(|p| (p.generation, p.txid)).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Pos>, D::Error> {
        let p: Option<(u64, u64)> = Deserialize::deserialize(d)?;
        Ok(p.map(|(generation, txid)| Pos { generation, txid }))
    }
}

/// Serde for a list of (page number, page bytes): each page as one byte string (postcard: its
/// length and the bytes), which is what a `Vec<u8>` is on the wire too, but read and written in
/// one copy rather than one call per byte.
mod page_list {
    use alloc::vec::Vec;
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(pages: &[(u32, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(pages.iter().map(|(n, d)| (n, Bytes::new(d))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u32, Vec<u8>)>, D::Error> {
        let v: Vec<(u32, ByteBuf)> = Deserialize::deserialize(d)?;
        Ok(v.into_iter().map(|(n, b)| (n, b.into_vec())).collect())
    }
}

/// A protocol message. New variants are only ever appended (postcard encodes
/// the variant index).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Message {
    /// Replica → primary, first message of every conversation (and again after
    /// a restore from storage, on the same stream).
    Hello {
        /// The replica's protocol version.
        version: u16,
        /// The database to replicate.
        db: String,
        /// The position the replica holds durably, None when it has nothing.
        #[serde(with = "opt_pos")]
        pos: Option<Pos>,
        /// The replica's whole-database checksum at `pos`.
        db_checksum: Option<u64>,
    },
    /// Primary → replica: the answer to Hello, the primary's current position.
    Welcome {
        /// The primary's protocol version.
        version: u16,
        /// Current generation.
        generation: u64,
        /// Last committed txid.
        txid: u64,
        /// Whole-database checksum at that txid.
        db_checksum: u64,
        /// The database's page size.
        page_size: u32,
    },
    /// Either way: a refusal or failure; see [`ErrorCode::is_fatal`].
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Human-readable detail (<= MAX_ERROR_MESSAGE_LEN bytes).
        message: String,
    },
    /// Replica → primary: "I have nothing usable, how do I restore?".
    RestoreConfigRequest,
    /// Primary → replica: restore from storage described by these opaque bytes
    /// (filled and read by the daemons), then say Hello again.
    RestoreConfig {
        /// The storage description.
        storage: Vec<u8>,
    },
    /// Replica → primary: stream me a snapshot (storage was not usable).
    SnapshotRequest,
    /// Primary → replica: a snapshot follows.
    SnapshotBegin {
        /// Generation of the snapshot.
        generation: u64,
        /// Txid the snapshot is at.
        txid: u64,
        /// Page size.
        page_size: u32,
        /// Database size in pages (>= 1).
        db_pages: u32,
        /// Whole-database checksum.
        db_checksum: u64,
    },
    /// Primary → replica: the next pages of the snapshot (page numbers strictly
    /// increasing across the whole snapshot, from 1 to db_pages, none missing).
    SnapshotPages {
        /// (page number, data).
        #[serde(with = "page_list")]
        pages: Vec<(u32, Vec<u8>)>,
    },
    /// Primary → replica: the snapshot is complete; transactions after it follow.
    SnapshotEnd,
    /// Primary → replica: one committed transaction.
    Txn(Txn),
    /// Replica → primary: everything up to txid is applied durably.
    Ack {
        /// Generation of the acknowledged transaction.
        generation: u64,
        /// Last applied txid.
        txid: u64,
        /// When it was applied (replica clock, ms since the Unix epoch).
        applied_at_ms: u64,
    },
    /// Either way, when idle: liveness and the sender's txid (primary: last
    /// committed; replica: last applied).
    Heartbeat {
        /// Sender's clock.
        now_ms: u64,
        /// Sender's txid.
        txid: u64,
    },
    /// Primary → replica: the first pages of a transaction too large for one
    /// message; more `TxnPart`s and then the transaction's `Txn` (with its
    /// header and the last pages) follow. Page numbers keep increasing across
    /// the parts and the `Txn`.
    TxnPart {
        /// Generation of the transaction.
        generation: u64,
        /// Its txid.
        txid: u64,
        /// (page number, data).
        #[serde(with = "page_list")]
        pages: Vec<(u32, Vec<u8>)>,
    },
}

impl Message {
    /// A short name for messages and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Welcome { .. } => "welcome",
            Message::Error { .. } => "error",
            Message::RestoreConfigRequest => "restore config request",
            Message::RestoreConfig { .. } => "restore config",
            Message::SnapshotRequest => "snapshot request",
            Message::SnapshotBegin { .. } => "snapshot begin",
            Message::SnapshotPages { .. } => "snapshot pages",
            Message::SnapshotEnd => "snapshot end",
            Message::Txn(_) => "txn",
            Message::Ack { .. } => "ack",
            Message::Heartbeat { .. } => "heartbeat",
            Message::TxnPart { .. } => "txn part",
        }
    }
}

/// A framing, decoding, validation or sequencing error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtoError {
    /// A frame length of 0.
    EmptyFrame,
    /// A frame length above MAX_FRAME_LEN (refused before buffering it).
    FrameTooLarge(u32),
    /// A frame length above the receiver's own, lower limit
    /// ([`FrameDecoder::with_limit`]; refused before buffering it).
    FrameAboveLimit {
        /// The frame's length.
        len: u32,
        /// The receiver's limit.
        limit: u32,
    },
    /// A message that is too large to frame.
    MessageTooLarge(usize),
    /// A frame whose payload is not a postcard-encoded message.
    Malformed,
    /// A frame with bytes left over after its message.
    TrailingBytes(usize),
    /// A database name that is empty or holds '/', NUL or "..".
    BadDbName,
    /// A database name longer than MAX_DB_NAME_LEN bytes.
    DbNameTooLong(usize),
    /// An error message longer than MAX_ERROR_MESSAGE_LEN bytes.
    ErrorMessageTooLong(usize),
    /// A page size that is not a power of two in 512..=65536.
    BadPageSize(u32),
    /// Generation 0.
    ZeroGeneration,
    /// Txid 0.
    ZeroTxid,
    /// A database size of 0 pages.
    ZeroDbPages,
    /// Page number 0.
    ZeroPgno,
    /// A page whose data is not one page long.
    PageLen {
        /// Page number.
        pgno: u32,
        /// Data length.
        len: usize,
        /// Expected page size.
        page_size: u32,
    },
    /// A page beyond the database size.
    PgnoBeyondDbSize {
        /// Page number.
        pgno: u32,
        /// Database size in pages.
        db_pages: u32,
    },
    /// Page numbers not strictly increasing.
    PagesNotIncreasing {
        /// Previous page number.
        prev: u32,
        /// This page number.
        pgno: u32,
    },
    /// A snapshot that ended before all its pages arrived.
    SnapshotIncomplete {
        /// Pages expected.
        expected: u32,
        /// Pages received.
        received: u32,
    },
    /// A peer speaking another protocol version.
    VersionMismatch {
        /// Ours.
        ours: u16,
        /// Theirs.
        theirs: u16,
    },
    /// A message that is not allowed in the current state.
    Unexpected {
        /// The message's name.
        message: &'static str,
        /// The state's name.
        state: &'static str,
    },
    /// An ack for a transaction that was never sent.
    AckBeyondSent {
        /// Acknowledged txid.
        acked: u64,
        /// Last txid sent.
        sent: u64,
    },
    /// `handle_applied` reported a txid that is not the next one to confirm.
    AppliedOutOfOrder {
        /// The txid expected.
        expected: u64,
        /// The txid reported.
        got: u64,
    },
    /// Nothing heard from the peer for this many ms.
    Timeout(u64),
    /// The peer sent an error with this fatal code.
    Remote(ErrorCode),
    /// The session is closed.
    Closed,
}

impl core::error::Error for ProtoError {}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ProtoError::*;
        match *self {
            EmptyFrame => f.write_str("empty frame: frame length 0"),
            FrameTooLarge(n) => write!(
                f,
                "frame length {n} above the limit of {MAX_FRAME_LEN} bytes"
            ),
            FrameAboveLimit { len, limit } => write!(
                f,
                "frame length {len} above this receiver's limit of {limit} bytes"
            ),
            MessageTooLarge(n) => write!(
                f,
                "message of {n} bytes above the frame limit of {MAX_FRAME_LEN} bytes"
            ),
            Malformed => f.write_str("malformed frame: not a protocol message"),
            TrailingBytes(n) => write!(f, "{n} trailing bytes after the message in a frame"),
            BadDbName => f.write_str("bad database name: empty, or holds '/', NUL or \"..\""),
            DbNameTooLong(n) => write!(
                f,
                "database name of {n} bytes: at most {MAX_DB_NAME_LEN} allowed"
            ),
            ErrorMessageTooLong(n) => write!(
                f,
                "error message of {n} bytes: at most {MAX_ERROR_MESSAGE_LEN} allowed"
            ),
            BadPageSize(p) => write!(f, "bad page size {p}"),
            ZeroGeneration => f.write_str("generation 0: generations start at 1"),
            ZeroTxid => f.write_str("txid 0: txids start at 1"),
            ZeroDbPages => f.write_str("database size of 0 pages"),
            ZeroPgno => f.write_str("page number 0"),
            PageLen {
                pgno,
                len,
                page_size,
            } => write!(
                f,
                "page {pgno} holds {len} bytes: expected the page size {page_size}"
            ),
            PgnoBeyondDbSize { pgno, db_pages } => {
                write!(
                    f,
                    "page {pgno} beyond the database size of {db_pages} pages"
                )
            }
            PagesNotIncreasing { prev, pgno } => {
                write!(
                    f,
                    "page {pgno} after page {prev}: page numbers must increase"
                )
            }
            SnapshotIncomplete { expected, received } => {
                write!(f, "snapshot ended after {received} of {expected} pages")
            }
            VersionMismatch { ours, theirs } => {
                write!(f, "protocol version mismatch: ours {ours}, theirs {theirs}")
            }
            Unexpected { message, state } => {
                write!(f, "unexpected {message} message in state {state}")
            }
            AckBeyondSent { acked, sent } => {
                write!(f, "ack for txid {acked} beyond the last sent txid {sent}")
            }
            AppliedOutOfOrder { expected, got } => {
                write!(f, "applied txid {got} out of order: expected {expected}")
            }
            Timeout(ms) => write!(f, "timeout: nothing heard from the peer for {ms} ms"),
            Remote(code) => write!(f, "peer error: {code}"),
            Closed => f.write_str("session closed"),
        }
    }
}

/// Appends one frame holding `msg` to `out`.
///
/// Fails (leaving `out` as it was) only when the encoded message exceeds
/// [`MAX_FRAME_LEN`].
pub fn encode_frame(msg: &Message, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    encode_frame_of(msg, out)
}

/// Appends one frame holding `Message::Txn` of `t` to `out` without copying the transaction
/// into a message first (the same bytes as [`encode_frame`] of `Message::Txn(t.clone())`).
pub fn encode_txn_frame(t: &Txn, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    /// `Message::Txn` by reference: its variant index is its place in [`Message`].
    struct TxnMessage<'a>(&'a Txn);
    impl Serialize for TxnMessage<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_newtype_variant("Message", TXN_VARIANT, "Txn", self.0)
        }
    }
    encode_frame_of(&TxnMessage(t), out)
}

/// The index of `Message::Txn` among [`Message`]'s variants.
const TXN_VARIANT: u32 = 9;

fn encode_frame_of<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    struct Ext<'a>(&'a mut Vec<u8>);
    impl Extend<u8> for Ext<'_> {
        fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
            self.0.extend(iter);
        }
    }
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    if postcard::to_extend(msg, Ext(out)).is_err() {
        // Serializing a Message cannot fail; be safe anyway.
        out.truncate(start);
        return Err(ProtoError::Malformed);
    }
    let len = out.len() - start - FRAME_HEADER_LEN;
    if len > MAX_FRAME_LEN as usize {
        out.truncate(start);
        return Err(ProtoError::MessageTooLarge(len));
    }
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Decodes one frame payload (without the length prefix).
pub fn decode_payload(payload: &[u8]) -> Result<Message, ProtoError> {
    match postcard::take_from_bytes::<Message>(payload) {
        Ok((m, [])) => Ok(m),
        Ok((_, rest)) => Err(ProtoError::TrailingBytes(rest.len())),
        Err(_) => Err(ProtoError::Malformed),
    }
}

/// A streaming frame decoder: push bytes as they arrive, poll messages.
///
/// The first error is sticky: the stream cannot be resynchronised after it.
#[derive(Clone, Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    failed: Option<ProtoError>,
    limit: u32,
}

impl Default for FrameDecoder {
    fn default() -> FrameDecoder {
        FrameDecoder::with_limit(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    /// A decoder that has seen no bytes.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// A decoder that also refuses frames longer than `limit` (at most
    /// [`MAX_FRAME_LEN`]) with [`ProtoError::FrameAboveLimit`], as soon as
    /// their length is in: for a peer whose messages are known to be small
    /// ([`MAX_REPLICA_FRAME_LEN`]).
    pub fn with_limit(limit: u32) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            failed: None,
            limit: limit.min(MAX_FRAME_LEN),
        }
    }

    /// Feeds the next bytes of the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete message; Ok(None) when more bytes are needed.
    pub fn poll(&mut self) -> Result<Option<Message>, ProtoError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let avail = &self.buf[self.start..];
        if avail.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]);
        let err = if len == 0 {
            Some(ProtoError::EmptyFrame)
        } else if len > MAX_FRAME_LEN {
            Some(ProtoError::FrameTooLarge(len))
        } else if len > self.limit {
            Some(ProtoError::FrameAboveLimit {
                len,
                limit: self.limit,
            })
        } else {
            None
        };
        if let Some(e) = err {
            return Err(self.fail(e));
        }
        let total = FRAME_HEADER_LEN + len as usize;
        if avail.len() < total {
            return Ok(None);
        }
        let r = decode_payload(&avail[FRAME_HEADER_LEN..total]);
        self.start += total;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        match r {
            Ok(m) => Ok(Some(m)),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn fail(&mut self, e: ProtoError) -> ProtoError {
        self.failed = Some(e);
        self.buf = Vec::new();
        self.start = 0;
        e
    }
}

/// Checks a database name: 1..=255 bytes, no '/', NUL or "..".
pub fn validate_db_name(db: &str) -> Result<(), ProtoError> {
    if db.len() > MAX_DB_NAME_LEN {
        return Err(ProtoError::DbNameTooLong(db.len()));
    }
    if db.is_empty() || db.contains('/') || db.contains('\0') || db.contains("..") {
        return Err(ProtoError::BadDbName);
    }
    Ok(())
}

/// Checks a page list: page numbers >= 1, strictly increasing and above
/// `after`, each <= `db_pages` when given, each data `page_size` long when
/// given (else all the same valid page size).
pub fn validate_pages(
    pages: &[(u32, Vec<u8>)],
    after: u32,
    db_pages: Option<u32>,
    page_size: Option<u32>,
) -> Result<(), ProtoError> {
    let mut prev = after;
    let mut size = page_size;
    for (pgno, data) in pages {
        let pgno = *pgno;
        if pgno == 0 {
            return Err(ProtoError::ZeroPgno);
        }
        if pgno <= prev {
            return Err(ProtoError::PagesNotIncreasing { prev, pgno });
        }
        if let Some(n) = db_pages {
            if pgno > n {
                return Err(ProtoError::PgnoBeyondDbSize { pgno, db_pages: n });
            }
        }
        let want = match size {
            Some(s) => s,
            None => {
                let l = u32::try_from(data.len()).unwrap_or(u32::MAX);
                if !valid_page_size(l) {
                    return Err(ProtoError::BadPageSize(l));
                }
                size = Some(l);
                l
            }
        };
        if data.len() != want as usize {
            return Err(ProtoError::PageLen {
                pgno,
                len: data.len(),
                page_size: want,
            });
        }
        prev = pgno;
    }
    Ok(())
}

fn nonzero_pos(generation: u64, txid: u64) -> Result<(), ProtoError> {
    if generation == 0 {
        return Err(ProtoError::ZeroGeneration);
    }
    if txid == 0 {
        return Err(ProtoError::ZeroTxid);
    }
    Ok(())
}

fn check_page_size(p: u32) -> Result<(), ProtoError> {
    if valid_page_size(p) {
        Ok(())
    } else {
        Err(ProtoError::BadPageSize(p))
    }
}

/// Checks the rules of one message on its own. `page_size` is the database's
/// page size when known (pages must then be exactly that long).
///
/// Sequencing rules (snapshot pages across messages, txids in order, ...) are
/// the state machines' business.
pub fn validate(msg: &Message, page_size: Option<u32>) -> Result<(), ProtoError> {
    if let Some(p) = page_size {
        check_page_size(p)?;
    }
    match msg {
        Message::Hello { db, pos, .. } => {
            validate_db_name(db)?;
            if let Some(p) = pos {
                nonzero_pos(p.generation, p.txid)?;
            }
        }
        Message::Welcome {
            generation,
            txid,
            page_size,
            ..
        } => {
            nonzero_pos(*generation, *txid)?;
            check_page_size(*page_size)?;
        }
        Message::Error { message, .. } => {
            if message.len() > MAX_ERROR_MESSAGE_LEN {
                return Err(ProtoError::ErrorMessageTooLong(message.len()));
            }
        }
        Message::SnapshotBegin {
            generation,
            txid,
            page_size: p,
            db_pages,
            ..
        } => {
            nonzero_pos(*generation, *txid)?;
            check_page_size(*p)?;
            if *db_pages == 0 {
                return Err(ProtoError::ZeroDbPages);
            }
        }
        Message::SnapshotPages { pages } => validate_pages(pages, 0, None, page_size)?,
        Message::Txn(t) => {
            nonzero_pos(t.generation, t.header.txid)?;
            if t.header.db_pages == 0 {
                return Err(ProtoError::ZeroDbPages);
            }
            validate_pages(&t.pages, 0, Some(t.header.db_pages), page_size)?;
        }
        Message::Ack {
            generation, txid, ..
        } => nonzero_pos(*generation, *txid)?,
        Message::TxnPart {
            generation,
            txid,
            pages,
        } => {
            nonzero_pos(*generation, *txid)?;
            validate_pages(pages, 0, None, page_size)?;
        }
        Message::RestoreConfigRequest
        | Message::RestoreConfig { .. }
        | Message::SnapshotRequest
        | Message::SnapshotEnd
        | Message::Heartbeat { .. } => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages written as byte strings are the same bytes on the wire as the plain
    /// `Vec<(u32, Vec<u8>)>` of earlier versions, so either side may be older.
    #[test]
    fn page_lists_keep_their_wire_form() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Plain {
            generation: u64,
            header: TxnInfo,
            pages: Vec<(u32, Vec<u8>)>,
        }
        let pages: Vec<(u32, Vec<u8>)> = (1..=3u32)
            .map(|n| (n * 7, (0..300u32).map(|i| (i * n) as u8).collect()))
            .collect();
        let header = TxnInfo {
            txid: 42,
            time_ms: 1_700_000_000_000,
            db_pages: 21,
            db_checksum: 0xdead_beef_0123_4567,
        };
        let plain = Plain {
            generation: 3,
            header,
            pages: pages.clone(),
        };
        let txn = Txn {
            generation: 3,
            header,
            pages: pages.clone(),
        };
        // A transaction framed by reference is the frame of its message.
        let (mut by_ref, mut owned) = (Vec::new(), Vec::new());
        encode_txn_frame(&txn, &mut by_ref).unwrap();
        encode_frame(&Message::Txn(txn.clone()), &mut owned).unwrap();
        assert_eq!(by_ref, owned);
        let ours = postcard::to_allocvec(&txn).unwrap();
        assert_eq!(ours, postcard::to_allocvec(&plain).unwrap());
        assert_eq!(postcard::from_bytes::<Txn>(&ours).unwrap(), txn);
        assert_eq!(postcard::from_bytes::<Plain>(&ours).unwrap(), plain);
        let part = Message::TxnPart {
            generation: 3,
            txid: 42,
            pages: pages.clone(),
        };
        let snap = Message::SnapshotPages { pages };
        for m in [part, snap] {
            let b = postcard::to_allocvec(&m).unwrap();
            assert_eq!(postcard::from_bytes::<Message>(&b).unwrap(), m);
        }
    }
}
