//! Bad input from every side, against the real binary:
//!
//! * hostile QUIC peers holding a valid client certificate, against a real primary while a real
//!   replica streams: lengths of 4 GiB and of the largest frame on 200 streams at once, a frame
//!   that would decode into a quarter of a gigabyte, garbage postcard, a Hello followed by junk,
//!   database names that try to leave their directory, acks beyond what was sent, messages a
//!   replica never sends, truncated and reset streams, silent streams; the primary refuses each
//!   with a clear log line, its memory stays bounded (VmHWM), and the replica converges
//!   untouched;
//! * replicas without a valid certificate (none, another CA, self-signed, expired, not yet
//!   valid, a server certificate): refused, nothing restored;
//! * a hostile "primary" (a certificate from the replica's CA) feeding a real replica garbage:
//!   the replica's database stays as it was and nothing is written outside its directory;
//! * garbage config files (random bytes, invalid UTF-8, NUL bytes, 20 MB, nesting 100,000 deep):
//!   exit 1 naming the file, nothing created; and thousands of mutated configs through
//!   `Config::parse` in-process;
//! * the protocol harnesses of the fuzz targets on seeded random input, and the replay of every
//!   input the fuzzers kept (`scripts/fuzz` copies them to `core/tests/fixtures/fuzz/<target>/`).

mod common;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Opts};
use common::*;
use replited::transport::{
    client_config, server_config, ClientTls, FramedStream, ServerTls, TransportError,
};
use replited_core::proto::{encode_frame, ErrorCode, Message, MAX_FRAME_LEN};
use replited_core::Pos;

// ---------------------------------------------------------------------------------------------
// Helpers

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A field of /proc/PID/status in kB (VmRSS, VmHWM).
fn status_kb(pid: u32, key: &str) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// Resets the peak resident set size (VmHWM) of a process to its current size.
fn reset_peak(pid: u32) {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

fn frame(m: &Message) -> Vec<u8> {
    let mut f = Vec::new();
    encode_frame(m, &mut f).unwrap();
    f
}

/// A frame holding `payload` as is.
fn raw_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

fn hello(db: &str, pos: Option<Pos>) -> Message {
    Message::Hello {
        version: 1,
        db: db.to_string(),
        pos,
        db_checksum: None,
    }
}

/// Every file under `dir`, recursively (relative paths), sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = fs::read_dir(d) {
            for e in rd.flatten() {
                let p = e.path();
                out.push(p.strip_prefix(root).unwrap().to_path_buf());
                if p.is_dir() && !p.is_symlink() {
                    walk(root, &p, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// How a hostile exchange ended.
#[derive(Debug)]
enum End {
    /// The primary finished its side of the stream.
    Finished,
    /// The stream or connection failed (the primary stopped or reset it, or closed the
    /// connection): why.
    Failed(#[allow(dead_code)] String),
    /// Nothing more within the time allowed.
    Silent,
}

#[derive(Debug)]
struct Reply {
    msgs: Vec<Message>,
    /// Writing the hostile bytes failed (the primary stopped the stream).
    write_error: Option<String>,
    end: End,
}

impl Reply {
    fn error(&self) -> Option<(ErrorCode, &str)> {
        self.msgs.iter().find_map(|m| match m {
            Message::Error { code, message } => Some((*code, message.as_str())),
            _ => None,
        })
    }
}

/// A client with the replica's valid certificate, talking raw bytes to the primary.
struct HostileClient {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
}

impl HostileClient {
    fn new(c: &Cluster) -> HostileClient {
        let certs = c.dir.path().join("certs");
        Self::with_tls(
            c,
            ClientTls {
                ca: certs.join("ca.pem"),
                cert: Some(certs.join("replica-1.pem")),
                key: Some(certs.join("replica-1-key.pem")),
                server_name: "localhost".into(),
            },
        )
    }

    fn with_tls(c: &Cluster, tls: ClientTls) -> HostileClient {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(client_config(&tls).unwrap());
        HostileClient {
            endpoint,
            addr: SocketAddr::from(([127, 0, 0, 1], c.port)),
        }
    }

    async fn connect(&self) -> Result<quinn::Connection, String> {
        let connecting = self
            .endpoint
            .connect(self.addr, "localhost")
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(15), connecting).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("handshake timed out".into()),
        }
    }

    /// Opens a stream on `conn`, writes `bytes` (then finishes it when asked) and reads the
    /// primary's answer for up to `wait`.
    async fn exchange(
        conn: &quinn::Connection,
        bytes: &[u8],
        finish: bool,
        wait: Duration,
    ) -> Reply {
        let (send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                return Reply {
                    msgs: Vec::new(),
                    write_error: Some(e.to_string()),
                    end: End::Failed(e.to_string()),
                }
            }
        };
        // The primary's STOP_SENDING is watched for beside the write: quinn-proto 0.11 answers
        // a write that the connection's window refuses with "blocked" before it looks whether
        // the stream was stopped (`write_source`), so the writer woken by the stop sleeps again
        // until the window opens — 200 streams of 16 MiB keep it shut, and the writes saw
        // their stops only at their 60 s deadline (after it, on a slow host).
        let stopped = send.stopped();
        let mut fs = FramedStream::new(send, recv);
        let write_error = match tokio::time::timeout(wait, async {
            let write = fs.send_frames(bytes);
            tokio::pin!(write);
            tokio::select! {
                biased;
                r = &mut write => r.err().map(|e| e.to_string()),
                r = stopped => match r {
                    Ok(Some(code)) => {
                        Some(TransportError::from(quinn::WriteError::Stopped(code)).to_string())
                    }
                    // The connection lost: the write says how.
                    _ => write.await.err().map(|e| e.to_string()),
                },
            }
        })
        .await
        {
            Ok(e) => e,
            Err(_) => Some("write timed out".into()),
        };
        if finish && write_error.is_none() {
            let _ = fs.finish();
        }
        let mut msgs = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        let end = loop {
            match tokio::time::timeout_at(deadline, fs.recv()).await {
                Ok(Ok(Some(m))) => msgs.push(m),
                Ok(Ok(None)) => break End::Finished,
                Ok(Err(e)) => break End::Failed(e.to_string()),
                Err(_) => break End::Silent,
            }
        };
        Reply {
            msgs,
            write_error,
            end,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile peers against a real primary

/// The payload of a `SnapshotPages` message holding `n` empty pages: two bytes each on the wire,
/// 32 bytes each once decoded.
fn empty_pages_payload(n: u32) -> Vec<u8> {
    let mut p = vec![7u8]; // variant index of SnapshotPages
    let mut v = n;
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            p.push(b);
            break;
        }
        p.push(b | 0x80);
    }
    p.reserve(2 * n as usize);
    for _ in 0..n {
        p.extend_from_slice(&[1, 0]);
    }
    p
}

#[test]
fn hostile_peers_leave_the_primary_bounded_and_the_replica_streaming() {
    let c = Cluster::new(Opts::default());
    let p = c.primary();
    run_load(&c.pdb, 1, 200);
    let r = c.replica(&[]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(60));
    wait_converged(&c.pdb, &c.rdb, Duration::from_secs(30), &[&p, &r]);
    let pid = p.child.id();
    let rt = runtime();
    let _in_rt = rt.enter();
    let client = HostileClient::new(&c);

    // --- 1. Memory: lengths and bodies a replica never sends, no load running. ---------------
    // Each attack is measured alone: the primary's peak resident size (VmHWM, reset before)
    // against its resident size just before.
    let measure = |what: &str, attack: &dyn Fn()| -> u64 {
        let before = status_kb(pid, "VmRSS");
        reset_peak(pid);
        attack();
        let peak = status_kb(pid, "VmHWM");
        let growth_mb = peak.saturating_sub(before) / 1024;
        eprintln!(
            "primary memory, {what}: VmRSS {} MB before, VmHWM {} MB during: +{growth_mb} MB",
            before / 1024,
            peak / 1024
        );
        growth_mb
    };
    let conn = rt.block_on(client.connect()).unwrap();
    // 4 GiB announced, then 64 KiB of junk: refused as soon as the length is in.
    let g1 = measure("a length of 4 GiB", &|| {
        let mut junk = u32::MAX.to_be_bytes().to_vec();
        junk.extend(vec![0x41; 64 * 1024]);
        let reply = rt.block_on(HostileClient::exchange(
            &conn,
            &junk,
            false,
            Duration::from_secs(5),
        ));
        assert!(reply.msgs.is_empty(), "{reply:?}");
        assert!(
            !matches!(reply.end, End::Silent),
            "the stream was not closed: {reply:?}"
        );
    });
    // A whole frame of the largest length that would decode into 8.4 million pages (270 MB of
    // vectors): refused by its length, before any of it is decoded.
    let g2 = measure("a 16 MiB frame decoding to 8.4 M pages", &|| {
        let n = (MAX_FRAME_LEN - 8) / 2;
        let amplifier = raw_frame(&empty_pages_payload(n));
        assert!(amplifier.len() <= MAX_FRAME_LEN as usize + 4);
        let reply = rt.block_on(HostileClient::exchange(
            &conn,
            &amplifier,
            true,
            Duration::from_secs(30),
        ));
        assert!(
            reply.msgs.is_empty(),
            "the amplifier was decoded: {:?}",
            reply.msgs
        );
    });
    // The largest length a frame may have, then all of its body but the last byte, on 200
    // streams over two connections at once: 3.2 GB if each were buffered.
    let g3 = measure("200 streams of 16 MiB frames never completed", &|| {
        let outcomes = rt.block_on(async {
            let conn2 = client.connect().await.unwrap();
            let mut body = MAX_FRAME_LEN.to_be_bytes().to_vec();
            body.extend(vec![0x42; MAX_FRAME_LEN as usize - 1]);
            let body = Arc::new(body);
            let mut tasks = Vec::new();
            for i in 0..200 {
                let conn = if i % 2 == 0 {
                    conn.clone()
                } else {
                    conn2.clone()
                };
                let body = body.clone();
                tasks.push(tokio::spawn(async move {
                    HostileClient::exchange(&conn, &body, false, Duration::from_secs(60)).await
                }));
            }
            let mut outcomes = std::collections::BTreeMap::new();
            for t in tasks {
                let reply = t.await.unwrap();
                assert!(reply.msgs.is_empty(), "{:?}", reply.msgs);
                let what = match &reply.write_error {
                    None => "written whole".to_string(),
                    Some(e) if e.contains("stopped by peer") => "stopped by the primary".into(),
                    Some(e) => e.clone(),
                };
                *outcomes.entry(what).or_insert(0) += 1;
            }
            conn2.close(0u32.into(), b"done");
            outcomes
        });
        eprintln!("200 streams of 16 MiB frames: {outcomes:?}");
        assert_eq!(
            outcomes.get("stopped by the primary"),
            Some(&200),
            "every stream is stopped at its length"
        );
    });
    conn.close(0u32.into(), b"done");
    for (what, g) in [("4 GiB length", g1), ("amplifier", g2), ("200 streams", g3)] {
        assert!(
            g < 64,
            "the primary's peak memory grew by {g} MB under hostile frames ({what})"
        );
    }
    let plog = p.log_text();
    assert!(
        plog.contains("frame length 4294967295 above"),
        "the primary names the refused length:\n{plog}"
    );

    // --- 2. Protocol abuse while the replica streams a load. ----------------------------------
    let load = spawn_load(&c.pdb, 201, 1400, &["--rate", "120"]);
    let etc_passwd = fs::metadata("/etc/passwd").unwrap().modified().unwrap();
    let before_tree: Vec<PathBuf> = tree(c.dir.path())
        .into_iter()
        .filter(|p| !p.starts_with("backup") && !p.to_string_lossy().contains(".log"))
        .collect();
    rt.block_on(async {
        let conn = client.connect().await.unwrap();
        let wait = Duration::from_secs(5);

        // A stream that never says anything whole: closed by the Hello timeout (checked below).
        let (mut silent, _silent_recv) = conn.open_bi().await.unwrap();
        silent.write_all(&[0, 0]).await.unwrap();

        // Garbage postcard: an unknown variant.
        let reply = HostileClient::exchange(&conn, &raw_frame(&[0xff; 10]), false, wait).await;
        assert!(reply.msgs.is_empty(), "{reply:?}");
        assert!(!matches!(reply.end, End::Silent), "{reply:?}");

        // A valid Hello, then junk: welcomed, then cut off.
        let mut bytes = frame(&hello("data.db", None));
        bytes.extend(raw_frame(&[0x99; 37]));
        let reply = HostileClient::exchange(&conn, &bytes, false, wait).await;
        assert!(
            matches!(reply.msgs.first(), Some(Message::Welcome { .. })),
            "{reply:?}"
        );
        assert!(!matches!(reply.end, End::Silent), "{reply:?}");

        // Names that try to leave their directory, or are not names at all.
        let long = "x".repeat(300);
        for name in [
            "../../etc/passwd",
            "/etc/passwd",
            "../data.db",
            "..",
            "a/b",
            "data.db/..",
            "data.db\0",
            "",
            long.as_str(),
        ] {
            let reply =
                HostileClient::exchange(&conn, &frame(&hello(name, None)), false, wait).await;
            let (code, message) = reply
                .error()
                .unwrap_or_else(|| panic!("no error for the name {name:?}: {reply:?}"));
            assert_eq!(code, ErrorCode::ProtocolViolation, "{name:?}: {message}");
            assert!(message.contains("database name"), "{name:?}: {message}");
            assert!(
                !reply
                    .msgs
                    .iter()
                    .any(|m| matches!(m, Message::Welcome { .. })),
                "{name:?} was welcomed"
            );
            assert!(matches!(reply.end, End::Finished), "{name:?}: {reply:?}");
        }
        // A name that is not UTF-8 does not even decode.
        let mut payload = vec![0u8, 1, 4, 0xff, 0xfe, b'.', b'.'];
        payload.extend([0, 0]);
        let reply = HostileClient::exchange(&conn, &raw_frame(&payload), false, wait).await;
        assert!(reply.msgs.is_empty(), "{reply:?}");

        // A database this primary does not serve; a protocol version it does not speak.
        let reply =
            HostileClient::exchange(&conn, &frame(&hello("other.db", None)), false, wait).await;
        assert_eq!(
            reply.error(),
            Some((ErrorCode::DatabaseNotFound, "Database not found: other.db")),
            "{reply:?}"
        );
        let v2 = Message::Hello {
            version: 2,
            db: "data.db".into(),
            pos: None,
            db_checksum: None,
        };
        let reply = HostileClient::exchange(&conn, &frame(&v2), false, wait).await;
        assert_eq!(
            reply.error().map(|e| e.0),
            Some(ErrorCode::VersionMismatch),
            "{reply:?}"
        );

        // Messages only a primary sends.
        for m in [
            Message::SnapshotEnd,
            Message::Welcome {
                version: 1,
                generation: 1,
                txid: 1,
                db_checksum: 0,
                page_size: 4096,
            },
            Message::RestoreConfig {
                storage: b"type = \"fs\"\npath = \"/\"\n".to_vec(),
            },
        ] {
            let reply = HostileClient::exchange(&conn, &frame(&m), false, wait).await;
            let (code, message) = reply.error().unwrap_or_else(|| panic!("{reply:?}"));
            assert_eq!(code, ErrorCode::ProtocolViolation, "{message}");
        }

        // An ack beyond anything sent, in a streaming session.
        let reply =
            HostileClient::exchange(&conn, &frame(&hello("data.db", None)), true, wait).await;
        let Some(Message::Welcome {
            generation, txid, ..
        }) = reply.msgs.first().cloned()
        else {
            panic!("{reply:?}")
        };
        let mut bytes = frame(&hello("data.db", Some(Pos { generation, txid })));
        bytes.extend(frame(&Message::Ack {
            generation,
            txid: u64::MAX / 2,
            applied_at_ms: 0,
        }));
        let reply = HostileClient::exchange(&conn, &bytes, false, wait).await;
        let (code, message) = reply.error().unwrap_or_else(|| panic!("{reply:?}"));
        assert_eq!(code, ErrorCode::ProtocolViolation);
        assert!(message.contains("beyond"), "{message}");

        // A frame cut short by the end of the stream, and a stream reset midway.
        let mut cut = 100u32.to_be_bytes().to_vec();
        cut.extend([1; 10]);
        let reply = HostileClient::exchange(&conn, &cut, true, wait).await;
        assert!(reply.msgs.is_empty(), "{reply:?}");
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&cut).await.unwrap();
        send.reset(7u32.into()).unwrap();

        // 100 sessions at once on one connection, each welcomed, then dropped.
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let conn = conn.clone();
            tasks.push(tokio::spawn(async move {
                HostileClient::exchange(&conn, &frame(&hello("data.db", None)), true, wait).await
            }));
        }
        for t in tasks {
            let reply = t.await.unwrap();
            assert!(
                matches!(reply.msgs.first(), Some(Message::Welcome { .. })),
                "{reply:?}"
            );
        }
        // The silent stream is dropped by the Hello timeout (10 s).
        tokio::time::sleep(Duration::from_secs(11)).await;
        drop(silent);
        // Abruptly gone, mid-session.
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&frame(&hello("data.db", None)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        conn.close(99u32.into(), b"gone");
    });
    wait_ok(load);
    let took = wait_converged(&c.pdb, &c.rdb, Duration::from_secs(60), &[&p, &r]);
    eprintln!("replica converged {took:?} after the load ended");
    assert_eq!(state(&c.rdb), expect(1400));
    assert_eq!(integrity(&c.rdb), "ok");

    // Nothing escaped: no file appeared outside the backup and the logs, /etc/passwd untouched.
    let after_tree: Vec<PathBuf> = tree(c.dir.path())
        .into_iter()
        .filter(|p| !p.starts_with("backup") && !p.to_string_lossy().contains(".log"))
        .filter(|p| !before_tree.contains(p))
        .filter(|p| {
            // The primary's and the replica's own WAL files come and go.
            let s = p.to_string_lossy();
            !(s.ends_with("-wal") || s.ends_with("-shm"))
        })
        .collect();
    assert!(after_tree.is_empty(), "new files: {after_tree:?}");
    assert_eq!(
        fs::metadata("/etc/passwd").unwrap().modified().unwrap(),
        etc_passwd
    );

    let plog = p.log_text();
    for needle in [
        "malformed frame: not a protocol message",
        "bad database name",
        "database name of 300 bytes",
        "ack for txid 9223372036854775807 beyond",
        "unexpected snapshot end message",
        "stream ended in the middle of a frame",
        "no Hello within",
        "protocol version mismatch: ours 1, theirs 2",
        "above this receiver's limit of 65536 bytes",
        "stream reset by peer",
    ] {
        assert!(
            plog.contains(needle),
            "the primary's log does not say {needle:?}:\n{plog}"
        );
    }
    assert!(!plog.contains("panicked"), "the primary panicked:\n{plog}");
    let rlog = r.stop();
    assert!(
        !rlog.contains("connection to the primary lost") && !rlog.contains("must be rebuilt"),
        "the real replica was disturbed:\n{rlog}"
    );
    p.stop();
}

// ---------------------------------------------------------------------------------------------
// Certificates

/// A CA made with rcgen in-process (for certificates `replited cert` would never issue: expired,
/// not yet valid, with the wrong key usage), written as PEM files.
struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2200, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    /// Writes `NAME.pem` and `NAME-key.pem` into `dir`: a client certificate valid from
    /// `from` to `until` (years), with extended key usage clientAuth unless `server_eku`.
    fn issue(&self, dir: &Path, name: &str, from: i32, until: i32, server_eku: bool) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![format!("{name}.example")]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![if server_eku {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        }];
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(until, 1, 1);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    }
}

#[test]
fn replicas_without_a_valid_certificate_are_refused() {
    let c = Cluster::new(Opts::default());
    let certs = c.dir.path().join("certs");
    let bad = c.dir.path().join("bad-certs");
    fs::create_dir_all(&bad).unwrap();
    // The primary trusts replited's CA and a second CA of the test's own, so that the only
    // thing wrong with the certificates below is what each case says.
    let test_ca = TestCa::new("test CA");
    let bundle = c.dir.path().join("client-cas.pem");
    fs::write(
        &bundle,
        format!(
            "{}{}",
            fs::read_to_string(certs.join("ca.pem")).unwrap(),
            test_ca.cert.pem()
        ),
    )
    .unwrap();
    let pcfg = fs::read_to_string(&c.pcfg).unwrap().replace(
        &format!("tls_client_ca = \"{}\"", certs.join("ca.pem").display()),
        &format!("tls_client_ca = \"{}\"", bundle.display()),
    );
    assert!(pcfg.contains("client-cas.pem"));
    fs::write(&c.pcfg, pcfg).unwrap();
    test_ca.issue(&bad, "good", 2000, 2200, false);
    test_ca.issue(&bad, "expired", 2000, 2001, false);
    test_ca.issue(&bad, "future", 2150, 2200, false);
    test_ca.issue(&bad, "server-usage", 2000, 2200, true);
    // Another CA altogether, and a self-signed certificate.
    replited::cert::make_ca(&bad.join("other-ca"), "some other CA").unwrap();
    replited::cert::make_cert(&bad.join("other-ca"), &bad, "other", &[], true).unwrap();
    let selfsigned = rcgen::generate_simple_self_signed(vec!["replica-1.example".into()]).unwrap();
    fs::write(bad.join("self.pem"), selfsigned.cert.pem()).unwrap();
    fs::write(
        bad.join("self-key.pem"),
        selfsigned.key_pair.serialize_pem(),
    )
    .unwrap();

    let p = c.primary();
    run_load(&c.pdb, 1, 50);
    let rt = runtime();
    let _in_rt = rt.enter();
    let tls = |name: Option<&str>| ClientTls {
        ca: certs.join("ca.pem"),
        cert: name.map(|n| bad.join(format!("{n}.pem"))),
        key: name.map(|n| bad.join(format!("{n}-key.pem"))),
        server_name: "localhost".into(),
    };
    let cases: [(Option<&str>, &str); 6] = [
        (None, "peer sent no certificates"),
        (Some("other"), "UnknownIssuer"),
        (Some("self"), "UnknownIssuer"),
        (Some("expired"), "certificate expired"),
        (Some("future"), "certificate not valid yet"),
        (
            Some("server-usage"),
            "does not allow extended key usage for client authentication",
        ),
    ];
    rt.block_on(async {
        // The control: the test CA's valid certificate is accepted and served.
        let client = HostileClient::with_tls(&c, tls(Some("good")));
        let conn = client
            .connect()
            .await
            .expect("a valid certificate is accepted");
        let reply = HostileClient::exchange(
            &conn,
            &frame(&hello("data.db", None)),
            true,
            Duration::from_secs(5),
        )
        .await;
        assert!(
            matches!(reply.msgs.first(), Some(Message::Welcome { .. })),
            "{reply:?}"
        );
        conn.close(0u32.into(), b"done");
        for (name, why) in cases {
            let client = HostileClient::with_tls(&c, tls(name));
            // The handshake may complete on the client's side before the server's verdict
            // arrives (TLS 1.3 sends the client certificate last): then the first stream fails.
            let outcome = match client.connect().await {
                Err(e) => e,
                Ok(conn) => {
                    let reply = HostileClient::exchange(
                        &conn,
                        &frame(&hello("data.db", None)),
                        true,
                        Duration::from_secs(5),
                    )
                    .await;
                    assert!(
                        reply.msgs.is_empty(),
                        "{name:?} was served: {:?}",
                        reply.msgs
                    );
                    format!("{:?} / {:?}", reply.write_error, reply.end)
                }
            };
            eprintln!("client certificate {name:?}: {outcome}");
            assert!(outcome.contains(why), "{name:?}: {outcome}");
        }
    });
    // The primary logs each refusal with the reason (the last ones may still be on their way).
    let start = Instant::now();
    while p.log_text().matches("refused connection").count() < cases.len()
        && start.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let plog = p.log_text();
    for (name, why) in cases {
        assert!(
            plog.contains(why),
            "the primary does not log {why:?} for {name:?}:\n{plog}"
        );
    }
    assert_eq!(
        plog.matches("refused connection").count(),
        cases.len(),
        "{plog}"
    );

    // A real replica with the other CA's certificate: refused, nothing restored.
    let rcfg = fs::read_to_string(&c.rcfg)
        .unwrap()
        .replace(
            &certs.join("replica-1.pem").display().to_string(),
            &bad.join("expired.pem").display().to_string(),
        )
        .replace(
            &certs.join("replica-1-key.pem").display().to_string(),
            &bad.join("expired-key.pem").display().to_string(),
        );
    assert!(rcfg.contains("expired.pem"));
    fs::write(&c.rcfg, rcfg).unwrap();
    let r = c.replica(&[]);
    std::thread::sleep(Duration::from_secs(4));
    let rlog = r.log_text();
    assert!(!rlog.contains("caught up"), "{rlog}");
    assert!(
        !c.rdb.exists(),
        "nothing is restored for a replica with an expired certificate"
    );
    assert!(
        rlog.contains("connection to the primary lost")
            || rlog.contains("cannot reach the primary"),
        "{rlog}"
    );
    drop(r);
    p.stop();
}

// ---------------------------------------------------------------------------------------------
// A hostile primary against a real replica

/// A "primary" holding a certificate from the replica's CA that answers every Hello with
/// `script(n)` (n: the how-many-th stream), raw bytes.
fn spawn_fake_primary(
    rt: &tokio::runtime::Runtime,
    c: &Cluster,
    script: fn(usize) -> Vec<u8>,
) -> tokio::task::JoinHandle<()> {
    let certs = c.dir.path().join("certs");
    let tls = ServerTls {
        cert: certs.join("primary.pem"),
        key: certs.join("primary-key.pem"),
        client_ca: None,
    };
    let port = c.port;
    rt.spawn(async move {
        let ep = quinn::Endpoint::server(
            server_config(&tls).unwrap(),
            SocketAddr::from(([127, 0, 0, 1], port)),
        )
        .unwrap();
        let mut n = 0;
        while let Some(incoming) = ep.accept().await {
            let Ok(conn) = incoming.await else { continue };
            while let Ok((send, recv)) = conn.accept_bi().await {
                let mut fs = FramedStream::new(send, recv);
                let bytes = script(n);
                n += 1;
                tokio::spawn(async move {
                    // Whatever the replica says first (its Hello), answer with the script.
                    let _ = tokio::time::timeout(Duration::from_secs(5), fs.recv()).await;
                    let _ = fs.send_frames(&bytes).await;
                    let _ = tokio::time::timeout(Duration::from_secs(3), fs.recv()).await;
                });
            }
        }
    })
}

fn hostile_primary_script(n: usize) -> Vec<u8> {
    let welcome = |generation, txid, page_size| Message::Welcome {
        version: 1,
        generation,
        txid,
        db_checksum: 1,
        page_size,
    };
    match n % 8 {
        // A length of 4 GiB.
        0 => u32::MAX.to_be_bytes().to_vec(),
        // Garbage.
        1 => raw_frame(&[0xee; 64]),
        // A page size that is not one.
        2 => frame(&welcome(1, 10, 1000)),
        // A new generation, then a restore config naming directories the replica must not
        // treat as its backup.
        3 | 4 => {
            let mut b = frame(&welcome(99, 10, 4096));
            let path = if n % 8 == 3 {
                "/etc"
            } else {
                "../../../../../../"
            };
            b.extend(frame(&Message::RestoreConfig {
                storage: format!("type = \"fs\"\npath = \"{path}\"\n").into_bytes(),
            }));
            b
        }
        // A snapshot that lies about its size, then pages out of order.
        5 => {
            let mut b = frame(&welcome(99, 10, 4096));
            b.extend(frame(&Message::SnapshotBegin {
                generation: 99,
                txid: 10,
                page_size: 4096,
                db_pages: 3,
                db_checksum: 0,
            }));
            b.extend(frame(&Message::SnapshotPages {
                pages: vec![(2, vec![0; 4096]), (1, vec![0; 4096])],
            }));
            b
        }
        // A restore config that is not TOML.
        6 => {
            let mut b = frame(&welcome(99, 10, 4096));
            b.extend(frame(&Message::RestoreConfig {
                storage: vec![0xff, 0, 1, 2],
            }));
            b
        }
        // A transaction whose pages go past the end of its database.
        _ => {
            let mut b = frame(&welcome(1, 10, 4096));
            b.extend(frame(&Message::Txn(replited_core::proto::Txn {
                generation: 1,
                header: replited_core::proto::TxnInfo {
                    txid: 1,
                    time_ms: 0,
                    db_pages: 1,
                    db_checksum: 0,
                },
                pages: vec![(5, vec![0; 4096])],
            })));
            b
        }
    }
}

#[test]
fn a_hostile_primary_cannot_damage_a_replica() {
    let c = Cluster::new(Opts::default());
    // A real replica first gets a real database.
    let p = c.primary();
    run_load(&c.pdb, 1, 300);
    let r = c.replica(&[]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(60));
    wait_converged(&c.pdb, &c.rdb, Duration::from_secs(30), &[&p, &r]);
    r.stop();
    p.stop();
    let held = state(&c.rdb);
    let before: Vec<PathBuf> = tree(c.dir.path());

    // Then an impostor takes the primary's address.
    let rt = runtime();
    let fake = spawn_fake_primary(&rt, &c, hostile_primary_script);
    let r = c.replica(&[]);
    let start = Instant::now();
    let mut rounds;
    loop {
        let log = r.log_text();
        rounds = log.matches("connection to the primary lost").count();
        if rounds >= 12 || start.elapsed() > Duration::from_secs(90) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let rlog = r.stop();
    fake.abort();
    eprintln!("hostile primary: {rounds} conversations refused:");
    let mut reasons: Vec<&str> = rlog
        .lines()
        .filter_map(|l| l.split_once("connection to the primary lost: "))
        .map(|(_, why)| why.split("; reconnecting").next().unwrap_or(why))
        .collect();
    reasons.sort();
    reasons.dedup();
    for r in &reasons {
        eprintln!("  {r}");
    }
    assert!(rounds >= 8, "the replica did not keep refusing:\n{rlog}");
    assert!(!rlog.contains("panicked"), "{rlog}");
    for needle in [
        "frame length 4294967295 above",
        "malformed frame",
        "bad page size 1000",
        "restore config is not UTF-8",
    ] {
        assert!(
            rlog.contains(needle),
            "the replica does not say {needle:?}:\n{rlog}"
        );
    }
    // Its database is what it was, whole; nothing was created outside its own files.
    assert_eq!(state(&c.rdb), held);
    assert_eq!(integrity(&c.rdb), "ok");
    let new: Vec<PathBuf> = tree(c.dir.path())
        .into_iter()
        .filter(|p| !before.contains(p) && !p.to_string_lossy().contains(".log"))
        .filter(|p| {
            let s = p.to_string_lossy();
            !(s.ends_with("-wal") || s.ends_with("-shm"))
        })
        .collect();
    assert!(new.is_empty(), "new files: {new:?}");
}

// ---------------------------------------------------------------------------------------------
// Garbage config files

#[test]
fn garbage_config_files_exit_1_naming_the_file_and_create_nothing() {
    let dir = tempfile::Builder::new()
        .prefix("replited-hostile-config")
        .tempdir()
        .unwrap();
    let d = dir.path();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut rand = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let good = format!(
        "[[database]]\ndb = \"{}\"\n[[database.replicate]]\nname = \"b\"\n[database.replicate.params]\ntype = \"fs\"\nroot = \"{}\"\n",
        d.join("data.db").display(),
        d.join("backup").display()
    );
    let mut nul = good.clone().into_bytes();
    nul[20] = 0;
    let mut latin1 = good.clone().into_bytes();
    latin1.extend(b"# caf\xe9\n");
    let deep_arrays = format!(
        "x = {}1{}\n{good}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let deep_tables = format!(
        "x = {}1{}\n{good}",
        "{a = ".repeat(50_000),
        "}".repeat(50_000)
    );
    let deep_dotted = format!("{} = 1\n{good}", vec!["a"; 100_000].join("."));
    let mut huge = good.clone();
    while huge.len() < 20 << 20 {
        huge.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    huge.push_str("[[database]]\nbogus = [\n");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random", rand(4096)),
        ("random-large", rand(1 << 20)),
        ("empty", Vec::new()),
        ("nul", nul),
        ("latin1", latin1),
        ("deep-arrays", deep_arrays.into_bytes()),
        ("deep-tables", deep_tables.into_bytes()),
        ("deep-dotted", deep_dotted.into_bytes()),
        ("huge", huge.into_bytes()),
        ("unterminated", b"[[database]]\ndb = \"/x\n".to_vec()),
        ("env-garbage", b"[[database]]\ndb = \"${1x}/${\"\n".to_vec()),
        (
            "env-unterminated",
            b"[[database]]\ndb = \"${HOME\"\n".to_vec(),
        ),
    ];
    for (name, bytes) in &cases {
        let path = d.join(format!("{name}.toml"));
        fs::write(&path, bytes).unwrap();
        let before = tree(d);
        for cmd in ["replicate", "replica-sidecar", "run"] {
            let start = Instant::now();
            // stderr to a file outside `d`: a message quoting a 200 KB line would fill a pipe.
            let err_path = std::env::temp_dir().join(format!(
                "replited-hostile-{}-{name}-{cmd}.err",
                std::process::id()
            ));
            let mut child = Command::new(bin())
                .args(["-c", path.to_str().unwrap(), cmd])
                .current_dir(d)
                .stdout(Stdio::null())
                .stderr(fs::File::create(&err_path).unwrap())
                .spawn()
                .unwrap();
            let status = loop {
                if let Some(st) = child.try_wait().unwrap() {
                    break st;
                }
                if start.elapsed() > Duration::from_secs(60) {
                    child.kill().unwrap();
                    panic!("replited {cmd} with {name}.toml did not exit");
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let err = String::from_utf8_lossy(&fs::read(&err_path).unwrap()).into_owned();
            fs::remove_file(&err_path).unwrap();
            assert_eq!(
                status.code(),
                Some(1),
                "replited {cmd} with {name}.toml: {status}\n{}",
                &err[..err.len().min(2000)]
            );
            assert!(
                err.contains(path.to_str().unwrap()),
                "replited {cmd}: the message does not name {}: {}",
                path.display(),
                &err[..err.len().min(2000)]
            );
            assert!(!err.contains("panicked"), "{err}");
            eprintln!(
                "{name}.toml ({} bytes), {cmd}: exit 1 in {:.0?}, {} byte message: {}",
                bytes.len(),
                start.elapsed(),
                err.len(),
                err.lines()
                    .rfind(|l| !l.trim().is_empty() && !l.trim().starts_with('|'))
                    .unwrap_or("")
                    .chars()
                    .take(160)
                    .collect::<String>()
            );
        }
        assert_eq!(tree(d), before, "{name}.toml: files were created");
        assert!(!d.join("backup").exists());
    }
    // A directory and a missing file are named too.
    for path in [d.to_path_buf(), d.join("missing.toml")] {
        let o = Command::new(bin())
            .args(["-c", path.to_str().unwrap(), "replicate"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        assert!(
            stderr(&o).contains(path.to_str().unwrap()),
            "{}",
            stderr(&o)
        );
    }
}

/// Applies one random mutation of a few kinds to a config text.
fn mutate_config(rng: &mut u64, text: &str) -> String {
    let mut next = || {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    };
    let mut b = text.as_bytes().to_vec();
    const TOKENS: &[&str] = &[
        "[",
        "]",
        "[[",
        "]]",
        "{",
        "}",
        "=",
        "\"",
        "'",
        "\n",
        ".",
        ",",
        "${",
        "}",
        "${X:-",
        "\"\"\"",
        "'''",
        "#",
        "\\u0000",
        "\\",
        "-1",
        "1e999",
        "nan",
        "true",
        "1979-05-27",
        "database",
        "replicate",
        "params",
        "type",
        "\"s3\"",
        "\"stream\"",
        "\"fs\"",
        "role",
        "\"replica\"",
        "[replica]",
        "[http]",
        "addr",
        "\"quic://[::1]:1\"",
        "db",
    ];
    for _ in 0..1 + next() % 4 {
        let len = b.len() as u64;
        let at = (next() % (len + 1)) as usize;
        match next() % 5 {
            0 if len > 0 => {
                b.remove(at.min(b.len() - 1));
            }
            1 => {
                let t = TOKENS[(next() % TOKENS.len() as u64) as usize];
                b.splice(at..at, t.bytes());
            }
            2 if len > 0 => {
                let end = (at + (next() % 40) as usize).min(b.len());
                b.drain(at..end);
            }
            3 => {
                let byte = next() as u8;
                b.insert(at, byte);
            }
            _ => {
                // Duplicate a slice elsewhere.
                if len > 2 {
                    let from = (next() % len) as usize;
                    let to = (from + (next() % 60) as usize).min(b.len());
                    let piece = b[from..to].to_vec();
                    b.splice(at..at, piece);
                }
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// The checks of the `config` fuzz target: never a panic; a refusal names the file; an accepted
/// config has a database naming a file.
fn check_config(text: &str) {
    let path = Path::new("/fuzz/replited.toml");
    match replited::config::Config::parse(path, text) {
        Ok(c) => {
            assert!(!c.databases.is_empty());
            for d in &c.databases {
                assert!(d.db.file_name().is_some(), "{}", d.db.display());
            }
        }
        Err(e) => assert!(e.to_string().contains("/fuzz/replited.toml"), "{e}"),
    }
}

/// The checks of the `restore_config` fuzz target: never a panic.
fn check_restore_config(bytes: &[u8]) {
    let _ = replited::server::parse_restore_config(bytes);
}

/// The config texts the seeds and the mutations start from: the examples and the shapes the
/// tests use.
fn config_seeds() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut seeds: Vec<String> = ["examples/replited.toml", "packaging/example.toml"]
        .iter()
        .filter_map(|p| fs::read_to_string(root.join(p)).ok())
        .collect();
    seeds.push(
        "[log]\nlevel = \"debug\"\n\n[[database]]\ndb = \"/var/lib/app/data.db\"\nsync-interval = \"1s\"\n\n[[database.replicate]]\nname = \"backup\"\n[database.replicate.params]\ntype = \"fs\"\nroot = \"/var/backups\"\n\n[[database.replicate]]\nname = \"stream\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"quic://0.0.0.0:50051\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n".into(),
    );
    seeds.push(
        "role = \"replica\"\n[replica]\nexec = \"pocketbase serve\"\n[http]\naddr = \"127.0.0.1:9090\"\n[[database]]\ndb = \"${DATA:-/data}/data.db\"\n[[database.replicate]]\nname = \"primary\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"http://db1:50051\"\ntls_ca = \"/ca.pem\"\nserver_name = \"db1\"\n".into(),
    );
    seeds.push(
        "[[database]]\ndb = \"/d/data.db\"\n[[database.replicate]]\nname = \"s3\"\n[database.replicate.params]\ntype = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9000\"\nregion = \"us-east-1\"\naccess-key-id = \"k\"\nsecret-access-key = \"s\"\n".into(),
    );
    seeds
}

#[test]
fn thousands_of_mutated_configs_are_refused_cleanly() {
    let seeds = config_seeds();
    assert!(seeds.len() >= 4);
    let mut rng = 0x5eed_c0f1_u64;
    let mut accepted = 0;
    let n = 20_000;
    for i in 0..n {
        let mut text = seeds[i % seeds.len()].clone();
        for _ in 0..1 + i % 3 {
            text = mutate_config(&mut rng, &text);
        }
        let path = Path::new("/fuzz/replited.toml");
        if replited::config::Config::parse(path, &text).is_ok() {
            accepted += 1;
        }
        check_config(&text);
        check_restore_config(text.as_bytes());
    }
    eprintln!("{n} mutated configs: {accepted} accepted, the rest refused naming the file");
    // The mutations are mild enough that some stay valid, and strong enough that most do not.
    assert!(
        accepted > 0 && accepted < n / 2,
        "{accepted} of {n} accepted"
    );
}

// ---------------------------------------------------------------------------------------------
// The fuzz harnesses, seeded, and the replay of kept inputs

/// A tiny xorshift.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Frames of every message kind, valid ones.
fn sample_frames() -> Vec<Vec<u8>> {
    let txn = |txid, pages: Vec<(u32, Vec<u8>)>| {
        Message::Txn(replited_core::proto::Txn {
            generation: 1,
            header: replited_core::proto::TxnInfo {
                txid,
                time_ms: 1_700_000_000_000,
                db_pages: 4,
                db_checksum: txid * 3,
            },
            pages,
        })
    };
    [
        hello(
            "data.db",
            Some(Pos {
                generation: 1,
                txid: 5,
            }),
        ),
        Message::Welcome {
            version: 1,
            generation: 1,
            txid: 9,
            db_checksum: 27,
            page_size: 512,
        },
        Message::Error {
            code: ErrorCode::Diverged,
            message: "x".into(),
        },
        Message::RestoreConfigRequest,
        Message::RestoreConfig {
            storage: b"type = \"fs\"\npath = \"/b/data.db\"\n".to_vec(),
        },
        Message::SnapshotRequest,
        Message::SnapshotBegin {
            generation: 1,
            txid: 5,
            page_size: 512,
            db_pages: 2,
            db_checksum: 15,
        },
        Message::SnapshotPages {
            pages: vec![(1, vec![1; 512]), (2, vec![2; 512])],
        },
        Message::SnapshotEnd,
        txn(6, vec![(1, vec![6; 512]), (3, vec![7; 512])]),
        Message::Ack {
            generation: 1,
            txid: 6,
            applied_at_ms: 5,
        },
        Message::Heartbeat { now_ms: 1, txid: 6 },
        Message::TxnPart {
            generation: 1,
            txid: 7,
            pages: vec![(1, vec![8; 512])],
        },
    ]
    .iter()
    .map(frame)
    .collect()
}

/// Seed programs for the session harnesses: conversations that reach streaming.
fn session_seeds() -> Vec<Vec<u8>> {
    vec![
        // primary: Hello at the position, three commits, an ack, a timeout, a restore request.
        vec![
            1, 0x80, 1, 1, 1, 0, 5, 3, 1, 5, 2, 1, 5, 1, 2, 1, 0, 4, 0x10, 0, 3, 0, 0,
        ],
        // primary: Hello without a position, snapshot request, commits, new generation.
        vec![1, 0, 3, 1, 5, 4, 1, 7, 5, 2, 0, 2, 1, 1, 4, 0x40, 0],
        // replica: start at txid 5; Welcome level; transactions 6, 7; a part; heartbeat.
        vec![
            1, 1, 1, 0, 1, 0, 0, 2, 2, 2, 0, 3, 2, 0, 3, 4, 1, 1, 6, 1, 9, 7, 0, 100,
        ],
        // replica: nothing held; Welcome; restore config; restored; transactions.
        vec![
            0, 1, 1, 1, 6, 0, 6, 0, 1, 2, 3, 4, 5, 6, 7, 10, 1, 2, 2, 1, 0, 5, 2, 1, 3,
        ],
    ]
}

#[test]
fn protocol_harnesses_on_seeded_random_input() {
    let mut rng = Rng(0x0dd_ba11);
    let frames = sample_frames();
    let seeds = session_seeds();
    for i in 0..4000 {
        // proto_frame: frames, mutated and concatenated, pushed in random pieces.
        let mut stream = vec![rng.below(64) as u8];
        for _ in 0..1 + rng.below(4) {
            stream.extend(&frames[rng.below(frames.len() as u64) as usize]);
        }
        for _ in 0..rng.below(4) {
            let at = rng.below(stream.len() as u64) as usize;
            match rng.below(3) {
                0 => stream[at] ^= 1 << rng.below(8),
                1 => stream[at] = rng.next() as u8,
                _ => stream.truncate(at.max(1)),
            }
        }
        if i % 10 == 0 {
            let n = rng.below(300) as usize;
            stream.extend(rng.bytes(n));
        }
        replited_core::fuzzing::proto_frame(&stream);

        // The session harnesses: random programs and mutated seeds.
        let mut prog = if i % 2 == 0 {
            let n = rng.below(200) as usize;
            rng.bytes(n)
        } else {
            seeds[rng.below(seeds.len() as u64) as usize].clone()
        };
        if i % 2 == 1 {
            for _ in 0..1 + rng.below(6) {
                let at = rng.below(prog.len() as u64 + 1) as usize;
                let b = rng.next() as u8;
                if at < prog.len() && rng.below(2) == 0 {
                    prog[at] = b;
                } else {
                    prog.insert(at, b);
                }
            }
        }
        replited_core::fuzzing::proto_primary(&prog);
        replited_core::fuzzing::proto_replica(&prog);
    }
}

/// The primary's decoder for a replica's frames: a length above 64 KiB is refused as soon as
/// its four bytes are in, one at the limit is read.
#[test]
fn replica_frames_are_limited_to_64_kib() {
    use replited_core::proto::{FrameDecoder, ProtoError, MAX_REPLICA_FRAME_LEN};
    let mut d = FrameDecoder::with_limit(MAX_REPLICA_FRAME_LEN);
    d.push(&(MAX_REPLICA_FRAME_LEN + 1).to_be_bytes());
    assert_eq!(
        d.poll(),
        Err(ProtoError::FrameAboveLimit {
            len: MAX_REPLICA_FRAME_LEN + 1,
            limit: MAX_REPLICA_FRAME_LEN
        })
    );
    assert_eq!(d.buffered(), 0);
    // An Error padded to exactly the limit (its message too long to be valid, but a frame
    // the decoder must read whole).
    let m = Message::Error {
        code: ErrorCode::Internal,
        message: "x".repeat(MAX_REPLICA_FRAME_LEN as usize - 5),
    };
    let f = frame(&m);
    assert_eq!(f.len(), 4 + MAX_REPLICA_FRAME_LEN as usize);
    let mut d = FrameDecoder::with_limit(MAX_REPLICA_FRAME_LEN);
    d.push(&f);
    assert_eq!(d.poll(), Ok(Some(m)));
    // The default decoder keeps the protocol's limit.
    let mut d = FrameDecoder::new();
    d.push(&(MAX_REPLICA_FRAME_LEN + 1).to_be_bytes());
    assert_eq!(d.poll(), Ok(None));
}

type Harness = fn(&[u8]);

/// Every fuzz target and the checks its inputs are replayed through.
fn harnesses() -> Vec<(&'static str, Harness)> {
    use replited_core::fuzzing as f;
    vec![
        ("wal_header", f::wal_header as Harness),
        ("wal_scan", f::wal_scan),
        ("segment_decode", f::segment_decode),
        ("file_name", f::file_name),
        ("proto_frame", f::proto_frame),
        ("proto_primary", f::proto_primary),
        ("proto_replica", f::proto_replica),
        ("config", |d| check_config(&String::from_utf8_lossy(d))),
        ("restore_config", check_restore_config),
    ]
}

/// The fuzz targets `fuzz/Cargo.toml` declares.
fn fuzz_targets() -> Vec<String> {
    let toml = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/Cargo.toml"))
        .unwrap();
    toml.split("[[bin]]")
        .skip(1)
        .filter_map(|b| {
            b.lines()
                .find_map(|l| l.trim().strip_prefix("name = \""))
                .map(|n| n.trim_end_matches('"').to_string())
        })
        .collect()
}

/// Every input `scripts/fuzz` kept (and any added by hand) under
/// `core/tests/fixtures/fuzz/<target>/` goes through its target's checks again; a directory for
/// a target without a harness here fails, so nothing kept is skipped silently.
#[test]
fn every_kept_fuzz_input_is_replayed() {
    let harnesses = harnesses();
    let mut declared = fuzz_targets();
    declared.sort();
    let mut known: Vec<String> = harnesses.iter().map(|h| h.0.to_string()).collect();
    known.sort();
    assert_eq!(declared, known, "every fuzz target has a replay here");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/tests/fixtures/fuzz");
    let mut replayed = 0;
    for entry in fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let (_, harness) = harnesses
            .iter()
            .find(|h| h.0 == name)
            .unwrap_or_else(|| panic!("kept inputs for an unknown fuzz target {name}"));
        for f in fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if f.file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(".md"))
            {
                continue;
            }
            harness(&fs::read(&f).unwrap());
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} kept fuzz inputs");
}

/// Writes seed inputs for the protocol and config fuzz targets into `fuzz/corpus/<target>/`
/// (`scripts/fuzz` runs it): `cargo test -p replited --test hostile -- --ignored`.
#[test]
#[ignore = "writes the fuzz seed corpus"]
fn write_fuzz_seed_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let write = |target: &str, i: usize, data: &[u8]| {
        let dir = root.join(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(format!("seed-{i:03}")), data).unwrap();
    };
    let frames = sample_frames();
    for (i, f) in frames.iter().enumerate() {
        let mut input = vec![(i * 7 % 64) as u8];
        input.extend(f);
        write("proto_frame", i, &input);
    }
    let mut all = vec![3u8];
    for f in &frames {
        all.extend(f);
    }
    write("proto_frame", 100, &all);
    for (i, s) in session_seeds().iter().enumerate() {
        write("proto_primary", i, s);
        write("proto_replica", i, s);
    }
    for (i, s) in config_seeds().iter().enumerate() {
        write("config", i, s.as_bytes());
    }
    write(
        "restore_config",
        0,
        b"type = \"fs\"\npath = \"/var/backups/replited/data.db\"\n",
    );
    write(
        "restore_config",
        1,
        b"type = \"s3\"\nname = \"data.db\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9000\"\nregion = \"us-east-1\"\nroot = \"r\"\npath-style = true\naccess-key-id = \"k\"\nsecret-access-key = \"s\"\n",
    );
}
