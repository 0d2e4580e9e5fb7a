//! Restore, retention and compaction planning over a listing of files.
//!
//! Every function takes the files' [`FileMeta`] (as parsed from their names)
//! and answers with indexes into that slice; nothing is read.
//!
//! Chaining: from a snapshot at txid S, the applied history reaches `cur = S`;
//! a segment of the same generation continues it when
//! `first <= cur + 1 <= last` (a segment that overlaps what is already applied
//! is usable: the applier skips txids <= cur). At each step the covering
//! segment with the largest last txid is chosen, so compacted segments are
//! preferred over the level-0 segments they cover.

use alloc::vec::Vec;
use core::fmt;

use crate::format::Kind;
use crate::name::FileMeta;

/// What to restore to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The latest transaction reachable in the latest generation.
    Latest,
    /// Exactly this transaction.
    Txid(u64),
    /// The last transaction committed at or before this time (ms).
    Time(u64),
}

/// Which files to apply, in order, to restore a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestorePlan {
    /// The generation restored from.
    pub generation: u64,
    /// Index of the snapshot into the input slice.
    pub snapshot: usize,
    /// Indexes of the segments, in apply order.
    pub segments: Vec<usize>,
    /// Apply transactions with txid <= this.
    pub last_txid: u64,
    /// Some(T) for Target::Time: also stop before the first transaction with
    /// time > T.
    pub stop_time_ms: Option<u64>,
}

/// Why no restore plan exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlanError {
    /// There is no snapshot at all.
    NoSnapshot,
    /// No chain of snapshot and segments reaches the txid.
    TxidNotFound {
        /// The txid asked for.
        txid: u64,
        /// The highest txid any chain reaches.
        latest: u64,
    },
    /// Every snapshot was taken after the time asked for.
    TimeBeforeFirstSnapshot {
        /// The time asked for.
        time_ms: u64,
        /// The earliest snapshot's time.
        first_ms: u64,
    },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::NoSnapshot => f.write_str("no snapshot"),
            PlanError::TxidNotFound { txid, latest } => write!(
                f,
                "txid {txid} not restorable: the latest restorable txid is {latest}"
            ),
            PlanError::TimeBeforeFirstSnapshot { time_ms, first_ms } => write!(
                f,
                "time {time_ms} is before the first snapshot at {first_ms}"
            ),
        }
    }
}

impl core::error::Error for PlanError {}

fn snapshots(files: &[FileMeta]) -> impl Iterator<Item = (usize, &FileMeta)> {
    files
        .iter()
        .enumerate()
        .filter(|(_, f)| f.kind == Kind::Snapshot)
}

/// Chains segments of `generation` from `start` (the txid already applied).
/// `limit`: stop once this txid is reached. `max_first_time`: only segments
/// whose first time is <= this. Returns (segments, txid reached).
fn chain(
    files: &[FileMeta],
    generation: u64,
    start: u64,
    limit: Option<u64>,
    max_first_time: Option<u64>,
) -> (Vec<usize>, u64) {
    let mut cur = start;
    let mut out = Vec::new();
    loop {
        if limit.is_some_and(|l| cur >= l) || cur == u64::MAX {
            break;
        }
        let next = cur + 1;
        let best = files
            .iter()
            .enumerate()
            .filter(|(_, f)| {
                f.kind == Kind::Segment
                    && f.generation == generation
                    && f.first_txid <= next
                    && next <= f.last_txid
                    && max_first_time.is_none_or(|t| f.first_time_ms <= t)
            })
            .max_by_key(|(i, f)| (f.last_txid, core::cmp::Reverse(*i)));
        match best {
            Some((i, f)) => {
                out.push(i);
                cur = f.last_txid;
            }
            None => break,
        }
    }
    (out, cur)
}

/// The highest txid any chain (from any snapshot) reaches; 0 without
/// snapshots.
fn latest_reachable(files: &[FileMeta]) -> u64 {
    snapshots(files)
        .map(|(_, s)| chain(files, s.generation, s.first_txid, None, None).1)
        .max()
        .unwrap_or(0)
}

/// Plans a restore. See the module docs and `docs/FORMAT.md`:
/// * Latest: the highest generation that has a snapshot, its snapshot with
///   the highest txid, then every segment that chains;
/// * Txid(N): the snapshot with the greatest txid <= N (txids are global
///   across generations), chained up to N;
/// * Time(T): the latest snapshot with time <= T (highest generation, then
///   highest txid), chained through segments whose first time is <= T; the
///   applier also stops before the first transaction with time > T.
pub fn plan_restore(files: &[FileMeta], target: Target) -> Result<RestorePlan, PlanError> {
    if snapshots(files).next().is_none() {
        return Err(PlanError::NoSnapshot);
    }
    match target {
        Target::Latest => {
            let (si, s) = snapshots(files)
                .max_by_key(|(i, s)| (s.generation, s.first_txid, core::cmp::Reverse(*i)))
                .ok_or(PlanError::NoSnapshot)?;
            let (segments, last) = chain(files, s.generation, s.first_txid, None, None);
            Ok(RestorePlan {
                generation: s.generation,
                snapshot: si,
                segments,
                last_txid: last,
                stop_time_ms: None,
            })
        }
        Target::Txid(n) => {
            let not_found = || PlanError::TxidNotFound {
                txid: n,
                latest: latest_reachable(files),
            };
            let (si, s) = snapshots(files)
                .filter(|(_, s)| s.first_txid <= n)
                .max_by_key(|(i, s)| (s.first_txid, s.generation, core::cmp::Reverse(*i)))
                .ok_or_else(not_found)?;
            let (segments, last) = chain(files, s.generation, s.first_txid, Some(n), None);
            if last < n {
                return Err(not_found());
            }
            Ok(RestorePlan {
                generation: s.generation,
                snapshot: si,
                segments,
                last_txid: n,
                stop_time_ms: None,
            })
        }
        Target::Time(t) => {
            let Some((si, s)) = snapshots(files)
                .filter(|(_, s)| s.first_time_ms <= t)
                .max_by_key(|(i, s)| (s.generation, s.first_txid, core::cmp::Reverse(*i)))
            else {
                let first_ms = snapshots(files)
                    .map(|(_, s)| s.first_time_ms)
                    .min()
                    .unwrap_or(0);
                return Err(PlanError::TimeBeforeFirstSnapshot {
                    time_ms: t,
                    first_ms,
                });
            };
            let (segments, last) = chain(files, s.generation, s.first_txid, None, Some(t));
            Ok(RestorePlan {
                generation: s.generation,
                snapshot: si,
                segments,
                last_txid: last,
                stop_time_ms: Some(t),
            })
        }
    }
}

/// Files to delete so that every point in [now - retention, now] stays
/// restorable: base = the latest snapshot with time <= now - retention (none →
/// delete nothing); delete every snapshot with txid < base.txid and every
/// segment with last_txid <= base.txid (any generation). Never the latest
/// snapshot. Indexes in ascending order.
pub fn plan_retention(files: &[FileMeta], now_ms: u64, retention_ms: u64) -> Vec<usize> {
    let cutoff = now_ms.saturating_sub(retention_ms);
    let Some((_, base)) = snapshots(files)
        .filter(|(_, s)| s.first_time_ms <= cutoff)
        .max_by_key(|(_, s)| (s.first_txid, s.generation))
    else {
        return Vec::new();
    };
    let base_txid = base.first_txid;
    let latest = snapshots(files)
        .map(|(_, s)| (s.first_txid, s.generation))
        .max();
    files
        .iter()
        .enumerate()
        .filter(|(_, f)| match f.kind {
            Kind::Snapshot => {
                f.first_txid < base_txid && Some((f.first_txid, f.generation)) != latest
            }
            Kind::Segment => f.last_txid <= base_txid,
        })
        .map(|(i, _)| i)
        .collect()
}

/// Compaction: among `generation`'s segments at `level` that are not covered
/// by a file of a higher level (a higher-level segment of the generation whose
/// range contains theirs), the longest run contiguous in txids starting at the
/// lowest first txid (each next segment starts just after the previous one
/// ends; among candidates the one reaching furthest); Some(indexes in txid
/// order) if that run has at least `min_files` files (and at least one), else
/// None.
pub fn plan_compaction(
    files: &[FileMeta],
    generation: u64,
    level: u32,
    min_files: usize,
) -> Option<Vec<usize>> {
    // O(n log n): called at every compaction with thousands of small segments listed (a
    // quadratic search here was most of capture's CPU at 1,000 commits/s).
    //
    // The higher-level segments as (first, furthest last among those starting at or before
    // it), in first-txid order: a file is covered iff the entry for the last such segment
    // starting at or before it reaches its last txid.
    let mut higher: Vec<(u64, u64)> = files
        .iter()
        .filter(|h| h.kind == Kind::Segment && h.generation == generation && h.level > level)
        .map(|h| (h.first_txid, h.last_txid))
        .collect();
    higher.sort_unstable();
    let mut reach = 0;
    for h in higher.iter_mut() {
        reach = reach.max(h.1);
        h.1 = reach;
    }
    let covered = |f: &FileMeta| {
        let n = higher.partition_point(|&(first, _)| first <= f.first_txid);
        n > 0 && higher[n - 1].1 >= f.last_txid
    };
    let mut candidates: Vec<usize> = files
        .iter()
        .enumerate()
        .filter(|(_, f)| {
            f.kind == Kind::Segment && f.generation == generation && f.level == level && !covered(f)
        })
        .map(|(i, _)| i)
        .collect();
    // For each first txid, the candidate reaching furthest (the earliest listed among equals).
    candidates.sort_unstable_by_key(|&i| {
        (
            files[i].first_txid,
            core::cmp::Reverse(files[i].last_txid),
            i,
        )
    });
    candidates.dedup_by_key(|i| files[*i].first_txid);
    let starting_at = |txid: u64| {
        candidates
            .binary_search_by_key(&txid, |&i| files[i].first_txid)
            .ok()
            .map(|p| candidates[p])
    };
    let mut run = Vec::new();
    let mut cur = *candidates.first()?;
    loop {
        run.push(cur);
        let end = files[cur].last_txid;
        if end == u64::MAX {
            break;
        }
        match starting_at(end + 1) {
            Some(i) => cur = i,
            None => break,
        }
    }
    (run.len() >= min_files.max(1)).then_some(run)
}
