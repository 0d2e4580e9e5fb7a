//! Waking when a database or its WAL is written instead of looking every few hundred
//! milliseconds (inotify): an idle replica then sleeps until something happens.
//!
//! One watch on the database's directory (creation, removal, renames and writes of the files in
//! it), filtered to the files asked for. Writes through `mmap` (SQLite's `-shm`) raise no event;
//! every commit writes the `-wal` (or, in rollback mode, the database file), which does.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// Reads per [`DbWatch::take`] at most (each up to 4 KiB of events): a steady stream of writes
/// never keeps the caller reading.
const READS: usize = 16;

/// Writes, creations, removals and renames of a database's files.
pub struct DbWatch {
    inotify: Inotify,
    names: Vec<OsString>,
}

/// What [`DbWatch::take`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// A watched file changed (or events were lost, which counts as a change).
    pub changed: bool,
    /// Every pending event was read (else more are waiting).
    pub drained: bool,
}

impl DbWatch {
    /// Watches the files named `db` + each of `suffixes` (`""` for the database itself,
    /// `"-wal"` for its WAL).
    pub fn new(db: &Path, suffixes: &[&str]) -> nix::Result<DbWatch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(
            crate::storage::parent_dir(db),
            AddWatchFlags::IN_MODIFY
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_MOVED_FROM,
        )?;
        let base = db.file_name().unwrap_or(db.as_os_str());
        let names = suffixes
            .iter()
            .map(|s| {
                let mut n = base.to_owned();
                n.push(s);
                n
            })
            .collect();
        Ok(DbWatch { inotify, names })
    }

    /// Reads the pending events without waiting.
    pub fn take(&self) -> Taken {
        let mut changed = false;
        for _ in 0..READS {
            match self.inotify.read_events() {
                Ok(events) if !events.is_empty() => {
                    changed |= events.iter().any(|e| {
                        e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW)
                            || e.name.as_ref().is_some_and(|n| self.names.contains(n))
                    });
                }
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => {
                    return Taken {
                        changed,
                        drained: true,
                    }
                }
                // Cannot tell what happened: as if the files changed.
                Err(_) => {
                    return Taken {
                        changed: true,
                        drained: true,
                    }
                }
            }
        }
        Taken {
            changed,
            drained: false,
        }
    }

    /// Waits until a watched file changes, `wake` becomes readable, or `timeout` passes;
    /// returns whether a watched file changed.
    pub fn wait(&self, timeout: Duration, wake: BorrowedFd<'_>) -> bool {
        let until = std::time::Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let mut fds = [
                PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN),
                PollFd::new(wake, PollFlags::POLLIN),
            ];
            match nix::poll::poll(&mut fds, poll_timeout(left)) {
                Ok(0) => return false,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                // Cannot wait: as if the files changed (the caller looks, then waits again).
                Err(_) => return true,
            }
            if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                return self.take().changed;
            }
            if self.take().changed {
                return true;
            }
        }
    }

    /// Registers it with the runtime (call within one), to wait for it with [`changed`].
    pub fn into_async(self) -> std::io::Result<tokio::io::unix::AsyncFd<DbWatch>> {
        // SAFETY: the inotify descriptor is this DbWatch's own, open until it is dropped, and
        // `as_raw_fd` always returns that one.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self, tokio::io::Interest::READABLE)
        }
        .map_err(std::io::Error::from)
    }
}

/// `d` as `poll`'s timeout, rounded up to the millisecond (a deadline less than one away is not
/// polled for again and again with a timeout of 0), at most 65 s.
pub fn poll_timeout(d: Duration) -> PollTimeout {
    PollTimeout::from(d.as_nanos().div_ceil(1_000_000).min(u16::MAX as u128) as u16)
}

impl AsRawFd for DbWatch {
    fn as_raw_fd(&self) -> RawFd {
        self.inotify.as_fd().as_raw_fd()
    }
}

/// Waits (in the runtime) until a watched file changes or `deadline` passes; without a watch,
/// never returns.
pub async fn changed(
    w: Option<&tokio::io::unix::AsyncFd<DbWatch>>,
    deadline: tokio::time::Instant,
) {
    let Some(w) = w else {
        return std::future::pending().await;
    };
    let _ = tokio::time::timeout_at(deadline, async {
        loop {
            let Ok(mut ready) = w.readable().await else {
                return;
            };
            let t = ready.get_inner().take();
            if t.drained {
                ready.clear_ready();
            }
            if t.changed {
                return;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_timeouts_round_up() {
        assert_eq!(poll_timeout(Duration::ZERO), PollTimeout::ZERO);
        assert_eq!(
            poll_timeout(Duration::from_micros(1)),
            PollTimeout::from(1u16)
        );
        assert_eq!(
            poll_timeout(Duration::from_micros(1001)),
            PollTimeout::from(2u16)
        );
        assert_eq!(
            poll_timeout(Duration::from_secs(500)),
            PollTimeout::from(u16::MAX)
        );
    }

    #[test]
    fn only_the_watched_files_count() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("data.db");
        let w = DbWatch::new(&db, &["-wal"]).unwrap();
        let (_keep, wake) = std::os::unix::net::UnixStream::pair().unwrap();
        std::fs::write(dir.path().join("data.db-shm"), b"x").unwrap();
        std::fs::write(&db, b"x").unwrap();
        std::fs::write(dir.path().join("other.db-wal"), b"x").unwrap();
        assert!(!w.wait(Duration::from_millis(50), wake.as_fd()));
        std::fs::write(dir.path().join("data.db-wal"), b"x").unwrap();
        assert!(w.wait(Duration::from_secs(5), wake.as_fd()));
        // Drained: nothing more until the next write.
        assert!(!w.take().changed);
        std::fs::remove_file(dir.path().join("data.db-wal")).unwrap();
        assert!(w.take().changed);
    }
}
