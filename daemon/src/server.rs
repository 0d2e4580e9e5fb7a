//! The primary's stream server: read replicas connect over QUIC and receive every committed
//! transaction (`docs/PROTOCOL.md`).
//!
//! The capture thread of each database publishes what it made durable to that database's
//! [`Hub`]: the position, and the transactions themselves, kept in memory for a while
//! ([`RECENT_BYTES`]). A session per replica (one QUIC stream, a [`PrimarySession`]) takes the
//! transactions a replica needs from the hub, or — for a replica further behind — reads them
//! back from the database's storage target, checksummed like every stored byte. Transactions
//! are streamed only once they are durable in storage, so a replica never holds history the
//! backups lack.
//!
//! A new replica is told where the backups are (`RestoreConfig`: the storage directory); if it
//! cannot read them, the session restores the latest backup into a temporary file here and
//! streams it as a snapshot.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use replited_core::format::{Event, Kind};
use replited_core::name::FileMeta;
use replited_core::pos::Pos;
use replited_core::primary::{PrimaryConfig, PrimaryEvent, PrimarySession};
use replited_core::proto::{Message, Txn, TxnInfo, MAX_REPLICA_FRAME_LEN};
use tokio::sync::{mpsc, watch};

use crate::config::{db_name, DbConfig, S3Params, StreamParams, TargetParams};
use crate::reader::decode_file;
use crate::replicate::now_ms;
use crate::restore::{remove_db_files, restore, RestoreOptions};
use crate::storage::Storage;
use crate::transport::{self, FramedStream, ServerTls};

/// Bytes of recent transactions each hub keeps in memory for replicas that are a little
/// behind (older ones are read back from storage). Less would save memory but leave a
/// replica that falls behind at a high rate reading from storage, slower than the primary
/// writes: 2 MiB was tried (docs/BENCHMARKS.md, sixth pass).
pub const RECENT_BYTES: usize = 8 << 20;
/// Bytes of transactions read back from storage per batch (a replica reading history holds
/// up to three: one queued to send, one waiting, one being read).
const HISTORY_BATCH_BYTES: usize = 2 << 20;
/// Bytes of pages per `SnapshotPages` message.
const SNAPSHOT_BATCH_BYTES: usize = 1 << 20;
/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What a hub knows.
#[derive(Default)]
struct HubState {
    page_size: u32,
    /// The position durable in storage and its checksum.
    pos: Option<(Pos, u64)>,
    recent: VecDeque<Arc<Txn>>,
    recent_bytes: usize,
}

impl HubState {
    /// Drops the oldest transactions (all but the latest) until those kept and `incoming`
    /// bytes more fit in [`RECENT_BYTES`].
    fn trim(&mut self, incoming: usize) {
        while self.recent_bytes + incoming > RECENT_BYTES && self.recent.len() > 1 {
            let t = self.recent.pop_front().expect("non-empty");
            self.recent_bytes -= t.data_len() + 64;
        }
    }
}

/// One database's feed of durable transactions, shared by its capture thread and the sessions
/// of its replicas.
pub struct Hub {
    name: String,
    state: Mutex<HubState>,
    changed: watch::Sender<u64>,
    storage: Vec<Arc<dyn Storage>>,
    /// What a new replica is told to restore from.
    restore_config: Option<Vec<u8>>,
    /// Where snapshots to stream are built.
    scratch: PathBuf,
    /// The status record replicas are tracked in, with this database's index there.
    health: std::sync::OnceLock<(Arc<crate::notify::Health>, usize)>,
}

/// A replica session tracked in the status record; untracked when dropped.
struct ReplicaTrack {
    health: Arc<crate::notify::Health>,
    lag: Arc<crate::notify::Lagging>,
    acked: Arc<AtomicU64>,
}

impl ReplicaTrack {
    fn acked(&self, txid: u64) {
        self.acked.store(txid, Ordering::Relaxed);
        self.lag.last_sync_ms.store(now_ms(), Ordering::Relaxed);
    }
}

impl Drop for ReplicaTrack {
    fn drop(&mut self) {
        self.health.untrack(&self.lag);
    }
}

/// Why transactions cannot be supplied.
#[derive(Debug)]
enum History {
    /// Not in memory nor in storage.
    Unavailable(String),
}

impl Hub {
    /// The hub of a database from its config (its storage targets give history and the
    /// restore config).
    pub fn new(cfg: &DbConfig) -> Result<Hub> {
        let name = db_name(&cfg.db);
        // A bucket is reachable from anywhere, but its credentials go only to replicas that
        // proved who they are (client certificates required); a directory otherwise.
        let authenticated = cfg.stream().is_some_and(|(_, p)| p.tls_client_ca.is_some());
        let s3 = cfg.replicate.iter().find_map(|t| match &t.params {
            TargetParams::S3(p) if authenticated => Some(restore_config_s3(p, &name)),
            _ => None,
        });
        let fs = cfg.replicate.iter().find_map(|t| match &t.params {
            TargetParams::Fs(p) => {
                let root = std::fs::canonicalize(&p.root).unwrap_or_else(|_| p.root.clone());
                Some(restore_config_fs(&root.join(&name)))
            }
            _ => None,
        });
        let restore_config = s3.or(fs);
        Ok(Hub {
            scratch: crate::storage::parent_dir(&cfg.db).to_path_buf(),
            name,
            state: Mutex::new(HubState::default()),
            changed: watch::channel(0).0,
            storage: crate::replicate::history_targets(cfg)?
                .into_iter()
                .map(|t| t.storage)
                .collect(),
            restore_config,
            health: std::sync::OnceLock::new(),
        })
    }

    /// The database name replicas ask for.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tracks connected replicas in `health` (worker `index`) for status, health and metrics.
    pub fn set_health(&self, health: Arc<crate::notify::Health>, index: usize) {
        let _ = self.health.set((health, index));
    }

    /// Commit time (unix ms) of transaction `txid`, when it is still in memory.
    fn commit_time(&self, txid: u64) -> Option<u64> {
        let st = self.state.lock().expect("hub lock");
        let i = st.recent.partition_point(|t| t.header.txid < txid);
        st.recent
            .get(i)
            .filter(|t| t.header.txid == txid)
            .map(|t| t.header.time_ms)
            .or_else(|| st.recent.front().map(|t| t.header.time_ms))
    }

    /// Starts tracking a replica session (until the returned guard drops): its lag is the age
    /// of the oldest durable transaction it has not acknowledged.
    fn track(self: &Arc<Hub>, peer: &str, acked: u64) -> Option<ReplicaTrack> {
        let (h, i) = self.health.get()?;
        let ack = Arc::new(AtomicU64::new(acked));
        let (hub, a) = (Arc::downgrade(self), ack.clone());
        let lag = h.track(*i, "replica", peer, move |now| {
            let Some(hub) = hub.upgrade() else {
                return (0, 0);
            };
            let cur = hub.position().1.map_or(0, |(p, _)| p.txid);
            let acked = a.load(Ordering::Relaxed);
            if acked >= cur {
                return (0, 0);
            }
            let since = hub.commit_time(acked + 1).unwrap_or(now);
            (now.saturating_sub(since), cur - acked)
        });
        Some(ReplicaTrack {
            health: h.clone(),
            lag,
            acked: ack,
        })
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// The durable position (capture start-up, a new generation).
    pub fn set_position(&self, generation: u64, txid: u64, db_checksum: u64, page_size: u32) {
        let mut st = self.state.lock().expect("hub lock");
        if st.pos.is_some_and(|(p, _)| p.generation != generation) || st.page_size != page_size {
            st.recent.clear();
            st.recent_bytes = 0;
        }
        st.page_size = page_size;
        st.pos = Some((Pos { generation, txid }, db_checksum));
        drop(st);
        self.bump();
    }

    /// Transactions just made durable, in txid order.
    pub fn publish(&self, generation: u64, page_size: u32, txns: Vec<Txn>) {
        let Some(last) = txns.last() else { return };
        let pos = (last.pos(), last.header.db_checksum);
        let mut st = self.state.lock().expect("hub lock");
        let continues = st
            .pos
            .is_some_and(|(p, _)| p.generation == generation && txns[0].header.txid == p.txid + 1)
            && st.page_size == page_size;
        if !continues {
            st.recent.clear();
            st.recent_bytes = 0;
        }
        st.page_size = page_size;
        st.pos = Some(pos);
        for t in txns {
            st.recent_bytes += t.data_len() + 64;
            st.recent.push_back(Arc::new(t));
        }
        st.trim(0);
        drop(st);
        self.bump();
    }

    /// Drops ahead of time what publishing `incoming` bytes of transactions would: the oldest
    /// it keeps, all but the latest (replicas up to date still find their position). Called
    /// before a write-out copies the pages it will publish, so that a write-out of many
    /// transactions (`sync-interval` above zero) does not hold the old and the new at once.
    pub fn make_room(&self, incoming: usize) {
        self.state.lock().expect("hub lock").trim(incoming);
    }

    fn position(&self) -> (u32, Option<(Pos, u64)>) {
        let st = self.state.lock().expect("hub lock");
        (st.page_size, st.pos)
    }

    /// The transactions after `after` from memory, when memory reaches back that far.
    fn recent_after(&self, after: Pos) -> Option<Vec<Arc<Txn>>> {
        let st = self.state.lock().expect("hub lock");
        let first = st.recent.front()?;
        if first.generation != after.generation || first.header.txid > after.txid + 1 {
            return None;
        }
        Some(
            st.recent
                .iter()
                .filter(|t| t.header.txid > after.txid)
                .cloned()
                .collect(),
        )
    }

    /// Restores the latest backup into a scratch file (removed on drop) for streaming.
    fn build_snapshot(&self) -> Result<ScratchDb> {
        let path = self.scratch.join(format!(
            ".{}.replited-snapshot-{}-{}",
            self.name,
            std::process::id(),
            now_ms()
        ));
        let refs: Vec<&dyn Storage> = self.storage.iter().map(|s| &**s).collect();
        let r = restore(
            &refs,
            &RestoreOptions {
                target: replited_core::plan::Target::Latest,
                output: path.clone(),
                force: true,
                if_db_not_exists: false,
                if_replica_exists: false,
            },
        );
        let mut scratch = ScratchDb {
            path,
            restored: None,
        };
        scratch.restored = Some(r?.ok_or_else(|| anyhow!("NoSnapshotError: nothing to stream"))?);
        Ok(scratch)
    }
}

/// A database file restored for streaming; deleted when dropped.
struct ScratchDb {
    path: PathBuf,
    restored: Option<crate::restore::Restored>,
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        remove_db_files(&self.path);
    }
}

/// The restore config of an fs target: TOML naming the directory that holds the database's
/// backups. Parsed back by [`parse_restore_config`].
pub fn restore_config_fs(dir: &Path) -> Vec<u8> {
    let mut t = toml::Table::new();
    t.insert("type".into(), toml::Value::String("fs".into()));
    t.insert(
        "path".into(),
        toml::Value::String(dir.to_string_lossy().into_owned()),
    );
    toml::to_string(&t).unwrap_or_default().into_bytes()
}

/// The restore config of an S3 target: its parameters with the credentials resolved, and
/// the database name (TOML). Sent only to authenticated replicas; never logged.
pub fn restore_config_s3(p: &S3Params, name: &str) -> Vec<u8> {
    let mut t = toml::Table::try_from(crate::s3::resolved(p)).unwrap_or_default();
    t.insert("type".into(), toml::Value::String("s3".into()));
    t.insert("name".into(), toml::Value::String(name.into()));
    toml::to_string(&t).unwrap_or_default().into_bytes()
}

/// Where a restore config says the backups are.
pub enum RestoreSource {
    /// A directory (`ROOT/NAME`).
    Fs(PathBuf),
    /// A bucket, and the database's name in it.
    S3(S3Params, String),
}

/// Reads a restore config.
pub fn parse_restore_config(bytes: &[u8]) -> Result<RestoreSource> {
    let text = std::str::from_utf8(bytes).context("restore config is not UTF-8")?;
    let mut t: toml::Table = toml::from_str(text).context("restore config is not TOML")?;
    let kind = match t.remove("type") {
        Some(toml::Value::String(k)) => k,
        _ => bail!("restore config without a type"),
    };
    match kind.as_str() {
        "fs" => match t.get("path") {
            Some(toml::Value::String(p)) => Ok(RestoreSource::Fs(PathBuf::from(p))),
            _ => bail!("fs restore config without a path"),
        },
        "s3" => {
            let name = match t.remove("name") {
                Some(toml::Value::String(n)) => n,
                _ => bail!("s3 restore config without a name"),
            };
            let p: S3Params = toml::Value::Table(t)
                .try_into()
                .context("s3 restore config")?;
            Ok(RestoreSource::S3(p, name))
        }
        k => bail!("restore config of an unknown kind \"{k}\""),
    }
}

/// Transactions read back from storage for one replica session further behind than the hub's
/// memory reaches: a thread walks the stored chain from the replica's position, each file read
/// once, and hands the transactions over in batches of [`HISTORY_BATCH_BYTES`], one batch
/// ahead of the stream. (Listing the storage and reading a batch's files anew for each batch,
/// as before, re-read a merged file from its start for every batch and listed a bucket of
/// thousands of objects each time: a replica that fell behind at 10,000 commits/s read back
/// slower than the primary wrote and never caught up.)
struct HistoryFeed {
    /// The position of the last transaction received.
    last: Pos,
    /// Whether anything was received.
    delivered: bool,
    rx: mpsc::Receiver<Result<Vec<Arc<Txn>>, String>>,
}

impl HistoryFeed {
    /// Starts reading the transactions after `after` back from `hub`'s storage.
    fn start(hub: &Hub, after: Pos) -> HistoryFeed {
        let (tx, rx) = mpsc::channel(1);
        let (name, storage) = (hub.name.clone(), hub.storage.clone());
        let spawned = std::thread::Builder::new()
            .name("history".into())
            .spawn(move || feed_history(&name, &storage, after, &tx));
        if let Err(e) = spawned {
            tracing::warn!(db = %hub.name, "cannot start a thread to read history: {e}");
        }
        HistoryFeed {
            last: after,
            delivered: false,
            rx,
        }
    }
}

/// The body of a [`HistoryFeed`]'s thread: walks the chain from `after` in a listing of the
/// first storage target that continues it, lists that target again where the walk ends, and
/// ends (dropping `tx`) once a fresh listing has nothing more — by then the hub's memory
/// reaches back far enough — or the session stops listening. An error is sent before it ends.
fn feed_history(
    name: &str,
    storage: &[Arc<dyn Storage>],
    after: Pos,
    tx: &mpsc::Sender<Result<Vec<Arc<Txn>>, String>>,
) {
    let mut last = after;
    let mut source: Option<usize> = None;
    let mut vanished = 0;
    let mut why = String::from("no storage target holds them");
    loop {
        let before = last;
        // The error of the target the walk went on with, else of the last one tried.
        let mut error: Option<(bool, String)> = None;
        let order: Vec<usize> = match source {
            Some(i) => vec![i],
            None => (0..storage.len()).collect(),
        };
        for i in order {
            let s = &*storage[i];
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            let walked = s.list().and_then(|files| {
                stream_history(s, &files, last, &mut |t| {
                    if last == after {
                        tracing::debug!(db = %name, "transactions after {after} read back from storage ({})", s.describe());
                    }
                    last = t.pos();
                    bytes += t.data_len();
                    batch.push(Arc::new(t));
                    if bytes < HISTORY_BATCH_BYTES {
                        return Ok(true);
                    }
                    bytes = 0;
                    Ok(tx.blocking_send(Ok(std::mem::take(&mut batch))).is_ok())
                })
            });
            // Whole transactions decoded before an error are good: the error follows them.
            if !batch.is_empty() && tx.blocking_send(Ok(batch)).is_err() || tx.is_closed() {
                return;
            }
            let err = walked.err().map(|e| {
                (
                    crate::restore::vanished(&e),
                    format!("{}: {e:#}", s.describe()),
                )
            });
            if last != before {
                source = Some(i);
                error = err;
                break;
            }
            error = err.or(error);
        }
        if last != before {
            vanished = 0;
        }
        match error {
            // Compaction replaced a listed file meanwhile (the soak saw a replica rebuilt for
            // this): list again.
            Some((true, _)) if vanished < 5 => vanished += 1,
            Some((_, e)) if last != after => {
                let _ = tx.blocking_send(Err(format!(
                    "reading the transactions after {last} back from storage: {e}"
                )));
                return;
            }
            Some((_, e)) => {
                why = e;
                break;
            }
            // The chain ends in a fresh listing.
            None if last == before => break,
            // More may have been stored meanwhile.
            None => {}
        }
    }
    if last == after {
        let _ = tx.blocking_send(Err(format!(
            "transactions after {after} are not in memory nor in storage ({why})"
        )));
    }
}

/// Walks the chain of stored segments that continues from `after` in the listing `all` (of
/// `storage`): at each step the file holding the next transaction that reaches furthest, each
/// file read once, front to back. `each` gets every transaction after `after`, in order, as
/// soon as it is decoded whole; returning false stops the walk (the rest of the file unread).
/// Returns the position of the last transaction handed over (`after` when none).
///
/// A transaction is handed over before its file's trailer is verified (a merged file may hold
/// hundreds of megabytes, more than a reader keeps in memory): the trailer is still verified
/// when the walk gets there, and a bad one ends the walk with an error; whoever applies the
/// transactions checks the whole-database checksum after each one, so a changed page is caught
/// when it is applied.
pub fn stream_history(
    storage: &dyn Storage,
    all: &[FileMeta],
    after: Pos,
    each: &mut dyn FnMut(Txn) -> Result<bool>,
) -> Result<Pos> {
    /// Ends a file's decoding early (`each` said stop, or failed).
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("stopped")
        }
    }
    impl std::error::Error for Stop {}

    let mut files: Vec<&FileMeta> = all
        .iter()
        .filter(|m| m.kind == Kind::Segment && m.generation == after.generation)
        .collect();
    files.sort_by_key(|m| (m.first_txid, std::cmp::Reverse(m.last_txid)));
    let mut next = after.txid + 1;
    let mut failed: Option<anyhow::Error> = None;
    // The file that holds `next` and reaches furthest.
    while let Some(m) = files
        .iter()
        .filter(|m| m.first_txid <= next && m.last_txid >= next)
        .max_by_key(|m| m.last_txid)
    {
        let from = next;
        let mut cur: Option<Txn> = None;
        // Hands the transaction decoded whole to `each`: Ok(false) to stop.
        let mut hand = |t: Txn, next: &mut u64| -> Result<bool> {
            if t.header.txid != *next {
                bail!(
                    "{}: expected txid {next}, found {}",
                    storage.locate(m),
                    t.header.txid
                );
            }
            *next += 1;
            match each(t) {
                Ok(go) => Ok(go),
                Err(e) => {
                    failed = Some(e);
                    Ok(false)
                }
            }
        };
        let r = decode_file(storage, m, |ev, dec| {
            let done = match ev {
                Event::Txn(_) | Event::End => cur.take(),
                _ => None,
            };
            if let Some(t) = done {
                if !hand(t, &mut next)? {
                    return Err(Stop.into());
                }
            }
            match ev {
                Event::Txn(h) if h.txid >= next => {
                    cur = Some(Txn {
                        generation: after.generation,
                        header: TxnInfo::from(h),
                        pages: Vec::with_capacity(h.page_count as usize),
                    });
                }
                Event::Page(pgno) => {
                    if let Some(t) = cur.as_mut() {
                        t.pages.push((*pgno, dec.page().to_vec()));
                    }
                }
                _ => {}
            }
            Ok(true)
        });
        if let Some(e) = failed.take() {
            return Err(e);
        }
        match r {
            Err(e) if e.is::<Stop>() => break,
            r => r?,
        }
        if next == from {
            bail!(
                "{} holds no transaction {next} although its name says so",
                storage.locate(m)
            );
        }
    }
    Ok(Pos {
        generation: after.generation,
        txid: next - 1,
    })
}

/// The stream servers of every database with a `type = "stream"` target, on a runtime thread
/// of their own. Databases that name the same address share one QUIC endpoint (the replica's
/// Hello says which database it wants).
pub struct Servers {
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Arc<tokio::sync::Notify>,
}

/// The server TLS of a stream target, or why it is incomplete.
pub fn server_tls(name: &str, p: &StreamParams) -> Result<ServerTls> {
    let (Some(cert), Some(key)) = (&p.tls_cert, &p.tls_key) else {
        bail!(
            "replicate \"{name}\": a stream server needs params.tls_cert and params.tls_key (TLS is always on; `replited cert` makes a development CA and certificates)"
        );
    };
    for (k, f) in [("tls_cert", Some(cert)), ("tls_key", Some(key))]
        .into_iter()
        .chain([("tls_client_ca", p.tls_client_ca.as_ref())])
    {
        if let Some(f) = f {
            if !f.is_file() {
                bail!(
                    "replicate \"{name}\": params.{k} = \"{}\" does not exist",
                    f.display()
                );
            }
        }
    }
    Ok(ServerTls {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: p.tls_client_ca.clone(),
    })
}

/// How long a session waits for capture to establish the first position.
const POSITION_WAIT: Duration = Duration::from_secs(60);

/// The UDP sockets passed by systemd socket activation, with their names.
fn passed_udp_sockets() -> Vec<(String, std::net::UdpSocket)> {
    crate::sockets::take(nix::sys::socket::SockType::Datagram)
        .into_iter()
        .map(|(name, fd)| (name, std::net::UdpSocket::from(fd)))
        .collect()
}

/// Resolves a stream target's address for binding.
fn bind_addr(p: &StreamParams) -> Result<SocketAddr> {
    let (host, port) = transport::parse_stream_addr(&p.addr)?;
    (host.as_str(), port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", p.addr))?
        .next()
        .ok_or_else(|| anyhow!("{} resolves to no address", p.addr))
}

impl Servers {
    /// Binds every stream server (errors here stop start-up) and serves until [`Servers::stop`].
    pub fn start(hubs: Vec<(Arc<Hub>, String, StreamParams)>) -> Result<Option<Servers>> {
        if hubs.is_empty() {
            return Ok(None);
        }
        // Group by bind address.
        let mut groups: Vec<(SocketAddr, ServerTls, HashMap<String, Arc<Hub>>)> = Vec::new();
        for (hub, target, p) in hubs {
            let tls = server_tls(&target, &p)?;
            let addr = bind_addr(&p)?;
            match groups.iter_mut().find(|g| g.0 == addr) {
                Some(g) => {
                    if g.1.cert != tls.cert || g.1.key != tls.key || g.1.client_ca != tls.client_ca
                    {
                        bail!("replicate \"{target}\": {addr} is shared with another database but with other TLS settings");
                    }
                    g.2.insert(hub.name().to_string(), hub);
                }
                None => {
                    let mut m = HashMap::new();
                    m.insert(hub.name().to_string(), hub);
                    groups.push((addr, tls, m));
                }
            }
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("stream")
            .enable_all()
            .build()?;
        let mut endpoints = Vec::new();
        let mut passed = passed_udp_sockets();
        let single = groups.len() == 1;
        {
            let _g = rt.enter();
            for (addr, tls, hubs) in groups {
                // A socket systemd passed (replited@.socket, ListenDatagram=) is used instead of
                // binding: the one named "quic" or bound to this address, or the only one.
                let pick = passed
                    .iter()
                    .position(|(name, sock)| {
                        name == "quic" || sock.local_addr().is_ok_and(|a| a == addr)
                    })
                    .or((single && passed.len() == 1).then_some(0));
                let ep = match pick {
                    Some(i) => {
                        let (name, sock) = passed.remove(i);
                        tracing::info!(
                            "using the UDP socket passed by systemd ({name}) on {} instead of binding {addr}",
                            sock.local_addr().map_or_else(|_| "?".into(), |a| a.to_string())
                        );
                        transport::server_endpoint_on(sock, &tls)
                    }
                    None => transport::server_endpoint(addr, &tls),
                }
                .with_context(|| format!("stream server on {addr}"))?;
                endpoints.push((ep, Arc::new(hubs)));
            }
        }
        let stop = Arc::new(tokio::sync::Notify::new());
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("stream server".into())
            .spawn(move || {
                rt.block_on(async move {
                    for (ep, hubs) in &endpoints {
                        tokio::spawn(accept_loop(ep.clone(), hubs.clone()));
                    }
                    stop2.notified().await;
                    for (ep, _) in &endpoints {
                        ep.close(0u32.into(), b"shutting down");
                    }
                    for (ep, _) in &endpoints {
                        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(Some(Servers {
            thread: Some(thread),
            stop,
        }))
    }

    /// Closes every connection and waits for the server thread.
    pub fn stop(mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(ep: quinn::Endpoint, hubs: Arc<HashMap<String, Arc<Hub>>>) {
    while let Some(incoming) = ep.accept().await {
        let hubs = hubs.clone();
        tokio::spawn(async move {
            let Ok(conn) = transport::accept(incoming).await else {
                return;
            };
            let peer = conn.remote_address().to_string();
            loop {
                match FramedStream::accept(&conn).await {
                    Ok(fs) => {
                        // A replica's messages are small: a longer frame is refused at its
                        // length, so a peer cannot make the primary buffer or decode 16 MiB
                        // per stream.
                        let fs = fs.with_frame_limit(MAX_REPLICA_FRAME_LEN);
                        let hubs = hubs.clone();
                        let peer = peer.clone();
                        tokio::spawn(async move {
                            if let Err(e) = serve(fs, hubs, &peer).await {
                                tracing::info!(peer = %peer, "replica stream ended: {e:#}");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::info!(peer = %peer, "replica disconnected: {e}");
                        break;
                    }
                }
            }
        });
    }
}

/// One replica stream: its session, fed from the hub, until either side ends it.
async fn serve(
    mut fs: FramedStream,
    hubs: Arc<HashMap<String, Arc<Hub>>>,
    peer: &str,
) -> Result<()> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, fs.recv())
        .await
        .map_err(|_| anyhow!("no Hello within {HELLO_TIMEOUT:?}"))??
        .ok_or_else(|| anyhow!("stream closed before Hello"))?;
    // An unknown name gets a session of some database, which refuses it with "Database not
    // found".
    let hub = match &first {
        Message::Hello { db, .. } => hubs.get(db.as_str()),
        _ => None,
    }
    .or_else(|| hubs.values().next())
    .cloned()
    .ok_or_else(|| anyhow!("no database served"))?;
    let mut rx = hub.changed.subscribe();
    // A replica that arrives while capture is still starting (its first datagram may be what
    // started the service, by socket activation) waits for the position instead of an error.
    let waited = tokio::time::timeout(POSITION_WAIT, async {
        while hub.position().1.is_none() {
            if rx.changed().await.is_err() {
                break;
            }
        }
    })
    .await;
    if waited.is_err() {
        tracing::warn!(db = %hub.name(), peer = %peer, "capture has not started within {POSITION_WAIT:?}: the replica is told to retry");
    }
    let (page_size, pos) = hub.position();
    let mut s = PrimarySession::with_config(
        hub.name(),
        page_size.max(512),
        PrimaryConfig::default(),
        now_ms(),
    );
    if let Some((p, c)) = pos {
        s.set_position(p.generation, p.txid, c);
    }
    // Tracked from the position it says it has (same generation), else from nothing.
    let has = match (&first, pos) {
        (Message::Hello { pos: Some(h), .. }, Some((p, _))) if h.generation == p.generation => {
            h.txid
        }
        _ => 0,
    };
    let track = hub.track(peer, has);
    s.handle_message(now_ms(), first);
    let mut buf = Vec::new();
    session_loop(
        &mut s,
        &mut fs,
        &hub,
        &mut rx,
        &mut buf,
        peer,
        track.as_ref(),
    )
    .await
}

/// The transactions after `after` (at least one): from the hub's memory when it reaches back
/// that far, else from the session's [`HistoryFeed`] (started, or started again, from `after`).
async fn history_after(
    hub: &Hub,
    feed: &mut Option<HistoryFeed>,
    after: Pos,
) -> Result<Vec<Arc<Txn>>, History> {
    loop {
        if let Some(v) = hub.recent_after(after).filter(|v| !v.is_empty()) {
            *feed = None;
            return Ok(v);
        }
        if feed.as_ref().is_none_or(|f| f.last != after) {
            *feed = Some(HistoryFeed::start(hub, after));
        }
        let f = feed.as_mut().expect("a feed");
        match f.rx.recv().await {
            Some(Ok(v)) if !v.is_empty() => {
                f.last = v[v.len() - 1].pos();
                f.delivered = true;
                return Ok(v);
            }
            Some(Ok(_)) => {}
            Some(Err(why)) => {
                *feed = None;
                return Err(History::Unavailable(why));
            }
            // The walk ended where storage did, a moment ago: memory, or a new walk, goes on.
            None if f.delivered => *feed = None,
            None => {
                *feed = None;
                return Err(History::Unavailable(format!(
                    "transactions after {after} could not be read back from storage"
                )));
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn session_loop(
    s: &mut PrimarySession,
    fs: &mut FramedStream,
    hub: &Arc<Hub>,
    rx: &mut watch::Receiver<u64>,
    buf: &mut Vec<u8>,
    peer: &str,
    track: Option<&ReplicaTrack>,
) -> Result<()> {
    let feed = &mut None;
    loop {
        while let Some(ev) = s.poll_event() {
            match ev {
                PrimaryEvent::NeedTxns { after } => match history_after(hub, feed, after).await {
                    Ok(txns) => {
                        for t in txns {
                            s.push_shared(t);
                        }
                    }
                    Err(History::Unavailable(why)) => {
                        tracing::warn!(db = %hub.name(), peer = %peer, "{why}: the replica must restore");
                        s.history_unavailable();
                    }
                },
                PrimaryEvent::RestoreConfigRequested => match &hub.restore_config {
                    Some(c) => {
                        tracing::info!(db = %hub.name(), peer = %peer, "new replica: sending the restore config");
                        s.send_restore_config(c.clone())?;
                    }
                    None => stream_snapshot(s, fs, hub, buf, peer).await?,
                },
                PrimaryEvent::NeedSnapshot => stream_snapshot(s, fs, hub, buf, peer).await?,
                PrimaryEvent::Acked { txid, lag } => {
                    tracing::trace!(db = %hub.name(), peer = %peer, txid, lag_ms = lag.ms, "ack");
                    if let Some(t) = track {
                        t.acked(txid);
                    }
                }
                PrimaryEvent::Error(e) => {
                    tracing::info!(db = %hub.name(), peer = %peer, "replica session: {e}");
                }
                _ => {}
            }
        }
        buf.clear();
        while s.poll_transmit(buf) {
            fs.send_frames(buf).await?;
            buf.clear();
        }
        if s.is_closed() {
            let _ = fs.finish();
            // Give the peer a moment to read the last frames (an error message).
            let _ = tokio::time::timeout(Duration::from_secs(1), fs.recv()).await;
            return Ok(());
        }
        let wake = s.poll_timeout().unwrap_or(now_ms() + 1000);
        let sleep = Duration::from_millis(wake.saturating_sub(now_ms()));
        tokio::select! {
            m = fs.recv() => match m? {
                Some(m) => s.handle_message(now_ms(), m),
                None => return Ok(()),
            },
            r = rx.changed() => {
                if r.is_err() {
                    return Ok(());
                }
                let (_, pos) = hub.position();
                if let Some((p, c)) = pos {
                    s.set_position(p.generation, p.txid, c);
                }
            }
            _ = tokio::time::sleep(sleep) => s.handle_timeout(now_ms()),
        }
    }
}

/// Streams the latest backup as a snapshot (the replica could not restore from storage).
async fn stream_snapshot(
    s: &mut PrimarySession,
    fs: &mut FramedStream,
    hub: &Arc<Hub>,
    buf: &mut Vec<u8>,
    peer: &str,
) -> Result<()> {
    tracing::info!(db = %hub.name(), peer = %peer, "streaming a snapshot to the replica");
    let h = hub.clone();
    let snap = tokio::task::spawn_blocking(move || h.build_snapshot()).await??;
    let r = snap.restored.as_ref().expect("built");
    s.send_snapshot_begin(r.generation, r.txid, r.db_pages, r.db_checksum)?;
    let ps = r.page_size as usize;
    let per = (SNAPSHOT_BATCH_BYTES / ps).max(1);
    let file = std::fs::File::open(&snap.path)?;
    let mut pgno = 1u32;
    let mut data = vec![0u8; per * ps];
    while pgno <= r.db_pages {
        let n = per.min((r.db_pages - pgno + 1) as usize);
        std::os::unix::fs::FileExt::read_exact_at(
            &file,
            &mut data[..n * ps],
            (pgno as u64 - 1) * ps as u64,
        )?;
        let pages = (0..n)
            .map(|i| (pgno + i as u32, data[i * ps..(i + 1) * ps].to_vec()))
            .collect();
        s.send_snapshot_pages(pages)?;
        pgno += n as u32;
        buf.clear();
        if s.poll_transmit(buf) {
            fs.send_frames(buf).await?;
        }
    }
    s.send_snapshot_end()?;
    tracing::info!(db = %hub.name(), peer = %peer, txid = r.txid, pages = r.db_pages, "snapshot streamed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(txid: u64, bytes: usize) -> Arc<Txn> {
        Arc::new(Txn {
            generation: 1,
            header: TxnInfo {
                txid,
                time_ms: 0,
                db_pages: 1,
                db_checksum: 0,
            },
            pages: vec![(1, vec![0; bytes])],
        })
    }

    fn kept(st: &HubState) -> Vec<u64> {
        st.recent.iter().map(|t| t.header.txid).collect()
    }

    /// Room for a write-out is made before its pages are copied, as publishing it would make
    /// it afterwards: with a second's worth of transactions (`sync-interval = "1s"` at
    /// 10,000 tx/s, more than the hub keeps) the old ones no longer stay beside the new copy.
    #[test]
    fn room_for_a_write_out_is_made_before_its_pages_are_copied() {
        let mut st = HubState::default();
        for txid in 1..=4 {
            let t = txn(txid, 2 << 20);
            st.recent_bytes += t.data_len() + 64;
            st.recent.push_back(t);
        }
        // Publishing trims to what fits: 4 × (2 MiB + 64) is just over 8 MiB.
        st.trim(0);
        assert_eq!(kept(&st), [2, 3, 4]);
        // 3 MiB coming: one more goes, as it would once they are published.
        st.trim(3 << 20);
        assert_eq!(kept(&st), [3, 4]);
        // A write-out as large as the hub keeps: all but the latest (replicas up to date
        // still find their position in it).
        st.trim(RECENT_BYTES);
        assert_eq!(kept(&st), [4]);
        assert_eq!(st.recent_bytes, (2 << 20) + 64);
    }
}
