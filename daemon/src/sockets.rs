//! Sockets systemd passes (`LISTEN_FDS`, `LISTEN_FDNAMES`; `replited@.socket`): read once and
//! handed out by kind, so each is owned (and closed) by exactly one user. Taken sockets are
//! made close-on-exec, so an `--exec` child never inherits them.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use nix::sys::socket::{getsockopt, sockopt, SockType};

static PASSED: Mutex<Option<Vec<(String, OwnedFd)>>> = Mutex::new(None);

fn with_passed<T>(f: impl FnOnce(&mut Vec<(String, OwnedFd)>) -> T) -> T {
    let mut g = PASSED.lock().unwrap_or_else(|e| e.into_inner());
    let v = g.get_or_insert_with(|| {
        let Ok(fds) = sd_notify::listen_fds_with_names() else {
            return Vec::new();
        };
        fds.map(|(fd, name)| {
            // SAFETY: systemd passed this descriptor to this process (LISTEN_PID checked), and
            // this registry is the only place that takes ownership of it.
            (name, unsafe { OwnedFd::from_raw_fd(fd) })
        })
        .collect()
    });
    f(v)
}

/// Takes the passed sockets of `kind` (datagram: QUIC; stream: HTTP), with their names.
pub fn take(kind: SockType) -> Vec<(String, OwnedFd)> {
    with_passed(|v| {
        let mut out = Vec::new();
        let mut i = 0;
        while i < v.len() {
            if getsockopt(&v[i].1, sockopt::SockType).is_ok_and(|t| t == kind) {
                let (name, fd) = v.remove(i);
                let _ = nix::fcntl::fcntl(
                    fd.as_raw_fd(),
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                );
                out.push((name, fd));
            } else {
                i += 1;
            }
        }
        out
    })
}
