//! The replica's side of the protocol as a sans-I/O state machine.
//!
//! The daemon owns the connection and the database. It feeds decoded messages
//! to [`Replica::handle_message`], timer ticks to [`Replica::handle_timeout`]
//! and the results of its own work to [`Replica::handle_applied`],
//! [`Replica::handle_restored`] and friends; it sends what
//! [`Replica::poll_transmit`] hands out and does what
//! [`Replica::poll_event`] says, in order.
//!
//! ```text
//! Hello ──Welcome(pos None)──────────────▶ Restoring ─RestoreConfig─▶ (daemon
//!   │                                        │  restores from storage,
//!   │                                        │  handle_restored) ─▶ Hello
//!   │                                        └SnapshotBegin/Pages/End─▶ CatchingUp
//!   ├─Welcome(same generation, behind)─────▶ CatchingUp ─caught up─▶ Streaming
//!   ├─Welcome(same generation, level)──────▶ Streaming
//!   └─Welcome(other generation)────────────▶ Rebuild ─▶ Restoring
//! any fatal error ─▶ Failed;  reset() (new connection) ─▶ Hello
//! ```

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::pos::Pos;
use crate::proto::{
    encode_frame, joins_batch, validate, validate_pages, ErrorCode, Message, ProtoError, Txn,
    PROTOCOL_VERSION,
};

/// The default time without sending anything after which either side sends a heartbeat: five
/// in the default idle timeout, and an idle connection costs each side a packet (and the
/// wake-ups around it) every two seconds, not every second.
pub const HEARTBEAT_MS: u64 = 2_000;

/// Tunables of a replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// The database to replicate.
    pub db: String,
    /// Send a heartbeat after this long without sending anything.
    pub heartbeat_ms: u64,
    /// Give up on the connection after this long without hearing anything.
    pub idle_timeout_ms: u64,
}

impl ReplicaConfig {
    /// Defaults: heartbeat every 2 s, timeout after 10 s.
    pub fn new(db: &str) -> ReplicaConfig {
        ReplicaConfig {
            db: String::from(db),
            heartbeat_ms: HEARTBEAT_MS,
            idle_timeout_ms: 10_000,
        }
    }
}

/// What the replica's database durably holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Applied {
    /// Position.
    pub pos: Pos,
    /// Whole-database checksum at that position.
    pub db_checksum: u64,
}

/// Why the local database must be thrown away and restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RebuildReason {
    /// The primary is in another generation than the replica's.
    NewGeneration {
        /// Replica's generation.
        ours: u64,
        /// Primary's generation.
        theirs: u64,
    },
    /// The database's checksum after applying differs from the primary's.
    ChecksumMismatch {
        /// The transaction (or snapshot) txid.
        txid: u64,
        /// The primary's checksum.
        expected: u64,
        /// The checksum the daemon computed.
        computed: u64,
    },
    /// The primary no longer has the transactions after the replica's position.
    HistoryUnavailable,
    /// The primary says the replica's position is not in its history.
    Diverged,
    /// A transaction arrived out of sequence.
    Gap {
        /// The txid expected.
        expected: u64,
        /// The txid received.
        got: u64,
    },
    /// The daemon saw a write to the replica's database that did not come
    /// from replication.
    LocalWrite,
}

impl fmt::Display for RebuildReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RebuildReason::NewGeneration { ours, theirs } => write!(
                f,
                "new generation on the primary: {theirs}, replica at {ours}"
            ),
            RebuildReason::ChecksumMismatch {
                txid,
                expected,
                computed,
            } => write!(
                f,
                "checksum mismatch at txid {txid}: primary 0x{expected:016x}, replica 0x{computed:016x}"
            ),
            RebuildReason::HistoryUnavailable => {
                f.write_str("history unavailable on the primary after the replica's position")
            }
            RebuildReason::Diverged => f.write_str("replica diverged from the primary's history"),
            RebuildReason::Gap { expected, got } => {
                write!(f, "transaction gap: expected txid {expected}, got {got}")
            }
            RebuildReason::LocalWrite => f.write_str("local write detected on the replica"),
        }
    }
}

/// What the daemon must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplicaEvent {
    /// Apply this transaction as one write transaction, then call
    /// [`Replica::handle_applied`] with its txid and the resulting checksum.
    Apply {
        /// The transaction.
        txn: Txn,
    },
    /// Start a fresh database from a snapshot streamed by the primary
    /// (discarding any partial one).
    StartSnapshot {
        /// Snapshot generation.
        generation: u64,
        /// Snapshot txid.
        txid: u64,
        /// Page size.
        page_size: u32,
        /// Database size in pages.
        db_pages: u32,
        /// Expected whole-database checksum.
        db_checksum: u64,
    },
    /// Write these snapshot pages.
    SnapshotPages {
        /// (page number, data).
        pages: Vec<(u32, Vec<u8>)>,
    },
    /// The snapshot is complete: make it the database, then call
    /// [`Replica::handle_applied`] with `pos.txid` and its checksum.
    FinishSnapshot {
        /// The snapshot's position.
        pos: Pos,
        /// The primary's checksum for it.
        db_checksum: u64,
    },
    /// Restore from the storage these bytes describe, then call
    /// [`Replica::handle_restored`] (or [`Replica::restore_failed`]).
    Restore {
        /// Opaque storage description from the primary.
        storage: Vec<u8>,
    },
    /// The local database cannot be continued: drop it. A restore follows.
    Rebuild {
        /// Why.
        reason: RebuildReason,
    },
    /// The primary sent an error.
    PrimaryError {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The conversation failed; reconnect and call [`Replica::reset`].
    Error(ProtoError),
}

/// Where a restore stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RestoreStep {
    /// RestoreConfigRequest sent, waiting for the primary.
    Requested,
    /// [`ReplicaEvent::Restore`] handed out, waiting for
    /// [`Replica::handle_restored`].
    Storage,
    /// SnapshotRequest sent, waiting for the primary.
    SnapshotRequested,
    /// Receiving a snapshot.
    Snapshot {
        /// Snapshot position.
        pos: Pos,
        /// Database size in pages.
        db_pages: u32,
        /// Primary's checksum.
        db_checksum: u64,
        /// Last page number received (0 = none).
        last_pgno: u32,
        /// Pages received.
        received: u32,
    },
}

/// The replica's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplicaState {
    /// Hello sent, waiting for Welcome.
    Hello,
    /// Getting a whole database.
    Restoring {
        /// Where it stands.
        step: RestoreStep,
    },
    /// Receiving transactions, behind the primary's position at Welcome.
    CatchingUp {
        /// The primary's txid at Welcome (or the snapshot's).
        target: u64,
    },
    /// Caught up; receiving transactions as they commit.
    Streaming,
    /// The conversation failed; [`Replica::reset`] on a new connection.
    Failed {
        /// Why.
        error: ProtoError,
    },
}

impl ReplicaState {
    fn name(&self) -> &'static str {
        match self {
            ReplicaState::Hello => "hello",
            ReplicaState::Restoring { .. } => "restoring",
            ReplicaState::CatchingUp { .. } => "catching up",
            ReplicaState::Streaming => "streaming",
            ReplicaState::Failed { .. } => "failed",
        }
    }
}

/// (page number, data) pairs.
type Pages = Vec<(u32, Vec<u8>)>;

/// A transaction handed out for applying, not yet confirmed.
#[derive(Clone, Copy, Debug)]
struct Pending {
    pos: Pos,
    db_checksum: u64,
    /// Commit time; None for a snapshot.
    time_ms: Option<u64>,
}

/// The replica state machine for one database on one connection at a time.
#[derive(Clone, Debug)]
pub struct Replica {
    cfg: ReplicaConfig,
    state: ReplicaState,
    applied: Option<Applied>,
    /// Generation and highest txid handed out for applying (>= applied).
    received: Option<Pos>,
    pending: VecDeque<Pending>,
    page_size: Option<u32>,
    /// The pages of a transaction received so far in `TxnPart`s: its position,
    /// the last page number, the pages.
    partial: Option<(Pos, u32, Pages)>,
    primary_txid: u64,
    last_applied_time_ms: Option<u64>,
    out: Vec<u8>,
    ack_due: bool,
    events: VecDeque<ReplicaEvent>,
    now_ms: u64,
    last_sent_ms: u64,
    last_recv_ms: u64,
}

impl Replica {
    /// A replica on a fresh connection holding `applied` (None: an empty or
    /// unusable database). Queues Hello.
    pub fn new(cfg: ReplicaConfig, applied: Option<Applied>, now_ms: u64) -> Replica {
        let mut r = Replica {
            cfg,
            state: ReplicaState::Hello,
            applied,
            received: applied.map(|a| a.pos),
            pending: VecDeque::new(),
            page_size: None,
            partial: None,
            primary_txid: 0,
            last_applied_time_ms: None,
            out: Vec::new(),
            ack_due: false,
            events: VecDeque::new(),
            now_ms,
            last_sent_ms: now_ms,
            last_recv_ms: now_ms,
        };
        r.reset(now_ms);
        r
    }

    /// The state.
    pub fn state(&self) -> ReplicaState {
        self.state
    }

    /// What the database durably holds, as confirmed by handle_applied or
    /// handle_restored.
    pub fn applied(&self) -> Option<Applied> {
        self.applied
    }

    /// The database's page size, once the primary said it.
    pub fn page_size(&self) -> Option<u32> {
        self.page_size
    }

    /// Transactions the primary has that are not applied here (as far as the
    /// replica last heard).
    pub fn lag_txns(&self) -> u64 {
        let a = self.applied.map_or(0, |a| a.pos.txid);
        self.primary_txid.saturating_sub(a)
    }

    /// now - the primary's commit time of the last applied transaction, 0 when
    /// caught up, None when unknown (nothing applied on this run yet).
    pub fn lag_ms(&self, now_ms: u64) -> Option<u64> {
        if self.applied.is_some() && self.lag_txns() == 0 {
            return Some(0);
        }
        self.last_applied_time_ms.map(|t| now_ms.saturating_sub(t))
    }

    /// When [`Replica::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<u64> {
        if matches!(self.state, ReplicaState::Failed { .. }) {
            return None;
        }
        Some(
            (self.last_sent_ms + self.cfg.heartbeat_ms)
                .min(self.last_recv_ms + self.cfg.idle_timeout_ms),
        )
    }

    /// Starts a new conversation (a new connection, or a retry after Failed):
    /// back to Hello with the applied position, so no restore is needed.
    /// Transactions handed out but not yet confirmed stay pending: confirm
    /// them with handle_applied as usual; the primary's resends of them are
    /// dropped.
    pub fn reset(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.out.clear();
        self.ack_due = false;
        self.partial = None;
        self.last_recv_ms = now_ms;
        self.state = ReplicaState::Hello;
        if self.applied.is_none() && self.pending.is_empty() {
            self.received = None;
        }
        self.send_hello();
    }

    fn send_hello(&mut self) {
        let msg = Message::Hello {
            version: PROTOCOL_VERSION,
            db: self.cfg.db.clone(),
            pos: self.applied.map(|a| a.pos),
            db_checksum: self.applied.map(|a| a.db_checksum),
        };
        self.send(msg);
    }

    fn send(&mut self, msg: Message) {
        // Messages built here are far below the frame limit.
        let _ = encode_frame(&msg, &mut self.out);
        self.last_sent_ms = self.now_ms;
    }

    fn fail(&mut self, error: ProtoError, tell_peer: bool) {
        if tell_peer {
            self.send(Message::Error {
                code: ErrorCode::ProtocolViolation,
                message: format!("{error}"),
            });
        }
        self.state = ReplicaState::Failed { error };
        self.events.push_back(ReplicaEvent::Error(error));
    }

    fn rebuild(&mut self, reason: RebuildReason) {
        self.events.push_back(ReplicaEvent::Rebuild { reason });
        self.applied = None;
        self.received = None;
        self.pending.clear();
        self.partial = None;
        self.ack_due = false;
        self.last_applied_time_ms = None;
        self.request_restore();
    }

    fn request_restore(&mut self) {
        self.state = ReplicaState::Restoring {
            step: RestoreStep::Requested,
        };
        self.send(Message::RestoreConfigRequest);
    }

    /// Handles one decoded message from the primary.
    pub fn handle_message(&mut self, now_ms: u64, msg: Message) {
        self.now_ms = now_ms;
        if matches!(self.state, ReplicaState::Failed { .. }) {
            return;
        }
        self.last_recv_ms = now_ms;
        if let Err(e) = validate(&msg, self.page_size) {
            self.fail(e, true);
            return;
        }
        let unexpected = ProtoError::Unexpected {
            message: msg.name(),
            state: self.state.name(),
        };
        match msg {
            Message::Heartbeat { txid, .. } => {
                if matches!(
                    self.state,
                    ReplicaState::CatchingUp { .. } | ReplicaState::Streaming
                ) {
                    self.primary_txid = self.primary_txid.max(txid);
                }
            }
            Message::Error { code, message } => {
                self.events
                    .push_back(ReplicaEvent::PrimaryError { code, message });
                match code {
                    ErrorCode::HistoryUnavailable | ErrorCode::Diverged => {
                        if matches!(self.state, ReplicaState::Restoring { .. }) {
                            // Already rebuilding (we saw it coming).
                            return;
                        }
                        self.rebuild(if code == ErrorCode::Diverged {
                            RebuildReason::Diverged
                        } else {
                            RebuildReason::HistoryUnavailable
                        });
                    }
                    _ => {
                        self.state = ReplicaState::Failed {
                            error: ProtoError::Remote(code),
                        };
                    }
                }
            }
            Message::Welcome {
                version,
                generation,
                txid,
                db_checksum,
                page_size,
            } => self.on_welcome(
                unexpected,
                version,
                generation,
                txid,
                db_checksum,
                page_size,
            ),
            Message::RestoreConfig { storage } => match self.state {
                ReplicaState::Restoring {
                    step: RestoreStep::Requested,
                } => {
                    self.state = ReplicaState::Restoring {
                        step: RestoreStep::Storage,
                    };
                    self.events.push_back(ReplicaEvent::Restore { storage });
                }
                _ => self.fail(unexpected, true),
            },
            Message::SnapshotBegin {
                generation,
                txid,
                page_size,
                db_pages,
                db_checksum,
            } => match self.state {
                ReplicaState::Restoring {
                    step: RestoreStep::Requested | RestoreStep::SnapshotRequested,
                } => {
                    if let Some(p) = self.page_size {
                        if p != page_size {
                            self.fail(ProtoError::BadPageSize(page_size), true);
                            return;
                        }
                    }
                    self.page_size = Some(page_size);
                    self.state = ReplicaState::Restoring {
                        step: RestoreStep::Snapshot {
                            pos: Pos { generation, txid },
                            db_pages,
                            db_checksum,
                            last_pgno: 0,
                            received: 0,
                        },
                    };
                    self.events.push_back(ReplicaEvent::StartSnapshot {
                        generation,
                        txid,
                        page_size,
                        db_pages,
                        db_checksum,
                    });
                }
                _ => self.fail(unexpected, true),
            },
            Message::SnapshotPages { pages } => match self.state {
                ReplicaState::Restoring {
                    step:
                        RestoreStep::Snapshot {
                            pos,
                            db_pages,
                            db_checksum,
                            last_pgno,
                            received,
                        },
                } => {
                    if let Err(e) =
                        validate_pages(&pages, last_pgno, Some(db_pages), self.page_size)
                    {
                        self.fail(e, true);
                        return;
                    }
                    let last_pgno = pages.last().map_or(last_pgno, |p| p.0);
                    self.state = ReplicaState::Restoring {
                        step: RestoreStep::Snapshot {
                            pos,
                            db_pages,
                            db_checksum,
                            last_pgno,
                            received: received + pages.len() as u32,
                        },
                    };
                    self.events.push_back(ReplicaEvent::SnapshotPages { pages });
                }
                _ => self.fail(unexpected, true),
            },
            Message::SnapshotEnd => match self.state {
                ReplicaState::Restoring {
                    step:
                        RestoreStep::Snapshot {
                            pos,
                            db_pages,
                            db_checksum,
                            received,
                            ..
                        },
                } => {
                    if received != db_pages {
                        self.fail(
                            ProtoError::SnapshotIncomplete {
                                expected: db_pages,
                                received,
                            },
                            true,
                        );
                        return;
                    }
                    self.events
                        .push_back(ReplicaEvent::FinishSnapshot { pos, db_checksum });
                    self.pending.push_back(Pending {
                        pos,
                        db_checksum,
                        time_ms: None,
                    });
                    self.received = Some(pos);
                    self.primary_txid = self.primary_txid.max(pos.txid);
                    self.state = ReplicaState::CatchingUp {
                        target: self.primary_txid,
                    };
                }
                _ => self.fail(unexpected, true),
            },
            Message::Txn(txn) => self.on_txn(unexpected, txn),
            Message::TxnPart {
                generation,
                txid,
                pages,
            } => self.on_txn_part(unexpected, Pos { generation, txid }, pages),
            Message::Hello { .. }
            | Message::RestoreConfigRequest
            | Message::SnapshotRequest
            | Message::Ack { .. } => self.fail(unexpected, true),
        }
    }

    fn on_welcome(
        &mut self,
        unexpected: ProtoError,
        version: u16,
        generation: u64,
        txid: u64,
        db_checksum: u64,
        page_size: u32,
    ) {
        match self.state {
            ReplicaState::Hello => {}
            // A Welcome mid-stream announces a new generation (or repeats the
            // primary's position).
            ReplicaState::CatchingUp { .. } | ReplicaState::Streaming => {
                let ours = self.received.map_or(0, |p| p.generation);
                if generation != ours {
                    self.rebuild(RebuildReason::NewGeneration {
                        ours,
                        theirs: generation,
                    });
                } else {
                    self.primary_txid = self.primary_txid.max(txid);
                }
                return;
            }
            _ => return self.fail(unexpected, true),
        }
        if version != PROTOCOL_VERSION {
            return self.fail(
                ProtoError::VersionMismatch {
                    ours: PROTOCOL_VERSION,
                    theirs: version,
                },
                true,
            );
        }
        self.page_size = Some(page_size);
        self.primary_txid = txid;
        let Some(a) = self.applied else {
            self.received = None;
            self.pending.clear();
            return self.request_restore();
        };
        if a.pos.generation != generation {
            return self.rebuild(RebuildReason::NewGeneration {
                ours: a.pos.generation,
                theirs: generation,
            });
        }
        if a.pos.txid > txid {
            return self.rebuild(RebuildReason::Diverged);
        }
        if a.pos.txid == txid && a.db_checksum != db_checksum {
            return self.rebuild(RebuildReason::ChecksumMismatch {
                txid,
                expected: db_checksum,
                computed: a.db_checksum,
            });
        }
        self.state = if a.pos.txid >= txid {
            ReplicaState::Streaming
        } else {
            ReplicaState::CatchingUp { target: txid }
        };
    }

    /// Checks where a transaction (or a part of one) at `pos` fits: Some(true)
    /// when it is the next one, Some(false) to drop it (a duplicate, or sent
    /// before the primary saw a restore request); None when the replica
    /// failed or rebuilds.
    fn sequence(&mut self, unexpected: ProtoError, pos: Pos) -> Option<bool> {
        match self.state {
            ReplicaState::CatchingUp { .. } | ReplicaState::Streaming => {}
            // Sent before the primary saw our restore request or new Hello.
            ReplicaState::Hello
            | ReplicaState::Restoring {
                step: RestoreStep::Requested | RestoreStep::Storage | RestoreStep::SnapshotRequested,
            } => return Some(false),
            _ => {
                self.fail(unexpected, true);
                return None;
            }
        }
        let Some(recv) = self.received else {
            self.fail(unexpected, true);
            return None;
        };
        if pos.generation != recv.generation {
            self.rebuild(RebuildReason::NewGeneration {
                ours: recv.generation,
                theirs: pos.generation,
            });
            return None;
        }
        if pos.txid <= recv.txid {
            return Some(false); // a duplicate: already applied or handed out
        }
        if pos.txid != recv.txid + 1 {
            self.rebuild(RebuildReason::Gap {
                expected: recv.txid + 1,
                got: pos.txid,
            });
            return None;
        }
        Some(true)
    }

    fn on_txn_part(&mut self, unexpected: ProtoError, pos: Pos, pages: Vec<(u32, Vec<u8>)>) {
        if self.sequence(unexpected, pos) != Some(true) {
            return;
        }
        match &mut self.partial {
            None => {
                let last = pages.last().map_or(0, |p| p.0);
                self.partial = Some((pos, last, pages));
            }
            Some((p, last, acc)) if *p == pos => {
                if let Err(e) = validate_pages(&pages, *last, None, self.page_size) {
                    return self.fail(e, true);
                }
                *last = pages.last().map_or(*last, |p| p.0);
                acc.extend(pages);
            }
            Some(_) => self.fail(unexpected, true),
        }
    }

    fn on_txn(&mut self, unexpected: ProtoError, mut txn: Txn) {
        let pos = txn.pos();
        if self.sequence(unexpected, pos) != Some(true) {
            return;
        }
        if let Some((p, last, mut acc)) = self.partial.take() {
            if p != pos {
                return self.fail(unexpected, true);
            }
            if let Err(e) = validate_pages(&txn.pages, last, None, self.page_size) {
                return self.fail(e, true);
            }
            if last > txn.header.db_pages {
                return self.fail(
                    ProtoError::PgnoBeyondDbSize {
                        pgno: last,
                        db_pages: txn.header.db_pages,
                    },
                    true,
                );
            }
            acc.append(&mut txn.pages);
            txn.pages = acc;
        }
        self.accept_txn(txn);
    }

    fn accept_txn(&mut self, txn: Txn) {
        let txid = txn.header.txid;
        self.received = Some(txn.pos());
        self.primary_txid = self.primary_txid.max(txid);
        self.pending.push_back(Pending {
            pos: txn.pos(),
            db_checksum: txn.header.db_checksum,
            time_ms: Some(txn.header.time_ms),
        });
        self.events.push_back(ReplicaEvent::Apply { txn });
    }

    /// The daemon applied transaction (or snapshot) `txid` durably and its
    /// database checksum is now `db_checksum`. Confirmations come in the
    /// order of the Apply/FinishSnapshot events; reports older than the
    /// oldest pending one (left over from before a rebuild) are ignored.
    pub fn handle_applied(&mut self, now_ms: u64, txid: u64, db_checksum: u64) {
        self.now_ms = now_ms;
        if matches!(self.state, ReplicaState::Failed { .. }) {
            return;
        }
        let Some(p) = self.pending.front().copied() else {
            return;
        };
        if txid < p.pos.txid {
            return;
        }
        if txid > p.pos.txid {
            return self.fail(
                ProtoError::AppliedOutOfOrder {
                    expected: p.pos.txid,
                    got: txid,
                },
                false,
            );
        }
        self.pending.pop_front();
        if db_checksum != p.db_checksum {
            return self.rebuild(RebuildReason::ChecksumMismatch {
                txid,
                expected: p.db_checksum,
                computed: db_checksum,
            });
        }
        self.applied = Some(Applied {
            pos: p.pos,
            db_checksum,
        });
        if let Some(t) = p.time_ms {
            self.last_applied_time_ms = Some(t);
        }
        self.ack_due = true;
        if let ReplicaState::CatchingUp { target } = self.state {
            if txid >= target {
                self.state = ReplicaState::Streaming;
            }
        }
    }

    /// Several transactions the daemon applied at once (taken with
    /// [`Replica::poll_next_txn`]) up to `txid`, its database checksum now
    /// `db_checksum`: the state after `txid` is the one checked, the ones
    /// before it were never a state of the replica's database.
    pub fn handle_applied_through(&mut self, now_ms: u64, txid: u64, db_checksum: u64) {
        if self.pending.iter().any(|p| p.pos.txid == txid) {
            while self.pending.front().is_some_and(|p| p.pos.txid < txid) {
                self.pending.pop_front();
            }
        }
        self.handle_applied(now_ms, txid, db_checksum)
    }

    /// The next event when it is a transaction that may be applied in one
    /// database transaction with `prev` (the last one taken): see
    /// [`joins_batch`]; `bytes` is the page data taken so far and `limit` the
    /// most to take. Confirm with [`Replica::handle_applied_through`].
    pub fn poll_next_txn(&mut self, prev: &Txn, bytes: usize, limit: usize) -> Option<Txn> {
        match self.events.front() {
            Some(ReplicaEvent::Apply { txn }) if joins_batch(prev, txn, bytes, limit) => {
                match self.events.pop_front() {
                    Some(ReplicaEvent::Apply { txn }) => Some(txn),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// The daemon restored the database from storage (after
    /// [`ReplicaEvent::Restore`]) to `pos` with checksum `db_checksum`: say
    /// Hello again on the same connection to catch up from there. Ignored
    /// unless a restore from storage is under way.
    pub fn handle_restored(&mut self, now_ms: u64, pos: Pos, db_checksum: u64) {
        self.now_ms = now_ms;
        if self.state
            != (ReplicaState::Restoring {
                step: RestoreStep::Storage,
            })
        {
            return;
        }
        self.applied = Some(Applied { pos, db_checksum });
        self.received = Some(pos);
        self.pending.clear();
        self.last_applied_time_ms = None;
        self.state = ReplicaState::Hello;
        self.send_hello();
    }

    /// The restore from storage failed: ask the primary for a snapshot.
    pub fn restore_failed(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        if self.state
            == (ReplicaState::Restoring {
                step: RestoreStep::Storage,
            })
        {
            self.state = ReplicaState::Restoring {
                step: RestoreStep::SnapshotRequested,
            };
            self.send(Message::SnapshotRequest);
        }
    }

    /// The daemon saw a write to the database that replication did not make.
    pub fn local_write_detected(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        if !matches!(self.state, ReplicaState::Failed { .. }) {
            self.rebuild(RebuildReason::LocalWrite);
        }
    }

    /// The daemon could not apply transaction `txid` (from an Apply event) and applied nothing
    /// of it. It and whatever was handed out after it are forgotten — their pending
    /// confirmations and the Apply events not taken yet — so that the primary's resends of
    /// them (after [`Replica::reset`]) are taken again instead of dropped as duplicates.
    pub fn apply_failed(&mut self, now_ms: u64, txid: u64) {
        self.now_ms = now_ms;
        while self.pending.back().is_some_and(|p| p.pos.txid >= txid) {
            self.pending.pop_back();
        }
        self.events
            .retain(|e| !matches!(e, ReplicaEvent::Apply { txn } if txn.header.txid >= txid));
        self.partial = None;
        self.received = self
            .pending
            .back()
            .map(|p| p.pos)
            .or(self.applied.map(|a| a.pos));
    }

    /// Timer tick: heartbeats when idle, failure when the primary is silent.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        if matches!(self.state, ReplicaState::Failed { .. }) {
            return;
        }
        let silent = now_ms.saturating_sub(self.last_recv_ms);
        if silent >= self.cfg.idle_timeout_ms {
            return self.fail(ProtoError::Timeout(silent), false);
        }
        if now_ms.saturating_sub(self.last_sent_ms) >= self.cfg.heartbeat_ms {
            let txid = self.applied.map_or(0, |a| a.pos.txid);
            self.send(Message::Heartbeat { now_ms, txid });
        }
    }

    /// Appends the frames to send to `out`; true when there were any. Acks
    /// are coalesced: at most one, for the last applied txid, per call.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) -> bool {
        if self.ack_due {
            self.ack_due = false;
            if let Some(a) = self.applied {
                self.send(Message::Ack {
                    generation: a.pos.generation,
                    txid: a.pos.txid,
                    applied_at_ms: self.now_ms,
                });
            }
        }
        if self.out.is_empty() {
            return false;
        }
        out.append(&mut self.out);
        true
    }

    /// The next thing the daemon must do.
    pub fn poll_event(&mut self) -> Option<ReplicaEvent> {
        self.events.pop_front()
    }
}
