//! Network faults between a real primary and a real replica in two network namespaces joined by
//! a veth pair (TESTING.md): random loss by nftables on the veth, and delay, jitter, reordering,
//! random drops and partitions (both ways, one way, short, longer than the 10 s idle timeout,
//! flapping) by the project's own UDP proxy (`tests/common/udp_proxy.rs`), which runs inside the
//! replica's namespace so that everything it forwards also crosses the veth.
//!
//! Under a running load (`load.py --rate`), each fault is applied for a while, then healed, and
//! the replica must converge: the same content as the primary (transaction id and content hash),
//! `PRAGMA integrity_check` ok, without a rebuild, every time. `NET_CYCLES=N` repeats the whole
//! list of faults N times (default 1; `scripts/network-faults` runs more); each cycle prints the
//! proxy's counters, the reconnections it caused and how long the replica took to converge
//! after healing, and `NET_REPORT=FILE` appends the figures to FILE.

mod common;
#[path = "common/udp_proxy.rs"]
mod udp_proxy;

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Opts};
use common::netns::NetPair;
use common::*;
use udp_proxy::{Faults, Stats, UdpProxy};

/// The replica log line of a connection that died.
const LOST: &str = "connection to the primary lost";

/// One fault and how long it lasts.
struct Fault {
    name: &'static str,
    /// nftables loss on the veth (percent, each direction).
    nft_loss: u32,
    /// The proxy's faults; a list is switched through in turn, `flap` long each.
    proxy: Vec<Faults>,
    flap: Duration,
    duration: Duration,
    /// The connection must survive it (shorter than the idle timeout).
    survives: bool,
    /// The connection must die of it (longer than the idle timeout).
    kills: bool,
}

fn faults() -> Vec<Fault> {
    let ms = Duration::from_millis;
    let one = |name, proxy: Faults, secs| Fault {
        name,
        nft_loss: 0,
        proxy: vec![proxy],
        flap: Duration::ZERO,
        duration: Duration::from_secs(secs),
        survives: false,
        kills: false,
    };
    vec![
        // The control: the same load without a fault.
        one("no fault (control)", Faults::none(), 6),
        Fault {
            nft_loss: 20,
            ..one("nftables loss 20 % each way", Faults::none(), 6)
        },
        one(
            "proxy drop 10 %, delay 40 ms + jitter 40 ms",
            Faults {
                drop: 0.10,
                delay: ms(40),
                jitter: ms(40),
                ..Faults::none()
            },
            6,
        ),
        one(
            "reorder 25 % (after 3), delay 5 ms",
            Faults {
                reorder: 0.25,
                reorder_after: 3,
                delay: ms(5),
                ..Faults::none()
            },
            6,
        ),
        Fault {
            survives: true,
            ..one("partition 4 s", Faults::partition(), 4)
        },
        Fault {
            survives: true,
            ..one(
                "one-way partition 4 s (replica to primary)",
                Faults {
                    block_up: true,
                    ..Faults::none()
                },
                4,
            )
        },
        Fault {
            survives: true,
            ..one(
                "one-way partition 4 s (primary to replica)",
                Faults {
                    block_down: true,
                    ..Faults::none()
                },
                4,
            )
        },
        Fault {
            kills: true,
            ..one(
                "partition 14 s (beyond the 10 s idle timeout)",
                Faults::partition(),
                14,
            )
        },
        Fault {
            name: "flapping partition (500 ms on, 500 ms off, delay 20 ms)",
            nft_loss: 0,
            proxy: vec![
                Faults::partition(),
                Faults {
                    delay: ms(20),
                    ..Faults::none()
                },
            ],
            flap: ms(500),
            duration: Duration::from_secs(6),
            survives: false,
            kills: false,
        },
        Fault {
            nft_loss: 5,
            ..one(
                "everything: nftables loss 5 %, drop 5 %, delay 30 + jitter 30 ms, reorder 10 %",
                Faults {
                    drop: 0.05,
                    delay: ms(30),
                    jitter: ms(30),
                    reorder: 0.10,
                    reorder_after: 2,
                    ..Faults::none()
                },
                6,
            )
        },
    ]
}

/// The figures of one cycle.
struct Figures {
    cycle: usize,
    fault: &'static str,
    txns: u64,
    stats: Stats,
    reconnects: usize,
    converged: Duration,
}

/// Transactions per second of the load running through every fault.
const RATE: u64 = 150;

#[test]
fn replica_converges_after_every_network_fault() {
    let cycles: usize = std::env::var("NET_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let net = NetPair::new().expect(
        "network namespaces (run as root with iproute2 and nftables; scripts/test installs them)",
    );
    let c = Cluster::new(Opts {
        host: net.a_ip.clone(),
        ..Opts::default()
    });
    // The proxy in the replica's namespace, forwarding across the veth to the primary.
    let server = SocketAddr::new(net.a_ip.parse().unwrap(), c.port);
    let proxy = UdpProxy::start_in(Some(&net.b), "127.0.0.1:0".parse().unwrap(), server).unwrap();
    // The replica connects to the proxy and still checks the primary's certificate for its
    // address.
    let rcfg = fs::read_to_string(&c.rcfg).unwrap();
    let direct = format!("addr = \"http://{}:{}\"", net.a_ip, c.port);
    assert!(rcfg.contains(&direct), "{rcfg}");
    fs::write(
        &c.rcfg,
        rcfg.replace(
            &direct,
            &format!(
                "addr = \"http://127.0.0.1:{}\"\nserver_name = \"{}\"",
                proxy.listen.port(),
                net.a_ip
            ),
        ),
    )
    .unwrap();

    let p = c.primary_cmd(net.command(&net.a, bin()));
    run_load(&c.pdb, 1, 200);
    let r = c.replica_cmd(net.command(&net.b, bin()), &[]);
    r.wait_for_log("caught up with the primary", Duration::from_secs(120));
    wait_converged(&c.pdb, &c.rdb, Duration::from_secs(60), &[&p, &r]);
    assert!(
        proxy.stats().forwarded > 0,
        "the replica's traffic goes through the proxy"
    );

    let mut next = 201u64;
    let mut figures = Vec::new();
    for cycle in 1..=cycles {
        for f in faults() {
            let txns = RATE * f.duration.as_secs();
            let load = spawn_load(
                &c.pdb,
                next,
                next + txns - 1,
                &["--rate", &RATE.to_string()],
            );
            next += txns;
            let lost_before = r.log_text().matches(LOST).count();
            let stats_before = proxy.stats();
            net.set_loss(f.nft_loss).unwrap();
            let start = Instant::now();
            let mut i = 0;
            while start.elapsed() < f.duration {
                proxy.set_faults(f.proxy[i % f.proxy.len()]);
                i += 1;
                let step = if f.flap.is_zero() { f.duration } else { f.flap };
                std::thread::sleep(step.min(f.duration.saturating_sub(start.elapsed())));
            }
            proxy.heal();
            net.set_loss(0).unwrap();
            let stats = proxy.stats() - stats_before;
            wait_ok(load);
            let converged = wait_converged(&c.pdb, &c.rdb, Duration::from_secs(90), &[&p, &r]);
            assert_eq!(integrity(&c.rdb), "ok", "after {}", f.name);
            let reconnects = r.log_text().matches(LOST).count() - lost_before;
            let fig = Figures {
                cycle,
                fault: f.name,
                txns,
                stats,
                reconnects,
                converged,
            };
            eprintln!(
                "cycle {cycle}: {}: {txns} txns; proxy forwarded {}, dropped {}, blocked {}, delayed {}, reordered {}; {reconnects} reconnections; converged {:.2} s after the load and the fault ended",
                f.name,
                stats.forwarded,
                stats.dropped,
                stats.blocked,
                stats.delayed,
                stats.reordered,
                converged.as_secs_f64()
            );
            // The fault did what it says.
            let pf = f.proxy[0];
            if pf.drop > 0.0 {
                assert!(stats.dropped > 0, "{}: nothing dropped", f.name);
            }
            if pf.reorder > 0.0 {
                assert!(stats.reordered > 0, "{}: nothing reordered", f.name);
            }
            if !pf.delay.is_zero() {
                assert!(stats.delayed > 0, "{}: nothing delayed", f.name);
            }
            if pf.block_up || pf.block_down {
                assert!(stats.blocked > 0, "{}: nothing blocked", f.name);
            }
            if f.survives {
                assert_eq!(
                    reconnects,
                    0,
                    "{}: shorter than the idle timeout, the connection survives:\n{}",
                    f.name,
                    r.log_text()
                );
            }
            if f.kills {
                assert!(
                    reconnects > 0,
                    "{}: longer than the idle timeout, the connection died and was made again:\n{}",
                    f.name,
                    r.log_text()
                );
            }
            figures.push(fig);
        }
    }
    assert_eq!(state(&c.rdb), expect(next - 1));
    assert_eq!(integrity(&c.rdb), "ok");
    let rlog = r.stop();
    assert!(
        !rlog.contains("must be rebuilt")
            && rlog.matches("restoring from the primary's backup").count() == 1,
        "the replica resumed after every fault without a rebuild (one restore, at the start):\n{rlog}"
    );
    p.stop();
    report(&figures, next - 1);
}

/// Prints a summary per fault and appends it to `NET_REPORT` when set.
fn report(figures: &[Figures], last: u64) {
    let mut out = String::new();
    let cycles = figures.iter().map(|f| f.cycle).max().unwrap_or(0);
    out.push_str(&format!(
        "\n{cycles} cycle(s), {} faults applied, {last} transactions, replica equal to the primary after every one\n\n| fault | times | reconnections | converged after healing: median / max (s) | dropped | blocked | reordered |\n|---|---:|---:|---:|---:|---:|---:|\n",
        figures.len()
    ));
    let mut names: Vec<&str> = figures.iter().map(|f| f.fault).collect();
    names.dedup();
    names.sort();
    names.dedup();
    for name in names {
        let fs: Vec<&Figures> = figures.iter().filter(|f| f.fault == name).collect();
        let mut times: Vec<f64> = fs.iter().map(|f| f.converged.as_secs_f64()).collect();
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let median = times[times.len() / 2];
        let max = times[times.len() - 1];
        let sum = |g: fn(&Stats) -> u64| fs.iter().map(|f| g(&f.stats)).sum::<u64>();
        out.push_str(&format!(
            "| {name} | {} | {} | {median:.2} / {max:.2} | {} | {} | {} |\n",
            fs.len(),
            fs.iter().map(|f| f.reconnects).sum::<usize>(),
            sum(|s| s.dropped),
            sum(|s| s.blocked),
            sum(|s| s.reordered),
        ));
    }
    let total: u64 = figures.iter().map(|f| f.txns).sum();
    out.push_str(&format!("\ntransactions under faults: {total}\n"));
    eprintln!("{out}");
    if let Ok(path) = std::env::var("NET_REPORT") {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(out.as_bytes()).unwrap();
    }
}

/// The proxy itself, on loopback: each fault does what it says and healing restores delivery.
#[test]
fn udp_proxy_applies_each_fault() {
    let server = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
    server
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let proxy =
        UdpProxy::start("127.0.0.1:0".parse().unwrap(), server.local_addr().unwrap()).unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    // The server side reads all the time (a socket buffer holds only a few hundred datagrams):
    // numbers received, and the address they came from.
    let received: Arc<Mutex<Vec<u32>>> = Arc::default();
    let from: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (server, received, from, done) =
            (server.clone(), received.clone(), from.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            while !done.load(Ordering::Relaxed) {
                if let Ok((k, f)) = server.recv_from(&mut buf) {
                    *from.lock().unwrap() = Some(f);
                    if k == 4 {
                        received
                            .lock()
                            .unwrap()
                            .push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
                    }
                }
            }
        })
    };
    // Sends n numbered datagrams (paced) and returns the numbers the server got, in order.
    let send = |n: u32| -> Vec<u32> {
        received.lock().unwrap().clear();
        for i in 0..n {
            client.send_to(&i.to_be_bytes(), proxy.listen).unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
        // Until nothing more arrives for 300 ms.
        let mut seen = usize::MAX;
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = received.lock().unwrap().len();
            if now == seen {
                break;
            }
            seen = now;
        }
        received.lock().unwrap().clone()
    };
    let mut buf = [0u8; 16];
    // No fault: everything, in order; and answers come back to the client.
    assert_eq!(send(200), (0..200).collect::<Vec<_>>());
    let upstream = from.lock().unwrap().expect("datagrams arrived");
    assert_ne!(upstream, client.local_addr().unwrap(), "through the proxy");
    server.send_to(b"pong", upstream).unwrap();
    let (k, back) = client.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..k], back), (&b"pong"[..], proxy.listen));

    // Random drops: about the fraction asked.
    proxy.set_faults(Faults {
        drop: 0.3,
        ..Faults::none()
    });
    let got = send(1000);
    assert!(
        (600..800).contains(&got.len()),
        "{} of 1000 with 30 % drop",
        got.len()
    );
    assert!(got.windows(2).all(|w| w[0] < w[1]));

    // Delay: nothing arrives before it.
    proxy.set_faults(Faults {
        delay: Duration::from_millis(150),
        ..Faults::none()
    });
    received.lock().unwrap().clear();
    let t = Instant::now();
    client.send_to(&7u32.to_be_bytes(), proxy.listen).unwrap();
    while received.lock().unwrap().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the delayed datagram never came"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "{:?}",
        t.elapsed()
    );

    // Reordering: every datagram arrives, not in order.
    proxy.set_faults(Faults {
        reorder: 0.3,
        reorder_after: 3,
        ..Faults::none()
    });
    let got = send(300);
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, (0..300).collect::<Vec<_>>());
    assert_ne!(got, sorted, "nothing was reordered");

    // Partition, then one way only, then healed.
    proxy.set_faults(Faults::partition());
    assert!(send(50).is_empty());
    proxy.set_faults(Faults {
        block_down: true,
        ..Faults::none()
    });
    assert_eq!(send(10).len(), 10);
    server.send_to(b"x", upstream).unwrap();
    assert!(client.recv_from(&mut buf).is_err(), "blocked downstream");
    proxy.heal();
    assert_eq!(send(100), (0..100).collect::<Vec<_>>());
    server.send_to(b"y", upstream).unwrap();
    assert_eq!(
        client.recv_from(&mut buf).unwrap().0,
        1,
        "healed downstream"
    );
    let s = proxy.stats();
    assert!(
        s.dropped > 200 && s.blocked >= 51 && s.reordered > 0 && s.delayed >= 1,
        "{s:?}"
    );
    done.store(true, Ordering::Relaxed);
    reader.join().unwrap();
}
