//! The service manager's notification protocol (`sd_notify`): `READY=1` once the work is really
//! under way (primary: every database captured; replica: every database caught up), `STATUS=`
//! lines saying what each database is doing, `WATCHDOG=1` only while every worker loop keeps
//! beating, and `STOPPING=1`. Without `NOTIFY_SOCKET` (not started by systemd) it sends nothing.
//!
//! The same record of each database (its position, when it last synced, its lag and error
//! counts) answers the HTTP status server (`/health`, `/status`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// How often a worker's status line is rebuilt at most.
pub const STATUS_EVERY: Duration = Duration::from_millis(200);

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
    errors: AtomicU64,
    lag_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// The workers' heartbeats, status lines and figures.
pub struct Health {
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
        Arc::new(Health {
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
            status_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
            enabled: AtomicBool::new(std::env::var_os("NOTIFY_SOCKET").is_some()),
            stop: AtomicBool::new(false),
        })
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

    /// Worker `i` met an error (it retries); counted and shown by `/status`.
    pub fn error(&self, i: usize, e: &dyn std::fmt::Display) {
        if let Some(s) = self.stats.get(i) {
            s.errors.fetch_add(1, Ordering::Relaxed);
            *s.last_error.lock().expect("error lock") = Some(e.to_string());
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
        }
        Ok(())
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
        let s = line();
        if let Some(slot) = self.status.lock().expect("status lock").get_mut(i) {
            *slot = s;
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
        self.stop.store(true, Ordering::SeqCst);
        let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// A thread that sends the status line when it changes and, when the service manager asked
    /// for a watchdog (`WATCHDOG_USEC`), `WATCHDOG=1` at half its interval — but only while
    /// every worker beat within the interval, so a wedged loop makes systemd restart replited.
    pub fn spawn(self: &Arc<Health>) {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return;
        }
        let h = self.clone();
        let watchdog = sd_notify::watchdog_enabled();
        let tick = watchdog.map_or(Duration::from_secs(1), |w| {
            (w / 2).min(Duration::from_secs(1))
        });
        let _ = std::thread::Builder::new()
            .name("sd_notify".into())
            .spawn(move || {
                let mut last = String::new();
                while !h.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(tick);
                    let line = h.line();
                    if line != last {
                        let _ = sd_notify::notify(&[NotifyState::Status(&line)]);
                        last = line;
                    }
                    if let Some(w) = watchdog {
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
