//! A small TCP proxy between replited and the S3 server (s3s-fs) that the tests can switch
//! between passing requests through (optionally after a delay), answering every request with
//! `500 InternalError`, and hanging (reading the request, never answering: the client's request
//! timeout fires).
//!
//! The mode is decided per connection when it is accepted; switching the mode closes every open
//! connection, so the next request meets the new mode (rust-s3's blocking client opens a
//! connection per request; replited's uploads keep theirs open, and go on on a new one once
//! it is closed). Declared from a test file with
//! `#[path = "common/s3proxy.rs"] mod s3proxy;`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does with the requests of a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward to the server.
    Pass,
    /// Forward to the server after this delay (slow uploads: a kill lands mid-request).
    Delay(Duration),
    /// Answer `HTTP/1.1 500 Internal Server Error` with an S3 error body.
    Fail500,
    /// Read the request and never answer.
    Hang,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    passed: AtomicU64,
    failed: AtomicU64,
    hung: AtomicU64,
    /// PUT/POST requests forwarded whose response has not started yet.
    puts_in_flight: AtomicI64,
}

struct State {
    upstream: String,
    mode: Mutex<Mode>,
    /// Every open socket (both sides) by connection, closed when the mode changes.
    open: Mutex<HashMap<u64, Vec<TcpStream>>>,
    next_id: AtomicU64,
    stop: AtomicBool,
    n: Counters,
}

pub struct S3Proxy {
    /// `http://127.0.0.1:PORT`: give this to replited as the endpoint.
    pub endpoint: String,
    state: Arc<State>,
}

impl S3Proxy {
    /// A proxy on a free 127.0.0.1 port forwarding to `upstream` (`http://HOST:PORT`).
    pub fn start(upstream: &str) -> S3Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            upstream: upstream.trim_start_matches("http://").to_string(),
            mode: Mutex::new(Mode::Pass),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            n: Counters::default(),
        });
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || handle(&st, conn));
            }
        });
        S3Proxy {
            endpoint: format!("http://127.0.0.1:{port}"),
            state,
        }
    }

    /// Switches the mode for new connections and closes the open ones.
    pub fn set_mode(&self, m: Mode) {
        *self.state.mode.lock().unwrap() = m;
        for (_, socks) in self.state.open.lock().unwrap().drain() {
            for s in socks {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    pub fn mode(&self) -> Mode {
        *self.state.mode.lock().unwrap()
    }

    /// Requests forwarded, answered 500, and left hanging so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        let n = &self.state.n;
        (
            n.passed.load(Ordering::SeqCst),
            n.failed.load(Ordering::SeqCst),
            n.hung.load(Ordering::SeqCst),
        )
    }

    /// An upload (PUT or POST) is on its way to the server and its answer has not begun.
    pub fn put_in_flight(&self) -> bool {
        self.state.n.puts_in_flight.load(Ordering::SeqCst) > 0
    }
}

impl Drop for S3Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.set_mode(Mode::Pass);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(self.endpoint.trim_start_matches("http://"));
    }
}

fn register(st: &State, id: u64, s: &TcpStream) {
    if let Ok(c) = s.try_clone() {
        st.open.lock().unwrap().entry(id).or_default().push(c);
    }
}

/// Reads up to the end of an HTTP head; returns (head, bytes read past it).
fn read_head(s: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    read_head_after(s, Vec::new())
}

/// Like [`read_head`], with `buf` already read.
fn read_head_after(s: &mut TcpStream, mut buf: Vec<u8>) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Some((buf, rest));
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 1 << 20 {
            return None;
        }
    }
}

fn content_length(head: &[u8]) -> u64 {
    String::from_utf8_lossy(head)
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

fn handle(st: &Arc<State>, client: TcpStream) {
    let id = st.next_id.fetch_add(1, Ordering::SeqCst);
    serve(st, id, client);
    st.open.lock().unwrap().remove(&id);
}

fn serve(st: &Arc<State>, id: u64, mut client: TcpStream) {
    st.n.connections.fetch_add(1, Ordering::SeqCst);
    // Heads and bodies go in separate writes: not held back by Nagle's algorithm.
    let _ = client.set_nodelay(true);
    // Registered before the mode is read: a switch in between closes this connection.
    register(st, id, &client);
    let mode = *st.mode.lock().unwrap();
    match mode {
        Mode::Fail500 => {
            // Answer the request (its body read first) with a 500 and close.
            if let Some((head, rest)) = read_head(&mut client) {
                let mut left = content_length(&head).saturating_sub(rest.len() as u64);
                let mut sink = [0u8; 65536];
                while left > 0 {
                    match client.read(&mut sink[..left.min(65536) as usize]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => left -= n as u64,
                    }
                }
                st.n.failed.fetch_add(1, Ordering::SeqCst);
                let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InternalError</Code><Message>injected by the test proxy</Message></Error>";
                let _ = write!(
                    client,
                    "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = client.shutdown(Shutdown::Both);
            }
        }
        Mode::Hang => {
            // Read (and drop) whatever comes until the client gives up or the mode changes.
            let mut counted = false;
            let mut sink = [0u8; 65536];
            loop {
                match client.read(&mut sink) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if !counted {
                            counted = true;
                            st.n.hung.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }
        }
        Mode::Pass | Mode::Delay(_) => {
            if let Mode::Delay(d) = mode {
                std::thread::sleep(d);
            }
            let Ok(upstream) = TcpStream::connect(&st.upstream) else {
                return;
            };
            register(st, id, &upstream);
            let _ = upstream.set_nodelay(true);
            st.n.passed.fetch_add(1, Ordering::SeqCst);
            let in_flight = Arc::new(AtomicBool::new(false));
            // client -> server, a request at a time (a client may send one after another on
            // a connection it keeps open): a PUT or POST is an upload in flight until the
            // server's answer begins.
            let (mut c_in, mut u_out) =
                (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            let (st2, fl2) = (st.clone(), in_flight.clone());
            let up = std::thread::spawn(move || {
                let mut pending = Vec::new();
                while let Some((head, rest)) = read_head_after(&mut c_in, pending) {
                    if (head.starts_with(b"PUT ") || head.starts_with(b"POST "))
                        && !fl2.swap(true, Ordering::SeqCst)
                    {
                        st2.n.puts_in_flight.fetch_add(1, Ordering::SeqCst);
                    }
                    if u_out.write_all(&head).is_err() {
                        break;
                    }
                    // The body: what was read past the head, then the rest from the client.
                    let len = content_length(&head) as usize;
                    let (body, after) = rest.split_at(len.min(rest.len()));
                    if u_out.write_all(body).is_err() {
                        break;
                    }
                    let left = (len - body.len()) as u64;
                    if left > 0
                        && std::io::copy(&mut (&mut c_in).take(left), &mut u_out).ok() != Some(left)
                    {
                        break;
                    }
                    pending = after.to_vec();
                }
                let _ = u_out.shutdown(Shutdown::Write);
            });
            let (mut u_in, mut c_out) = (upstream, client);
            let mut b = [0u8; 65536];
            loop {
                match u_in.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if in_flight.swap(false, Ordering::SeqCst) {
                            st.n.puts_in_flight.fetch_sub(1, Ordering::SeqCst);
                        }
                        if c_out.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            if in_flight.swap(false, Ordering::SeqCst) {
                st.n.puts_in_flight.fetch_sub(1, Ordering::SeqCst);
            }
            let _ = c_out.shutdown(Shutdown::Both);
            let _ = u_in.shutdown(Shutdown::Both);
            let _ = up.join();
        }
    }
}
