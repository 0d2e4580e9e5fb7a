//! A deterministic simulation: one primary session and one replica joined by a
//! byte pipe that delivers random chunk sizes, delays, and sometimes drops the
//! connection; fake databases on both sides make applying checkable.

mod common;

use std::collections::{BTreeMap, VecDeque};

use common::Rng;
use replited_core::hash::{page_hash, DbHashes};
use replited_core::pos::Pos;
use replited_core::primary::{
    PrimaryConfig, PrimaryEvent, PrimarySession, PrimaryState, TRANSMIT_CHUNK,
};
use replited_core::proto::*;
use replited_core::replica::{
    Applied, RebuildReason, Replica, ReplicaConfig, ReplicaEvent, ReplicaState,
};

const PS: u32 = 512;
const DB: &str = "app.db";

/// A database: its pages (absent = zero-filled) and its hashes.
#[derive(Clone, Debug)]
struct FakeDb {
    hashes: DbHashes,
    pages: BTreeMap<u32, Vec<u8>>,
}

impl FakeDb {
    fn new() -> FakeDb {
        FakeDb {
            hashes: DbHashes::new(PS),
            pages: BTreeMap::new(),
        }
    }

    fn write(&mut self, pgno: u32, data: &[u8]) {
        self.hashes.set(pgno, page_hash(pgno, data));
        self.pages.insert(pgno, data.to_vec());
    }

    fn apply(&mut self, db_pages: u32, pages: &[(u32, Vec<u8>)]) {
        self.hashes.set_page_count(db_pages);
        self.pages.retain(|&p, _| p <= db_pages);
        for (p, d) in pages {
            self.write(*p, d);
        }
    }

    fn checksum(&self) -> u64 {
        self.hashes.checksum()
    }

    fn page_count(&self) -> u32 {
        self.hashes.page_count()
    }

    /// Every page, zero pages materialised.
    fn full(&self) -> Vec<Vec<u8>> {
        (1..=self.page_count())
            .map(|p| {
                self.pages
                    .get(&p)
                    .cloned()
                    .unwrap_or_else(|| vec![0; PS as usize])
            })
            .collect()
    }
}

/// How the primary's daemon answers a restore request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RestoreVia {
    Storage,
    Snapshot,
    /// Storage download fails: the replica asks for a snapshot.
    StorageFails,
}

struct Cluster {
    rng: Rng,
    now: u64,
    // Primary side.
    generation: u64,
    txid: u64,
    pdb: FakeDb,
    /// Transactions of the current generation still in memory.
    history: Vec<Txn>,
    /// A snapshot in storage.
    stored: (Pos, FakeDb),
    session: PrimarySession,
    pcfg: PrimaryConfig,
    p_dec: FrameDecoder,
    restore_via: RestoreVia,
    /// Corrupt the checksum of the transaction with this txid.
    corrupt_txid: Option<u64>,
    // Replica side.
    replica: Replica,
    rdb: FakeDb,
    r_dec: FrameDecoder,
    /// Applies done but not yet confirmed to the state machine.
    unconfirmed: VecDeque<(u64, u64)>,
    async_apply: bool,
    /// Apply the transactions already received as one, as a replica that is behind does.
    batch_apply: bool,
    /// The most transactions applied as one.
    largest_batch: usize,
    // Network.
    to_primary: VecDeque<u8>,
    to_replica: VecDeque<u8>,
    drop_per_mille: u64,
    // Observations.
    applied_log: Vec<Pos>,
    rebuilds: Vec<RebuildReason>,
    primary_errors: Vec<ErrorCode>,
    replica_errors: Vec<ProtoError>,
    acks: u64,
    drops: u64,
    max_in_flight_seen: usize,
    /// The primary closed the session: drop the connection once its last
    /// frames are delivered.
    closing: bool,
}

impl Cluster {
    fn new(seed: u64, replica_db: &str) -> Cluster {
        let mut pdb = FakeDb::new();
        let mut rng = Rng::new(seed);
        for p in 1..=4 {
            pdb.write(p, &rng.bytes(PS as usize));
        }
        let now = 1_700_000_000_000;
        let pcfg = PrimaryConfig {
            max_in_flight_bytes: 8 * 1024,
            heartbeat_ms: 1_000,
            idle_timeout_ms: 10_000,
        };
        let start = Pos {
            generation: 1,
            txid: 1,
        };
        let mut c = Cluster {
            rng,
            now,
            generation: 1,
            txid: 1,
            stored: (start, pdb.clone()),
            pdb,
            history: Vec::new(),
            session: PrimarySession::with_config(DB, PS, pcfg, now),
            pcfg,
            p_dec: FrameDecoder::new(),
            restore_via: RestoreVia::Storage,
            corrupt_txid: None,
            replica: Replica::new(ReplicaConfig::new(replica_db), None, now),
            rdb: FakeDb::new(),
            r_dec: FrameDecoder::new(),
            unconfirmed: VecDeque::new(),
            async_apply: false,
            batch_apply: false,
            largest_batch: 0,
            to_primary: VecDeque::new(),
            to_replica: VecDeque::new(),
            drop_per_mille: 0,
            applied_log: Vec::new(),
            rebuilds: Vec::new(),
            primary_errors: Vec::new(),
            replica_errors: Vec::new(),
            acks: 0,
            drops: 0,
            max_in_flight_seen: 0,
            closing: false,
        };
        c.session.set_position(1, 1, c.pdb.checksum());
        c
    }

    fn pos(&self) -> Pos {
        Pos {
            generation: self.generation,
            txid: self.txid,
        }
    }

    /// The primary commits one random transaction (pages, growth, shrink).
    fn commit(&mut self) {
        let old = self.pdb.page_count();
        let db_pages = match self.rng.below(10) {
            0 => (old.saturating_sub(1 + self.rng.below(3) as u32)).max(1),
            1 | 2 => old + 1 + self.rng.below(4) as u32,
            _ => old,
        };
        let mut pgnos: Vec<u32> = (0..1 + self.rng.below(5))
            .map(|_| 1 + self.rng.below(u64::from(db_pages)) as u32)
            .collect();
        if db_pages > old {
            pgnos.push(db_pages); // growth writes the last page
        }
        pgnos.sort_unstable();
        pgnos.dedup();
        let pages: Vec<(u32, Vec<u8>)> = pgnos
            .into_iter()
            .map(|p| (p, self.rng.bytes(PS as usize)))
            .collect();
        self.pdb.apply(db_pages, &pages);
        self.txid += 1;
        self.now += self.rng.below(20);
        let mut txn = Txn {
            generation: self.generation,
            header: TxnInfo {
                txid: self.txid,
                time_ms: self.now,
                db_pages,
                db_checksum: self.pdb.checksum(),
            },
            pages,
        };
        if self.corrupt_txid == Some(self.txid) {
            txn.header.db_checksum ^= 1;
        }
        self.history.push(txn.clone());
        if self.rng.below(8) == 0 {
            self.stored = (self.pos(), self.pdb.clone());
        }
        self.session.push_txn(txn);
    }

    /// The primary starts a new generation (as after a WAL reset): a snapshot
    /// at the next txid, history gone.
    fn new_generation(&mut self) {
        self.generation += 1;
        self.txid += 1;
        self.pdb.write(1, &self.rng.bytes(PS as usize));
        self.history.clear();
        self.stored = (self.pos(), self.pdb.clone());
        self.session
            .set_position(self.generation, self.txid, self.pdb.checksum());
    }

    fn reconnect(&mut self) {
        self.drops += 1;
        self.closing = false;
        self.to_primary.clear();
        self.to_replica.clear();
        self.p_dec = FrameDecoder::new();
        self.r_dec = FrameDecoder::new();
        self.session = PrimarySession::with_config(DB, PS, self.pcfg, self.now);
        self.session
            .set_position(self.generation, self.txid, self.pdb.checksum());
        self.replica.reset(self.now);
    }

    /// Moves frames into the pipes and handles every event on both sides.
    fn pump(&mut self) {
        for _ in 0..100 {
            let mut progress = false;
            let mut out = Vec::new();
            if self.session.poll_transmit(&mut out) {
                self.to_replica.extend(out.drain(..));
                progress = true;
            }
            self.max_in_flight_seen = self.max_in_flight_seen.max(self.session.in_flight_bytes());
            if self.replica.poll_transmit(&mut out) {
                self.to_primary.extend(out.drain(..));
                progress = true;
            }
            while let Some(e) = self.session.poll_event() {
                progress = true;
                if self.primary_event(e) {
                    return self.reconnect();
                }
            }
            while let Some(e) = self.replica.poll_event() {
                progress = true;
                if self.replica_event(e) {
                    return self.reconnect();
                }
            }
            if !progress {
                return;
            }
        }
        panic!("pump does not settle");
    }

    /// True when the connection must be dropped.
    fn primary_event(&mut self, e: PrimaryEvent) -> bool {
        match e {
            PrimaryEvent::NeedTxns { after } => {
                let first = self.history.first().map(|t| t.header.txid);
                if after.generation != self.generation || first.is_none_or(|f| after.txid + 1 < f) {
                    self.session.history_unavailable();
                } else {
                    for t in self.history.iter().filter(|t| t.header.txid > after.txid) {
                        self.session.push_txn(t.clone());
                    }
                }
            }
            PrimaryEvent::RestoreConfigRequested => match self.restore_via {
                RestoreVia::Storage | RestoreVia::StorageFails => self
                    .session
                    .send_restore_config(b"mem://".to_vec())
                    .unwrap(),
                RestoreVia::Snapshot => self.send_snapshot(),
            },
            PrimaryEvent::NeedSnapshot => self.send_snapshot(),
            PrimaryEvent::Acked { txid, lag } => {
                self.acks += 1;
                assert!(txid <= self.txid);
                assert_eq!(lag.txns, self.txid - txid);
            }
            PrimaryEvent::Error(_) => self.closing = true,
            _ => unreachable!(),
        }
        false
    }

    fn send_snapshot(&mut self) {
        let full = self.pdb.full();
        self.session
            .send_snapshot_begin(
                self.generation,
                self.txid,
                full.len() as u32,
                self.pdb.checksum(),
            )
            .unwrap();
        let mut pgno = 1u32;
        for chunk in full.chunks(3) {
            let pages = chunk
                .iter()
                .map(|d| {
                    pgno += 1;
                    (pgno - 1, d.clone())
                })
                .collect();
            self.session.send_snapshot_pages(pages).unwrap();
        }
        self.session.send_snapshot_end().unwrap();
    }

    fn confirm(&mut self) {
        while let Some((txid, checksum)) = self.unconfirmed.pop_front() {
            if self.batch_apply {
                self.replica
                    .handle_applied_through(self.now, txid, checksum);
            } else {
                self.replica.handle_applied(self.now, txid, checksum);
            }
        }
    }

    fn replica_event(&mut self, e: ReplicaEvent) -> bool {
        match e {
            ReplicaEvent::Apply { txn } => {
                let mut batch = vec![txn];
                // As the daemon does: a shrinking first transaction goes alone.
                if self.batch_apply && batch[0].header.db_pages >= self.rdb.page_count() {
                    let mut bytes = batch[0].data_len();
                    while let Some(t) =
                        self.replica
                            .poll_next_txn(&batch[batch.len() - 1], bytes, 3 * PS as usize)
                    {
                        bytes += t.data_len();
                        batch.push(t);
                    }
                }
                self.largest_batch = self.largest_batch.max(batch.len());
                for txn in &batch {
                    assert!(
                        self.applied_log.last().is_none_or(
                            |p| p.generation != txn.generation || p.txid + 1 == txn.header.txid
                        ),
                        "applied out of order or twice: {:?} after {:?}",
                        txn.pos(),
                        self.applied_log.last()
                    );
                    self.applied_log.push(txn.pos());
                }
                let txn = Txn::merged(batch).unwrap();
                self.rdb.apply(txn.header.db_pages, &txn.pages);
                self.unconfirmed
                    .push_back((txn.header.txid, self.rdb.checksum()));
                if !self.async_apply {
                    self.confirm();
                }
            }
            ReplicaEvent::StartSnapshot {
                page_size,
                db_pages,
                ..
            } => {
                assert_eq!(page_size, PS);
                self.rdb = FakeDb::new();
                self.rdb.hashes.set_page_count(db_pages);
            }
            ReplicaEvent::SnapshotPages { pages } => {
                for (p, d) in pages {
                    self.rdb.write(p, &d);
                }
            }
            ReplicaEvent::FinishSnapshot { pos, .. } => {
                self.applied_log.push(pos);
                self.unconfirmed.push_back((pos.txid, self.rdb.checksum()));
                self.confirm();
            }
            ReplicaEvent::Restore { storage } => {
                assert_eq!(storage, b"mem://");
                if self.restore_via == RestoreVia::StorageFails {
                    self.replica.restore_failed(self.now);
                } else {
                    let (pos, db) = self.stored.clone();
                    self.rdb = db;
                    self.applied_log.push(pos);
                    self.replica
                        .handle_restored(self.now, pos, self.rdb.checksum());
                }
            }
            ReplicaEvent::Rebuild { reason } => {
                self.rebuilds.push(reason);
                self.rdb = FakeDb::new();
                self.unconfirmed.clear();
                self.applied_log.clear();
            }
            ReplicaEvent::PrimaryError { code, .. } => self.primary_errors.push(code),
            ReplicaEvent::Error(e) => {
                self.replica_errors.push(e);
                return true;
            }
            _ => unreachable!(),
        }
        false
    }

    fn deliver(&mut self, to_replica: bool) {
        let pipe = if to_replica {
            &mut self.to_replica
        } else {
            &mut self.to_primary
        };
        if pipe.is_empty() {
            return;
        }
        let most = if self.batch_apply { 5000 } else { 700 };
        let n = (1 + self.rng.below(most) as usize).min(pipe.len());
        let chunk: Vec<u8> = pipe.drain(..n).collect();
        if to_replica {
            self.r_dec.push(&chunk);
            loop {
                match self.r_dec.poll() {
                    Ok(Some(m)) => self.replica.handle_message(self.now, m),
                    Ok(None) => break,
                    Err(e) => panic!("replica decode: {e}"),
                }
            }
        } else {
            self.p_dec.push(&chunk);
            loop {
                match self.p_dec.poll() {
                    Ok(Some(m)) => self.session.handle_message(self.now, m),
                    Ok(None) => break,
                    Err(e) => panic!("primary decode: {e}"),
                }
            }
        }
    }

    fn tick(&mut self, ms: u64) {
        self.now += ms;
        self.session.handle_timeout(self.now);
        self.replica.handle_timeout(self.now);
    }

    fn settled(&self) -> bool {
        self.to_primary.is_empty()
            && self.to_replica.is_empty()
            && self.unconfirmed.is_empty()
            && self.replica.applied().map(|a| a.pos) == Some(self.pos())
            && self.replica.state() == ReplicaState::Streaming
    }

    /// Runs random network steps, committing `commits` transactions along the
    /// way, until everything is delivered and applied.
    fn drive(&mut self, mut commits: u32) {
        self.pump();
        for _ in 0..200_000 {
            if commits == 0 && self.settled() {
                return;
            }
            match self.rng.below(20) {
                0..=3 if commits > 0 => {
                    self.commit();
                    commits -= 1;
                }
                0..=7 => self.deliver(true),
                8..=11 => self.deliver(false),
                12 => {
                    let ms = self.rng.below(300);
                    self.tick(ms);
                }
                13 if self.async_apply => self.confirm(),
                14 if self.rng.below(1000) < self.drop_per_mille * 20 => self.reconnect(),
                _ => {
                    self.deliver(true);
                    self.deliver(false);
                }
            }
            if self.replica.applied().is_none() && self.unconfirmed.is_empty() {
                self.confirm();
            }
            self.pump();
            if matches!(self.replica.state(), ReplicaState::Failed { .. }) {
                return;
            }
            if self.closing && self.to_replica.is_empty() {
                self.reconnect();
            }
        }
        panic!(
            "did not settle: replica {:?} at {:?}, primary at {:?}, session {:?}",
            self.replica.state(),
            self.replica.applied(),
            self.pos(),
            self.session.state()
        );
    }

    fn assert_equal(&self) {
        let (r, p) = (self.rdb.full(), self.pdb.full());
        assert_eq!(r.len(), p.len(), "page counts differ");
        for (i, (a, b)) in r.iter().zip(&p).enumerate() {
            assert!(a == b, "page {} differs", i + 1);
        }
        assert_eq!(self.rdb.checksum(), self.pdb.checksum());
        let a = self.replica.applied().unwrap();
        assert_eq!(a.pos, self.pos());
        assert_eq!(a.db_checksum, self.pdb.checksum());
        assert_eq!(self.replica.lag_txns(), 0);
        assert_eq!(self.replica.lag_ms(self.now), Some(0));
    }
}

#[test]
fn random_runs_converge() {
    let mut batched = 0;
    for seed in 1..=40u64 {
        let mut c = Cluster::new(seed * 0x9e37_79b9, DB);
        c.async_apply = seed % 2 == 0;
        c.batch_apply = seed % 4 < 2;
        c.drop_per_mille = if seed % 3 == 0 { 0 } else { 5 };
        c.restore_via = match seed % 3 {
            0 => RestoreVia::Storage,
            1 => RestoreVia::Snapshot,
            _ => RestoreVia::StorageFails,
        };
        c.drive(200);
        c.assert_equal();
        assert!(c.rebuilds.is_empty(), "seed {seed}: {:?}", c.rebuilds);
        assert!(c.acks > 0);
        assert!(
            c.max_in_flight_seen <= c.pcfg.max_in_flight_bytes,
            "window exceeded: {}",
            c.max_in_flight_seen
        );
        // More commits after settling.
        c.drive(20);
        c.assert_equal();
        if c.batch_apply {
            batched = batched.max(c.largest_batch);
        }
    }
    assert!(batched > 1, "no run applied transactions as one");
}

#[test]
fn restarted_replica_resumes_without_restore() {
    let mut c = Cluster::new(99, DB);
    c.drive(30);
    c.assert_equal();
    // The replica process restarts: a new state machine from its database.
    let applied = c.replica.applied();
    c.replica = Replica::new(ReplicaConfig::new(DB), applied, c.now);
    c.session = PrimarySession::with_config(DB, PS, c.pcfg, c.now);
    c.session
        .set_position(c.generation, c.txid, c.pdb.checksum());
    c.to_primary.clear();
    c.to_replica.clear();
    c.p_dec = FrameDecoder::new();
    c.r_dec = FrameDecoder::new();
    let log_len = c.applied_log.len();
    c.drive(10);
    c.assert_equal();
    // Only the 10 new transactions were applied: no restore, no resend.
    assert_eq!(c.applied_log.len(), log_len + 10);
    assert!(c.rebuilds.is_empty());
}

#[test]
fn wrong_database_name() {
    let mut c = Cluster::new(5, "nope.db");
    c.drive(0);
    assert_eq!(c.primary_errors, vec![ErrorCode::DatabaseNotFound]);
    assert_eq!(
        c.replica.state(),
        ReplicaState::Failed {
            error: ProtoError::Remote(ErrorCode::DatabaseNotFound)
        }
    );
    assert!(c.session.is_closed());
    assert_eq!(
        ErrorCode::DatabaseNotFound.to_string(),
        "Database not found"
    );
}

#[test]
fn new_generation_while_streaming_rebuilds() {
    for via in [RestoreVia::Storage, RestoreVia::Snapshot] {
        let mut c = Cluster::new(7, DB);
        c.restore_via = via;
        c.drive(20);
        c.assert_equal();
        c.new_generation();
        c.drive(10);
        c.assert_equal();
        assert_eq!(
            c.rebuilds,
            vec![RebuildReason::NewGeneration { ours: 1, theirs: 2 }]
        );
    }
}

#[test]
fn new_generation_while_disconnected_rebuilds() {
    let mut c = Cluster::new(8, DB);
    c.drive(15);
    c.new_generation();
    for _ in 0..5 {
        c.commit();
    }
    c.reconnect();
    c.drive(5);
    c.assert_equal();
    assert_eq!(
        c.rebuilds,
        vec![RebuildReason::NewGeneration { ours: 1, theirs: 2 }]
    );
}

#[test]
fn corrupted_checksum_rebuilds() {
    let mut c = Cluster::new(11, DB);
    c.restore_via = RestoreVia::Snapshot;
    c.drive(5);
    c.corrupt_txid = Some(c.txid + 3);
    c.drive(10);
    c.assert_equal();
    assert_eq!(c.rebuilds.len(), 1);
    assert!(matches!(
        c.rebuilds[0],
        RebuildReason::ChecksumMismatch { txid, .. } if txid == c.txid - 7
    ));
}

#[test]
fn history_unavailable_rebuilds() {
    let mut c = Cluster::new(13, DB);
    c.restore_via = RestoreVia::Snapshot;
    c.drive(5);
    c.assert_equal();
    // The replica goes away; the primary commits and forgets old history.
    for _ in 0..20 {
        c.commit();
    }
    c.history.drain(..10);
    c.reconnect();
    c.drive(3);
    c.assert_equal();
    assert_eq!(c.primary_errors, vec![ErrorCode::HistoryUnavailable]);
    assert_eq!(c.rebuilds, vec![RebuildReason::HistoryUnavailable]);
}

#[test]
fn duplicates_are_not_applied_twice() {
    let mut c = Cluster::new(17, DB);
    c.async_apply = true;
    c.drive(10);
    c.assert_equal();
    // Applies that are not yet confirmed when the connection drops: the new
    // Hello carries the confirmed position and the primary resends the rest.
    for _ in 0..5 {
        c.commit();
    }
    for _ in 0..50 {
        c.deliver(true);
        c.pump();
    }
    assert!(!c.unconfirmed.is_empty());
    let before = c.applied_log.len();
    c.reconnect();
    c.drive(0);
    c.assert_equal();
    assert_eq!(c.applied_log.len(), before); // nothing applied twice
                                             // A duplicated frame on the wire is dropped too.
    let t = c.history.last().unwrap().clone();
    c.replica.handle_message(c.now, Message::Txn(t));
    assert_eq!(c.replica.poll_event(), None);
    assert!(c.rebuilds.is_empty());
}

#[test]
fn local_write_rebuilds() {
    let mut c = Cluster::new(19, DB);
    c.drive(5);
    c.replica.local_write_detected(c.now);
    c.drive(5);
    c.assert_equal();
    assert_eq!(c.rebuilds, vec![RebuildReason::LocalWrite]);
}

#[test]
fn heartbeats_keep_idle_connection_alive_and_silence_times_out() {
    let mut c = Cluster::new(23, DB);
    c.drive(3);
    for _ in 0..100 {
        c.tick(500);
        c.pump();
        c.deliver(true);
        c.deliver(false);
        c.pump();
    }
    assert_eq!(c.drops, 0);
    assert!(c.replica_errors.is_empty());
    assert_eq!(c.replica.state(), ReplicaState::Streaming);
    // Silence: no delivery at all.
    let mut r = c.replica.clone();
    r.handle_timeout(c.now + 10_000);
    assert!(matches!(
        r.state(),
        ReplicaState::Failed {
            error: ProtoError::Timeout(_)
        }
    ));
    let mut s = c.session.clone();
    s.handle_timeout(c.now + 10_000);
    assert!(s.is_closed());
}

#[test]
fn flow_control_window() {
    let mut c = Cluster::new(29, DB);
    c.drive(1);
    // Queue many transactions without delivering acks.
    for _ in 0..40 {
        c.commit();
        c.pump();
    }
    assert!(c.session.in_flight_bytes() <= c.pcfg.max_in_flight_bytes);
    assert!(c.session.queued_txns() > 0, "window never filled");
    c.drive(0);
    c.assert_equal();
    assert_eq!(c.session.queued_txns(), 0);
}

#[test]
fn protocol_violations_fail() {
    // A replica receiving a Hello.
    let mut r = Replica::new(ReplicaConfig::new(DB), None, 0);
    r.handle_message(
        1,
        Message::Hello {
            version: 1,
            db: DB.into(),
            pos: None,
            db_checksum: None,
        },
    );
    assert!(matches!(r.state(), ReplicaState::Failed { .. }));
    assert!(matches!(
        r.poll_event(),
        Some(ReplicaEvent::Error(ProtoError::Unexpected { .. }))
    ));
    // A version mismatch at Welcome.
    let mut r = Replica::new(ReplicaConfig::new(DB), None, 0);
    r.handle_message(
        1,
        Message::Welcome {
            version: 9,
            generation: 1,
            txid: 1,
            db_checksum: 0,
            page_size: PS,
        },
    );
    assert!(matches!(
        r.poll_event(),
        Some(ReplicaEvent::Error(ProtoError::VersionMismatch {
            ours: 1,
            theirs: 9
        }))
    ));
    // A primary receiving a Hello with another version.
    let mut s = PrimarySession::new(DB, PS);
    s.set_position(1, 1, 0);
    s.handle_message(
        0,
        Message::Hello {
            version: 2,
            db: DB.into(),
            pos: None,
            db_checksum: None,
        },
    );
    assert!(s.is_closed());
    let mut out = Vec::new();
    assert!(s.poll_transmit(&mut out));
    let mut d = FrameDecoder::new();
    d.push(&out);
    assert!(matches!(
        d.poll().unwrap(),
        Some(Message::Error {
            code: ErrorCode::VersionMismatch,
            ..
        })
    ));
    // A gap in transactions rebuilds.
    let mut r = Replica::new(
        ReplicaConfig::new(DB),
        Some(Applied {
            pos: Pos {
                generation: 1,
                txid: 5,
            },
            db_checksum: 1,
        }),
        0,
    );
    r.handle_message(
        0,
        Message::Welcome {
            version: 1,
            generation: 1,
            txid: 9,
            db_checksum: 0,
            page_size: PS,
        },
    );
    assert_eq!(r.state(), ReplicaState::CatchingUp { target: 9 });
    r.handle_message(
        0,
        Message::Txn(Txn {
            generation: 1,
            header: TxnInfo {
                txid: 7,
                time_ms: 0,
                db_pages: 1,
                db_checksum: 0,
            },
            pages: vec![],
        }),
    );
    assert_eq!(
        r.poll_event(),
        Some(ReplicaEvent::Rebuild {
            reason: RebuildReason::Gap {
                expected: 6,
                got: 7
            }
        })
    );
    // An ack beyond what was sent.
    let mut s = PrimarySession::new(DB, PS);
    s.set_position(1, 3, 0);
    s.handle_message(
        0,
        Message::Hello {
            version: 1,
            db: DB.into(),
            pos: Some(Pos {
                generation: 1,
                txid: 3,
            }),
            db_checksum: Some(0),
        },
    );
    assert!(matches!(s.state(), PrimaryState::Streaming { .. }));
    s.handle_message(
        0,
        Message::Ack {
            generation: 1,
            txid: 4,
            applied_at_ms: 0,
        },
    );
    assert!(s.is_closed());
}

/// A session at txid 1 that took the Hello of a replica at txid 1 (streaming now), and that
/// replica; pages of `page_size` bytes.
fn connected(page_size: u32) -> (PrimarySession, Replica) {
    let mut s = PrimarySession::new(DB, page_size);
    s.set_position(1, 1, 0);
    let mut r = Replica::new(
        ReplicaConfig::new(DB),
        Some(Applied {
            pos: Pos {
                generation: 1,
                txid: 1,
            },
            db_checksum: 0,
        }),
        0,
    );
    let mut wire = Vec::new();
    r.poll_transmit(&mut wire);
    for m in decode_all(&wire) {
        s.handle_message(0, m);
    }
    (s, r)
}

fn streaming_replica(txid: u64, primary_txid: u64) -> Replica {
    let mut r = Replica::new(
        ReplicaConfig::new(DB),
        Some(Applied {
            pos: Pos {
                generation: 1,
                txid,
            },
            db_checksum: 0,
        }),
        0,
    );
    r.handle_message(
        0,
        Message::Welcome {
            version: 1,
            generation: 1,
            txid: primary_txid,
            db_checksum: 0,
            page_size: PS,
        },
    );
    let mut out = Vec::new();
    r.poll_transmit(&mut out);
    r
}

fn empty_txn(txid: u64, time_ms: u64) -> Message {
    Message::Txn(Txn {
        generation: 1,
        header: TxnInfo {
            txid,
            time_ms,
            db_pages: 1,
            db_checksum: txid,
        },
        pages: vec![],
    })
}

fn decode_all(bytes: &[u8]) -> Vec<Message> {
    let mut d = FrameDecoder::new();
    d.push(bytes);
    let mut v = Vec::new();
    while let Some(m) = d.poll().unwrap() {
        v.push(m);
    }
    v
}

#[test]
fn acks_are_coalesced() {
    let mut r = streaming_replica(1, 4);
    for txid in 2..=4 {
        r.handle_message(10, empty_txn(txid, 5));
    }
    for txid in 2..=4 {
        assert!(matches!(r.poll_event(), Some(ReplicaEvent::Apply { .. })));
        r.handle_applied(20, txid, txid);
    }
    let mut out = Vec::new();
    assert!(r.poll_transmit(&mut out));
    assert_eq!(
        decode_all(&out),
        vec![Message::Ack {
            generation: 1,
            txid: 4,
            applied_at_ms: 20
        }]
    );
    out.clear();
    assert!(!r.poll_transmit(&mut out));
    assert_eq!(r.state(), ReplicaState::Streaming);
}

#[test]
fn lag_reporting() {
    let mut r = streaming_replica(1, 1);
    assert_eq!(r.lag_txns(), 0);
    assert_eq!(r.lag_ms(1_000), Some(0));
    r.handle_message(100, empty_txn(2, 90));
    r.handle_message(100, empty_txn(3, 95));
    r.handle_message(
        100,
        Message::Heartbeat {
            now_ms: 100,
            txid: 5,
        },
    );
    r.handle_applied(100, 2, 2);
    assert_eq!(r.lag_txns(), 3);
    assert_eq!(r.lag_ms(150), Some(60));
    // The primary's view through acks.
    let mut s = PrimarySession::new(DB, PS);
    s.set_position(1, 1, 0);
    s.handle_message(
        0,
        Message::Hello {
            version: 1,
            db: DB.into(),
            pos: Some(Pos {
                generation: 1,
                txid: 1,
            }),
            db_checksum: Some(0),
        },
    );
    for txid in 2..=3 {
        let Message::Txn(t) = empty_txn(txid, 90 + txid) else {
            unreachable!()
        };
        assert!(s.push_txn(t));
    }
    let mut out = Vec::new();
    s.poll_transmit(&mut out);
    s.handle_message(
        200,
        Message::Ack {
            generation: 1,
            txid: 2,
            applied_at_ms: 150,
        },
    );
    assert_eq!(
        s.poll_event(),
        Some(PrimaryEvent::Acked {
            txid: 2,
            lag: replited_core::primary::Lag { txns: 1, ms: 108 }
        })
    );
}

#[test]
fn heartbeat_when_idle() {
    let hb = ReplicaConfig::new(DB).heartbeat_ms;
    let mut r = streaming_replica(1, 1);
    r.handle_timeout(hb - 1);
    let mut out = Vec::new();
    assert!(!r.poll_transmit(&mut out));
    r.handle_timeout(hb);
    assert!(r.poll_transmit(&mut out));
    assert_eq!(
        decode_all(&out),
        vec![Message::Heartbeat {
            now_ms: hb,
            txid: 1
        }]
    );
    assert_eq!(r.poll_timeout(), Some(2 * hb));
}

/// `poll_transmit` hands out about `TRANSMIT_CHUNK` bytes per call (whole transactions), so the
/// buffers between the session and the transport stay small; called until it says false, it
/// sends everything the window allows, in order.
#[test]
fn transmit_comes_in_chunks() {
    let ps = 4096u32;
    let (mut s, _) = connected(ps);
    // 1,000 transactions of 3 pages (12 KiB): 12 MiB, more than the 8 MiB window.
    for txid in 2..=1001u64 {
        let pages = (1..=3u32)
            .map(|p| (p, vec![(txid % 251) as u8; ps as usize]))
            .collect();
        s.push_txn(Txn {
            generation: 1,
            header: TxnInfo {
                txid,
                time_ms: 0,
                db_pages: 3,
                db_checksum: txid,
            },
            pages,
        });
    }
    // Each call hands out at least TRANSMIT_CHUNK and at most one transaction more.
    let most_per_call = TRANSMIT_CHUNK + 3 * ps as usize + 1024;
    let mut calls = 0;
    let mut next = 2u64;
    let mut out = Vec::new();
    while s.poll_transmit(&mut out) {
        calls += 1;
        assert!(out.len() < most_per_call, "{} bytes in one call", out.len());
        for m in decode_all(&out) {
            if let Message::Txn(t) = m {
                assert_eq!(t.header.txid, next);
                next += 1;
            }
        }
        out.clear();
    }
    let window = PrimaryConfig::default().max_in_flight_bytes;
    assert!(calls >= window / most_per_call, "{calls} calls");
    assert!(s.in_flight_bytes() <= window);
    assert!(
        s.in_flight_bytes() + 3 * ps as usize + 64 > window,
        "the window was filled"
    );
    assert!(next > 600, "sent up to {next}");
}

#[test]
fn transaction_larger_than_a_frame_arrives_whole() {
    let big = 65536u32;
    let (mut s, mut r) = connected(big);
    let mut wire = Vec::new();
    // 600 pages of 64 KiB: 37.5 MiB, more than two frames.
    let pages: Vec<(u32, Vec<u8>)> = (1..=600)
        .map(|p| (p, vec![(p % 251) as u8; big as usize]))
        .collect();
    let txn = Txn {
        generation: 1,
        header: TxnInfo {
            txid: 2,
            time_ms: 0,
            db_pages: 600,
            db_checksum: 7,
        },
        pages,
    };
    assert!(s.push_txn(txn.clone()));
    wire.clear();
    assert!(s.poll_transmit(&mut wire));
    assert!(!s.is_closed());
    let msgs = decode_all(&wire);
    let parts = msgs
        .iter()
        .filter(|m| matches!(m, Message::TxnPart { .. }))
        .count();
    assert!(parts >= 4, "{parts} parts");
    for m in msgs {
        r.handle_message(1, m);
    }
    let mut got = None;
    while let Some(e) = r.poll_event() {
        if let ReplicaEvent::Apply { txn } = e {
            assert!(got.is_none(), "one Apply per transaction");
            got = Some(txn);
        }
    }
    assert_eq!(got, Some(txn));
    // A part that goes backwards is a protocol violation.
    let mut r = streaming_replica(1, 2);
    r.handle_message(
        1,
        Message::TxnPart {
            generation: 1,
            txid: 2,
            pages: vec![(5, vec![0; PS as usize])],
        },
    );
    r.handle_message(
        1,
        Message::TxnPart {
            generation: 1,
            txid: 2,
            pages: vec![(3, vec![0; PS as usize])],
        },
    );
    assert!(matches!(r.state(), ReplicaState::Failed { .. }));
}

/// A transaction the daemon failed to apply (SQLite refused it; nothing applied) is taken
/// again when the primary resends it on the next connection — with everything after it, whose
/// Apply events were still queued — instead of being dropped as a duplicate (found by the
/// soak: the replica then looped on "does not follow the last applied transaction").
#[test]
fn failed_apply_is_taken_again_after_reconnect() {
    let mut r = streaming_replica(1, 5);
    for txid in 2..=5 {
        r.handle_message(10, empty_txn(txid, 5));
    }
    assert!(matches!(r.poll_event(), Some(ReplicaEvent::Apply { txn }) if txn.header.txid == 2));
    r.handle_applied(20, 2, 2);
    assert!(matches!(r.poll_event(), Some(ReplicaEvent::Apply { txn }) if txn.header.txid == 3));
    r.apply_failed(21, 3);
    // The queued Apply events for 4 and 5 are gone with it.
    assert_eq!(r.poll_event(), None);
    r.reset(30);
    let mut out = Vec::new();
    assert!(r.poll_transmit(&mut out));
    assert!(decode_all(&out).iter().any(|m| matches!(
        m,
        Message::Hello { pos: Some(p), .. } if p.txid == 2
    )));
    r.handle_message(
        31,
        Message::Welcome {
            version: 1,
            generation: 1,
            txid: 5,
            db_checksum: 2,
            page_size: PS,
        },
    );
    for txid in 3..=5 {
        r.handle_message(32, empty_txn(txid, 5));
    }
    for txid in 3..=5 {
        match r.poll_event() {
            Some(ReplicaEvent::Apply { txn }) => assert_eq!(txn.header.txid, txid),
            e => panic!("expected Apply {txid}, got {e:?}"),
        }
        r.handle_applied(33, txid, txid);
    }
    assert_eq!(r.applied().unwrap().pos.txid, 5);
    assert_eq!(r.state(), ReplicaState::Streaming);
}
