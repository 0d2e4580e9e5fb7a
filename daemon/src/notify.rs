//! The service manager's notification protocol (`sd_notify`): `READY=1` once the work is really
//! under way (primary: every database captured; replica: every database caught up), `STATUS=`
//! lines saying what each database is doing, `WATCHDOG=1` only while every worker loop keeps
//! beating, and `STOPPING=1`. Without `NOTIFY_SOCKET` (not started by systemd) it sends nothing.
//!
//! The same record of each database (its position, when it last synced, its lag and error
//! counts) answers the HTTP status server (`/health`, `/status`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// How often a worker's status line is rebuilt at most.
pub const STATUS_EVERY: Duration = Duration::from_millis(200);

/// How often a status line is sent to the service manager at most.
const SEND_EVERY: Duration = Duration::from_secs(1);

/// `/health` fails past this lag unless `[http] max-lag` says otherwise.
pub const DEFAULT_MAX_LAG: Duration = Duration::from_secs(60);

/// No lag figure (u64::MAX in [`Stats::lag_ms`]).
const NO_LAG: u64 = u64::MAX;

/// What one worker (one database) has done, for `/status`.
#[derive(Default)]
struct Stats {
    generation: AtomicU64,
    txid: AtomicU64,
    /// Unix ms of the last sync (primary: a segment durable; replica: a transaction applied).
    synced_ms: AtomicU64,
    /// Transactions made durable (primary) or applied (replica) since start.
    records: AtomicU64,
    /// Replica: SQLite transactions committed to apply them (one may carry several).
    commits: AtomicU64,
    errors: AtomicU64,
    lag_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// How far behind something that follows a database is: a storage target, or (on a primary) a
/// connected replica. `lag(now_ms)` gives (ms behind, transactions behind): the age of the
/// oldest transaction it does not hold yet.
pub struct Lagging {
    /// "target" or "replica".
    pub kind: &'static str,
    /// The target's name or the replica's address.
    pub name: String,
    lag: Box<dyn Fn(u64) -> (u64, u64) + Send + Sync>,
    /// Unix ms of its last successful sync (0: none yet).
    pub last_sync_ms: AtomicU64,
}

impl Lagging {
    /// (ms, transactions) behind at `now_ms`.
    pub fn lag(&self, now_ms: u64) -> (u64, u64) {
        (self.lag)(now_ms)
    }
}

/// The workers' heartbeats, status lines and figures.
pub struct Health {
    /// What follows each worker's database, with the worker's index.
    followers: Mutex<Vec<(usize, Arc<Lagging>)>>,
    /// `/health` fails when a follower is further behind than this.
    max_lag: AtomicU64,
    role: crate::config::Role,
    /// Each worker's database (its path).
    dbs: Vec<String>,
    stats: Vec<Stats>,
    start: Instant,
    /// Milliseconds since `start` of each worker's last beat.
    beats: Vec<AtomicU64>,
    ready: Vec<AtomicBool>,
    told_ready: AtomicBool,
    status: Mutex<Vec<String>>,
    /// Signalled when a status line changes, and at `STOPPING=1`.
    status_changed: Condvar,
    /// When each worker's status was last set (ms since `start`, 0: never).
    status_at: Vec<AtomicU64>,
    /// A service manager or the status server listens; otherwise status lines are not even
    /// built.
    enabled: AtomicBool,
    stop: AtomicBool,
}

impl Health {
    /// For one worker per database in `dbs` (their paths), all of one role.
    pub fn new(role: crate::config::Role, dbs: Vec<String>) -> Arc<Health> {
        let n = dbs.len();
        let h = Arc::new(Health {
            followers: Mutex::new(Vec::new()),
            max_lag: AtomicU64::new(DEFAULT_MAX_LAG.as_millis() as u64),
            role,
            stats: (0..n)
                .map(|_| Stats {
                    lag_ms: AtomicU64::new(NO_LAG),
                    ..Stats::default()
                })
                .collect(),
            dbs,
            start: Instant::now(),
            beats: (0..n).map(|_| AtomicU64::new(0)).collect(),
            ready: (0..n).map(|_| AtomicBool::new(false)).collect(),
            told_ready: AtomicBool::new(false),
            status: Mutex::new(vec![String::from("starting"); n]),
            status_changed: Condvar::new(),
            status_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
            enabled: AtomicBool::new(std::env::var_os("NOTIFY_SOCKET").is_some()),
            stop: AtomicBool::new(false),
        });
        h.register_metrics();
        h
    }

    /// Per-database figures every role has (`/metrics`).
    fn register_metrics(self: &Arc<Health>) {
        use crate::metrics::gauge_fn;
        for (i, path) in self.dbs.iter().enumerate() {
            let db = crate::config::db_name(std::path::Path::new(path));
            let l = [("db", db.as_str())];
            let w = Arc::downgrade(self);
            let stat = move |f: fn(&Stats) -> u64| {
                let w = w.clone();
                move || w.upgrade().map(|h| f(&h.stats[i]))
            };
            let applied = stat(|s| s.records.load(Ordering::Relaxed));
            let synced = stat(|s| s.synced_ms.load(Ordering::Relaxed));
            let lag = stat(|s| s.lag_ms.load(Ordering::Relaxed));
            let commits = stat(|s| s.commits.load(Ordering::Relaxed));
            let w = Arc::downgrade(self);
            gauge_fn(
                "replited_up",
                "1 while the database's capture or apply loop runs and beats.",
                &l,
                move || {
                    w.upgrade().map(|h| {
                        let age = h
                            .now_ms()
                            .saturating_sub(h.beats[i].load(Ordering::Relaxed));
                        f64::from(u8::from(
                            h.ready[i].load(Ordering::SeqCst)
                                && !h.stop.load(Ordering::SeqCst)
                                && age < 30_000,
                        ))
                    })
                },
            );
            crate::metrics::counter_fn(
                "replited_records_replicated_total",
                "Transactions made durable (primary) or applied (replica) since start.",
                &l,
                move || applied().map(|v| v as f64),
            );
            gauge_fn(
                "replited_last_sync_timestamp_seconds",
                "Unix time of the last sync (primary: durable in every target; replica: applied).",
                &l,
                move || synced().filter(|t| *t > 0).map(|t| t as f64 / 1000.0),
            );
            if self.role == crate::config::Role::Replica {
                gauge_fn(
                    "replited_lag_seconds",
                    "How far this replica is behind its primary.",
                    &l,
                    move || lag().filter(|v| *v != NO_LAG).map(|v| v as f64 / 1000.0),
                );
                crate::metrics::counter_fn(
                    "replited_replica_commits_total",
                    "SQLite transactions committed to apply the primary's: fewer than records replicated when the replica caught up applying several as one.",
                    &l,
                    move || commits().map(|v| v as f64),
                );
            }
        }
    }

    /// Tracks something that follows worker `i`'s database (a target, a replica) for `/status`,
    /// `/health` and `/metrics` (`replited_{kind}_lag_seconds`, `…_lag_transactions`).
    pub fn track(
        &self,
        i: usize,
        kind: &'static str,
        name: &str,
        lag: impl Fn(u64) -> (u64, u64) + Send + Sync + 'static,
    ) -> Arc<Lagging> {
        let l = Arc::new(Lagging {
            kind,
            name: name.to_string(),
            lag: Box::new(lag),
            last_sync_ms: AtomicU64::new(0),
        });
        let db = crate::config::db_name(std::path::Path::new(&self.dbs[i]));
        let labels: [(&str, &str); 2] = [("db", &db), (kind, name)];
        let (secs, txns, sync): (&'static str, &'static str, &'static str) = match kind {
            "replica" => (
                "replited_replica_lag_seconds",
                "replited_replica_lag_transactions",
                "replited_replica_last_ack_timestamp_seconds",
            ),
            _ => (
                "replited_target_lag_seconds",
                "replited_target_lag_transactions",
                "replited_target_last_sync_timestamp_seconds",
            ),
        };
        let w = Arc::downgrade(&l);
        crate::metrics::gauge_fn(
            secs,
            "Age of the oldest transaction it does not hold yet (0 when caught up).",
            &labels,
            move || {
                w.upgrade()
                    .map(|l| l.lag(crate::replicate::now_ms()).0 as f64 / 1000.0)
            },
        );
        let w = Arc::downgrade(&l);
        crate::metrics::gauge_fn(
            txns,
            "Transactions committed that it does not hold yet.",
            &labels,
            move || {
                w.upgrade()
                    .map(|l| l.lag(crate::replicate::now_ms()).1 as f64)
            },
        );
        let w = Arc::downgrade(&l);
        crate::metrics::gauge_fn(
            sync,
            "Unix time of its last successful sync.",
            &labels,
            move || {
                w.upgrade()
                    .map(|l| l.last_sync_ms.load(Ordering::Relaxed))
                    .filter(|t| *t > 0)
                    .map(|t| t as f64 / 1000.0)
            },
        );
        self.followers
            .lock()
            .expect("followers lock")
            .push((i, l.clone()));
        l
    }

    /// Stops tracking `l` (a replica that disconnected, a target removed by a reload).
    pub fn untrack(&self, l: &Arc<Lagging>) {
        self.followers
            .lock()
            .expect("followers lock")
            .retain(|(_, x)| !Arc::ptr_eq(x, l));
    }

    /// `/health` fails when a follower is further behind than `d`.
    pub fn set_max_lag(&self, d: Duration) {
        self.max_lag.store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// The index of the worker following database `path`.
    pub fn index_of(&self, path: &str) -> Option<usize> {
        self.dbs.iter().position(|d| d == path)
    }

    /// Status lines are wanted (the status server runs).
    pub fn enable_status(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    /// Worker `i` made `records` more transactions durable (primary) or applied them (replica),
    /// reaching `txid` of `generation`.
    pub fn synced(&self, i: usize, generation: u64, txid: u64, records: u64) {
        if let Some(s) = self.stats.get(i) {
            s.generation.store(generation, Ordering::Relaxed);
            s.txid.store(txid, Ordering::Relaxed);
            s.records.fetch_add(records, Ordering::Relaxed);
            s.synced_ms
                .store(crate::replicate::now_ms(), Ordering::Relaxed);
        }
    }

    /// Replica worker `i` applied primary transactions up to `txid`, `records` of them, in one
    /// SQLite transaction.
    pub fn applied(&self, i: usize, generation: u64, txid: u64, records: u64) {
        self.synced(i, generation, txid, records);
        if let Some(s) = self.stats.get(i) {
            s.commits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Worker `i`'s position without a sync (after establishing or a restore).
    pub fn position(&self, i: usize, generation: u64, txid: u64) {
        if let Some(s) = self.stats.get(i) {
            s.generation.store(generation, Ordering::Relaxed);
            s.txid.store(txid, Ordering::Relaxed);
        }
    }

    /// A replica's lag behind its primary.
    pub fn set_lag(&self, i: usize, lag_ms: Option<u64>) {
        if let Some(s) = self.stats.get(i) {
            s.lag_ms.store(lag_ms.unwrap_or(NO_LAG), Ordering::Relaxed);
        }
    }

    /// Worker `i` met an error of `kind` (it retries); counted (`replited_errors_total`) and
    /// shown by `/status`.
    pub fn error(&self, i: usize, kind: &'static str, e: &dyn std::fmt::Display) {
        if let Some(s) = self.stats.get(i) {
            s.errors.fetch_add(1, Ordering::Relaxed);
            *s.last_error.lock().expect("error lock") = Some(e.to_string());
            let db = crate::config::db_name(std::path::Path::new(&self.dbs[i]));
            crate::metrics::counter(
                "replited_errors_total",
                "Errors by kind (each retried).",
                &[("db", &db), ("kind", kind)],
            )
            .inc();
        }
    }

    /// Every worker is ready and beat within `limit`: what `/health` answers 200 to.
    pub fn healthy(&self, limit: Duration) -> Result<(), String> {
        if self.stop.load(Ordering::SeqCst) {
            return Err("stopping".into());
        }
        let now = self.now_ms();
        for (i, db) in self.dbs.iter().enumerate() {
            if !self.ready[i].load(Ordering::SeqCst) {
                return Err(format!("{db}: not ready yet"));
            }
            let age = now.saturating_sub(self.beats[i].load(Ordering::Relaxed));
            if age > limit.as_millis() as u64 {
                return Err(format!("{db}: no progress for {age} ms"));
            }
            let lag = self.stats[i].lag_ms.load(Ordering::Relaxed);
            let max = self.max_lag.load(Ordering::Relaxed);
            if lag != NO_LAG && lag > max {
                return Err(format!(
                    "{db}: {lag} ms behind the primary (max-lag {max} ms)"
                ));
            }
        }
        let unix = crate::replicate::now_ms();
        let max = self.max_lag.load(Ordering::Relaxed);
        for (i, f) in self.followers.lock().expect("followers lock").iter() {
            let (ms, txns) = f.lag(unix);
            if ms > max {
                return Err(format!(
                    "{}: {} {} is {ms} ms ({txns} transactions) behind (max-lag {max} ms)",
                    self.dbs[*i], f.kind, f.name
                ));
            }
        }
        Ok(())
    }

    fn followers_json(&self, i: usize, kind: &str) -> Vec<serde_json::Value> {
        let now = crate::replicate::now_ms();
        self.followers
            .lock()
            .expect("followers lock")
            .iter()
            .filter(|(w, f)| *w == i && f.kind == kind)
            .map(|(_, f)| {
                let (ms, txns) = f.lag(now);
                let synced = f.last_sync_ms.load(Ordering::Relaxed);
                serde_json::json!({
                    "name": f.name,
                    "lag_ms": ms,
                    "lag_transactions": txns,
                    "last_sync_time": (synced != 0).then(|| humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH + Duration::from_millis(synced)).to_string()),
                })
            })
            .collect()
    }

    /// `/status`: one object per database.
    pub fn status_json(&self) -> serde_json::Value {
        let lines = self.status.lock().expect("status lock").clone();
        let now = self.now_ms();
        let dbs: Vec<serde_json::Value> = self
            .dbs
            .iter()
            .enumerate()
            .map(|(i, db)| {
                let s = &self.stats[i];
                let synced = s.synced_ms.load(Ordering::Relaxed);
                let lag = s.lag_ms.load(Ordering::Relaxed);
                serde_json::json!({
                    "db": db,
                    "role": self.role.as_str(),
                    "generation": format!("{:016x}", s.generation.load(Ordering::Relaxed)),
                    "txid": s.txid.load(Ordering::Relaxed),
                    "last_lsn": s.txid.load(Ordering::Relaxed),
                    "last_sync_time": (synced != 0).then(|| humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH + Duration::from_millis(synced)).to_string()),
                    "lag_ms": (lag != NO_LAG).then_some(lag),
                    "records_replicated": s.records.load(Ordering::Relaxed),
                    "error_count": s.errors.load(Ordering::Relaxed),
                    "last_error": s.last_error.lock().expect("error lock").clone(),
                    "is_running": !self.stop.load(Ordering::SeqCst)
                        && now.saturating_sub(self.beats[i].load(Ordering::Relaxed)) < 30_000,
                    "ready": self.ready[i].load(Ordering::SeqCst),
                    "status": lines.get(i),
                    "targets": self.followers_json(i, "target"),
                    "replicas": self.followers_json(i, "replica"),
                })
            })
            .collect();
        serde_json::json!({
            "role": self.role.as_str(),
            "ready": self.told_ready.load(Ordering::SeqCst),
            "uptime_seconds": self.start.elapsed().as_secs(),
            "databases": dbs,
        })
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Worker `i`'s loop is alive.
    pub fn beat(&self, i: usize) {
        if let Some(b) = self.beats.get(i) {
            b.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// What worker `i` is doing (one line, shown by `systemctl status`). Workers call this from
    /// their loops: `line` is only built when a service manager listens, and at most every
    /// [`STATUS_EVERY`] per worker (the line is sent at most once a second anyway).
    pub fn set_status(&self, i: usize, line: impl FnOnce() -> String) {
        let Some(at) = self
            .status_at
            .get(i)
            .filter(|_| self.enabled.load(Ordering::Relaxed))
        else {
            return;
        };
        let now = self.now_ms().max(1);
        let last = at.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < STATUS_EVERY.as_millis() as u64 {
            return;
        }
        at.store(now, Ordering::Relaxed);
        self.put_status(i, line());
    }

    /// Worker `i`'s status line is `line`: the notifying thread wakes if it changed.
    fn put_status(&self, i: usize, line: String) {
        let mut status = self.status.lock().expect("status lock");
        if let Some(slot) = status.get_mut(i).filter(|s| **s != line) {
            *slot = line;
            self.status_changed.notify_all();
        }
    }

    /// Sets worker `i`'s status line at once (what `READY=1` will carry), whatever the rate
    /// limit of [`Health::set_status`].
    pub fn set_status_now(&self, i: usize, line: String) {
        self.put_status(i, line);
        if let Some(at) = self.status_at.get(i) {
            at.store(self.now_ms().max(1), Ordering::Relaxed);
        }
    }

    /// Worker `i` is under way; `READY=1` once all are.
    pub fn set_ready(&self, i: usize) {
        self.beat(i);
        if let Some(r) = self.ready.get(i) {
            r.store(true, Ordering::SeqCst);
        }
        if self.ready.iter().all(|r| r.load(Ordering::SeqCst))
            && !self.told_ready.swap(true, Ordering::SeqCst)
        {
            let status = self.line();
            let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
            tracing::debug!("told the service manager READY=1");
        }
    }

    fn line(&self) -> String {
        self.status.lock().expect("status lock").join("; ")
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        {
            // Under the lock: the notifying thread is waiting, or sees the flag before it waits.
            let _status = self.status.lock().expect("status lock");
            self.stop.store(true, Ordering::SeqCst);
            self.status_changed.notify_all();
        }
        let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// A thread that sends the status line when it changes (at most every [`SEND_EVERY`]) and,
    /// when the service manager asked for a watchdog (`WATCHDOG_USEC`), `WATCHDOG=1` at half its
    /// interval — but only while every worker beat within the interval, so a wedged loop makes
    /// systemd restart replited. It sleeps while nothing changes: an idle daemon wakes it (and
    /// the service manager) only for the watchdog.
    pub fn spawn(self: &Arc<Health>) {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return;
        }
        let h = self.clone();
        let watchdog = sd_notify::watchdog_enabled();
        // No watchdog: woken by changes only (the hour is a bound, not a schedule).
        let tick = watchdog.map_or(Duration::from_secs(3600), |w| w / 2);
        let _ = std::thread::Builder::new()
            .name("sd_notify".into())
            .spawn(move || {
                let mut last = String::new();
                let mut sent = Instant::now();
                while !h.stop.load(Ordering::SeqCst) {
                    let status = h.status.lock().expect("status lock");
                    let _ = h
                        .status_changed
                        .wait_timeout_while(status, tick, |s| {
                            !h.stop.load(Ordering::SeqCst) && s.join("; ") == last
                        })
                        .expect("status lock");
                    // A burst of changes is sent as one line (never holding the watchdog back).
                    let gap = SEND_EVERY.min(tick).saturating_sub(sent.elapsed());
                    if !gap.is_zero() && !h.stop.load(Ordering::SeqCst) {
                        std::thread::sleep(gap);
                    }
                    sent = Instant::now();
                    if h.stop.load(Ordering::SeqCst) {
                        // STOPPING=1 (and its "stopping" status) was the last word.
                        break;
                    }
                    let line = h.line();
                    if line != last {
                        let _ = sd_notify::notify(&[NotifyState::Status(&line)]);
                        last = line;
                    }
                    // The watchdog is armed once start-up completes (READY=1).
                    if let Some(w) = watchdog.filter(|_| h.told_ready.load(Ordering::SeqCst)) {
                        let now = h.now_ms();
                        let limit = w.as_millis() as u64;
                        let stale: Vec<usize> = h
                            .beats
                            .iter()
                            .enumerate()
                            .filter(|(_, b)| now.saturating_sub(b.load(Ordering::Relaxed)) > limit)
                            .map(|(i, _)| i)
                            .collect();
                        if stale.is_empty() {
                            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                        } else {
                            tracing::error!(
                                "worker(s) {stale:?} made no progress for over {w:?}: no WATCHDOG=1 (systemd restarts replited)"
                            );
                        }
                    }
                }
            });
    }
}
