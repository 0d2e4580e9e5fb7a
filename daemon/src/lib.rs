//! replited: continuous backup and point-in-time restore for SQLite, native to systemd.
//!
//! The binary's modules, one concern each; the formats and all decisions that need no I/O live
//! in `replited-core`.

pub mod apply;
pub mod cert;
pub mod checkvfs;
pub mod cli;
pub mod config;
pub mod dbwatch;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod ops;
pub mod reader;
pub mod replicate;
pub mod restore;
pub mod s3;
pub mod server;
pub mod shutdown;
pub mod sidecar;
pub mod sockets;
pub mod spool;
pub mod sqlite;
pub mod storage;
pub mod transport;
pub mod walfile;

/// For unit tests: waits (up to 10 s, else fails naming `what`) until `done` holds.
#[cfg(test)]
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "{what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
