//! replited: continuous backup and point-in-time restore for SQLite, native to systemd.
//!
//! The binary's modules, one concern each; the formats and all decisions that need no I/O live
//! in `replited-core`.

pub mod apply;
pub mod cert;
pub mod checkvfs;
pub mod cli;
pub mod config;
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
