//! The I/O-free core of replited.
//!
//! replited captures every committed transaction from a live SQLite database's
//! write-ahead log and stores it as files (segments and snapshots) for
//! point-in-time restore. This crate holds everything that does not touch the
//! outside world:
//!
//! * [`wal`]: SQLite's WAL header and frame format and its checksum;
//! * [`scan`]: a sans-I/O scanner that groups WAL frames into committed
//!   transactions;
//! * [`hash`]: page hashes, the incremental whole-database checksum and a
//!   streaming file hasher;
//! * [`pos`]: positions in a database's history (generation, txid);
//! * [`format`]: replited's file format for snapshots and segments, with a
//!   streaming encoder and a streaming, fully validating decoder;
//! * [`name`]: storage object names;
//! * [`plan`]: restore, retention and compaction planning;
//! * [`proto`]: the replication protocol's messages and framing (postcard);
//! * [`primary`] and [`replica`]: the two ends of a replication stream as
//!   state machines (`handle_*` in, `poll_*` out).
//!
//! The crate is `no_std` (it needs `alloc`), has no clock (times come in as
//! milliseconds since the Unix epoch) and no threads.
//! See `docs/FORMAT.md` for the formats and rules in one place.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod hash;
pub mod name;
pub mod plan;
pub mod pos;
pub mod primary;
pub mod proto;
pub mod replica;
pub mod scan;
pub mod wal;

pub use format::{Compression, Decoder, Encoder, Event, FileHeader, FormatError, Kind, TxnHeader};
pub use hash::{page_hash, DbHashes, FileHasher};
pub use name::FileMeta;
pub use plan::{plan_compaction, plan_restore, plan_retention, PlanError, RestorePlan, Target};
pub use pos::Pos;
pub use scan::{EndOfLog, Frame, PageRef, ScanError, WalPos, WalScanner, WalTxn};
pub use wal::{FrameHeader, WalError, WalHeader};
