//! SIGTERM/SIGINT handling: a pipe that becomes readable once a signal arrives, so every
//! capture loop wakes from `poll` at once.

use std::os::unix::io::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Fires once on SIGTERM or SIGINT (or `trigger`).
pub struct Shutdown {
    read: UnixStream,
    write: UnixStream,
    flag: Arc<AtomicBool>,
}

impl Shutdown {
    /// Installs the signal handlers.
    pub fn install() -> std::io::Result<Shutdown> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, flag.clone())?;
            signal_hook::low_level::pipe::register(sig, write.try_clone()?)?;
        }
        Ok(Shutdown { read, write, flag })
    }

    /// True once a signal arrived.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Blocks until a shutdown is requested (no wake-ups meanwhile: the flag is set before the
    /// pipe is written).
    pub fn wait(&self) {
        use nix::poll::{PollFd, PollFlags, PollTimeout};
        while !self.requested() {
            let mut fds = [PollFd::new(self.fd(), PollFlags::POLLIN)];
            let _ = nix::poll::poll(&mut fds, PollTimeout::NONE);
        }
    }

    /// Readable once a signal arrived.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Fires it from inside the process (a capture loop that failed for good).
    pub fn trigger(&self) {
        use std::io::Write;
        self.flag.store(true, Ordering::SeqCst);
        let _ = (&self.write).write_all(&[1]);
    }
}
