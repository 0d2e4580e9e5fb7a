//! The primary's side of the protocol: one session per replica connection
//! (per database), as a sans-I/O state machine.
//!
//! The daemon feeds decoded messages to [`PrimarySession::handle_message`],
//! ticks to [`PrimarySession::handle_timeout`], commits to
//! [`PrimarySession::push_txn`] / [`PrimarySession::set_position`]; it sends
//! what [`PrimarySession::poll_transmit`] hands out and answers what
//! [`PrimarySession::poll_event`] asks for.
//!
//! Transactions pushed are queued and sent while the bytes sent and not yet
//! acknowledged stay within `max_in_flight_bytes` (one transaction is always
//! allowed when nothing is in flight). When the replica is behind and nothing
//! is queued, the session asks for the missing transactions with
//! [`PrimaryEvent::NeedTxns`]; the daemon pushes them (in one go, from memory
//! or storage) or calls [`PrimarySession::history_unavailable`].

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::pos::Pos;
use crate::proto::{
    encode_frame, encode_txn_frame, validate, validate_pages, ErrorCode, Message, ProtoError, Txn,
    MAX_MESSAGE_DATA, PROTOCOL_VERSION,
};

/// Bytes of frames [`PrimarySession::poll_transmit`] hands out per call, past
/// which it stops before the next transaction (one is always whole): the buffers
/// between the session and the transport stay this small instead of growing to
/// the whole window. (At 1 MiB the two buffers, swapped between the session and
/// the daemon, each grew to 2 MiB on a busy primary.)
pub const TRANSMIT_CHUNK: usize = 256 << 10;

/// Per-message overhead counted in the flow-control window besides page data.
const TXN_OVERHEAD: usize = 64;

/// Tunables of a primary session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrimaryConfig {
    /// Bytes of transactions sent and not yet acknowledged, at most.
    pub max_in_flight_bytes: usize,
    /// Send a heartbeat after this long without sending anything.
    pub heartbeat_ms: u64,
    /// Close the session after this long without hearing anything.
    pub idle_timeout_ms: u64,
}

impl Default for PrimaryConfig {
    /// 8 MiB window, heartbeat every 2 s, timeout after 10 s.
    fn default() -> PrimaryConfig {
        PrimaryConfig {
            max_in_flight_bytes: 8 * 1024 * 1024,
            heartbeat_ms: crate::replica::HEARTBEAT_MS,
            idle_timeout_ms: 10_000,
        }
    }
}

/// Replication lag as seen by an acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lag {
    /// Committed transactions not yet acknowledged.
    pub txns: u64,
    /// now - commit time of the acknowledged transaction (0 when unknown, as
    /// for a snapshot).
    pub ms: u64,
}

/// What the daemon must do for the session.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PrimaryEvent {
    /// Push (with [`PrimarySession::push_txn`]) every transaction after
    /// `after` up to the current position, or call
    /// [`PrimarySession::history_unavailable`].
    NeedTxns {
        /// The last position the replica has.
        after: Pos,
    },
    /// The replica asks for a snapshot: stream one with
    /// [`PrimarySession::send_snapshot_begin`], `send_snapshot_pages` and
    /// `send_snapshot_end`.
    NeedSnapshot,
    /// The replica needs a restore: answer with
    /// [`PrimarySession::send_restore_config`] or stream a snapshot.
    RestoreConfigRequested,
    /// The replica applied everything up to `txid`.
    Acked {
        /// Last applied txid.
        txid: u64,
        /// Lag.
        lag: Lag,
    },
    /// The session failed or was refused; it is closed (once the frames
    /// queued are sent, close the stream).
    Error(ProtoError),
}

/// The session's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PrimaryState {
    /// Waiting for Hello.
    AwaitingHello,
    /// Welcome sent; waiting for a restore request or a new Hello.
    Welcomed,
    /// Streaming a snapshot.
    Snapshotting {
        /// Snapshot position.
        pos: Pos,
        /// Database size in pages.
        db_pages: u32,
        /// Last page number sent.
        last_pgno: u32,
        /// Pages sent.
        sent: u32,
    },
    /// Streaming transactions of `generation` from `next_txid` on.
    Streaming {
        /// Generation streamed.
        generation: u64,
        /// Next txid to queue.
        next_txid: u64,
    },
    /// Done; nothing more is accepted.
    Closed,
}

impl PrimaryState {
    fn name(&self) -> &'static str {
        match self {
            PrimaryState::AwaitingHello => "awaiting hello",
            PrimaryState::Welcomed => "welcomed",
            PrimaryState::Snapshotting { .. } => "snapshotting",
            PrimaryState::Streaming { .. } => "streaming",
            PrimaryState::Closed => "closed",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    txid: u64,
    bytes: usize,
    time_ms: u64,
}

/// The primary's session with one replica for one database.
#[derive(Clone, Debug)]
pub struct PrimarySession {
    db: String,
    page_size: u32,
    cfg: PrimaryConfig,
    state: PrimaryState,
    /// Current position and checksum.
    position: Option<(Pos, u64)>,
    queue: VecDeque<Arc<Txn>>,
    in_flight: VecDeque<InFlight>,
    in_flight_bytes: usize,
    last_sent_txid: u64,
    need_outstanding: bool,
    out: Vec<u8>,
    events: VecDeque<PrimaryEvent>,
    now_ms: u64,
    last_sent_ms: u64,
    last_recv_ms: u64,
}

impl PrimarySession {
    /// A session for database `db_name` with default tunables.
    pub fn new(db_name: &str, page_size: u32) -> PrimarySession {
        PrimarySession::with_config(db_name, page_size, PrimaryConfig::default(), 0)
    }

    /// A session with explicit tunables, started at `now_ms`.
    pub fn with_config(
        db_name: &str,
        page_size: u32,
        cfg: PrimaryConfig,
        now_ms: u64,
    ) -> PrimarySession {
        PrimarySession {
            db: String::from(db_name),
            page_size,
            cfg,
            state: PrimaryState::AwaitingHello,
            position: None,
            queue: VecDeque::new(),
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            last_sent_txid: 0,
            need_outstanding: false,
            out: Vec::new(),
            events: VecDeque::new(),
            now_ms,
            last_sent_ms: now_ms,
            last_recv_ms: now_ms,
        }
    }

    /// The state.
    pub fn state(&self) -> PrimaryState {
        self.state
    }

    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.state == PrimaryState::Closed
    }

    /// Bytes sent and not yet acknowledged.
    pub fn in_flight_bytes(&self) -> usize {
        self.in_flight_bytes
    }

    /// Transactions queued behind the flow-control window.
    pub fn queued_txns(&self) -> usize {
        self.queue.len()
    }

    /// When [`PrimarySession::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.is_closed() {
            return None;
        }
        Some(
            (self.last_sent_ms + self.cfg.heartbeat_ms)
                .min(self.last_recv_ms + self.cfg.idle_timeout_ms),
        )
    }

    /// Queues one frame; fails only for a message above the frame limit
    /// (nothing is queued then).
    fn send(&mut self, msg: &Message) -> Result<(), ProtoError> {
        encode_frame(msg, &mut self.out)?;
        self.last_sent_ms = self.now_ms;
        Ok(())
    }

    fn send_error(&mut self, code: ErrorCode, message: String) {
        // Error messages are far below the frame limit.
        let _ = self.send(&Message::Error { code, message });
    }

    fn close(&mut self, error: ProtoError) {
        self.state = PrimaryState::Closed;
        self.queue.clear();
        self.events.push_back(PrimaryEvent::Error(error));
    }

    fn violation(&mut self, error: ProtoError) {
        self.send_error(ErrorCode::ProtocolViolation, format!("{error}"));
        self.close(error);
    }

    fn stop_stream(&mut self) {
        self.queue.clear();
        self.in_flight.clear();
        self.in_flight_bytes = 0;
        self.need_outstanding = false;
    }

    fn send_welcome(&mut self, pos: Pos, db_checksum: u64) {
        let _ = self.send(&Message::Welcome {
            version: PROTOCOL_VERSION,
            generation: pos.generation,
            txid: pos.txid,
            db_checksum,
            page_size: self.page_size,
        });
    }

    fn start_stream(&mut self, from: Pos) {
        self.stop_stream();
        self.last_sent_txid = from.txid;
        self.state = PrimaryState::Streaming {
            generation: from.generation,
            next_txid: from.txid + 1,
        };
    }

    /// The primary's current position (call at start and for a new
    /// generation; [`PrimarySession::push_txn`] advances it for each commit).
    /// A new generation while streaming is announced with a new Welcome (the
    /// replica rebuilds).
    pub fn set_position(&mut self, generation: u64, txid: u64, db_checksum: u64) {
        let pos = Pos { generation, txid };
        self.position = Some((pos, db_checksum));
        if let PrimaryState::Streaming { generation: g, .. } = self.state {
            if g != generation {
                self.stop_stream();
                self.state = PrimaryState::Welcomed;
                self.send_welcome(pos, db_checksum);
            }
        }
    }

    /// Offers one committed transaction; also advances the current position
    /// when the transaction is past it in the same generation. Queued (true) when it is the next
    /// one the replica needs; ignored (false) when it is a duplicate, from
    /// another generation, leaves a gap (the session will ask for the missing
    /// ones with NeedTxns) or the session is not streaming.
    pub fn push_txn(&mut self, txn: Txn) -> bool {
        self.push_shared(Arc::new(txn))
    }

    /// [`PrimarySession::push_txn`] for a transaction the daemon shares (a hub of recent
    /// ones): queued without copying its pages.
    pub fn push_shared(&mut self, txn: Arc<Txn>) -> bool {
        if self
            .position
            .is_none_or(|(p, _)| p.generation == txn.generation && p.txid < txn.header.txid)
        {
            self.position = Some((txn.pos(), txn.header.db_checksum));
        }
        let PrimaryState::Streaming {
            generation,
            next_txid,
        } = self.state
        else {
            return false;
        };
        if txn.generation != generation || txn.header.txid != next_txid {
            return false;
        }
        self.state = PrimaryState::Streaming {
            generation,
            next_txid: next_txid + 1,
        };
        self.need_outstanding = false;
        self.queue.push_back(txn);
        true
    }

    /// The daemon cannot supply the transactions asked for: tells the replica
    /// (HistoryUnavailable; it rebuilds) and stops streaming.
    pub fn history_unavailable(&mut self) {
        if matches!(self.state, PrimaryState::Streaming { .. }) {
            self.stop_stream();
            self.state = PrimaryState::Welcomed;
            self.send_error(
                ErrorCode::HistoryUnavailable,
                String::from("history unavailable after the replica's position"),
            );
        }
    }

    /// Answers [`PrimaryEvent::RestoreConfigRequested`] with the storage
    /// description.
    pub fn send_restore_config(&mut self, storage: Vec<u8>) -> Result<(), ProtoError> {
        if self.state != PrimaryState::Welcomed {
            return Err(self.misuse("restore config"));
        }
        self.send(&Message::RestoreConfig { storage })
    }

    fn misuse(&self, message: &'static str) -> ProtoError {
        ProtoError::Unexpected {
            message,
            state: self.state.name(),
        }
    }

    /// Starts streaming a snapshot (after a restore request).
    pub fn send_snapshot_begin(
        &mut self,
        generation: u64,
        txid: u64,
        db_pages: u32,
        db_checksum: u64,
    ) -> Result<(), ProtoError> {
        if self.state != PrimaryState::Welcomed {
            return Err(self.misuse("snapshot begin"));
        }
        let msg = Message::SnapshotBegin {
            generation,
            txid,
            page_size: self.page_size,
            db_pages,
            db_checksum,
        };
        validate(&msg, None)?;
        self.send(&msg)?;
        self.state = PrimaryState::Snapshotting {
            pos: Pos { generation, txid },
            db_pages,
            last_pgno: 0,
            sent: 0,
        };
        Ok(())
    }

    /// Sends the next snapshot pages (page numbers continuing upwards).
    pub fn send_snapshot_pages(&mut self, pages: Vec<(u32, Vec<u8>)>) -> Result<(), ProtoError> {
        let PrimaryState::Snapshotting {
            pos,
            db_pages,
            last_pgno,
            sent,
        } = self.state
        else {
            return Err(self.misuse("snapshot pages"));
        };
        validate_pages(&pages, last_pgno, Some(db_pages), Some(self.page_size))?;
        let new_last = pages.last().map_or(last_pgno, |p| p.0);
        let n = pages.len() as u32;
        self.send(&Message::SnapshotPages { pages })?;
        self.state = PrimaryState::Snapshotting {
            pos,
            db_pages,
            last_pgno: new_last,
            sent: sent + n,
        };
        Ok(())
    }

    /// Ends the snapshot; transactions after it are streamed next.
    pub fn send_snapshot_end(&mut self) -> Result<(), ProtoError> {
        let PrimaryState::Snapshotting {
            pos,
            db_pages,
            sent,
            ..
        } = self.state
        else {
            return Err(self.misuse("snapshot end"));
        };
        if sent != db_pages {
            return Err(ProtoError::SnapshotIncomplete {
                expected: db_pages,
                received: sent,
            });
        }
        let _ = self.send(&Message::SnapshotEnd);
        self.start_stream(pos);
        Ok(())
    }

    /// Handles one decoded message from the replica.
    pub fn handle_message(&mut self, now_ms: u64, msg: Message) {
        self.now_ms = now_ms;
        if self.is_closed() {
            return;
        }
        self.last_recv_ms = now_ms;
        if let Err(e) = validate(&msg, Some(self.page_size)) {
            return self.violation(e);
        }
        let unexpected = ProtoError::Unexpected {
            message: msg.name(),
            state: self.state.name(),
        };
        match msg {
            Message::Hello {
                version,
                db,
                pos,
                db_checksum,
            } => self.on_hello(version, &db, pos, db_checksum),
            Message::RestoreConfigRequest | Message::SnapshotRequest => match self.state {
                PrimaryState::Welcomed | PrimaryState::Streaming { .. } => {
                    self.stop_stream();
                    self.state = PrimaryState::Welcomed;
                    self.events.push_back(if msg == Message::SnapshotRequest {
                        PrimaryEvent::NeedSnapshot
                    } else {
                        PrimaryEvent::RestoreConfigRequested
                    });
                }
                _ => self.violation(unexpected),
            },
            Message::Ack {
                generation, txid, ..
            } => self.on_ack(generation, txid),
            Message::Heartbeat { .. } => {}
            Message::Error { code, .. } => {
                if code.is_fatal() {
                    self.close(ProtoError::Remote(code));
                } else {
                    self.events
                        .push_back(PrimaryEvent::Error(ProtoError::Remote(code)));
                }
            }
            _ => self.violation(unexpected),
        }
    }

    fn on_hello(&mut self, version: u16, db: &str, pos: Option<Pos>, db_checksum: Option<u64>) {
        if version != PROTOCOL_VERSION {
            self.send_error(
                ErrorCode::VersionMismatch,
                format!("protocol version {version} not supported: this primary speaks {PROTOCOL_VERSION}"),
            );
            return self.close(ProtoError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        if db != self.db {
            self.send_error(
                ErrorCode::DatabaseNotFound,
                format!("Database not found: {db}"),
            );
            return self.close(ProtoError::Remote(ErrorCode::DatabaseNotFound));
        }
        let Some((cur, cur_checksum)) = self.position else {
            self.send_error(
                ErrorCode::Internal,
                String::from("the primary has no position yet"),
            );
            return self.close(ProtoError::Closed);
        };
        self.stop_stream();
        self.state = PrimaryState::Welcomed;
        self.send_welcome(cur, cur_checksum);
        let Some(p) = pos else { return };
        if p.generation != cur.generation {
            return; // the replica rebuilds and asks for a restore
        }
        if p.txid > cur.txid
            || (p.txid == cur.txid && db_checksum.is_some_and(|c| c != cur_checksum))
        {
            return self.send_error(
                ErrorCode::Diverged,
                format!("replica position {p} is not in this primary's history"),
            );
        }
        self.start_stream(p);
    }

    fn on_ack(&mut self, generation: u64, txid: u64) {
        let PrimaryState::Streaming { generation: g, .. } = self.state else {
            return; // stale: sent before a restore request or new Hello
        };
        if g != generation {
            return;
        }
        // A replica may ack transactions it received on an earlier connection
        // (applied after it said Hello): anything up to the current position
        // is plausible.
        let known = self
            .position
            .map_or(0, |(p, _)| p.txid)
            .max(self.last_sent_txid);
        if txid > known {
            return self.violation(ProtoError::AckBeyondSent {
                acked: txid,
                sent: known,
            });
        }
        let mut time_ms = None;
        while let Some(f) = self.in_flight.front() {
            if f.txid > txid {
                break;
            }
            if f.txid == txid {
                time_ms = Some(f.time_ms);
            }
            self.in_flight_bytes -= f.bytes;
            self.in_flight.pop_front();
        }
        let cur = self.position.map_or(0, |(p, _)| p.txid);
        self.events.push_back(PrimaryEvent::Acked {
            txid,
            lag: Lag {
                txns: cur.saturating_sub(txid),
                ms: time_ms.map_or(0, |t| self.now_ms.saturating_sub(t)),
            },
        });
    }

    /// Timer tick: heartbeats when idle, closing when the replica is silent.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        if self.is_closed() {
            return;
        }
        let silent = now_ms.saturating_sub(self.last_recv_ms);
        if silent >= self.cfg.idle_timeout_ms {
            return self.close(ProtoError::Timeout(silent));
        }
        if self.state != PrimaryState::AwaitingHello
            && now_ms.saturating_sub(self.last_sent_ms) >= self.cfg.heartbeat_ms
        {
            let txid = self.position.map_or(0, |(p, _)| p.txid);
            let _ = self.send(&Message::Heartbeat { now_ms, txid });
        }
    }

    /// Appends the frames to send to `out` (queued transactions as far as the
    /// flow-control window allows, about [`TRANSMIT_CHUNK`] bytes at a time:
    /// call again until it returns false); true when there were any.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        while let Some(t) = self.queue.front() {
            if self.out.len() >= TRANSMIT_CHUNK {
                break;
            }
            let bytes = t.data_len() + TXN_OVERHEAD;
            if self.in_flight_bytes > 0
                && self.in_flight_bytes + bytes > self.cfg.max_in_flight_bytes
            {
                break;
            }
            let Some(t) = self.queue.pop_front() else {
                break;
            };
            let (txid, time_ms) = (t.header.txid, t.header.time_ms);
            if let Err(e) = self.send_txn(t) {
                // Cannot happen (parts are far below the frame limit); fail loudly.
                self.send_error(
                    ErrorCode::Internal,
                    format!("transaction {txid} does not fit in a frame"),
                );
                self.close(e);
                break;
            }
            self.in_flight.push_back(InFlight {
                txid,
                bytes,
                time_ms,
            });
            self.in_flight_bytes += bytes;
            self.last_sent_txid = txid;
        }
        if self.out.is_empty() {
            return false;
        }
        if out.is_empty() {
            core::mem::swap(out, &mut self.out);
        } else {
            out.append(&mut self.out);
        }
        true
    }

    /// Sends one transaction: as `TxnPart`s of at most [`MAX_MESSAGE_DATA`]
    /// bytes of pages, then its `Txn`, when it is larger than that.
    fn send_txn(&mut self, t: Arc<Txn>) -> Result<(), ProtoError> {
        if t.data_len() <= MAX_MESSAGE_DATA {
            encode_txn_frame(&t, &mut self.out)?;
            self.last_sent_ms = self.now_ms;
            return Ok(());
        }
        let mut t = Arc::unwrap_or_clone(t);
        while t.data_len() > MAX_MESSAGE_DATA {
            let mut n = 0;
            let mut bytes = 0;
            for (_, d) in &t.pages {
                if n > 0 && bytes + d.len() > MAX_MESSAGE_DATA {
                    break;
                }
                bytes += d.len();
                n += 1;
            }
            let rest = t.pages.split_off(n);
            let part = core::mem::replace(&mut t.pages, rest);
            self.send(&Message::TxnPart {
                generation: t.generation,
                txid: t.header.txid,
                pages: part,
            })?;
        }
        self.send(&Message::Txn(t))
    }

    /// The next thing the daemon must do.
    pub fn poll_event(&mut self) -> Option<PrimaryEvent> {
        if self.events.is_empty() && self.queue.is_empty() && !self.need_outstanding {
            if let (
                PrimaryState::Streaming {
                    generation,
                    next_txid,
                },
                Some((cur, _)),
            ) = (self.state, self.position)
            {
                if cur.generation == generation && next_txid <= cur.txid {
                    self.need_outstanding = true;
                    return Some(PrimaryEvent::NeedTxns {
                        after: Pos {
                            generation,
                            txid: next_txid - 1,
                        },
                    });
                }
            }
        }
        self.events.pop_front()
    }
}
