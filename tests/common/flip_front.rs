//! A faulty network in front of the S3 server: a plain-TCP relay on a free 127.0.0.1 port that
//! flips one byte in the body of the first few presigned PUTs it carries (requests whose target
//! holds `X-Amz-Signature`: the uploads replited streams from its files), as a bad NIC or
//! middlebox would, and relays every other byte unchanged — or, started with
//! [`FlipFront::refusing_bulk_delete`], plays a store without DeleteObjects: a multi-object
//! delete (`POST …?delete`) is answered `501 NotImplemented`. Any of them holds requests whose
//! first line names what [`FlipFront::hold`] was given for a while before relaying them (a slow
//! upload of one kind of file), and [`FlipFront::cut`] drops the connection of the next GET it
//! names partway through the answer. Declared from a test file with
//! `#[path = "common/flip_front.rs"] mod flip_front;`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Requests held before they are relayed: those whose first line contains the text, for how
/// long; and how many were.
#[derive(Default)]
struct Hold {
    what: Mutex<Option<(String, Duration)>>,
    held: AtomicU64,
    /// Requests held at the moment, and the most held at once.
    holding: AtomicU64,
    most: AtomicU64,
    /// The next GET whose first line contains the text is cut after that many bytes of its
    /// answer (once).
    cut: Mutex<Option<(String, u64)>>,
    cuts: AtomicU64,
    /// Requests with a `Range` header.
    ranged: AtomicU64,
    /// Connections accepted.
    connections: AtomicU64,
}

pub struct FlipFront {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    flipped: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    hold: Arc<Hold>,
}

impl FlipFront {
    /// Relays to `upstream` (HOST:PORT), corrupting the bodies of the first `n` presigned PUTs.
    pub fn start(upstream: &str, n: u64) -> FlipFront {
        FlipFront::with(upstream, n, false)
    }

    /// Relays to `upstream` (HOST:PORT) unchanged but for multi-object deletes, refused.
    pub fn refusing_bulk_delete(upstream: &str) -> FlipFront {
        FlipFront::with(upstream, 0, true)
    }

    fn with(upstream: &str, n: u64, refuse: bool) -> FlipFront {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let flipped = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let hold = Arc::new(Hold::default());
        let (f, r, h, upstream) = (
            flipped.clone(),
            refused.clone(),
            hold.clone(),
            upstream.to_string(),
        );
        std::thread::spawn(move || {
            for c in listener.incoming().flatten() {
                let (f, r, h, upstream) = (f.clone(), r.clone(), h.clone(), upstream.clone());
                std::thread::spawn(move || {
                    let _ = relay(c, &upstream, &f, n, refuse.then_some(&*r), &h);
                });
            }
        });
        FlipFront {
            endpoint,
            flipped,
            refused,
            hold,
        }
    }

    /// From now on, requests whose first line (method and target) contains `what` wait `d`
    /// before they are relayed; `None`: none.
    pub fn hold(&self, what: Option<(&str, Duration)>) {
        *self.hold.what.lock().unwrap() = what.map(|(w, d)| (w.to_string(), d));
    }

    /// Requests held so far (counted as their wait begins).
    pub fn held(&self) -> u64 {
        self.hold.held.load(Ordering::SeqCst)
    }

    /// The most requests held at once so far.
    pub fn most_held_at_once(&self) -> u64 {
        self.hold.most.load(Ordering::SeqCst)
    }

    /// The next GET whose first line contains `what` loses its connection after `after` bytes
    /// of the answer (headers included).
    pub fn cut(&self, what: &str, after: u64) {
        *self.hold.cut.lock().unwrap() = Some((what.to_string(), after));
    }

    /// Answers cut so far, and requests that asked for a range.
    pub fn cuts_and_ranges(&self) -> (u64, u64) {
        (
            self.hold.cuts.load(Ordering::SeqCst),
            self.hold.ranged.load(Ordering::SeqCst),
        )
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.hold.connections.load(Ordering::SeqCst)
    }

    /// Multi-object deletes refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    /// Request bodies corrupted so far.
    pub fn flipped(&self) -> u64 {
        self.flipped.load(Ordering::SeqCst)
    }
}

/// One connection, which may carry one request after another (replited's uploads keep theirs
/// open): each request's head is read and the request relayed whole — held first when `hold`
/// names it, its body's first byte flipped when it is a presigned PUT and the budget allows —
/// while the answers are copied back until either side closes. The first request alone may
/// be refused (with `refused`, a multi-object delete is answered 501 and counted: rust-s3's own
/// requests, which open a connection each); any GET may have its answer cut.
fn relay(
    mut c: TcpStream,
    upstream: &str,
    flipped: &AtomicU64,
    n: u64,
    refused: Option<&AtomicU64>,
    hold: &Hold,
) -> std::io::Result<()> {
    hold.connections.fetch_add(1, Ordering::SeqCst);
    let mut up = TcpStream::connect(upstream)?;
    // Requests and answers go on as they come (a connection kept open would otherwise meet
    // Nagle's algorithm and delayed ACKs).
    c.set_nodelay(true)?;
    up.set_nodelay(true)?;
    let mut buf = Vec::new();
    let mut back: Option<std::thread::JoinHandle<()>> = None;
    let answers = Arc::new(Answers {
        copied: AtomicU64::new(0),
        limit: AtomicU64::new(u64::MAX),
    });
    let mut chunk = [0u8; 16 << 10];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break Some(i + 4);
            }
            let k = c.read(&mut chunk)?;
            if k == 0 {
                break None;
            }
            buf.extend_from_slice(&chunk[..k]);
        };
        let Some(head_end) = head_end else { break };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let first_line =
            String::from_utf8_lossy(&buf[..buf.iter().position(|&b| b == b'\r').unwrap()])
                .into_owned();
        let wait = hold
            .what
            .lock()
            .unwrap()
            .as_ref()
            .filter(|(w, _)| first_line.contains(w.as_str()))
            .map(|(_, d)| *d);
        if let Some(d) = wait {
            hold.held.fetch_add(1, Ordering::SeqCst);
            let now = hold.holding.fetch_add(1, Ordering::SeqCst) + 1;
            hold.most.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(d);
            hold.holding.fetch_sub(1, Ordering::SeqCst);
        }
        if head.contains("\r\nrange: bytes=") {
            hold.ranged.fetch_add(1, Ordering::SeqCst);
        }
        let cut_after = {
            let mut c = hold.cut.lock().unwrap();
            let hit = first_line.starts_with("GET ")
                && c.as_ref()
                    .is_some_and(|(w, _)| first_line.contains(w.as_str()));
            hit.then(|| c.take().map(|(_, n)| n)).flatten()
        };
        if let Some(n) = cut_after {
            // The answers before this one were read whole before it was sent (HTTP/1.1
            // without pipelining): its answer starts where the copy back stands.
            answers
                .limit
                .store(answers.copied.load(Ordering::SeqCst) + n, Ordering::SeqCst);
            hold.cuts.fetch_add(1, Ordering::SeqCst);
        }
        if back.is_none() {
            if let Some(refused) = refused.filter(|_| {
                first_line.starts_with("POST ")
                    && first_line
                        .split(' ')
                        .nth(1)
                        .is_some_and(|t| t.contains("?delete"))
            }) {
                refused.fetch_add(1, Ordering::SeqCst);
                let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NotImplemented</Code>\
                            <Message>A header or query you provided requires functionality that is not \
                            implemented.</Message></Error>";
                return write!(
                    c,
                    "HTTP/1.1 501 Not Implemented\r\nContent-Type: application/xml\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        }
        // The request whole: its head and the body its Content-Length announces (a chunked
        // body, which no client here sends, is relayed as it comes, to the end).
        let chunked = head.contains("\r\ntransfer-encoding: chunked");
        let len = head
            .split("\r\n")
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let end = if chunked { buf.len() } else { head_end + len };
        while buf.len() < end {
            let k = c.read(&mut chunk)?;
            if k == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..k]);
        }
        let end = end.min(buf.len());
        if first_line.starts_with("PUT ")
            && first_line.contains("X-Amz-Signature")
            && end > head_end
            && flipped
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                    (v < n).then_some(v + 1)
                })
                .is_ok()
        {
            buf[head_end] ^= 0x5a;
        }
        up.write_all(&buf[..end])?;
        buf.drain(..end);
        if back.is_none() {
            let (c2, up2, answers) = (c.try_clone()?, up.try_clone()?, answers.clone());
            back = Some(std::thread::spawn(move || copy_back(up2, c2, &answers)));
        }
        if chunked {
            let _ = std::io::copy(&mut c, &mut up);
            break;
        }
    }
    let _ = up.shutdown(Shutdown::Write);
    if let Some(b) = back {
        let _ = b.join();
    }
    Ok(())
}

/// The answers copied back on one connection: bytes so far, and where the connection is cut.
struct Answers {
    copied: AtomicU64,
    limit: AtomicU64,
}

/// Copies the answers from `up` to `c` until either side closes, or cuts both connections
/// once `answers.limit` bytes have been copied.
fn copy_back(mut up: TcpStream, mut c: TcpStream, answers: &Answers) {
    let mut chunk = [0u8; 16 << 10];
    let mut copied = 0u64;
    loop {
        let k = match up.read(&mut chunk) {
            Ok(0) | Err(_) => {
                let _ = c.shutdown(Shutdown::Write);
                return;
            }
            Ok(k) => k,
        };
        // (The limit is set before the request whose answer it cuts is sent upstream.)
        let room = answers.limit.load(Ordering::SeqCst).saturating_sub(copied);
        let k = k.min(usize::try_from(room).unwrap_or(usize::MAX));
        if c.write_all(&chunk[..k]).is_err() {
            return;
        }
        copied += k as u64;
        answers.copied.store(copied, Ordering::SeqCst);
        if copied == answers.limit.load(Ordering::SeqCst) {
            let _ = c.shutdown(Shutdown::Both);
            let _ = up.shutdown(Shutdown::Both);
            return;
        }
    }
}
