//! The wire protocol: framing round trips, streaming decoding, limits, garbage
//! and validation.

mod common;

use common::Rng;
use replited_core::pos::Pos;
use replited_core::proto::*;

const PS: u32 = 512;

fn page(fill: u8) -> Vec<u8> {
    vec![fill; PS as usize]
}

fn txn(txid: u64, pages: &[u32], db_pages: u32) -> Txn {
    Txn {
        generation: 2,
        header: TxnInfo {
            txid,
            time_ms: 1_700_000_000_000 + txid,
            db_pages,
            db_checksum: 0xdead_beef ^ txid,
        },
        pages: pages.iter().map(|&p| (p, page(p as u8))).collect(),
    }
}

/// One of every message (and a few variations).
fn all_messages() -> Vec<Message> {
    vec![
        Message::Hello {
            version: PROTOCOL_VERSION,
            db: "main.db".into(),
            pos: None,
            db_checksum: None,
        },
        Message::Hello {
            version: PROTOCOL_VERSION,
            db: "x".into(),
            pos: Some(Pos {
                generation: 3,
                txid: u64::MAX,
            }),
            db_checksum: Some(7),
        },
        Message::Welcome {
            version: PROTOCOL_VERSION,
            generation: 1,
            txid: 99,
            db_checksum: u64::MAX,
            page_size: 4096,
        },
        Message::Error {
            code: ErrorCode::DatabaseNotFound,
            message: "Database not found: y".into(),
        },
        Message::Error {
            code: ErrorCode::VersionMismatch,
            message: String::new(),
        },
        Message::Error {
            code: ErrorCode::HistoryUnavailable,
            message: "h".into(),
        },
        Message::Error {
            code: ErrorCode::Diverged,
            message: "d".into(),
        },
        Message::Error {
            code: ErrorCode::ProtocolViolation,
            message: "p".into(),
        },
        Message::Error {
            code: ErrorCode::Internal,
            message: "i".into(),
        },
        Message::RestoreConfigRequest,
        Message::RestoreConfig {
            storage: b"s3://bucket/prefix".to_vec(),
        },
        Message::RestoreConfig { storage: vec![] },
        Message::SnapshotRequest,
        Message::SnapshotBegin {
            generation: 1,
            txid: 5,
            page_size: PS,
            db_pages: 3,
            db_checksum: 42,
        },
        Message::SnapshotPages {
            pages: vec![(1, page(1)), (2, page(2))],
        },
        Message::SnapshotPages { pages: vec![] },
        Message::SnapshotEnd,
        Message::Txn(txn(7, &[1, 3, 9], 9)),
        Message::Txn(txn(8, &[], 1)),
        Message::Ack {
            generation: 2,
            txid: 8,
            applied_at_ms: 1_700_000_000_123,
        },
        Message::Heartbeat { now_ms: 5, txid: 0 },
    ]
}

fn frame(m: &Message) -> Vec<u8> {
    let mut v = Vec::new();
    encode_frame(m, &mut v).unwrap();
    v
}

#[test]
fn round_trip_every_message() {
    for m in all_messages() {
        let f = frame(&m);
        let len = u32::from_be_bytes(f[..4].try_into().unwrap()) as usize;
        assert_eq!(len + 4, f.len());
        assert_eq!(decode_payload(&f[4..]).unwrap(), m);
        let mut d = FrameDecoder::new();
        d.push(&f);
        assert_eq!(d.poll().unwrap(), Some(m.clone()));
        assert_eq!(d.poll().unwrap(), None);
        assert_eq!(d.buffered(), 0);
        validate(&m, Some(PS)).unwrap_or_else(|e| panic!("{m:?}: {e}"));
    }
}

#[test]
fn encode_appends() {
    let mut v = b"prefix".to_vec();
    encode_frame(&Message::SnapshotEnd, &mut v).unwrap();
    assert_eq!(&v[..6], b"prefix");
    let mut d = FrameDecoder::new();
    d.push(&v[6..]);
    assert_eq!(d.poll().unwrap(), Some(Message::SnapshotEnd));
}

#[test]
fn decoder_byte_by_byte_and_in_chunks() {
    let msgs = all_messages();
    let mut stream = Vec::new();
    for m in &msgs {
        encode_frame(m, &mut stream).unwrap();
    }
    // Byte by byte.
    let mut d = FrameDecoder::new();
    let mut got = Vec::new();
    for b in &stream {
        d.push(std::slice::from_ref(b));
        while let Some(m) = d.poll().unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got, msgs);
    // Random chunks.
    let mut rng = Rng::new(77);
    for _ in 0..50 {
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        let mut i = 0;
        while i < stream.len() {
            let n = (1 + rng.below(300) as usize).min(stream.len() - i);
            d.push(&stream[i..i + n]);
            i += n;
            while let Some(m) = d.poll().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
    }
}

#[test]
fn oversized_length_refused_without_allocating() {
    for len in [MAX_FRAME_LEN + 1, u32::MAX] {
        let mut d = FrameDecoder::new();
        d.push(&len.to_be_bytes());
        assert_eq!(d.poll(), Err(ProtoError::FrameTooLarge(len)));
        // Nothing buffered waiting for the body, and the error is sticky.
        assert_eq!(d.buffered(), 0);
        d.push(&[0u8; 100]);
        assert_eq!(d.poll(), Err(ProtoError::FrameTooLarge(len)));
    }
    // The largest allowed length just waits for its bytes.
    let mut d = FrameDecoder::new();
    d.push(&MAX_FRAME_LEN.to_be_bytes());
    assert_eq!(d.poll(), Ok(None));
    assert_eq!(d.buffered(), 4);
    // Length 0.
    let mut d = FrameDecoder::new();
    d.push(&[0, 0, 0, 0]);
    assert_eq!(d.poll(), Err(ProtoError::EmptyFrame));
    assert!(ProtoError::FrameTooLarge(u32::MAX)
        .to_string()
        .contains("above the limit"));
}

#[test]
fn encoder_refuses_oversized_message() {
    let m = Message::RestoreConfig {
        storage: vec![0u8; MAX_FRAME_LEN as usize + 1],
    };
    let mut v = b"keep".to_vec();
    assert!(matches!(
        encode_frame(&m, &mut v),
        Err(ProtoError::MessageTooLarge(_))
    ));
    assert_eq!(v, b"keep");
}

#[test]
fn trailing_and_malformed_payloads() {
    let mut f = frame(&Message::SnapshotEnd);
    f.push(0);
    let len = (f.len() - 4) as u32;
    f[..4].copy_from_slice(&len.to_be_bytes());
    let mut d = FrameDecoder::new();
    d.push(&f);
    assert_eq!(d.poll(), Err(ProtoError::TrailingBytes(1)));
    // An unknown variant index.
    let mut d = FrameDecoder::new();
    d.push(&[0, 0, 0, 1, 0x7f]);
    assert_eq!(d.poll(), Err(ProtoError::Malformed));
    // A truncated message inside a complete frame.
    let f = frame(&Message::Txn(txn(7, &[1, 3], 3)));
    let mut cut = f[..f.len() - 10].to_vec();
    let len = (cut.len() - 4) as u32;
    cut[..4].copy_from_slice(&len.to_be_bytes());
    assert_eq!(decode_payload(&cut[4..]), Err(ProtoError::Malformed));
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = Rng::new(0x5eed_1234);
    let valid: Vec<Vec<u8>> = all_messages().iter().map(frame).collect();
    let mut errors = 0;
    for i in 0..4000 {
        let input = if i % 2 == 0 {
            // Pure garbage behind a plausible length.
            let n = rng.below(200) as usize;
            let mut v = (n as u32).to_be_bytes().to_vec();
            let body = rng.bytes(n);
            v.extend(body);
            v
        } else {
            // A valid frame with a few bytes of its payload flipped.
            let mut v = valid[rng.below(valid.len() as u64) as usize].clone();
            for _ in 0..1 + rng.below(4) {
                let at = 4 + rng.below((v.len() - 4) as u64) as usize;
                v[at] = rng.next() as u8;
            }
            v
        };
        let mut d = FrameDecoder::new();
        for c in input.chunks(1 + rng.below(16) as usize) {
            d.push(c);
        }
        match d.poll() {
            Ok(Some(m)) => {
                // Whatever parses must survive validation without panicking,
                // and re-encode.
                let _ = validate(&m, Some(PS));
                let _ = validate(&m, None);
                let mut v = Vec::new();
                encode_frame(&m, &mut v).unwrap();
            }
            Ok(None) => {}
            Err(_) => errors += 1,
        }
        // Totally random bytes, length prefix included.
        let mut d = FrameDecoder::new();
        let n = rng.below(64) as usize;
        d.push(&rng.bytes(n));
        let _ = d.poll();
    }
    assert!(errors > 1000, "only {errors} errors");
}

#[test]
fn error_code_display() {
    assert_eq!(
        ErrorCode::DatabaseNotFound.to_string(),
        "Database not found"
    );
    assert_eq!(
        ErrorCode::HistoryUnavailable.to_string(),
        "History unavailable"
    );
    assert!(ErrorCode::DatabaseNotFound.is_fatal());
    assert!(!ErrorCode::Diverged.is_fatal());
    assert!(!ErrorCode::HistoryUnavailable.is_fatal());
}

fn hello(db: &str) -> Message {
    Message::Hello {
        version: 1,
        db: db.into(),
        pos: None,
        db_checksum: None,
    }
}

#[test]
fn validate_db_names() {
    assert_eq!(validate(&hello("ok.db"), None), Ok(()));
    assert_eq!(validate(&hello(&"a".repeat(255)), None), Ok(()));
    assert_eq!(
        validate(&hello(&"a".repeat(256)), None),
        Err(ProtoError::DbNameTooLong(256))
    );
    for bad in ["", "a/b", "a\0b", "..", "a..b", "/abs"] {
        assert_eq!(
            validate(&hello(bad), None),
            Err(ProtoError::BadDbName),
            "{bad:?}"
        );
    }
    let zero = Message::Hello {
        version: 1,
        db: "a".into(),
        pos: Some(Pos {
            generation: 0,
            txid: 1,
        }),
        db_checksum: None,
    };
    assert_eq!(validate(&zero, None), Err(ProtoError::ZeroGeneration));
}

#[test]
fn validate_pages_rules() {
    let ok = Message::Txn(txn(5, &[1, 2, 9], 9));
    assert_eq!(validate(&ok, Some(PS)), Ok(()));
    assert_eq!(validate(&ok, None), Ok(()));
    // Wrong page size.
    assert_eq!(
        validate(&ok, Some(1024)),
        Err(ProtoError::PageLen {
            pgno: 1,
            len: 512,
            page_size: 1024
        })
    );
    // Beyond the database size.
    assert_eq!(
        validate(&Message::Txn(txn(5, &[1, 10], 9)), Some(PS)),
        Err(ProtoError::PgnoBeyondDbSize {
            pgno: 10,
            db_pages: 9
        })
    );
    // Page 0.
    assert_eq!(
        validate(&Message::Txn(txn(5, &[0], 9)), Some(PS)),
        Err(ProtoError::ZeroPgno)
    );
    // Not increasing.
    for pages in [&[2u32, 2][..], &[3, 1]] {
        assert!(matches!(
            validate(&Message::Txn(txn(5, pages, 9)), Some(PS)),
            Err(ProtoError::PagesNotIncreasing { .. })
        ));
    }
    // Short page.
    let mut t = txn(5, &[1], 1);
    t.pages[0].1.pop();
    assert!(matches!(
        validate(&Message::Txn(t.clone()), Some(PS)),
        Err(ProtoError::PageLen { .. })
    ));
    assert_eq!(
        validate(&Message::Txn(t), None),
        Err(ProtoError::BadPageSize(511))
    );
    // Zero txid / generation / db size.
    assert_eq!(
        validate(&Message::Txn(txn(0, &[], 1)), None),
        Err(ProtoError::ZeroTxid)
    );
    assert_eq!(
        validate(&Message::Txn(txn(1, &[], 0)), None),
        Err(ProtoError::ZeroDbPages)
    );
    // Snapshot pages follow the same rules.
    let sp = Message::SnapshotPages {
        pages: vec![(2, page(0)), (1, page(0))],
    };
    assert!(matches!(
        validate(&sp, Some(PS)),
        Err(ProtoError::PagesNotIncreasing { .. })
    ));
    // Bad page sizes in headers.
    let w = Message::Welcome {
        version: 1,
        generation: 1,
        txid: 1,
        db_checksum: 0,
        page_size: 1000,
    };
    assert_eq!(validate(&w, None), Err(ProtoError::BadPageSize(1000)));
    let e = Message::Error {
        code: ErrorCode::Internal,
        message: "x".repeat(MAX_ERROR_MESSAGE_LEN + 1),
    };
    assert_eq!(
        validate(&e, None),
        Err(ProtoError::ErrorMessageTooLong(MAX_ERROR_MESSAGE_LEN + 1))
    );
}

#[test]
fn txn_helpers() {
    let t = txn(5, &[1, 2], 9);
    assert_eq!(
        t.pos(),
        Pos {
            generation: 2,
            txid: 5
        }
    );
    let h = t.file_header();
    assert_eq!((h.txid, h.page_count, h.db_pages), (5, 2, 9));
    assert_eq!(TxnInfo::from(&h), t.header);
    assert_eq!(t.data_len(), 2 * PS as usize);
}

/// The encoding is part of the protocol: pin a few frames byte for byte.
#[test]
fn golden_frames() {
    assert_eq!(frame(&Message::SnapshotEnd), [0, 0, 0, 1, 8]);
    assert_eq!(
        frame(&Message::Heartbeat {
            now_ms: 300,
            txid: 0
        }),
        [0, 0, 0, 4, 11, 0xac, 0x02, 0]
    );
    assert_eq!(
        frame(&Message::Hello {
            version: 1,
            db: "x".into(),
            pos: Some(Pos {
                generation: 2,
                txid: 3
            }),
            db_checksum: None,
        }),
        [0, 0, 0, 8, 0, 1, 1, b'x', 1, 2, 3, 0]
    );
    assert_eq!(
        frame(&Message::Error {
            code: ErrorCode::Diverged,
            message: "d".into()
        }),
        [0, 0, 0, 4, 2, 3, 1, b'd']
    );
}
