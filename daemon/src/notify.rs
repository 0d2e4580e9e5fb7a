//! The service manager's notification protocol (`sd_notify`): `READY=1` once the work is really
//! under way (primary: every database captured; replica: every database caught up), `STATUS=`
//! lines saying what each database is doing, `WATCHDOG=1` only while every worker loop keeps
//! beating, and `STOPPING=1`. Without `NOTIFY_SOCKET` (not started by systemd) it does nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// How often a worker's status line is rebuilt at most.
pub const STATUS_EVERY: Duration = Duration::from_millis(200);

/// The workers' heartbeats and status lines.
pub struct Health {
    start: Instant,
    /// Milliseconds since `start` of each worker's last beat.
    beats: Vec<AtomicU64>,
    ready: Vec<AtomicBool>,
    told_ready: AtomicBool,
    status: Mutex<Vec<String>>,
    /// When each worker's status was last set (ms since `start`, 0: never).
    status_at: Vec<AtomicU64>,
    /// A service manager listens (`NOTIFY_SOCKET`); otherwise status lines are not even built.
    enabled: bool,
    stop: AtomicBool,
}

impl Health {
    /// For `n` workers (one per database).
    pub fn new(n: usize) -> Arc<Health> {
        Arc::new(Health {
            start: Instant::now(),
            beats: (0..n).map(|_| AtomicU64::new(0)).collect(),
            ready: (0..n).map(|_| AtomicBool::new(false)).collect(),
            told_ready: AtomicBool::new(false),
            status: Mutex::new(vec![String::from("starting"); n]),
            status_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            stop: AtomicBool::new(false),
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
        let Some(at) = self.status_at.get(i).filter(|_| self.enabled) else {
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
        if !self.enabled {
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
