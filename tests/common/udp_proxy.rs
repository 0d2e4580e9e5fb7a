//! A small userspace UDP proxy for network-fault tests (the kernel here has no `tc netem`):
//! clients send to the proxy's listening address, the proxy forwards each datagram to the server
//! from a socket of its own per client, and the server's answers back to the client. Faults are
//! switched at run time, independently per direction where it matters:
//!
//! * `drop`: a random fraction of datagrams is dropped;
//! * `delay` + `jitter`: every datagram waits `delay` plus a uniformly random part of `jitter`
//!   in a timer queue (jitter alone reorders datagrams);
//! * `reorder`: a random fraction of datagrams is held back and released right after the next
//!   `reorder_after` datagrams of the same direction (or after 200 ms if none come);
//! * `block_up` / `block_down`: everything client→server / server→client is dropped (both: a
//!   partition), including what was queued when the block began; `Faults::none()` heals.
//!
//! `start_in(Some(ns), ..)` runs the proxy inside a named network namespace (`ip netns add`):
//! its threads enter it with setns(2) before opening any socket, so the proxy can stand between
//! a replica in one namespace and a primary in another, its upstream traffic crossing the veth.
//! Counters (`stats`) say what each fault actually did.
#![allow(dead_code)]

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The faults applied to datagrams passing through the proxy.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Fraction (0.0..=1.0) of datagrams dropped, each direction.
    pub drop: f64,
    /// Added to every datagram's delivery time.
    pub delay: Duration,
    /// A uniformly random extra delay of up to this much per datagram.
    pub jitter: Duration,
    /// Fraction (0.0..=1.0) of datagrams held back...
    pub reorder: f64,
    /// ...until this many later datagrams of the same direction have passed.
    pub reorder_after: u32,
    /// Drop everything from the client to the server.
    pub block_up: bool,
    /// Drop everything from the server to the client.
    pub block_down: bool,
}

impl Faults {
    /// No fault: datagrams pass at once.
    pub fn none() -> Faults {
        Faults::default()
    }

    /// Nothing passes either way.
    pub fn partition() -> Faults {
        Faults {
            block_up: true,
            block_down: true,
            ..Faults::default()
        }
    }
}

/// What the proxy did, since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams delivered (either way).
    pub forwarded: u64,
    /// Dropped by the random `drop` fault.
    pub dropped: u64,
    /// Dropped by a block (partition), on arrival or while queued.
    pub blocked: u64,
    /// Delivered later than they arrived (delay or jitter).
    pub delayed: u64,
    /// Held back and released after later ones.
    pub reordered: u64,
}

impl std::ops::Sub for Stats {
    type Output = Stats;
    fn sub(self, o: Stats) -> Stats {
        Stats {
            forwarded: self.forwarded - o.forwarded,
            dropped: self.dropped - o.dropped,
            blocked: self.blocked - o.blocked,
            delayed: self.delayed - o.delayed,
            reordered: self.reordered - o.reordered,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// Client to server.
    Up = 0,
    /// Server to client.
    Down = 1,
}

struct Item {
    due: Instant,
    seq: u64,
    dir: Dir,
    sock: Arc<UdpSocket>,
    to: SocketAddr,
    data: Vec<u8>,
}

impl PartialEq for Item {
    fn eq(&self, o: &Item) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Item) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    /// Reversed: the earliest due first out of a max-heap.
    fn cmp(&self, o: &Item) -> CmpOrdering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

/// A held-back datagram: how many more datagrams of its direction must pass first, and until
/// when it waits at most.
struct Held {
    remaining: u32,
    until: Instant,
    item: Item,
}

#[derive(Default)]
struct Sched {
    heap: BinaryHeap<Item>,
    held: [VecDeque<Held>; 2],
    seq: u64,
}

struct Shared {
    faults: Mutex<Faults>,
    stats: Mutex<Stats>,
    sched: Mutex<Sched>,
    wake: Condvar,
    stop: AtomicBool,
    rng: Mutex<u64>,
}

impl Shared {
    fn random(&self) -> f64 {
        let mut x = self.rng.lock().unwrap();
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x >> 11) as f64 / (1u64 << 53) as f64
    }

    fn blocked(f: &Faults, dir: Dir) -> bool {
        match dir {
            Dir::Up => f.block_up,
            Dir::Down => f.block_down,
        }
    }

    /// A datagram arrived: apply the faults and queue it.
    fn submit(&self, dir: Dir, sock: Arc<UdpSocket>, to: SocketAddr, data: Vec<u8>) {
        let f = *self.faults.lock().unwrap();
        if Self::blocked(&f, dir) {
            self.stats.lock().unwrap().blocked += 1;
            return;
        }
        if f.drop > 0.0 && self.random() < f.drop {
            self.stats.lock().unwrap().dropped += 1;
            return;
        }
        let now = Instant::now();
        let extra = if f.jitter.is_zero() {
            Duration::ZERO
        } else {
            f.jitter.mul_f64(self.random())
        };
        let due = now + f.delay + extra;
        let hold = f.reorder > 0.0 && self.random() < f.reorder;
        let mut s = self.sched.lock().unwrap();
        s.seq += 1;
        let item = Item {
            due,
            seq: s.seq,
            dir,
            sock,
            to,
            data,
        };
        if hold {
            s.held[dir as usize].push_back(Held {
                remaining: f.reorder_after.max(1),
                until: now + Duration::from_millis(200),
                item,
            });
            drop(s);
            self.stats.lock().unwrap().reordered += 1;
            self.wake.notify_all();
            return;
        }
        let after = item.due;
        s.heap.push(item);
        // Release the held-back datagrams this one was the last to wait for, right after it.
        let mut released = Vec::new();
        for h in s.held[dir as usize].iter_mut() {
            h.remaining -= 1;
        }
        while s.held[dir as usize]
            .front()
            .is_some_and(|h| h.remaining == 0)
        {
            released.push(s.held[dir as usize].pop_front().unwrap());
        }
        for mut h in released {
            s.seq += 1;
            h.item.seq = s.seq;
            h.item.due = h.item.due.max(after);
            s.heap.push(h.item);
        }
        drop(s);
        if !f.delay.is_zero() || !f.jitter.is_zero() {
            self.stats.lock().unwrap().delayed += 1;
        }
        self.wake.notify_all();
    }

    /// The timer thread: delivers queued datagrams when due.
    fn run_scheduler(&self) {
        let mut s = self.sched.lock().unwrap();
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            // Held-back datagrams nothing came after: released at their deadline.
            for d in 0..2 {
                while s.held[d].front().is_some_and(|h| h.until <= now) {
                    let h = s.held[d].pop_front().unwrap();
                    s.heap.push(h.item);
                }
            }
            let mut due = Vec::new();
            while s.heap.peek().is_some_and(|i| i.due <= now) {
                due.push(s.heap.pop().unwrap());
            }
            if !due.is_empty() {
                drop(s);
                let f = *self.faults.lock().unwrap();
                let (mut sent, mut blocked) = (0, 0);
                for i in due {
                    if Self::blocked(&f, i.dir) {
                        blocked += 1;
                    } else {
                        // A full socket buffer or an unreachable peer is loss, as on a network.
                        let _ = i.sock.send_to(&i.data, i.to);
                        sent += 1;
                    }
                }
                {
                    let mut st = self.stats.lock().unwrap();
                    st.forwarded += sent;
                    st.blocked += blocked;
                }
                s = self.sched.lock().unwrap();
                continue;
            }
            let next = [
                s.heap.peek().map(|i| i.due),
                s.held[0].front().map(|h| h.until),
                s.held[1].front().map(|h| h.until),
            ]
            .into_iter()
            .flatten()
            .min();
            let wait = next
                .map_or(Duration::from_millis(100), |t| {
                    t.saturating_duration_since(now)
                })
                .min(Duration::from_millis(100));
            s = self.wake.wait_timeout(s, wait).unwrap().0;
        }
    }
}

/// A running proxy; stopped when dropped.
pub struct UdpProxy {
    /// Where clients send (the proxy's listening socket).
    pub listen: SocketAddr,
    /// Where datagrams are forwarded to.
    pub server: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

// setns(2) from glibc (no crate needed): moves the calling thread into another namespace.
extern "C" {
    fn setns(fd: i32, nstype: i32) -> i32;
}
const CLONE_NEWNET: i32 = 0x4000_0000;

/// Moves the calling thread into the named network namespace (`/run/netns/NAME`).
fn enter_netns(name: &str) -> std::io::Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{name}"))?;
    // SAFETY: setns only reads the descriptor, which stays open for the call.
    if unsafe { setns(f.as_raw_fd(), CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn recv_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind(addr)?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(s)
}

impl UdpProxy {
    /// A proxy on `listen` (port 0: any) forwarding to `server`, in the current namespace.
    pub fn start(listen: SocketAddr, server: SocketAddr) -> std::io::Result<UdpProxy> {
        UdpProxy::start_in(None, listen, server)
    }

    /// A proxy on `listen` forwarding to `server`, its sockets in namespace `netns` when given.
    pub fn start_in(
        netns: Option<&str>,
        listen: SocketAddr,
        server: SocketAddr,
    ) -> std::io::Result<UdpProxy> {
        let shared = Arc::new(Shared {
            faults: Mutex::new(Faults::none()),
            stats: Mutex::new(Stats::default()),
            sched: Mutex::new(Sched::default()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            rng: Mutex::new(0x9e37_79b9_7f4a_7c15),
        });
        let mut threads = Vec::new();
        let sh = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("udp-proxy-timer".into())
                .spawn(move || sh.run_scheduler())?,
        );
        // The listener: binds in the namespace, then forwards client datagrams upstream, one
        // upstream socket (and reader thread) per client address.
        let (tx, rx) = mpsc::channel();
        let sh = shared.clone();
        let ns = netns.map(String::from);
        threads.push(
            std::thread::Builder::new()
                .name("udp-proxy-listen".into())
                .spawn(move || {
                    let setup = || -> std::io::Result<UdpSocket> {
                        if let Some(ns) = &ns {
                            enter_netns(ns)?;
                        }
                        recv_socket(listen)
                    };
                    let sock = match setup() {
                        Ok(s) => Arc::new(s),
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(sock.local_addr());
                    let mut upstream: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
                    let mut readers = Vec::new();
                    let mut buf = vec![0u8; 65536];
                    while !sh.stop.load(Ordering::Relaxed) {
                        let (n, client) = match sock.recv_from(&mut buf) {
                            Ok(x) => x,
                            Err(_) => continue, // timeout: look at the stop flag
                        };
                        let up = match upstream.get(&client) {
                            Some(u) => u.clone(),
                            None => {
                                let any: SocketAddr = if server.is_ipv4() {
                                    "0.0.0.0:0".parse().unwrap()
                                } else {
                                    "[::]:0".parse().unwrap()
                                };
                                let Ok(u) = recv_socket(any) else { continue };
                                let u = Arc::new(u);
                                upstream.insert(client, u.clone());
                                // Answers from the server go back to this client.
                                let (sh2, u2, back) = (sh.clone(), u.clone(), sock.clone());
                                readers.push(std::thread::spawn(move || {
                                    let mut buf = vec![0u8; 65536];
                                    while !sh2.stop.load(Ordering::Relaxed) {
                                        if let Ok((n, from)) = u2.recv_from(&mut buf) {
                                            if from == server {
                                                sh2.submit(
                                                    Dir::Down,
                                                    back.clone(),
                                                    client,
                                                    buf[..n].to_vec(),
                                                );
                                            }
                                        }
                                    }
                                }));
                                u
                            }
                        };
                        sh.submit(Dir::Up, up, server, buf[..n].to_vec());
                    }
                    for r in readers {
                        let _ = r.join();
                    }
                })?,
        );
        let listen = rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|e| std::io::Error::other(format!("the proxy did not start: {e}")))??;
        Ok(UdpProxy {
            listen,
            server,
            shared,
            threads,
        })
    }

    /// Switches the faults (from the next datagram on; a block also drops what is queued).
    pub fn set_faults(&self, f: Faults) {
        *self.shared.faults.lock().unwrap() = f;
        self.shared.wake.notify_all();
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        *self.shared.faults.lock().unwrap()
    }

    /// No more faults.
    pub fn heal(&self) {
        self.set_faults(Faults::none());
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> Stats {
        *self.shared.stats.lock().unwrap()
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
