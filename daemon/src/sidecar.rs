//! `replica-sidecar`: a read replica that follows a primary over QUIC.
//!
//! For each configured database with a `type = "stream"` target (the primary to follow):
//!
//! * **Start**: a database that exists and has a replica position file resumes where it was
//!   (after checking its whole-database checksum against the position); a missing database, or
//!   `--force-restore`, or a position that does not match, restores: from the storage the primary
//!   names (`RestoreConfig`), or — if that storage cannot be read here — from a snapshot the
//!   primary streams. Either way the new file is verified before it replaces anything.
//! * **Follow**: every primary transaction is applied as one SQLite write transaction
//!   ([`crate::apply`]), so readers never see half of one. Acknowledgements tell the primary
//!   how far the replica is.
//! * **Position**: `DB.replited-position` holds the last applied position with its checksum and
//!   the primary's page-1 stamp, and the one before it. It is written before each transaction
//!   is committed, so after a crash the database matches one of the two.
//! * **Repair**: a new generation, a checksum mismatch, history the primary no longer has, or a
//!   write made on the replica → the app is stopped, the database restored, the app started
//!   again; the reason is logged.
//! * **Supervision** (`--exec CMD`): the app starts once every database has caught up, is
//!   restarted with backoff when it exits, stopped around a rebuild, restarted on a schema
//!   change when asked (`--restart-on-schema-change`), and receives SIGTERM/SIGINT.
//! * A lost primary: reads go on; the replica reconnects with backoff.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use replited_core::hash::{page_hash, DbHashes};
use replited_core::pos::Pos;
use replited_core::proto::{joins_batch, ErrorCode, ProtoError, Txn};
use replited_core::replica::{Applied, Replica, ReplicaConfig, ReplicaEvent, ReplicaState};
use tokio::sync::{mpsc, oneshot, watch};

use crate::apply::{stamp_of, Applier, ApplyError, Checkpointer, Page1Stamp};
use crate::config::{db_name, Config, StreamParams};
use crate::replicate::now_ms;
use crate::restore::{install, remove_db_files, restore, temp_path, RestoreOptions};
use crate::s3::S3Storage;
use crate::server::{parse_restore_config, stream_history, RestoreSource};
use crate::shutdown::Shutdown;
use crate::storage::{FsStorage, Storage};
use crate::transport::{self, ClientTls, FramedStream};
use replited_core::name::FileMeta;

/// Options of `replica-sidecar`.
#[derive(Clone, Debug, Default)]
pub struct SidecarOptions {
    /// Restore even if the database exists.
    pub force_restore: bool,
    /// The app to supervise (run with `sh -c`).
    pub exec: Option<String>,
    /// Restart the app when the primary changes the schema.
    pub restart_on_schema_change: bool,
    /// systemd-unit mode (the app is a unit bound to replited's, e.g. `pocketbase@.service`):
    /// a rebuild exits with [`EXIT_REBUILD`] after marking the database for a restore, so
    /// systemd stops the app, restarts replited (which restores before `READY=1`) and starts
    /// the app again; with `restart_on_schema_change`, a schema change exits the same way
    /// (replited then resumes without a restore).
    pub exit_on_rebuild: bool,
}

/// The exit status of a replica leaving for a rebuild or an app restart in systemd-unit mode
/// (EX_TEMPFAIL; `RestartForceExitStatus=75` in `replited@.service`).
pub const EXIT_REBUILD: u8 = 75;

/// Set when the replica exits for a rebuild (the process's exit status is then
/// [`EXIT_REBUILD`]).
pub static EXITING_FOR_REBUILD: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// A follower's way out in systemd-unit mode.
#[derive(Debug, thiserror::Error)]
#[error("{0}: exiting with status 75 so that systemd stops the app, restarts replited (which restores first) and starts the app again")]
struct ExitForRebuild(String);

/// How often a running restore's progress is looked at (and systemd's start-up timeout
/// extended by [`RESTORE_EXTEND`] while it grows).
const RESTORE_PROGRESS: Duration = Duration::from_secs(5);
/// How much more start-up time a restore asks for, when it starts and at each sign of progress.
const RESTORE_EXTEND: Duration = Duration::from_secs(30);
/// A bucket replica lists the whole prefix every this many polls (the others list only what
/// sorts after the newest file seen).
const FULL_LIST_EVERY: u64 = 10;
/// How often the replica's WAL is checkpointed (by a connection of its own).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// How often a write made on the replica is looked for at most (only when its files changed,
/// where inotify tells).
const LOCAL_WRITE_CHECK: Duration = Duration::from_millis(250);
/// How long a replica whose files did not change goes without looking for a write at most.
const LOCAL_WRITE_RECHECK: Duration = Duration::from_secs(10);
/// Reconnection backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long the app gets to stop after SIGTERM before SIGKILL.
const APP_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The most page data a replica that is behind applies in one SQLite transaction (the
/// transactions already received, merged: one commit, one lock, each page written once).
const BATCH_BYTES: usize = 4 << 20;

/// The client TLS of a replica's stream target, or why it is incomplete.
pub fn client_tls(name: &str, p: &StreamParams) -> Result<ClientTls> {
    let Some(ca) = &p.tls_ca else {
        bail!("replicate \"{name}\": a replica needs params.tls_ca, the CA that signed the primary's certificate (TLS is always on; `replited cert` makes a development CA and certificates)");
    };
    if p.tls_cert.is_some() != p.tls_key.is_some() {
        bail!("replicate \"{name}\": params.tls_cert and params.tls_key go together");
    }
    for (k, f) in [
        ("tls_ca", Some(ca)),
        ("tls_cert", p.tls_cert.as_ref()),
        ("tls_key", p.tls_key.as_ref()),
    ] {
        if let Some(f) = f {
            if !f.is_file() {
                bail!(
                    "replicate \"{name}\": params.{k} = \"{}\" does not exist",
                    f.display()
                );
            }
        }
    }
    let (host, _) = transport::parse_stream_addr(&p.addr)?;
    Ok(ClientTls {
        ca: ca.clone(),
        cert: p.tls_cert.clone(),
        key: p.tls_key.clone(),
        server_name: p.server_name.clone().unwrap_or(host),
    })
}

/// Runs `replica-sidecar` until SIGTERM/SIGINT.
pub fn run(cfg: Config, opts: SidecarOptions) -> Result<()> {
    let mut plans = Vec::new();
    let mut buckets = Vec::new();
    for d in &cfg.databases {
        let dir = crate::storage::parent_dir(&d.db);
        if !dir.is_dir() {
            bail!(
                "{}: db = \"{}\": directory {} does not exist",
                cfg.path.display(),
                d.db.display(),
                dir.display()
            );
        }
        if let Some((name, p)) = d.stream() {
            let tls = client_tls(name, p).with_context(|| cfg.path.display().to_string())?;
            plans.push((d.clone(), p.addr.clone(), tls));
        } else if let Some((name, p)) = d.replicate.iter().find_map(|t| match &t.params {
            crate::config::TargetParams::S3(p) => Some((t.name.as_str(), p)),
            _ => None,
        }) {
            // No primary to follow: the bucket alone.
            let s3 = S3Storage::new(p, &db_name(&d.db), dir)
                .with_context(|| format!("{}: replicate \"{name}\"", cfg.path.display()))?;
            s3.check_readable()
                .with_context(|| format!("{}: replicate \"{name}\"", cfg.path.display()))?;
            buckets.push((d.clone(), s3));
        }
    }
    if plans.is_empty() && buckets.is_empty() {
        bail!(
            "{}: no [[database]] has a replicate target with type = \"stream\" naming the primary to follow (or type = \"s3\" to follow a bucket)",
            cfg.path.display()
        );
    }
    let shutdown = Shutdown::install()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    // A thread turns the signal pipe into the runtime's stop signal.
    let shutdown = Arc::new(shutdown);
    {
        let sd = shutdown.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                sd.wait();
                let _ = stop_tx.send(true);
            })?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let n = plans.len() + buckets.len();
    let health = crate::notify::Health::new(
        crate::config::Role::Replica,
        plans
            .iter()
            .map(|p| &p.0)
            .chain(buckets.iter().map(|b| &b.0))
            .map(|d| d.db.display().to_string())
            .collect(),
    );
    crate::cli::process_metrics(crate::config::Role::Replica);
    crate::http::start(&cfg.http, health.clone())
        .with_context(|| cfg.path.display().to_string())?;
    rt.block_on(async move {
        let (sup_tx, sup_rx) = mpsc::unbounded_channel();
        health.spawn();
        let mut tasks = Vec::new();
        for (i, (d, s3)) in buckets.into_iter().enumerate() {
            let f = BucketFollower {
                index: plans.len() + i,
                db: d.db.clone(),
                busy: d.busy_timeout,
                storage: s3,
                force_restore: opts.force_restore,
                exit_on_rebuild: opts.exit_on_rebuild,
                sup: sup_tx.clone(),
                stop: stop_rx.clone(),
                health: health.clone(),
            };
            tasks.push(tokio::task::spawn_blocking(move || f.run()));
        }
        for (i, (d, addr, tls)) in plans.into_iter().enumerate() {
            let f = Follower {
                index: i,
                name: db_name(&d.db),
                db: d.db.clone(),
                busy: d.busy_timeout,
                addr,
                tls,
                force_restore: opts.force_restore,
                exit_on_rebuild: opts.exit_on_rebuild,
                sup: sup_tx.clone(),
                stop: stop_rx.clone(),
                health: health.clone(),
            };
            tasks.push(tokio::spawn(async move { f.run().await }));
        }
        drop(sup_tx);
        let sup = supervise(n, opts, sup_rx, stop_rx.clone(), health.clone(), shutdown).await;
        let mut result = sup;
        for t in tasks {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
                Err(e) => {
                    if result.is_ok() {
                        result = Err(anyhow!("replica task failed: {e}"));
                    }
                }
            }
        }
        result
    })
}

/// What a follower tells the supervisor.
enum SupMsg {
    /// Database `i` caught up with the primary.
    CaughtUp(usize),
    /// Database `i` is about to be replaced: stop the app, then answer.
    Stop(usize, oneshot::Sender<()>),
    /// The primary changed the schema of a database.
    SchemaChanged,
    /// Follower `i` ended for good (shutdown, or a fatal error).
    Done(usize, Option<String>),
}

/// The app under supervision.
struct App {
    cmd: String,
    child: Option<tokio::process::Child>,
    started: Option<Instant>,
    failures: u32,
    restart_at: Option<tokio::time::Instant>,
}

impl App {
    fn start(&mut self) {
        if self.child.is_some() {
            return;
        }
        self.restart_at = None;
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!("exec {}", self.cmd))
            .kill_on_drop(true);
        if crate::s3::cert_file_was_set() {
            // replited's own setting; the app gets the environment replited was given.
            cmd.env_remove("SSL_CERT_FILE");
        }
        match cmd.spawn() {
            Ok(c) => {
                tracing::info!(pid = c.id().unwrap_or(0), "started the app: {}", self.cmd);
                self.child = Some(c);
                self.started = Some(Instant::now());
            }
            Err(e) => {
                tracing::error!("cannot start the app ({}): {e}", self.cmd);
                self.schedule_restart();
            }
        }
    }

    fn schedule_restart(&mut self) {
        if self
            .started
            .is_some_and(|s| s.elapsed() > Duration::from_secs(60))
        {
            self.failures = 0;
        }
        let delay = Duration::from_millis(500 * (1u64 << self.failures.min(6)))
            .min(Duration::from_secs(30));
        self.failures += 1;
        tracing::warn!("restarting the app in {delay:?}");
        self.restart_at = Some(tokio::time::Instant::now() + delay);
    }

    /// SIGTERM, then SIGKILL after [`APP_STOP_TIMEOUT`].
    async fn stop(&mut self, why: &str) {
        self.restart_at = None;
        let Some(mut c) = self.child.take() else {
            return;
        };
        tracing::info!("stopping the app: {why}");
        if let Some(pid) = c.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(APP_STOP_TIMEOUT, c.wait()).await {
            Ok(Ok(st)) => tracing::info!("the app stopped: {st}"),
            Ok(Err(e)) => tracing::warn!("waiting for the app: {e}"),
            Err(_) => {
                tracing::warn!("the app did not stop within {APP_STOP_TIMEOUT:?}: killing it");
                let _ = c.kill().await;
            }
        }
    }
}

async fn supervise(
    n: usize,
    opts: SidecarOptions,
    mut rx: mpsc::UnboundedReceiver<SupMsg>,
    mut stop: watch::Receiver<bool>,
    health: Arc<crate::notify::Health>,
    shutdown: Arc<Shutdown>,
) -> Result<()> {
    let mut ready = vec![false; n];
    let mut done = vec![false; n];
    let mut fatal = None;
    let mut app = opts.exec.clone().map(|cmd| App {
        cmd,
        child: None,
        started: None,
        failures: 0,
        restart_at: None,
    });
    loop {
        let restart_at = app.as_ref().and_then(|a| a.restart_at);
        let child_exit = async {
            match app.as_mut().and_then(|a| a.child.as_mut()) {
                Some(c) => c.wait().await.ok(),
                None => std::future::pending().await,
            }
        };
        let restart = async {
            match restart_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            m = rx.recv() => match m {
                None => break,
                Some(SupMsg::CaughtUp(i)) => {
                    ready[i] = true;
                    health.set_ready(i);
                    if let Some(a) = app.as_mut() {
                        if ready.iter().all(|r| *r) && a.child.is_none() && a.restart_at.is_none() {
                            a.start();
                        }
                    }
                }
                Some(SupMsg::Stop(i, ack)) => {
                    ready[i] = false;
                    if let Some(a) = app.as_mut() {
                        a.stop("the replica is being rebuilt").await;
                    }
                    let _ = ack.send(());
                }
                Some(SupMsg::SchemaChanged) => {
                    if let Some(a) = app.as_mut().filter(|_| opts.restart_on_schema_change) {
                        if a.child.is_some() {
                            a.stop("the primary changed the schema").await;
                            a.start();
                        }
                    } else if opts.exit_on_rebuild && opts.restart_on_schema_change {
                        let e = ExitForRebuild("the primary changed the schema".into());
                        tracing::warn!("{e}");
                        EXITING_FOR_REBUILD.store(true, std::sync::atomic::Ordering::SeqCst);
                        fatal.get_or_insert(e.to_string());
                        shutdown.trigger();
                    }
                }
                Some(SupMsg::Done(i, err)) => {
                    done[i] = true;
                    if let Some(e) = err {
                        fatal.get_or_insert(e);
                        // One database failing for good stops the others: systemd's restart
                        // policy applies to the whole service.
                        shutdown.trigger();
                    }
                    if done.iter().all(|d| *d) {
                        break;
                    }
                }
            },
            st = child_exit => {
                let a = app.as_mut().expect("a child exited");
                a.child = None;
                match st {
                    Some(st) => tracing::warn!("the app exited: {st}"),
                    None => tracing::warn!("the app exited"),
                }
                a.schedule_restart();
            }
            _ = restart => {
                if let Some(a) = app.as_mut() {
                    a.restart_at = None;
                    if ready.iter().all(|r| *r) {
                        a.start();
                    }
                }
            }
            _ = stop.wait_for(|s| *s) => {
                health.stopping();
                if let Some(a) = app.as_mut() {
                    a.stop("replited is stopping (signal)").await;
                }
                // The followers stop on the same signal; wait for them.
                while let Some(m) = rx.recv().await {
                    match m {
                        SupMsg::Stop(_, ack) => { let _ = ack.send(()); }
                        SupMsg::Done(_, Some(e)) => { fatal.get_or_insert(e); }
                        _ => {}
                    }
                }
                break;
            }
        }
    }
    if let Some(a) = app.as_mut() {
        a.stop("replited is stopping").await;
    }
    match fatal {
        Some(e) => Err(anyhow!(e)),
        None => Ok(()),
    }
}

/// One database following its primary.
struct Follower {
    index: usize,
    name: String,
    db: PathBuf,
    busy: Duration,
    addr: String,
    tls: ClientTls,
    force_restore: bool,
    exit_on_rebuild: bool,
    sup: mpsc::UnboundedSender<SupMsg>,
    stop: watch::Receiver<bool>,
    health: Arc<crate::notify::Health>,
}

/// How a conversation ended.
enum End {
    Shutdown,
    Reconnect(String),
}

/// The local side of one database: the applier, the position file and a snapshot being
/// received.
struct Local {
    /// Held while the database file is replaced (see [`crate::apply::checkpoint_loop`]).
    file_lock: Arc<tokio::sync::Mutex<()>>,
    db: PathBuf,
    busy: Duration,
    applier: Option<Applier>,
    position: PositionFile,
    snapshot: Option<SnapshotFile>,
    schema_cookie: Option<u32>,
}

impl Follower {
    async fn run(self) -> Result<()> {
        let r = self.run_inner().await;
        let _ = self.sup.send(SupMsg::Done(
            self.index,
            r.as_ref()
                .err()
                .map(|e| format!("{}: {e:#}", self.db.display())),
        ));
        r
    }

    async fn run_inner(&self) -> Result<()> {
        // Checkpoints run beside the applier, never in its way.
        let file_lock = Arc::new(tokio::sync::Mutex::new(()));
        let ckpt = Checkpointer::start(&self.db, CHECKPOINT_EVERY, file_lock.clone())?;
        let r = self.follow(file_lock).await;
        let _ = tokio::task::spawn_blocking(move || ckpt.stop()).await;
        r
    }

    async fn follow(&self, file_lock: Arc<tokio::sync::Mutex<()>>) -> Result<()> {
        let mut local = Local {
            file_lock,
            db: self.db.clone(),
            busy: self.busy,
            applier: None,
            position: PositionFile::open(&self.db)?,
            snapshot: None,
            schema_cookie: None,
        };
        let applied = if self.force_restore {
            tracing::info!(db = %self.db.display(), "--force-restore: the database will be restored from the primary's backup");
            None
        } else if !self.db.exists() {
            tracing::info!(db = %self.db.display(), "no database yet: it will be restored from the primary's backup");
            None
        } else {
            match local.resume() {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::warn!(db = %self.db.display(), "cannot resume ({e:#}): the database will be restored");
                    None
                }
            }
        };
        if let Some(a) = applied {
            tracing::info!(
                db = %self.db.display(),
                generation = a.pos.generation,
                txid = a.pos.txid,
                "resuming at txid {} without a restore",
                a.pos.txid
            );
        }
        let (host, port) = transport::parse_stream_addr(&self.addr)?;
        let endpoint = transport::client_endpoint(&self.tls)?;
        let mut replica = Replica::new(ReplicaConfig::new(&self.name), applied, now_ms());
        let mut backoff = BACKOFF_MIN;
        let mut stop = self.stop.clone();
        // Writes made on the replica are looked for when its files change (else every
        // LOCAL_WRITE_CHECK).
        let changes = crate::dbwatch::DbWatch::new(&self.db, &["", "-wal"])
            .map_err(std::io::Error::from)
            .and_then(crate::dbwatch::DbWatch::into_async)
            .map_err(|e| {
                tracing::debug!(db = %self.db.display(), "no inotify watch for local writes ({e}): looking every {LOCAL_WRITE_CHECK:?}")
            })
            .ok();
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            self.health.beat(self.index);
            self.health.set_status(self.index, || {
                format!("{}: connecting to the primary at {}", self.name, self.addr)
            });
            let conn = tokio::select! {
                c = transport::connect(&endpoint, &host, port, &self.tls.server_name) => c,
                _ = stop.wait_for(|s| *s) => return Ok(()),
            };
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(db = %self.db.display(), "cannot reach the primary at {}: {e}; retrying in {backoff:?} (reads go on)", self.addr);
                    self.health.error(
                        self.index,
                        "replication",
                        &format_args!("cannot reach the primary at {}: {e}", self.addr),
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.wait_for(|s| *s) => return Ok(()),
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            let fs = match FramedStream::open(&conn).await {
                Ok(fs) => fs,
                Err(e) => {
                    tracing::warn!(db = %self.db.display(), "opening a stream to the primary: {e}");
                    continue;
                }
            };
            replica.reset(now_ms());
            let started = Instant::now();
            let end = self
                .converse(&mut replica, fs, &mut local, changes.as_ref())
                .await;
            conn.close(0u32.into(), b"bye");
            match end {
                Ok(End::Shutdown) => return Ok(()),
                Ok(End::Reconnect(why)) => {
                    if started.elapsed() > Duration::from_secs(10) {
                        backoff = BACKOFF_MIN;
                    }
                    tracing::warn!(db = %self.db.display(), "connection to the primary lost: {why}; reconnecting in {backoff:?} (reads go on)");
                    self.health.error(
                        self.index,
                        "replication",
                        &format_args!("connection to the primary lost: {why}"),
                    );
                }
                Err(e) => return Err(e),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection's conversation.
    async fn converse(
        &self,
        replica: &mut Replica,
        mut fs: FramedStream,
        local: &mut Local,
        changes: Option<&tokio::io::unix::AsyncFd<crate::dbwatch::DbWatch>>,
    ) -> Result<End> {
        let mut stop = self.stop.clone();
        let mut buf = Vec::new();
        let mut caught_up_said = false;
        // At most one look per LOCAL_WRITE_CHECK; with a watch, only after the files changed
        // (the applier's own writes included: a look costs one `PRAGMA data_version` then),
        // or LOCAL_WRITE_RECHECK after the last look.
        let mut check = tokio::time::interval(LOCAL_WRITE_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut look = true;
        let mut looked = tokio::time::Instant::now();
        loop {
            while let Some(ev) = replica.poll_event() {
                if let Err(e) = self.on_event(replica, local, ev).await {
                    if e.is::<ExitForRebuild>() {
                        return Err(e);
                    }
                    // Nothing half-done stays: a transaction was rolled back, a snapshot's
                    // temporary file removed. A new conversation starts from what is applied.
                    tracing::error!(db = %self.db.display(), "{e:#}");
                    local.snapshot = None;
                    return Ok(End::Reconnect(format!("{e:#}")));
                }
            }
            buf.clear();
            if replica.poll_transmit(&mut buf) {
                if let Err(e) = fs.send_frames(&buf).await {
                    return Ok(End::Reconnect(e.to_string()));
                }
            }
            match replica.state() {
                ReplicaState::Failed { error } => {
                    return match error {
                        ProtoError::Remote(ErrorCode::DatabaseNotFound) => Err(anyhow!(
                            "Database not found: the primary at {} does not serve \"{}\" (the replica's db file name must match the primary's)",
                            self.addr,
                            self.name
                        )),
                        ProtoError::Remote(ErrorCode::VersionMismatch)
                        | ProtoError::VersionMismatch { .. } => Err(anyhow!(
                            "the primary at {} speaks another protocol version: upgrade both to the same replited",
                            self.addr
                        )),
                        e => Ok(End::Reconnect(e.to_string())),
                    };
                }
                ReplicaState::Streaming if !caught_up_said => {
                    caught_up_said = true;
                    let a = replica.applied();
                    tracing::info!(
                        db = %self.db.display(),
                        generation = a.map_or(0, |a| a.pos.generation),
                        txid = a.map_or(0, |a| a.pos.txid),
                        lag_ms = replica.lag_ms(now_ms()).unwrap_or(0),
                        "caught up with the primary: streaming"
                    );
                    self.health.set_status_now(
                        self.index,
                        format!(
                            "{}: streaming at txid {}, lag {} ms",
                            self.name,
                            a.map_or(0, |a| a.pos.txid),
                            replica.lag_ms(now_ms()).unwrap_or(0)
                        ),
                    );
                    let _ = self.sup.send(SupMsg::CaughtUp(self.index));
                }
                ReplicaState::Streaming => {}
                _ => caught_up_said = false,
            }
            self.health.beat(self.index);
            if replica.state() == ReplicaState::Streaming {
                self.health.set_lag(self.index, replica.lag_ms(now_ms()));
            }
            self.health
                .set_status(self.index, || match replica.state() {
                    ReplicaState::Streaming => format!(
                        "{}: streaming at txid {}, lag {} ms",
                        self.name,
                        replica.applied().map_or(0, |a| a.pos.txid),
                        replica.lag_ms(now_ms()).unwrap_or(0)
                    ),
                    ReplicaState::CatchingUp { target } => format!(
                        "{}: catching up, txid {} of {target}",
                        self.name,
                        replica.applied().map_or(0, |a| a.pos.txid)
                    ),
                    ReplicaState::Restoring { .. } => format!("{}: restoring", self.name),
                    _ => format!("{}: connecting", self.name),
                });
            let wake = replica.poll_timeout().unwrap_or(now_ms() + 1000);
            let sleep = Duration::from_millis(wake.saturating_sub(now_ms()));
            tokio::select! {
                m = fs.recv() => match m {
                    Ok(Some(m)) => {
                        replica.handle_message(now_ms(), m);
                        // What has arrived meanwhile is taken too (the primary's window bounds
                        // it): a replica that is behind applies it in one transaction.
                        loop {
                            match fs.try_recv() {
                                Ok(Some(m)) => replica.handle_message(now_ms(), m),
                                Ok(None) => break,
                                Err(e) => return Ok(End::Reconnect(e.to_string())),
                            }
                        }
                    }
                    Ok(None) => return Ok(End::Reconnect("the primary closed the stream".into())),
                    Err(e) => return Ok(End::Reconnect(e.to_string())),
                },
                _ = tokio::time::sleep(sleep) => replica.handle_timeout(now_ms()),
                _ = crate::dbwatch::changed(changes, looked + LOCAL_WRITE_RECHECK), if !look => look = true,
                _ = check.tick(), if look => {
                    look = changes.is_none();
                    looked = tokio::time::Instant::now();
                    if let Some(a) = local.applier.as_mut() {
                        match a.local_write_detected() {
                            Ok(true) => {
                                tracing::warn!(db = %self.db.display(), "a write was made on the replica (it is read-only): rebuilding it from the primary");
                                replica.local_write_detected(now_ms());
                            }
                            Ok(false) => {}
                            Err(e) => tracing::warn!(db = %self.db.display(), "checking for local writes: {e:#}"),
                        }
                    }
                }
                _ = stop.wait_for(|s| *s) => {
                    let _ = fs.finish();
                    return Ok(End::Shutdown);
                }
            }
        }
    }

    /// Stops the app (when supervised) before the database is replaced.
    async fn stop_app(&self) {
        let (tx, rx) = oneshot::channel();
        if self.sup.send(SupMsg::Stop(self.index, tx)).is_ok() {
            let _ = rx.await;
        }
    }

    async fn on_event(
        &self,
        replica: &mut Replica,
        local: &mut Local,
        ev: ReplicaEvent,
    ) -> Result<()> {
        let db = self.db.display().to_string();
        match ev {
            ReplicaEvent::Apply { txn } => {
                let first = txn.header.txid;
                let generation = txn.generation;
                let batch = local.run_from(txn, |prev, bytes| {
                    replica.poll_next_txn(prev, bytes, BATCH_BYTES)
                });
                let n = batch.len() as u64;
                let txid = first + n - 1;
                match local.apply_txns(batch)? {
                    Ok((ck, schema_changed)) => {
                        replica.handle_applied_through(now_ms(), txid, ck);
                        self.health.applied(self.index, generation, txid, n);
                        self.health.set_lag(self.index, replica.lag_ms(now_ms()));
                        if schema_changed {
                            tracing::info!(db = %db, txid, "the primary changed the schema");
                            let _ = self.sup.send(SupMsg::SchemaChanged);
                        }
                    }
                    Err(e) => match e {
                        ApplyError::ChecksumMismatch { actual, .. } => {
                            tracing::error!(db = %db, "{e}");
                            replica.handle_applied_through(now_ms(), txid, actual);
                        }
                        ApplyError::LocalWrite { .. } => {
                            tracing::warn!(db = %db, "{e}");
                            replica.local_write_detected(now_ms());
                        }
                        // Nothing was applied: it and what came after it are forgotten, so
                        // that the primary's resends on the next connection are taken. After
                        // an SQLite error the database is opened again (as at start-up, checked
                        // against the position file) rather than trusting that connection.
                        e => {
                            replica.apply_failed(now_ms(), first);
                            if matches!(e, ApplyError::Sqlite { .. } | ApplyError::Reread { .. }) {
                                local.applier = None;
                                if let Err(re) = local.resume() {
                                    tracing::error!(db = %db, "reopening the database after an error: {re:#}");
                                    replica.local_write_detected(now_ms());
                                }
                            }
                            return Err(e.into());
                        }
                    },
                }
            }
            ReplicaEvent::Rebuild { reason } => {
                tracing::warn!(db = %db, "the replica must be rebuilt: {reason}");
                if self.exit_on_rebuild {
                    return Err(local.exit_for_rebuild(&reason.to_string())?);
                }
                self.stop_app().await;
                local.applier = None;
            }
            ReplicaEvent::Restore { storage } => {
                self.stop_app().await;
                local.applier = None;
                match local.restore_from(&storage).await {
                    Ok(a) => {
                        replica.handle_restored(now_ms(), a.pos, a.db_checksum);
                    }
                    Err(e) => {
                        tracing::warn!(db = %db, "restoring from the primary's backup failed: {e:#}; asking the primary to stream a snapshot");
                        replica.restore_failed(now_ms());
                    }
                }
            }
            ReplicaEvent::StartSnapshot {
                generation,
                txid,
                page_size,
                db_pages,
                ..
            } => {
                self.stop_app().await;
                local.applier = None;
                tracing::info!(db = %db, generation, txid, pages = db_pages, "receiving a snapshot from the primary");
                local.snapshot = Some(SnapshotFile::create(&self.db, page_size)?);
            }
            ReplicaEvent::SnapshotPages { pages } => {
                let s = local
                    .snapshot
                    .as_mut()
                    .ok_or_else(|| anyhow!("snapshot pages without a snapshot"))?;
                s.write(&pages)?;
            }
            ReplicaEvent::FinishSnapshot { pos, db_checksum } => {
                let s = local
                    .snapshot
                    .take()
                    .ok_or_else(|| anyhow!("snapshot end without a snapshot"))?;
                let lock = local.file_lock.clone();
                let _held = lock.lock().await;
                let ck = local.install_snapshot(s, pos, db_checksum)?;
                replica.handle_applied(now_ms(), pos.txid, ck);
            }
            ReplicaEvent::PrimaryError { code, message } => {
                tracing::warn!(db = %db, "the primary says: {message} ({code:?})");
            }
            ReplicaEvent::Error(e) => {
                tracing::warn!(db = %db, "replication protocol: {e}");
            }
            _ => {}
        }
        Ok(())
    }
}

impl Local {
    /// systemd-unit mode: forgets the recorded position (so the next start restores instead of
    /// resuming) and returns the error that makes replited exit with [`EXIT_REBUILD`].
    fn exit_for_rebuild(&mut self, why: &str) -> Result<anyhow::Error> {
        self.applier = None;
        let p = PositionFile::path_for(&self.db);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
        }
        crate::storage::sync_dir(crate::storage::parent_dir(&self.db))?;
        EXITING_FOR_REBUILD.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(ExitForRebuild(format!("the replica must be rebuilt: {why}")).into())
    }

    /// Opens the existing database at the position its position file names.
    fn resume(&mut self) -> Result<Applied> {
        let (cur, prev) = self
            .position
            .read()?
            .ok_or_else(|| anyhow!("no replica position is recorded for it"))?;
        let mut last = None;
        for e in std::iter::once(cur).chain(prev) {
            let a = Applier::open_with_stamp(&self.db, self.busy, e.stamp)?;
            if a.checksum() == e.checksum {
                return Ok(self.adopt(a, &e));
            }
            last = Some((e, a.checksum()));
        }
        let (e, got) = last.expect("at least one entry");
        bail!(
            "its content (checksum {got:#018x}) is not the recorded position's (txid {}, checksum {:#018x})",
            e.txid,
            e.checksum
        )
    }

    /// `first` and the transactions `next` hands out after it — given the last one taken and
    /// the page bytes taken so far, it returns one that [`joins_batch`] — to be applied as one
    /// SQLite transaction. `first` goes alone when it shrinks the database (see
    /// [`joins_batch`]).
    fn run_from(&self, first: Txn, mut next: impl FnMut(&Txn, usize) -> Option<Txn>) -> Vec<Txn> {
        let alone = self
            .applier
            .as_ref()
            .is_none_or(|a| first.header.db_pages < a.page_count());
        let mut bytes = first.data_len();
        let mut run = vec![first];
        if !alone {
            while let Some(t) = next(&run[run.len() - 1], bytes) {
                bytes += t.data_len();
                run.push(t);
            }
        }
        run
    }

    /// Applies primary transactions — one, or a run that each [`joins_batch`] the one before
    /// (a replica that is behind) — as one SQLite transaction: readers see the state after the
    /// last. The position file names that state before the commit (and names the state before
    /// it again if it is refused), so after a crash the database matches one of its two
    /// entries. Ok((checksum, the schema changed)), or why it was refused; the outer error is
    /// the position file's.
    fn apply_txns(&mut self, batch: Vec<Txn>) -> Result<Result<(u64, bool), ApplyError>> {
        let first = batch.first().map_or(0, |t| t.header.txid);
        let Some(txn) = Txn::merged(batch) else {
            bail!("no transaction to apply");
        };
        let txn = &txn;
        let txid = txn.header.txid;
        let Some(a) = self.applier.as_mut() else {
            bail!("transaction {txid} arrived with no database to apply it to");
        };
        let before = Entry {
            generation: txn.generation,
            txid: a.applied_txid().unwrap_or(0),
            checksum: a.checksum(),
            stamp: a.stamp(),
        };
        let after = Entry {
            generation: txn.generation,
            txid,
            checksum: txn.header.db_checksum,
            stamp: match txn.pages.first() {
                Some((1, p)) => stamp_of(p),
                _ => before.stamp,
            },
        };
        self.position.write(&after, Some(&before))?;
        match a.apply_run(
            first,
            txid,
            txn.header.db_pages,
            txn.header.db_checksum,
            &txn.pages,
        ) {
            Ok(ck) => {
                let cookie = a.schema_cookie();
                let changed = self.schema_cookie.is_some_and(|c| c != cookie);
                self.schema_cookie = Some(cookie);
                Ok(Ok((ck, changed)))
            }
            Err(e) => {
                self.position.write(&before, None)?;
                Ok(Err(e))
            }
        }
    }

    fn adopt(&mut self, mut a: Applier, e: &Entry) -> Applied {
        a.set_applied_txid(e.txid);
        if let Err(err) = a.tune_for_streaming() {
            tracing::warn!(db = %self.db.display(), "{err:#}");
        }
        self.schema_cookie = Some(a.schema_cookie());
        self.applier = Some(a);
        Applied {
            pos: Pos {
                generation: e.generation,
                txid: e.txid,
            },
            db_checksum: e.checksum,
        }
    }

    /// Restores from the storage the primary described (a directory this host can read).
    async fn restore_from(&mut self, storage: &[u8]) -> Result<Applied> {
        let lock = self.file_lock.clone();
        let _held = lock.lock().await;
        let src: Box<dyn Storage> = match parse_restore_config(storage)? {
            RestoreSource::Fs(dir) => {
                if !dir.is_dir() {
                    bail!(
                        "the primary's backup directory {} is not reachable from here",
                        dir.display()
                    );
                }
                Box::new(FsStorage::at(dir))
            }
            RestoreSource::S3(p, name) => Box::new(S3Storage::new(
                &p,
                &name,
                crate::storage::parent_dir(&self.db),
            )?),
        };
        let src_name = src.describe();
        tracing::info!(db = %self.db.display(), "restoring from the primary's backup {src_name}");
        let out = self.db.clone();
        let tmp = temp_path(&self.db);
        let mut job = tokio::task::spawn_blocking(move || {
            let src = &*src;
            restore(
                &[src],
                &RestoreOptions {
                    target: replited_core::plan::Target::Latest,
                    output: out,
                    force: true,
                    if_db_not_exists: false,
                    if_replica_exists: false,
                },
            )
        });
        // A restore starting asks systemd for more start-up time, and again while it makes
        // progress (its file grows), saying how far it is.
        let status = format!("{}: restoring from {}", db_name(&self.db), src_name);
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::ExtendTimeoutUsec(RESTORE_EXTEND.as_micros() as u32),
            sd_notify::NotifyState::Status(&status),
        ]);
        let mut written = 0u64;
        let r = loop {
            tokio::select! {
                r = &mut job => break r,
                _ = tokio::time::sleep(RESTORE_PROGRESS) => {
                    let now = std::fs::metadata(&tmp).map_or(0, |m| m.len());
                    if now > written {
                        written = now;
                        let status = format!("{}: restoring, {} MB written", db_name(&self.db), now >> 20);
                        let _ = sd_notify::notify(&[
                            sd_notify::NotifyState::ExtendTimeoutUsec(
                                RESTORE_EXTEND.as_micros() as u32,
                            ),
                            sd_notify::NotifyState::Status(&status),
                        ]);
                    }
                }
            }
        };
        let r = r??.ok_or_else(|| anyhow!("nothing was restored"))?;
        let a = Applier::open(&self.db, self.busy)?;
        if a.checksum() != r.db_checksum {
            bail!(
                "the restored database's checksum {:#018x} is not the backup's {:#018x}",
                a.checksum(),
                r.db_checksum
            );
        }
        let e = Entry {
            generation: r.generation,
            txid: r.txid,
            checksum: r.db_checksum,
            stamp: a.stamp(),
        };
        self.position.write(&e, None)?;
        Ok(self.adopt(a, &e))
    }

    /// Verifies a received snapshot and puts it in place; returns its checksum.
    fn install_snapshot(&mut self, s: SnapshotFile, pos: Pos, expected: u64) -> Result<u64> {
        let ck = s.hashes.checksum();
        if ck != expected || s.hashes.page_count() == 0 {
            // The replica state machine rebuilds on the mismatch.
            return Ok(ck);
        }
        let tmp = s.finish()?;
        if let Err(e) = crate::sqlite::integrity_check(&tmp) {
            remove_db_files(&tmp);
            return Err(e.context("the streamed snapshot failed SQLite's integrity check"));
        }
        install(&tmp, &self.db)?;
        let a = Applier::open(&self.db, self.busy)?;
        let e = Entry {
            generation: pos.generation,
            txid: pos.txid,
            checksum: a.checksum(),
            stamp: a.stamp(),
        };
        self.position.write(&e, None)?;
        let ck = a.checksum();
        self.adopt(a, &e);
        tracing::info!(db = %self.db.display(), txid = pos.txid, "snapshot installed");
        Ok(ck)
    }
}

/// A snapshot being received into a temporary file beside the database.
struct SnapshotFile {
    path: PathBuf,
    file: Option<File>,
    hashes: DbHashes,
}

impl SnapshotFile {
    fn create(db: &Path, page_size: u32) -> Result<SnapshotFile> {
        let path = temp_path(db);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(SnapshotFile {
            path,
            file: Some(file),
            hashes: DbHashes::new(page_size),
        })
    }

    fn write(&mut self, pages: &[(u32, Vec<u8>)]) -> Result<()> {
        let ps = self.hashes.page_size() as u64;
        let f = self.file.as_ref().expect("open");
        for (pgno, data) in pages {
            f.write_all_at(data, (*pgno as u64 - 1) * ps)?;
            self.hashes.set(*pgno, page_hash(*pgno, data));
        }
        Ok(())
    }

    fn finish(mut self) -> Result<PathBuf> {
        let f = self.file.take().expect("open");
        f.sync_all()?;
        Ok(std::mem::take(&mut self.path))
    }
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            remove_db_files(&self.path);
        }
    }
}

/// One recorded position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    generation: u64,
    txid: u64,
    checksum: u64,
    stamp: Page1Stamp,
}

/// `DB.replited-position`: the last applied position and the one before it, rewritten in place
/// (one small `pwrite`, checksummed) before each transaction commits.
struct PositionFile {
    path: PathBuf,
    file: File,
}

const POS_MAGIC: &[u8; 8] = b"RPLTPOS1";
const ENTRY_LEN: usize = 8 + 8 + 8 + 12;
const POS_LEN: usize = 8 + 1 + 2 * ENTRY_LEN + 8;

impl PositionFile {
    fn path_for(db: &Path) -> PathBuf {
        let mut p = db.as_os_str().to_owned();
        p.push(".replited-position");
        PathBuf::from(p)
    }

    fn open(db: &Path) -> Result<PositionFile> {
        let path = Self::path_for(db);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(PositionFile { path, file })
    }

    fn write(&mut self, cur: &Entry, prev: Option<&Entry>) -> Result<()> {
        let mut b = Vec::with_capacity(POS_LEN);
        b.extend_from_slice(POS_MAGIC);
        b.push(prev.is_some() as u8);
        for e in [Some(cur), prev] {
            let e = e.copied().unwrap_or(Entry {
                generation: 0,
                txid: 0,
                checksum: 0,
                stamp: [0; 12],
            });
            b.extend_from_slice(&e.generation.to_be_bytes());
            b.extend_from_slice(&e.txid.to_be_bytes());
            b.extend_from_slice(&e.checksum.to_be_bytes());
            b.extend_from_slice(&e.stamp);
        }
        let sum = page_hash(0, &b);
        b.extend_from_slice(&sum.to_be_bytes());
        self.file
            .write_all_at(&b, 0)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// The recorded (current, previous) positions; None when nothing is recorded.
    fn read(&self) -> Result<Option<(Entry, Option<Entry>)>> {
        let mut b = vec![0u8; POS_LEN];
        let n = self.file.read_at(&mut b, 0)?;
        if n == 0 {
            return Ok(None);
        }
        if n < POS_LEN || &b[..8] != POS_MAGIC {
            bail!("{} is not a replica position file", self.path.display());
        }
        let sum = u64::from_be_bytes(b[POS_LEN - 8..].try_into().expect("8"));
        if page_hash(0, &b[..POS_LEN - 8]) != sum {
            bail!("{} is damaged (checksum mismatch)", self.path.display());
        }
        let entry = |at: usize| {
            let u = |o: usize| u64::from_be_bytes(b[at + o..at + o + 8].try_into().expect("8"));
            Entry {
                generation: u(0),
                txid: u(8),
                checksum: u(16),
                stamp: b[at + 24..at + 36].try_into().expect("12"),
            }
        };
        let cur = entry(9);
        let prev = (b[8] == 1).then(|| entry(9 + ENTRY_LEN));
        Ok(Some((cur, prev)))
    }
}

/// How often a replica following a bucket looks for new files (one LIST request when nothing is
/// new).
const BUCKET_POLL: Duration = Duration::from_secs(1);

/// How long a replica following a bucket waits for the file continuing its position when newer
/// ones are there already, before it rebuilds. Files reach a bucket out of order: the primary
/// uploads its commits' segments on one thread and compaction's merged files (which may replace
/// segments never uploaded) on another, behind snapshots and earlier merges.
const BUCKET_GAP_GRACE: Duration = Duration::from_secs(60);

/// A replica following a database through its bucket alone (no connection to the primary):
/// it restores the latest backup, then polls for files written after the last one it saw and
/// applies their transactions, each as one SQLite transaction, as a streamed replica does.
struct BucketFollower {
    index: usize,
    db: PathBuf,
    busy: Duration,
    storage: S3Storage,
    force_restore: bool,
    exit_on_rebuild: bool,
    sup: mpsc::UnboundedSender<SupMsg>,
    stop: watch::Receiver<bool>,
    health: Arc<crate::notify::Health>,
}

impl BucketFollower {
    fn run(self) -> Result<()> {
        // As for a streamed replica: checkpoints on a connection of their own.
        let file_lock = Arc::new(tokio::sync::Mutex::new(()));
        let ckpt = Checkpointer::start(&self.db, CHECKPOINT_EVERY, file_lock.clone())?;
        let r = self.run_inner(file_lock);
        ckpt.stop();
        let _ = self.sup.send(SupMsg::Done(
            self.index,
            r.as_ref()
                .err()
                .map(|e| format!("{}: {e:#}", self.db.display())),
        ));
        r
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps `d`, woken early only to stop (an idle follower wakes once a poll, not every few
    /// milliseconds to look at the stop flag); true when told to stop. Runs on a blocking thread
    /// of the runtime.
    fn sleep_unless_stopped(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        let mut stop = self.stop.clone();
        let waited = tokio::runtime::Handle::current()
            .block_on(async { tokio::time::timeout(d, stop.wait_for(|s| *s)).await });
        if let Ok(Err(_)) = waited {
            // The sender is gone (shutting down): no stop to wait for, sleep out the poll.
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
        }
        self.stopped()
    }

    fn stop_app(&self) {
        let (tx, rx) = oneshot::channel();
        if self.sup.send(SupMsg::Stop(self.index, tx)).is_ok() {
            let _ = rx.blocking_recv();
        }
    }

    /// Restores the latest backup in the bucket over the database.
    fn rebuild(&self, local: &mut Local, why: &str) -> Result<Applied> {
        tracing::warn!(db = %self.db.display(), "the replica must be rebuilt: {why}");
        if self.exit_on_rebuild {
            return Err(local.exit_for_rebuild(why)?);
        }
        self.restore_latest(local)
    }

    fn restore_latest(&self, local: &mut Local) -> Result<Applied> {
        self.stop_app();
        local.applier = None;
        let lock = local.file_lock.clone();
        let _held = lock.blocking_lock();
        // The primary's compaction may delete a file between the listing and its download:
        // list again and retry.
        let mut attempt = 0;
        let r = loop {
            attempt += 1;
            match restore(
                &[&self.storage],
                &RestoreOptions {
                    target: replited_core::plan::Target::Latest,
                    output: self.db.clone(),
                    force: true,
                    if_db_not_exists: false,
                    if_replica_exists: false,
                },
            ) {
                Ok(Some(r)) => break r,
                Ok(None) => bail!("nothing was restored"),
                Err(e) if attempt < 10 && !self.stopped() => {
                    tracing::warn!(db = %self.db.display(), "{e:#}; listing again and retrying");
                    std::thread::sleep(Duration::from_millis(300 * attempt));
                }
                Err(e) => return Err(e),
            }
        };
        let a = Applier::open(&self.db, self.busy)?;
        let e = Entry {
            generation: r.generation,
            txid: r.txid,
            checksum: a.checksum(),
            stamp: a.stamp(),
        };
        local.position.write(&e, None)?;
        Ok(local.adopt(a, &e))
    }

    fn run_inner(&self, file_lock: Arc<tokio::sync::Mutex<()>>) -> Result<()> {
        let mut local = Local {
            file_lock,
            db: self.db.clone(),
            busy: self.busy,
            applier: None,
            position: PositionFile::open(&self.db)?,
            snapshot: None,
            schema_cookie: None,
        };
        tracing::info!(db = %self.db.display(), "following {} (no primary connection)", self.storage.describe());
        let mut applied = if self.force_restore || !self.db.exists() {
            tracing::info!(db = %self.db.display(), "restoring the latest backup from the bucket");
            self.restore_latest(&mut local)?
        } else {
            match local.resume() {
                Ok(a) => {
                    tracing::info!(db = %self.db.display(), txid = a.pos.txid, "resuming at txid {} without a restore", a.pos.txid);
                    a
                }
                Err(e) => {
                    // Nothing runs on the database before READY=1: restore in place.
                    tracing::warn!(db = %self.db.display(), "cannot resume ({e:#}): the database will be restored");
                    self.restore_latest(&mut local)?
                }
            }
        };
        let mut files = self.storage.list()?;
        let mut said = false;
        let mut failing = false;
        let mut polls = 0u64;
        // Since when newer files have been in the bucket but none continuing from the position
        // then (its txid).
        let mut gap_since: Option<(Instant, u64)> = None;
        loop {
            // Local writes, then what is new in the bucket.
            if let Some(a) = local.applier.as_mut() {
                if a.local_write_detected().unwrap_or(false) {
                    applied = self.rebuild(&mut local, "local write detected on the replica")?;
                    files = self.storage.list()?;
                }
            }
            // New files sort after the last one seen, except a compaction's merged file, which
            // is named after its first transaction: a full listing now and then finds those (and
            // drops the files compaction deleted).
            polls += 1;
            let full = polls % FULL_LIST_EVERY == 0;
            let last = files.iter().max_by_key(|m| m.path()).copied();
            let listed = if full {
                self.storage.list()
            } else {
                self.storage.list_after(last.as_ref())
            };
            match listed {
                Ok(new) => {
                    if failing {
                        tracing::info!(db = %self.db.display(), "{} answers again", self.storage.describe());
                        failing = false;
                    }
                    if full {
                        files = new;
                    } else {
                        files.extend(new);
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(db = %self.db.display(), "{e:#}; retrying (reads go on)");
                        self.health
                            .error(self.index, "bucket", &format_args!("{e:#}"));
                        failing = true;
                    }
                }
            }
            if !failing {
                let newest_gen = files.iter().map(|m| m.generation).max().unwrap_or(0);
                if newest_gen > applied.pos.generation
                    && files.iter().any(|m| {
                        m.generation == newest_gen
                            && m.kind == replited_core::format::Kind::Snapshot
                    })
                {
                    applied = self.rebuild(
                        &mut local,
                        &format!(
                            "new generation in the bucket: {newest_gen:016x}, replica at {:016x}",
                            applied.pos.generation
                        ),
                    )?;
                    files = self.storage.list()?;
                }
                match self.catch_up(&mut local, &files, &mut applied) {
                    Ok(true) => gap_since = None,
                    Ok(false) => {
                        // A file it needs is gone or was compacted under an earlier key:
                        // list everything once. A file deleted between that listing and its
                        // download (the primary's compaction) is retried at the next poll.
                        let again = self.storage.list().and_then(|f| {
                            files = f;
                            self.catch_up(&mut local, &files, &mut applied)
                        });
                        match again {
                            Ok(true) => gap_since = None,
                            Ok(false) => {
                                if gap_since.is_some_and(|(_, t)| t != applied.pos.txid) {
                                    gap_since = None;
                                }
                                let (since, _) = *gap_since.get_or_insert_with(|| {
                                    tracing::info!(
                                        db = %self.db.display(),
                                        "history after txid {} is not in the bucket, newer files \
                                         are: waiting up to {BUCKET_GAP_GRACE:?} for it (files \
                                         can reach the bucket out of order)",
                                        applied.pos.txid
                                    );
                                    (Instant::now(), applied.pos.txid)
                                });
                                if since.elapsed() >= BUCKET_GAP_GRACE {
                                    gap_since = None;
                                    applied = self.rebuild(
                                        &mut local,
                                        &format!(
                                            "history after txid {} is no longer in the bucket \
                                             (missing for {BUCKET_GAP_GRACE:?} while newer \
                                             files are there)",
                                            applied.pos.txid
                                        ),
                                    )?;
                                    files = self.storage.list()?;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(db = %self.db.display(), "{e:#}; retrying");
                                self.health
                                    .error(self.index, "bucket", &format_args!("{e:#}"));
                            }
                        }
                    }
                    Err(e) => match e.downcast_ref::<ApplyError>() {
                        Some(
                            ApplyError::ChecksumMismatch { .. } | ApplyError::LocalWrite { .. },
                        ) => {
                            applied = self.rebuild(&mut local, &format!("{e:#}"))?;
                            files = self.storage.list()?;
                        }
                        _ => {
                            tracing::warn!(db = %self.db.display(), "{e:#}; retrying");
                            self.health
                                .error(self.index, "bucket", &format_args!("{e:#}"));
                            files = self.storage.list().unwrap_or(files);
                        }
                    },
                }
                if !said {
                    said = true;
                    tracing::info!(db = %self.db.display(), txid = applied.pos.txid, "caught up with the bucket: following");
                    self.health.set_status_now(
                        self.index,
                        format!("following the bucket at txid {}", applied.pos.txid),
                    );
                    let _ = self.sup.send(SupMsg::CaughtUp(self.index));
                }
            }
            self.health.beat(self.index);
            self.health.set_status(self.index, || {
                format!("following the bucket at txid {}", applied.pos.txid)
            });
            if self.sleep_unless_stopped(BUCKET_POLL) {
                return Ok(());
            }
        }
    }

    /// Applies every transaction the listing holds after the applied position. False when the
    /// listing shows newer transactions of this generation that cannot be reached from here.
    fn catch_up(
        &self,
        local: &mut Local,
        files: &[FileMeta],
        applied: &mut Applied,
    ) -> Result<bool> {
        // Transactions as the walk hands them over, applied in batches of up to 16 MiB.
        let mut pending: Vec<Txn> = Vec::new();
        let mut bytes = 0usize;
        let mut apply = |pending: &mut Vec<Txn>, applied: &mut Applied| -> Result<()> {
            let mut txns = pending.drain(..).peekable();
            while let Some(t) = txns.next() {
                let batch = local.run_from(t, |prev, bytes| {
                    txns.next_if(|t| joins_batch(prev, t, bytes, BATCH_BYTES))
                });
                let n = batch.len() as u64;
                let pos = batch[batch.len() - 1].pos();
                let (ck, schema_changed) = local.apply_txns(batch)??;
                *applied = Applied {
                    pos,
                    db_checksum: ck,
                };
                self.health.applied(self.index, pos.generation, pos.txid, n);
                if schema_changed {
                    let _ = self.sup.send(SupMsg::SchemaChanged);
                }
            }
            Ok(())
        };
        stream_history(&self.storage, files, applied.pos, &mut |t| {
            bytes += t.data_len();
            pending.push(t);
            if bytes >= 16 << 20 {
                bytes = 0;
                apply(&mut pending, applied)?;
            }
            Ok(true)
        })?;
        apply(&mut pending, applied)?;
        let newer = files.iter().any(|m| {
            m.generation == applied.pos.generation
                && m.kind == replited_core::format::Kind::Segment
                && m.last_txid > applied.pos.txid
        });
        Ok(!newer)
    }
}
