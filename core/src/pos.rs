//! Positions in a database's history.
//!
//! A generation is a run of history with no gap: it starts with a snapshot
//! and continues with segments holding every later transaction. When history
//! cannot be continued (the WAL was reset or checkpointed behind replited's
//! back, the database was replaced, ...) a new generation starts with a new
//! snapshot. Transaction ids (txids) are global: they keep increasing across
//! generations; a new generation's first snapshot takes the previous
//! generation's last txid + 1. Generations are numbered from 1 upwards.

use core::fmt;

/// A position in a database's history: a generation (a run of history with no
/// gap) and a transaction id. Txids are global: they keep increasing across
/// generations (a new generation's first snapshot takes the previous last
/// txid + 1). Ordered by generation, then txid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    /// The generation (>= 1).
    pub generation: u64,
    /// The transaction id (>= 1).
    pub txid: u64,
}

impl fmt::Display for Pos {
    /// Formats as `{generation:016x}/{txid:016x}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}/{:016x}", self.generation, self.txid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_order() {
        let p = Pos {
            generation: 2,
            txid: 0xabc,
        };
        assert_eq!(alloc::format!("{p}"), "0000000000000002/0000000000000abc");
        assert!(
            p < Pos {
                generation: 3,
                txid: 1
            }
        );
    }
}
