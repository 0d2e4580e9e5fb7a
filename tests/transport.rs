//! The QUIC transport over loopback with real certificates made by `replited::cert`: framed
//! message exchange, mutual TLS, CA mismatches, stray datagrams, and hostile frames.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use quinn::Endpoint;
use replited::cert::{describe, make_ca, make_cert};
use replited::transport::{
    accept, client_endpoint, connect, parse_stream_addr, peer_identity, server_endpoint,
    server_endpoint_on, ClientTls, FramedStream, ServerTls, TransportError,
};
use replited_core::proto::{Message, ProtoError, Txn, TxnInfo, MAX_FRAME_LEN};
use replited_core::Pos;
use tokio::time::timeout;

// --- An allocator that records the largest single allocation made by a thread while it asks. ---

struct Tracking;

static PEAK: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
}

fn note(size: usize) {
    if TRACK.try_with(|t| t.get()).unwrap_or(false) {
        PEAK.fetch_max(size, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

// --- Certificates ---

/// A CA with a server and a client certificate, and a second, unrelated CA with its own.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    certs: PathBuf,
    other_ca: PathBuf,
    other_certs: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let certs = dir.path().join("certs");
        let other_ca = dir.path().join("other-ca");
        let other_certs = dir.path().join("other-certs");
        let sans = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        make_ca(&ca, "replited test CA").unwrap();
        make_cert(
            &ca,
            &certs,
            "primary",
            &sans(&["localhost", "127.0.0.1", "::1"]),
            false,
        )
        .unwrap();
        make_cert(
            &ca,
            &certs,
            "replica-1",
            &sans(&["replica-1.example"]),
            true,
        )
        .unwrap();
        make_ca(&other_ca, "some other CA").unwrap();
        make_cert(
            &other_ca,
            &other_certs,
            "primary",
            &sans(&["localhost", "127.0.0.1"]),
            false,
        )
        .unwrap();
        make_cert(&other_ca, &other_certs, "replica-1", &[], true).unwrap();
        Pki {
            _dir: dir,
            ca,
            certs,
            other_ca,
            other_certs,
        }
    }

    fn server(&self, mutual: bool) -> ServerTls {
        ServerTls {
            cert: self.certs.join("primary.pem"),
            key: self.certs.join("primary-key.pem"),
            client_ca: mutual.then(|| self.ca.join("ca.pem")),
        }
    }

    fn client(&self, cert_dir: Option<&Path>) -> ClientTls {
        ClientTls {
            ca: self.ca.join("ca.pem"),
            cert: cert_dir.map(|d| d.join("replica-1.pem")),
            key: cert_dir.map(|d| d.join("replica-1-key.pem")),
            server_name: "localhost".to_string(),
        }
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn connect_to(
    server: SocketAddr,
    tls: &ClientTls,
) -> Result<quinn::Connection, TransportError> {
    let ep = client_endpoint(tls).unwrap();
    connect(&ep, "127.0.0.1", server.port(), &tls.server_name).await
}

fn hello() -> Message {
    Message::Hello {
        version: 1,
        db: "data.db".to_string(),
        pos: Some(Pos {
            generation: 3,
            txid: 41,
        }),
        db_checksum: Some(0x0123_4567_89ab_cdef),
    }
}

fn welcome() -> Message {
    Message::Welcome {
        version: 1,
        generation: 3,
        txid: 1041,
        db_checksum: 99,
        page_size: 4096,
    }
}

/// Transaction `i` (0-based): 4 pages of 4096 bytes whose content depends on `i` and the page.
fn txn(i: u64) -> Message {
    let txid = 42 + i;
    let pages = (0..4u32)
        .map(|p| {
            let pgno = 1 + p * 3 + (i % 5) as u32;
            let mut x = txid.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(pgno);
            let data = (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            (pgno, data)
        })
        .collect();
    Message::Txn(Txn {
        generation: 3,
        header: TxnInfo {
            txid,
            time_ms: 1_700_000_000_000 + i,
            db_pages: 20,
            db_checksum: txid * 7,
        },
        pages,
    })
}

/// A server that accepts every connection and, on each stream, answers `Hello` with `Welcome`
/// and echoes everything else. Identities of accepted clients go to the channel.
fn spawn_echo_server(
    ep: Endpoint,
    identities: Option<tokio::sync::mpsc::UnboundedSender<Option<String>>>,
) {
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let identities = identities.clone();
            tokio::spawn(async move {
                let Ok(conn) = accept(incoming).await else {
                    return;
                };
                if let Some(tx) = identities {
                    let _ = tx.send(peer_identity(&conn));
                }
                while let Ok(mut stream) = FramedStream::accept(&conn).await {
                    tokio::spawn(async move {
                        while let Ok(Some(m)) = stream.recv().await {
                            let reply = match m {
                                Message::Hello { .. } => welcome(),
                                other => other,
                            };
                            if stream.send(&reply).await.is_err() {
                                break;
                            }
                        }
                        let _ = stream.finish();
                    });
                }
            });
        }
    });
}

/// Connects, says Hello on a new stream and returns the answer.
async fn hello_exchange(server: SocketAddr, tls: &ClientTls) -> Result<Message, TransportError> {
    let conn = connect_to(server, tls).await?;
    let mut stream = FramedStream::open(&conn).await?;
    stream.send(&hello()).await?;
    match stream.recv().await? {
        Some(m) => Ok(m),
        None => Err(TransportError::Truncated { buffered: 0 }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_welcome_then_1000_txns_in_order() {
    let pki = Pki::new();
    let ep = server_endpoint(loopback(), &pki.server(false)).unwrap();
    let addr = ep.local_addr().unwrap();

    let server = tokio::spawn(async move {
        let conn = accept(ep.accept().await.unwrap()).await.unwrap();
        let mut stream = FramedStream::accept(&conn).await.unwrap();
        assert_eq!(stream.recv().await.unwrap(), Some(hello()));
        stream.send(&welcome()).await.unwrap();
        for i in 0..1000 {
            stream.send(&txn(i)).await.unwrap();
        }
        let ack = stream.recv().await.unwrap();
        assert_eq!(
            ack,
            Some(Message::Ack {
                generation: 3,
                txid: 1041,
                applied_at_ms: 5
            })
        );
        stream.finish().unwrap();
        assert_eq!(stream.recv().await.unwrap(), None);
        // Keep the connection until the client has read everything; it closes it after this
        // task ends (closing first could discard the end of stream before it is read here).
        conn
    });

    let tls = pki.client(None);
    let conn = timeout(Duration::from_secs(10), connect_to(addr, &tls))
        .await
        .unwrap()
        .unwrap();
    let mut stream = FramedStream::open(&conn).await.unwrap();
    stream.send(&hello()).await.unwrap();
    assert_eq!(stream.recv().await.unwrap(), Some(welcome()));
    for i in 0..1000 {
        let got = timeout(Duration::from_secs(10), stream.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(got == Some(txn(i)), "transaction {i} differs");
    }
    stream
        .send(&Message::Ack {
            generation: 3,
            txid: 1041,
            applied_at_ms: 5,
        })
        .await
        .unwrap();
    stream.finish().unwrap();
    assert_eq!(stream.recv().await.unwrap(), None, "clean end of stream");
    let server_conn = timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    conn.close(0u32.into(), b"done");
    drop(server_conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let pki = Pki::new();
    let ep = server_endpoint(loopback(), &pki.server(true)).unwrap();
    let addr = ep.local_addr().unwrap();
    let (tx, mut identities) = tokio::sync::mpsc::unbounded_channel();
    spawn_echo_server(ep, Some(tx));

    // No client certificate.
    let r = timeout(
        Duration::from_secs(10),
        hello_exchange(addr, &pki.client(None)),
    )
    .await
    .expect("refusal within the timeout");
    let e = r.expect_err("a client without a certificate must be refused");
    assert!(e.to_string().contains("peer sent no certificates"), "{e}");

    // A certificate signed by another CA.
    let r = timeout(
        Duration::from_secs(10),
        hello_exchange(addr, &pki.client(Some(&pki.other_certs))),
    )
    .await
    .expect("refusal within the timeout");
    let e = r.expect_err("a client with a foreign certificate must be refused");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");

    // A good certificate.
    let r = timeout(
        Duration::from_secs(10),
        hello_exchange(addr, &pki.client(Some(&pki.certs))),
    )
    .await
    .unwrap();
    assert_eq!(r.unwrap(), welcome());

    // The only connection the server accepted is the good one, and it knows who it is.
    let id = identities
        .recv()
        .await
        .unwrap()
        .expect("a client certificate");
    assert!(
        id.contains("CN=replica-1") && id.contains("replica-1.example"),
        "{id}"
    );
    assert!(identities.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_server_it_cannot_verify() {
    let pki = Pki::new();
    // The server's certificate is signed by a CA the client does not trust.
    let foreign = ServerTls {
        cert: pki.other_certs.join("primary.pem"),
        key: pki.other_certs.join("primary-key.pem"),
        client_ca: None,
    };
    let ep = server_endpoint(loopback(), &foreign).unwrap();
    let addr = ep.local_addr().unwrap();
    spawn_echo_server(ep, None);
    let r = timeout(Duration::from_secs(10), connect_to(addr, &pki.client(None)))
        .await
        .unwrap();
    match r {
        Err(TransportError::Connection(e)) => {
            let msg = e.to_string();
            assert!(msg.contains("UnknownIssuer"), "{msg}");
        }
        other => panic!("expected a refused connection, got {other:?}"),
    }

    // A client trusting the other CA would accept that server...
    let trusting = ClientTls {
        ca: pki.other_ca.join("ca.pem"),
        ..pki.client(None)
    };
    assert!(connect_to(addr, &trusting).await.is_ok());

    // ...but not under a name its certificate does not hold.
    let wrong_name = ClientTls {
        server_name: "db.example".to_string(),
        ..trusting
    };
    match connect_to(addr, &wrong_name).await {
        Err(TransportError::Connection(e)) => {
            assert!(e.to_string().contains("not valid for name"), "{e}")
        }
        other => panic!("expected a refused connection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_datagrams_do_not_disturb_a_connection() {
    let pki = Pki::new();
    // Through the "already bound socket" constructor (systemd socket activation).
    let socket = UdpSocket::bind(loopback()).unwrap();
    let ep = server_endpoint_on(socket, &pki.server(false)).unwrap();
    let addr = ep.local_addr().unwrap();
    spawn_echo_server(ep, None);

    let conn = connect_to(addr, &pki.client(None)).await.unwrap();
    let mut stream = FramedStream::open(&conn).await.unwrap();
    stream.send(&hello()).await.unwrap();
    assert_eq!(stream.recv().await.unwrap(), Some(welcome()));

    let noise = tokio::task::spawn_blocking(move || {
        let s = UdpSocket::bind(loopback()).unwrap();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut buf = vec![0u8; 1500];
        for i in 0..4000 {
            let len = 1 + (next() % 1500) as usize;
            for b in &mut buf[..len] {
                *b = next() as u8;
            }
            // Some look like QUIC v1 long-header (Initial) or short-header packets.
            match i % 3 {
                0 if len >= 5 => {
                    buf[0] = 0xc0 | (buf[0] & 0x0f);
                    buf[1..5].copy_from_slice(&1u32.to_be_bytes());
                }
                1 => buf[0] = 0x40 | (buf[0] & 0x3f),
                _ => {}
            }
            let _ = s.send_to(&buf[..len], addr);
            if i % 200 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });

    for i in 0..300 {
        let m = if i % 2 == 0 {
            txn(i)
        } else {
            Message::Heartbeat { now_ms: i, txid: i }
        };
        stream.send(&m).await.unwrap();
        let echoed = timeout(Duration::from_secs(10), stream.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(echoed == Some(m), "message {i} differs");
    }
    noise.await.unwrap();

    // Still fine after all the noise.
    stream.send(&hello()).await.unwrap();
    assert_eq!(stream.recv().await.unwrap(), Some(welcome()));
    assert!(conn.close_reason().is_none());
}

#[tokio::test]
async fn hostile_frames_are_typed_errors_without_big_allocations() {
    let pki = Pki::new();
    let ep = server_endpoint(loopback(), &pki.server(false)).unwrap();
    let addr = ep.local_addr().unwrap();
    let tls = pki.client(None);
    let (client, server) = tokio::join!(connect_to(addr, &tls), async {
        accept(ep.accept().await.unwrap()).await
    });
    let (client, server) = (client.unwrap(), server.unwrap());

    // Opens a stream from the client, writes `bytes` (finishing when asked), and returns the
    // server's framed view of it along with the client's sending half.
    async fn stream_with(
        client: &quinn::Connection,
        server: &quinn::Connection,
        bytes: &[u8],
        finish: bool,
    ) -> (quinn::SendStream, FramedStream) {
        let (mut send, _recv) = client.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        if finish {
            send.finish().unwrap();
        }
        let framed = FramedStream::accept(server).await.unwrap();
        (send, framed)
    }

    // A length above the limit: refused as soon as the length is in.
    let mut bytes = u32::MAX.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[7; 100]);
    let (_s, mut f) = stream_with(&client, &server, &bytes, false).await;
    let r = timeout(Duration::from_secs(5), f.recv()).await.unwrap();
    assert!(
        matches!(
            r,
            Err(TransportError::Frame(ProtoError::FrameTooLarge(u32::MAX)))
        ),
        "{r:?}"
    );
    // The error is final.
    assert!(matches!(f.recv().await, Err(TransportError::Frame(_))));

    // A length of zero.
    let (_s, mut f) = stream_with(&client, &server, &[0, 0, 0, 0, 1, 2], false).await;
    let r = timeout(Duration::from_secs(5), f.recv()).await.unwrap();
    assert!(
        matches!(r, Err(TransportError::Frame(ProtoError::EmptyFrame))),
        "{r:?}"
    );

    // Garbage payload: an unknown variant index.
    let mut bytes = 10u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0xff; 10]);
    let (_s, mut f) = stream_with(&client, &server, &bytes, true).await;
    let r = f.recv().await;
    assert!(
        matches!(r, Err(TransportError::Frame(ProtoError::Malformed))),
        "{r:?}"
    );

    // A valid message followed by bytes inside the same frame.
    let mut frame = Vec::new();
    replited_core::proto::encode_frame(&Message::SnapshotEnd, &mut frame).unwrap();
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) + 3;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3]);
    let (_s, mut f) = stream_with(&client, &server, &frame, true).await;
    let r = f.recv().await;
    assert!(
        matches!(r, Err(TransportError::Frame(ProtoError::TrailingBytes(3)))),
        "{r:?}"
    );

    // The largest allowed length, then only 1000 bytes: the receiver holds what arrived and
    // reserves nothing near the claimed 16 MiB.
    let mut bytes = MAX_FRAME_LEN.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0x55; 1000]);
    let (mut s, mut f) = stream_with(&client, &server, &bytes, false).await;
    PEAK.store(0, Ordering::Relaxed);
    TRACK.with(|t| t.set(true));
    let waited = timeout(Duration::from_millis(500), f.recv()).await;
    TRACK.with(|t| t.set(false));
    assert!(waited.is_err(), "no message can be complete: {waited:?}");
    assert_eq!(f.buffered(), 1004);
    let peak = PEAK.load(Ordering::Relaxed);
    assert!(
        peak < 1024 * 1024,
        "largest allocation while receiving: {peak} bytes"
    );
    // Then the sender gives up: a typed error, not a hang.
    s.finish().unwrap();
    let r = timeout(Duration::from_secs(5), f.recv()).await.unwrap();
    assert!(
        matches!(r, Err(TransportError::Truncated { buffered: 1004 })),
        "{r:?}"
    );

    // Sending a message too large for a frame is refused before anything is written.
    let (send, recv) = client.open_bi().await.unwrap();
    let mut f = FramedStream::new(send, recv);
    let huge = Message::RestoreConfig {
        storage: vec![0; MAX_FRAME_LEN as usize + 1],
    };
    assert!(matches!(
        f.send(&huge).await,
        Err(TransportError::Frame(ProtoError::MessageTooLarge(_)))
    ));

    // Nothing was written: the peer sees an empty stream once it is finished.
    f.finish().unwrap();
    let mut empty = FramedStream::accept(&server).await.unwrap();
    let r = timeout(Duration::from_secs(5), empty.recv()).await.unwrap();
    assert_eq!(r.unwrap(), None);

    // The connection itself is unharmed.
    let mut frame = Vec::new();
    replited_core::proto::encode_frame(&hello(), &mut frame).unwrap();
    let (_s, mut f) = stream_with(&client, &server, &frame, true).await;
    let r = timeout(Duration::from_secs(5), f.recv()).await.unwrap();
    assert_eq!(r.unwrap(), Some(hello()));
    assert_eq!(f.recv().await.unwrap(), None);
}

#[test]
fn parse_stream_addr_forms() {
    let ok = |s: &str| parse_stream_addr(s).unwrap();
    assert_eq!(ok("quic://0.0.0.0:50051"), ("0.0.0.0".to_string(), 50051));
    assert_eq!(
        ok("http://127.0.0.1:50051"),
        ("127.0.0.1".to_string(), 50051)
    );
    assert_eq!(ok("quic://[::1]:50051"), ("::1".to_string(), 50051));
    assert_eq!(ok("quic://host.example:1"), ("host.example".to_string(), 1));
    for bad in [
        "0.0.0.0:50051",
        "tcp://x:1",
        "quic://x",
        "quic://x:99999",
        "quic://:1",
        "quic://x:0",
        "quic://::1:1",
        "quic://x:1/path",
        "",
    ] {
        let e = parse_stream_addr(bad).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "Invalid stream address: {bad} (expected quic://HOST:PORT or http://HOST:PORT)"
            )
        );
    }
}

#[test]
fn certificates_on_disk() {
    let pki = Pki::new();
    for key in [
        pki.ca.join("ca-key.pem"),
        pki.certs.join("primary-key.pem"),
        pki.certs.join("replica-1-key.pem"),
    ] {
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
    }
    let der = |p: PathBuf| {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(p).unwrap()
    };
    assert_eq!(
        describe(&der(pki.certs.join("primary.pem"))).unwrap(),
        "CN=primary SAN=[localhost, 127.0.0.1, ::1]"
    );
    assert_eq!(
        describe(&der(pki.ca.join("ca.pem"))).unwrap(),
        "CN=replited test CA"
    );
    // A CA is never silently replaced; a server certificate needs a name; names stay files.
    assert!(make_ca(&pki.ca, "again").is_err());
    assert!(make_cert(&pki.ca, &pki.certs, "srv", &[], false).is_err());
    assert!(make_cert(&pki.ca, &pki.certs, "../escape", &[], true).is_err());
    assert!(make_cert(
        &pki.ca,
        &pki.certs,
        "x",
        &["not a name!".to_string()],
        false
    )
    .is_err());
    // Reissuing replaces.
    make_cert(&pki.ca, &pki.certs, "replica-1", &[], true).unwrap();
}
