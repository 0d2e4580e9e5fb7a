//! Storage object names.

use replited_core::format::{Compression, FileHeader, Kind};
use replited_core::name::FileMeta;

fn seg(generation: u64, first: u64, last: u64, level: u32) -> FileMeta {
    FileMeta {
        kind: Kind::Segment,
        generation,
        level,
        first_txid: first,
        last_txid: last,
        first_time_ms: first.wrapping_mul(10) / 2,
        last_time_ms: last.wrapping_mul(10) / 2 + (last - first),
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

#[test]
fn paths() {
    assert_eq!(
        seg(1, 0x10, 0x1f, 2).path(),
        "0000000000000001/0000000000000010-000000000000001f-0000000000000050-00000000000000aa.l2.seg"
    );
    assert_eq!(
        snap(0xab, 5, 0x18bcfe56800).path(),
        "00000000000000ab/0000000000000005-0000018bcfe56800.snap"
    );
    assert_eq!(FileMeta::generation_dir(0xab), "00000000000000ab");
}

#[test]
fn round_trip() {
    let metas = [
        seg(1, 1, 1, 0),
        seg(7, 100, 200, 12),
        seg(u64::MAX, u64::MAX - 1, u64::MAX, u32::MAX),
        snap(1, 1, 0),
        snap(3, 0xdead_beef, u64::MAX),
    ];
    for m in metas {
        assert_eq!(FileMeta::parse_path(&m.path()), Some(m), "{}", m.path());
    }
}

#[test]
fn names_sort_in_txid_order() {
    let mut metas = [
        seg(1, 0x100, 0x1ff, 0),
        seg(1, 0x9, 0xff, 0),
        seg(1, 0x9, 0x1ff, 1),
        seg(2, 0x200, 0x300, 0),
    ];
    let mut paths: Vec<_> = metas.iter().map(|m| m.path()).collect();
    paths.sort();
    metas.sort_by_key(|m| (m.generation, m.first_txid, m.last_txid));
    assert_eq!(paths, metas.iter().map(|m| m.path()).collect::<Vec<_>>());
}

#[test]
fn junk_gives_none() {
    let good_seg = seg(1, 2, 3, 0).path();
    let good_snap = snap(1, 2, 3).path();
    let junk = [
        String::new(),
        "/".into(),
        "x".into(),
        good_seg.replace(".seg", ".seg.tmp"),
        good_seg.replace(".l0", ".l00"),
        good_seg.replace(".l0", ".l"),
        good_seg.replace(".l0", ".l-1"),
        good_seg.replace(".l0", ".l+1"),
        good_seg.replace(".l0", ".l4294967296"),
        good_seg.replace(".l0", ""),
        good_seg.replace("0000000000000001/", "000000000000001/"),
        good_seg.replace("0000000000000001/", "00000000000000001/"),
        good_seg.replace("0000000000000001/", ""),
        good_seg.replace("0000000000000001/", "0000000000000001//"),
        good_seg.replace("0000000000000001/", "x/0000000000000001/"),
        good_seg.replace("0000000000000002", "000000000000000A"),
        good_seg.replace("0000000000000002", "0x00000000000002"),
        good_seg.replace("-0000000000000003", ""),
        good_seg.replace(".l0.seg", "-0000000000000001.l0.seg"),
        good_seg.replace(".seg", ".snap"),
        good_snap.replace(".snap", ".seg"),
        good_snap.replace(".snap", ".snap~"),
        format!("{good_snap}/"),
        good_snap.replace("0000000000000002-", "0000000000000002_"),
        good_snap.replace("-0000000000000003", "-000000000000003"),
        // Rules: generation 0, txid 0, last < first, last time < first time.
        "0000000000000000/0000000000000001-0000000000000001.snap".into(),
        "0000000000000001/0000000000000000-0000000000000001.snap".into(),
        "0000000000000001/0000000000000005-0000000000000004-0000000000000000-0000000000000000.l0.seg"
            .into(),
        "0000000000000001/0000000000000004-0000000000000005-0000000000000002-0000000000000001.l0.seg"
            .into(),
        "0000000000000001/0000000000000004-0000000000000005-0000000000000002-00000000000000é1.l0.seg"
            .into(),
    ];
    for j in junk {
        assert_eq!(FileMeta::parse_path(&j), None, "{j:?}");
    }
    assert!(FileMeta::parse_path(&good_seg).is_some());
    assert!(FileMeta::parse_path(&good_snap).is_some());
}

#[test]
fn from_header_and_matches() {
    let h = FileHeader {
        kind: Kind::Segment,
        compression: Compression::Lz4,
        page_size: 4096,
        level: 1,
        generation: 2,
        first_txid: 10,
        last_txid: 20,
        first_time_ms: 100,
        last_time_ms: 200,
        wal: None,
        db_checksum: 0,
        db_pages: 1,
    };
    let m = FileMeta::from_header(&h);
    assert_eq!(FileMeta::parse_path(&m.path()), Some(m));
    assert!(m.matches(&h));
    let mut other = h;
    other.last_txid = 21;
    assert!(!m.matches(&other));
    let mut other = h;
    other.level = 0;
    assert!(!m.matches(&other));
    // Compression is not part of the name.
    let mut other = h;
    other.compression = Compression::None;
    assert!(m.matches(&other));
}
