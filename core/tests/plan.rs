//! Restore, retention and compaction planning.

mod common;

use common::Rng;
use replited_core::format::Kind;
use replited_core::name::FileMeta;
use replited_core::plan::*;

fn seg(generation: u64, first: u64, last: u64, level: u32, t0: u64, t1: u64) -> FileMeta {
    FileMeta {
        kind: Kind::Segment,
        generation,
        level,
        first_txid: first,
        last_txid: last,
        first_time_ms: t0,
        last_time_ms: t1,
    }
}

fn snap(generation: u64, txid: u64, time: u64) -> FileMeta {
    FileMeta {
        kind: Kind::Snapshot,
        generation,
        level: 0,
        first_txid: txid,
        last_txid: txid,
        first_time_ms: time,
        last_time_ms: time,
    }
}

fn plan(
    generation: u64,
    snapshot: usize,
    segments: &[usize],
    last: u64,
    stop: Option<u64>,
) -> RestorePlan {
    RestorePlan {
        generation,
        snapshot,
        segments: segments.to_vec(),
        last_txid: last,
        stop_time_ms: stop,
    }
}

/// One generation with compacted and level-0 segments and two snapshots.
fn one_generation() -> Vec<FileMeta> {
    vec![
        snap(1, 1, 100),             // 0
        seg(1, 2, 5, 0, 110, 150),   // 1
        seg(1, 6, 9, 0, 160, 190),   // 2
        seg(1, 10, 12, 0, 200, 220), // 3
        seg(1, 2, 9, 1, 110, 190),   // 4: compaction of 1 and 2
        snap(1, 9, 190),             // 5
        seg(1, 13, 13, 0, 230, 230), // 6
    ]
}

#[test]
fn restore_one_generation() {
    let f = one_generation();
    let cases: &[(Target, Result<RestorePlan, PlanError>)] = &[
        (Target::Latest, Ok(plan(1, 5, &[3, 6], 13, None))),
        (Target::Txid(1), Ok(plan(1, 0, &[], 1, None))),
        (Target::Txid(2), Ok(plan(1, 0, &[4], 2, None))),
        (Target::Txid(7), Ok(plan(1, 0, &[4], 7, None))),
        (Target::Txid(9), Ok(plan(1, 5, &[], 9, None))),
        (Target::Txid(11), Ok(plan(1, 5, &[3], 11, None))),
        (Target::Txid(13), Ok(plan(1, 5, &[3, 6], 13, None))),
        (
            Target::Txid(14),
            Err(PlanError::TxidNotFound {
                txid: 14,
                latest: 13,
            }),
        ),
        (
            Target::Txid(0),
            Err(PlanError::TxidNotFound {
                txid: 0,
                latest: 13,
            }),
        ),
        (Target::Time(100), Ok(plan(1, 0, &[], 1, Some(100)))),
        (Target::Time(155), Ok(plan(1, 0, &[4], 9, Some(155)))),
        (Target::Time(189), Ok(plan(1, 0, &[4], 9, Some(189)))),
        (Target::Time(190), Ok(plan(1, 5, &[], 9, Some(190)))),
        (Target::Time(200), Ok(plan(1, 5, &[3], 12, Some(200)))),
        (
            Target::Time(u64::MAX),
            Ok(plan(1, 5, &[3, 6], 13, Some(u64::MAX))),
        ),
        (
            Target::Time(99),
            Err(PlanError::TimeBeforeFirstSnapshot {
                time_ms: 99,
                first_ms: 100,
            }),
        ),
    ];
    for (target, want) in cases {
        assert_eq!(&plan_restore(&f, *target), want, "{target:?}");
    }
}

#[test]
fn restore_across_generations() {
    let f = vec![
        seg(2, 12, 20, 0, 310, 400), // 0
        snap(1, 1, 100),             // 1
        seg(1, 2, 10, 0, 110, 200),  // 2
        snap(2, 11, 300),            // 3
        seg(3, 21, 25, 0, 500, 600), // 4: generation 3 has no snapshot yet
        seg(1, 11, 11, 0, 290, 290), // 5: generation 1's tail, abandoned
    ];
    let cases: &[(Target, Result<RestorePlan, PlanError>)] = &[
        (Target::Latest, Ok(plan(2, 3, &[0], 20, None))),
        (Target::Txid(5), Ok(plan(1, 1, &[2], 5, None))),
        (Target::Txid(10), Ok(plan(1, 1, &[2], 10, None))),
        (Target::Txid(11), Ok(plan(2, 3, &[], 11, None))),
        (Target::Txid(15), Ok(plan(2, 3, &[0], 15, None))),
        (
            Target::Txid(22),
            Err(PlanError::TxidNotFound {
                txid: 22,
                latest: 20,
            }),
        ),
        (Target::Time(250), Ok(plan(1, 1, &[2], 10, Some(250)))),
        (Target::Time(295), Ok(plan(1, 1, &[2, 5], 11, Some(295)))),
        (Target::Time(305), Ok(plan(2, 3, &[], 11, Some(305)))),
        (Target::Time(10_000), Ok(plan(2, 3, &[0], 20, Some(10_000)))),
    ];
    for (target, want) in cases {
        assert_eq!(&plan_restore(&f, *target), want, "{target:?}");
    }
}

#[test]
fn restore_gaps_and_overlaps() {
    // A gap at txid 6.
    let mut f = vec![
        snap(1, 1, 100),           // 0
        seg(1, 2, 5, 0, 110, 150), // 1
        seg(1, 7, 9, 0, 170, 190), // 2
    ];
    assert_eq!(
        plan_restore(&f, Target::Latest),
        Ok(plan(1, 0, &[1], 5, None))
    );
    assert_eq!(
        plan_restore(&f, Target::Txid(8)),
        Err(PlanError::TxidNotFound { txid: 8, latest: 5 })
    );
    // A later snapshot bridges the gap.
    f.push(snap(1, 7, 175)); // 3
    assert_eq!(
        plan_restore(&f, Target::Txid(8)),
        Ok(plan(1, 3, &[2], 8, None))
    );
    assert_eq!(
        plan_restore(&f, Target::Txid(6)),
        Err(PlanError::TxidNotFound { txid: 6, latest: 9 })
    );
    assert_eq!(
        plan_restore(&f, Target::Latest),
        Ok(plan(1, 3, &[2], 9, None))
    );

    // Overlapping segments: partially applied ranges are listed; the one
    // reaching furthest wins; a level-2 file beats what it covers.
    let f = vec![
        snap(1, 1, 100),             // 0
        seg(1, 2, 5, 0, 110, 150),   // 1
        seg(1, 6, 9, 0, 160, 190),   // 2
        seg(1, 4, 11, 1, 130, 210),  // 3: overlaps 1 and 2
        seg(1, 10, 12, 0, 200, 220), // 4
        seg(1, 12, 15, 0, 220, 250), // 5
    ];
    assert_eq!(
        plan_restore(&f, Target::Latest),
        Ok(plan(1, 0, &[1, 3, 5], 15, None))
    );
    assert_eq!(
        plan_restore(&f, Target::Txid(5)),
        Ok(plan(1, 0, &[1], 5, None))
    );
    assert_eq!(
        plan_restore(&f, Target::Txid(6)),
        Ok(plan(1, 0, &[1, 3], 6, None))
    );
    let mut g = f.clone();
    g.push(seg(1, 2, 15, 2, 110, 250)); // 6
    assert_eq!(
        plan_restore(&g, Target::Latest),
        Ok(plan(1, 0, &[6], 15, None))
    );
    assert_eq!(
        plan_restore(&g, Target::Txid(3)),
        Ok(plan(1, 0, &[6], 3, None))
    );
}

#[test]
fn restore_without_snapshot() {
    let f = vec![seg(1, 2, 5, 0, 0, 1)];
    for t in [Target::Latest, Target::Txid(3), Target::Time(5)] {
        assert_eq!(plan_restore(&f, t), Err(PlanError::NoSnapshot));
        assert_eq!(plan_restore(&[], t), Err(PlanError::NoSnapshot));
    }
    assert_eq!(PlanError::NoSnapshot.to_string(), "no snapshot");
    assert_eq!(
        PlanError::TxidNotFound { txid: 8, latest: 5 }.to_string(),
        "txid 8 not restorable: the latest restorable txid is 5"
    );
}

/// Random histories (several generations, level-0 segments of random sizes
/// and random compactions): every txid is restorable and the plan's segments
/// chain from the snapshot to it.
#[test]
fn restore_random_histories() {
    let mut rng = Rng::new(0x5eed);
    for _ in 0..100 {
        let mut files = Vec::new();
        let mut txid = 1u64;
        let mut time = 1000u64;
        let gens = 1 + rng.below(3);
        for generation in 1..=gens {
            files.push(snap(generation, txid, time));
            let start = files.len();
            for _ in 0..rng.below(12) {
                let n = 1 + rng.below(4);
                files.push(seg(generation, txid + 1, txid + n, 0, time + 1, time + n));
                txid += n;
                time += n;
            }
            // Random compactions of runs of this generation's segments.
            let segs: Vec<FileMeta> = files[start..].to_vec();
            for _ in 0..rng.below(3) {
                if segs.len() < 2 {
                    break;
                }
                let a = rng.below(segs.len() as u64 - 1) as usize;
                let b = a + 1 + rng.below((segs.len() - a - 1) as u64) as usize;
                let (x, y) = (segs[a], segs[b]);
                files.push(seg(
                    generation,
                    x.first_txid,
                    y.last_txid,
                    1,
                    x.first_time_ms,
                    y.last_time_ms,
                ));
            }
            if rng.below(2) == 0 {
                files.push(snap(generation, txid, time));
            }
            txid += 1;
            time += 1;
        }
        let last = txid - 1;
        for n in 1..=last {
            let p = plan_restore(&files, Target::Txid(n)).unwrap();
            assert_eq!(p.last_txid, n);
            let mut cur = files[p.snapshot].first_txid;
            assert!(cur <= n);
            for &i in &p.segments {
                let s = files[i];
                assert_eq!(s.generation, p.generation);
                assert!(s.first_txid <= cur + 1 && cur < s.last_txid);
                cur = s.last_txid;
            }
            assert!(cur >= n);
        }
        assert_eq!(
            plan_restore(&files, Target::Latest).unwrap().last_txid,
            last
        );
    }
}

fn retention_files() -> Vec<FileMeta> {
    vec![
        snap(1, 1, 1000),              // 0
        seg(1, 2, 5, 0, 1100, 1500),   // 1
        snap(2, 6, 1600),              // 2
        seg(2, 7, 9, 0, 1700, 1900),   // 3
        snap(2, 9, 2000),              // 4
        seg(2, 10, 12, 0, 2100, 2200), // 5
        seg(2, 7, 12, 1, 1700, 2200),  // 6
    ]
}

#[test]
fn retention() {
    let f = retention_files();
    let cases: &[(u64, u64, &[usize])] = &[
        (2500, 600, &[0, 1]),       // base: snapshot 2 (time 1600 <= 1900)
        (2500, 400, &[0, 1, 2, 3]), // base: snapshot 4 (time 2000 <= 2100)
        (2500, 2000, &[]),          // nothing is old enough
        (100, 1_000_000, &[]),      // saturating
        (1000, 0, &[]),             // base: snapshot 0, nothing before it
        (u64::MAX, 0, &[0, 1, 2, 3]),
    ];
    for &(now, keep, want) in cases {
        assert_eq!(
            plan_retention(&f, now, keep),
            want,
            "now {now} retention {keep}"
        );
    }
    // The only snapshot is never deleted, nor is the latest one.
    let f = vec![
        seg(1, 2, 3, 0, 5, 6),
        snap(1, 3, 10),
        seg(1, 4, 5, 0, 11, 12),
    ];
    assert_eq!(plan_retention(&f, 1000, 0), vec![0]);
}

#[test]
fn compaction() {
    let base = vec![
        seg(1, 1, 3, 0, 0, 0),   // 0
        seg(1, 4, 6, 0, 0, 0),   // 1
        seg(1, 7, 9, 0, 0, 0),   // 2
        seg(1, 11, 12, 0, 0, 0), // 3: after a gap
        seg(1, 13, 14, 0, 0, 0), // 4
        seg(2, 1, 100, 0, 0, 0), // 5: another generation
        snap(1, 1, 0),           // 6
    ];
    assert_eq!(plan_compaction(&base, 1, 0, 3), Some(vec![0, 1, 2]));
    assert_eq!(plan_compaction(&base, 1, 0, 4), None);
    assert_eq!(plan_compaction(&base, 1, 1, 1), None);
    assert_eq!(plan_compaction(&base, 2, 0, 1), Some(vec![5]));
    assert_eq!(plan_compaction(&base, 3, 0, 0), None);
    assert_eq!(plan_compaction(&[], 1, 0, 0), None);
    // Once 0..=2 are compacted, the next run starts after the gap.
    let mut f = base.clone();
    f.push(seg(1, 1, 9, 1, 0, 0)); // 7
    assert_eq!(plan_compaction(&f, 1, 0, 2), Some(vec![3, 4]));
    assert_eq!(plan_compaction(&f, 1, 0, 3), None);
    assert_eq!(plan_compaction(&f, 1, 1, 1), Some(vec![7]));
    // A level-2 file covering the level-1 one.
    f.push(seg(1, 1, 14, 2, 0, 0)); // 8
    assert_eq!(plan_compaction(&f, 1, 1, 1), None);
    assert_eq!(plan_compaction(&f, 1, 0, 1), None);
    // Level-1 files in sequence; partial coverage does not count.
    let f = vec![
        seg(1, 1, 6, 1, 0, 0),   // 0
        seg(1, 7, 12, 1, 0, 0),  // 1
        seg(1, 13, 20, 1, 0, 0), // 2
        seg(1, 10, 20, 2, 0, 0), // 3: covers 2 only
    ];
    assert_eq!(plan_compaction(&f, 1, 1, 2), Some(vec![0, 1]));
    // Overlapping files at the same level: the one reaching furthest.
    let f = vec![
        seg(1, 1, 3, 0, 0, 0), // 0
        seg(1, 1, 5, 0, 0, 0), // 1
        seg(1, 4, 6, 0, 0, 0), // 2
        seg(1, 6, 9, 0, 0, 0), // 3
    ];
    assert_eq!(plan_compaction(&f, 1, 0, 2), Some(vec![1, 3]));
}

/// The definition `plan_compaction` implements, written the obvious (quadratic) way.
fn compaction_by_definition(
    files: &[FileMeta],
    generation: u64,
    level: u32,
    min_files: usize,
) -> Option<Vec<usize>> {
    let covered = |f: &FileMeta| {
        files.iter().any(|h| {
            h.kind == Kind::Segment
                && h.generation == generation
                && h.level > level
                && h.first_txid <= f.first_txid
                && f.last_txid <= h.last_txid
        })
    };
    let candidates: Vec<usize> = (0..files.len())
        .filter(|&i| {
            let f = &files[i];
            f.kind == Kind::Segment && f.generation == generation && f.level == level && !covered(f)
        })
        .collect();
    let pick = |pred: &dyn Fn(&FileMeta) -> bool| {
        candidates
            .iter()
            .copied()
            .filter(|&i| pred(&files[i]))
            .max_by_key(|&i| (files[i].last_txid, std::cmp::Reverse(i)))
    };
    let lowest = candidates.iter().map(|&i| files[i].first_txid).min()?;
    let mut run = Vec::new();
    let mut cur = pick(&|f| f.first_txid == lowest)?;
    loop {
        run.push(cur);
        let end = files[cur].last_txid;
        match pick(&|f| f.first_txid == end + 1) {
            Some(i) => cur = i,
            None => break,
        }
    }
    (run.len() >= min_files.max(1)).then_some(run)
}

/// Random listings (overlaps, duplicates, gaps, several levels and generations, snapshots):
/// the fast planner agrees with the definition on every one.
#[test]
fn compaction_agrees_with_its_definition() {
    let mut rng = Rng::new(0xC0FFEE);
    for _ in 0..3000 {
        let n = rng.below(40) as usize;
        let files: Vec<FileMeta> = (0..n)
            .map(|_| {
                let first = 1 + rng.below(30);
                let last = first + rng.below(6);
                let generation = 1 + rng.below(2);
                if rng.below(10) == 0 {
                    snap(generation, first, 0)
                } else {
                    seg(generation, first, last, rng.below(3) as u32, 0, 0)
                }
            })
            .collect();
        for generation in 1..=2 {
            for level in 0..3 {
                for min in [0, 1, 2, 4] {
                    assert_eq!(
                        plan_compaction(&files, generation, level, min),
                        compaction_by_definition(&files, generation, level, min),
                        "{files:?} generation {generation} level {level} min {min}"
                    );
                }
            }
        }
    }
}
