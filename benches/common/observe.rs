//! Instruments of benches/peers.rs, the same for every tool measured: a TCP proxy that counts
//! the HTTP requests a tool sends to the S3 server, a recursive inotify watch that records
//! when objects appear complete in the server's directory, and a process's CPU time and peak
//! memory. Declared with `#[path = "common/observe.rs"] mod observe;`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::io::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// HTTP requests forwarded, by kind (PUT, GET, LIST, HEAD, DELETE, POST, …).
pub type Counts = BTreeMap<String, u64>;

/// A proxy on 127.0.0.1 in front of the S3 server that parses each request's head (and skips
/// its body by Content-Length or chunked encoding) so that it counts requests, not
/// connections: clients that keep connections alive send many requests on each.
pub struct CountingProxy {
    /// `http://127.0.0.1:PORT`: give this to the tool as its endpoint.
    pub endpoint: String,
    counts: Arc<Mutex<Counts>>,
    stop: Arc<AtomicBool>,
}

impl CountingProxy {
    /// A proxy forwarding to `upstream` (`http://HOST:PORT`).
    pub fn start(upstream: &str) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let counts = Arc::new(Mutex::new(Counts::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let upstream = upstream.trim_start_matches("http://").to_string();
        let (c, s) = (counts.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                // Heads and bodies are forwarded in separate writes: with Nagle's algorithm a
                // body would wait for the ACK of its head, delayed on a connection kept open.
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let c = c.clone();
                std::thread::spawn(move || relay(client, server, &c));
            }
        });
        CountingProxy {
            endpoint: format!("http://127.0.0.1:{port}"),
            counts,
            stop,
        }
    }

    pub fn counts(&self) -> Counts {
        self.counts.lock().unwrap().clone()
    }

    pub fn total(&self) -> u64 {
        self.counts.lock().unwrap().values().sum()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(self.endpoint.trim_start_matches("http://"));
    }
}

/// Requests minus an earlier count, summed.
pub fn since(now: &Counts, before: &Counts) -> Counts {
    now.iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// The kind of a request line: its method, with a GET of a bucket (`/bucket`, `/bucket/`,
/// `/bucket?…`: path-style addressing) or with `list-type=` counted as LIST.
fn kind(line: &str) -> String {
    let mut it = line.split_whitespace();
    let method = it.next().unwrap_or("?").to_string();
    let target = it.next().unwrap_or("");
    let path = target.split('?').next().unwrap_or("");
    let bucket_only = path.trim_matches('/').split('/').count() <= 1;
    if method == "GET" && (bucket_only || target.contains("list-type=")) {
        "LIST".to_string()
    } else {
        method
    }
}

fn relay(client: TcpStream, server: TcpStream, counts: &Mutex<Counts>) {
    let (Ok(mut s_in), Ok(mut c_out)) = (server.try_clone(), client.try_clone()) else {
        return;
    };
    // Answers go back as they come.
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut s_in, &mut c_out);
        let _ = c_out.shutdown(Shutdown::Both);
        let _ = s_in.shutdown(Shutdown::Both);
    });
    let mut r = BufReader::with_capacity(1 << 16, client);
    let mut w = server;
    let _ = requests(&mut r, &mut w, counts);
    let _ = w.shutdown(Shutdown::Write);
    let _ = back.join();
}

/// Forwards requests one by one, counting each when its head is complete.
fn requests(
    r: &mut BufReader<TcpStream>,
    w: &mut TcpStream,
    counts: &Mutex<Counts>,
) -> std::io::Result<()> {
    loop {
        let mut head = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            head.push_str(&line);
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        let first = head.lines().next().unwrap_or("").to_string();
        *counts.lock().unwrap().entry(kind(&first)).or_default() += 1;
        w.write_all(head.as_bytes())?;
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_ascii_lowercase())
            })
        };
        if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                line.clear();
                r.read_line(&mut line)?;
                w.write_all(line.as_bytes())?;
                let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| std::io::Error::other("bad chunk size"))?;
                if size == 0 {
                    // Trailers, then an empty line.
                    loop {
                        line.clear();
                        if r.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
                            w.write_all(line.as_bytes())?;
                            break;
                        }
                        w.write_all(line.as_bytes())?;
                    }
                    break;
                }
                copy_n(r, w, size + 2)?;
            }
        } else if let Some(n) = header("content-length").and_then(|v| v.parse::<u64>().ok()) {
            copy_n(r, w, n)?;
        }
    }
}

fn copy_n(r: &mut BufReader<TcpStream>, w: &mut TcpStream, n: u64) -> std::io::Result<()> {
    let copied = std::io::copy(&mut r.by_ref().take(n), w)?;
    if copied < n {
        return Err(std::io::Error::other("body cut short"));
    }
    Ok(())
}

/// When objects appeared complete under a directory and its subdirectories (created later
/// too): the times of IN_CLOSE_WRITE and IN_MOVED_TO events, as the watching thread woke up
/// for them. A file found in a new directory when its watch is added counts at that moment.
pub struct ObjectWatch {
    events: Arc<Mutex<Vec<Instant>>>,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ObjectWatch {
    pub fn start(root: &Path) -> ObjectWatch {
        let events = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
        let mut dirs = HashMap::new();
        let now = Instant::now();
        let mut found = Vec::new();
        watch_tree(&inotify, root, &mut dirs, &mut found, now);
        let (ev, dn) = (events.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            while !dn.load(Ordering::SeqCst) {
                let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
                let _ = nix::poll::poll(&mut fds, PollTimeout::from(50u16));
                let now = Instant::now();
                while let Ok(evs) = inotify.read_events() {
                    if evs.is_empty() {
                        break;
                    }
                    let mut times = Vec::new();
                    for e in evs {
                        let Some(name) = e.name else { continue };
                        if e.mask.contains(AddWatchFlags::IN_ISDIR) {
                            if let Some(parent) = dirs.get(&e.wd).cloned() {
                                let p: PathBuf = Path::new(&parent).join(name);
                                watch_tree(&inotify, &p, &mut dirs, &mut times, now);
                            }
                        } else if e
                            .mask
                            .intersects(AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_MOVED_TO)
                        {
                            times.push(now);
                        }
                    }
                    ev.lock().unwrap().extend(times);
                }
            }
        });
        ObjectWatch {
            events,
            done,
            thread: Some(thread),
        }
    }

    /// The first object event at or after `t`.
    pub fn first_at_or_after(&self, t: Instant) -> Option<Instant> {
        let e = self.events.lock().unwrap();
        let i = e.partition_point(|x| *x < t);
        e.get(i).copied()
    }

    /// The newest object event.
    pub fn last(&self) -> Option<Instant> {
        self.events.lock().unwrap().last().copied()
    }

    /// For each time in `ts` (ascending), the first object event at or after it.
    pub fn durable(&self, ts: &[Instant]) -> Vec<Option<Instant>> {
        let e = self.events.lock().unwrap();
        ts.iter()
            .map(|t| e.get(e.partition_point(|x| x < t)).copied())
            .collect()
    }
}

impl Drop for ObjectWatch {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Watches `dir` and every directory under it; files already there count as appearing `now`.
fn watch_tree(
    inotify: &Inotify,
    dir: &Path,
    dirs: &mut HashMap<nix::sys::inotify::WatchDescriptor, PathBuf>,
    found: &mut Vec<Instant>,
    now: Instant,
) {
    let flags = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_ONLYDIR;
    let Ok(wd) = inotify.add_watch(dir, flags) else {
        return;
    };
    dirs.insert(wd, dir.to_path_buf());
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            watch_tree(inotify, &e.path(), dirs, found, now);
        } else {
            found.push(now);
        }
    }
}

/// The peak resident set (VmHWM) of a running process, in MB.
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// What a finished command did.
pub struct Ran {
    pub ok: bool,
    pub secs: f64,
    /// Peak resident set of the process (VmHWM, polled every 5 ms while it ran: a lower
    /// bound), MB; NaN if it ended before the first poll.
    pub peak_rss_mb: f64,
    /// Its stdout and stderr, for a failure's reason.
    pub output: String,
}

/// Runs `cmd` to completion, its output to `log`, polling its peak RSS. (Not wait4's
/// ru_maxrss: it also counts the benchmark's own memory, which a spawned child shares until
/// exec.)
pub fn run_measured(cmd: &mut Command, log: &Path) -> Ran {
    let f = fs::File::create(log).unwrap();
    let t = Instant::now();
    let mut child: Child = cmd
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut peak = f64::NAN;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        // An exiting process shows VmHWM 0: keep the last real figure.
        if let Some(mb) = peak_rss_mb(child.id()).filter(|mb| *mb > 0.0) {
            peak = mb;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ran {
        ok: status.success(),
        secs: t.elapsed().as_secs_f64(),
        peak_rss_mb: peak,
        output: fs::read_to_string(log).unwrap_or_default(),
    }
}

/// Waits until `f` holds, up to `limit`; false if it never did.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}
