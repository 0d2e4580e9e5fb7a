//! A network-fault fixture for end-to-end tests: two fresh Linux network namespaces joined by a
//! veth pair, with random packet loss applied by nftables (the kernel here has no `tc netem`).
//!
//! Requires root, `ip` (iproute2) and `nft` (nftables); `measured_loss` also needs `python3`.
//! Nothing is configured in the host namespace: the veth is created directly inside the two
//! namespaces, so traffic only ever flows between them.
//!
//! Loss model: `set_loss(p)` installs, in each namespace, a table `inet rpl_loss` with one chain
//! on the *input* hook that drops p % of the packets arriving on the veth (`numgen random mod
//! 10000 < p*100 drop`). Each direction is therefore dropped exactly once, at the receiver, so
//! the effective one-way loss is p % and the round-trip loss is 1 - (1 - p)^2 (~19 % for p = 10).
//! The output hook is deliberately not used: a drop there makes the sender's `send()` fail with
//! EPERM, which real network loss never does. ARP is not an `inet` packet and is never dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

/// The veth end's name inside each namespace.
const VETH: &str = "veth0";
/// The nftables table (family `inet`) holding the loss rule in each namespace.
const NFT_TABLE: &str = "rpl_loss";
/// Namespace name prefix: `rpl-<pid>-<n>-a` / `-b`.
const PREFIX: &str = "rpl-";
/// UDP port used by `measured_loss` inside the namespaces.
const PROBE_PORT: u16 = 47999;

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// Two namespaces `a` and `b` joined by a veth pair, `a_ip` <-> `b_ip` (a /24 of their own).
/// Dropping it deletes both namespaces (and thereby the veth).
pub struct NetPair {
    pub a: String,
    pub b: String,
    pub a_ip: String,
    pub b_ip: String,
    created: Vec<String>,
}

impl NetPair {
    /// Two fresh namespaces (`rpl-<pid>-<n>-a` / `-b`), a veth pair `10.X.Y.1/24` (in `a`) <->
    /// `10.X.Y.2/24` (in `b`) with X.Y unique per pair, and `lo` up in both.
    pub fn new() -> Result<NetPair, String> {
        check_tool("ip", "-V", "iproute2")?;
        check_tool("nft", "--version", "nftables")?;
        SWEEP.call_once(sweep_stale);

        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        // 100..=253 for X and 1..=254 for Y: distinct for up to 39116 pairs per process.
        let k = (pid.wrapping_mul(97).wrapping_add(n)) % (154 * 254);
        let (x, y) = (100 + k / 254, 1 + k % 254);
        let mut pair = NetPair {
            a: format!("{PREFIX}{pid}-{n}-a"),
            b: format!("{PREFIX}{pid}-{n}-b"),
            a_ip: format!("10.{x}.{y}.1"),
            b_ip: format!("10.{x}.{y}.2"),
            created: Vec::new(),
        };
        // On any error below, dropping `pair` deletes whatever was already created.
        for ns in [pair.a.clone(), pair.b.clone()] {
            run(ip(&["netns", "add", &ns]), "ip netns add").map_err(|e| {
                format!("{e} (creating network namespaces needs root / CAP_SYS_ADMIN)")
            })?;
            pair.created.push(ns);
        }
        run(
            ip(&[
                "link", "add", VETH, "netns", &pair.a, "type", "veth", "peer", "name", VETH,
                "netns", &pair.b,
            ]),
            "ip link add veth",
        )?;
        for (ns, addr) in [(&pair.a, &pair.a_ip), (&pair.b, &pair.b_ip)] {
            let cidr = format!("{addr}/24");
            run(
                ip(&["-n", ns, "link", "set", "lo", "up"]),
                "ip link set lo up",
            )?;
            run(
                ip(&["-n", ns, "addr", "add", &cidr, "dev", VETH]),
                "ip addr add",
            )?;
            run(
                ip(&["-n", ns, "link", "set", VETH, "up"]),
                "ip link set veth up",
            )?;
        }
        Ok(pair)
    }

    /// Drop `percent` % of the packets in both directions, replacing any previous loss rule;
    /// 0 removes the loss. Applied on the input hook of each namespace for all traffic arriving
    /// on the veth, so the effective one-way loss is `percent` % (see the module docs).
    pub fn set_loss(&self, percent: u32) -> Result<(), String> {
        if percent > 100 {
            return Err(format!("set_loss: {percent} % is more than 100 %"));
        }
        // `add` + `delete` makes the delete succeed whether or not the table existed; the whole
        // script is one atomic nftables transaction.
        let mut script = format!("add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n");
        if percent > 0 {
            script.push_str(&format!(
                "table inet {NFT_TABLE} {{\n  chain input {{\n    type filter hook input priority -200; policy accept;\n    iifname \"{VETH}\" numgen random mod 10000 < {} drop\n  }}\n}}\n",
                percent * 100
            ));
        }
        for ns in [&self.a, &self.b] {
            let mut cmd = self.command(ns, "nft");
            cmd.args(["-f", "-"]);
            run_with_stdin(cmd, &script, &format!("nft -f - in {ns}"))?;
        }
        Ok(())
    }

    /// A `Command` that runs `program` (add args with `.arg`/`.args`) inside namespace `ns` via
    /// `ip netns exec`, inheriting the environment (so `PATH` lookup works as usual).
    pub fn command(&self, ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program]);
        cmd
    }

    /// Send `packets` UDP datagrams from `a` to `b` (paced, numbered; python3 on both ends) and
    /// return the fraction of distinct datagrams that did not arrive.
    pub fn measured_loss(&self, packets: u32) -> Result<f64, String> {
        if packets == 0 {
            return Err("measured_loss: packets must be > 0".into());
        }
        check_tool("python3", "--version", "python3")?;
        let receiver_py = "import socket, sys\n\
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)\n\
            s.bind((sys.argv[1], int(sys.argv[2])))\n\
            print('ready', flush=True)\n\
            s.settimeout(10.0)\n\
            seen = set()\n\
            while True:\n\
            \x20   try:\n\
            \x20       d, _ = s.recvfrom(64)\n\
            \x20   except socket.timeout:\n\
            \x20       break\n\
            \x20   seen.add(int(d))\n\
            \x20   s.settimeout(1.5)\n\
            print(len(seen), flush=True)\n";
        let sender_py = "import socket, sys, time\n\
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
            dst = (sys.argv[1], int(sys.argv[2]))\n\
            for i in range(int(sys.argv[3])):\n\
            \x20   s.sendto(str(i).encode(), dst)\n\
            \x20   time.sleep(0.0002)\n";
        let port = PROBE_PORT.to_string();

        let mut receiver = self.command(&self.b, "python3");
        receiver
            .args(["-c", receiver_py, &self.b_ip, &port])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut receiver = KillOnDrop(
            receiver
                .spawn()
                .map_err(|e| format!("spawning the python3 receiver: {e}"))?,
        );
        let mut lines = BufReader::new(receiver.0.stdout.take().expect("piped stdout")).lines();
        match lines.next() {
            Some(Ok(l)) if l.trim() == "ready" => {}
            other => {
                let _ = receiver.0.kill();
                let out = receiver.stderr_after_exit();
                return Err(format!(
                    "python3 receiver in {} did not start (got {other:?}): {out}",
                    self.b
                ));
            }
        }

        let mut sender = self.command(&self.a, "python3");
        sender.args(["-c", sender_py, &self.b_ip, &port, &packets.to_string()]);
        run(sender, "python3 sender")?;

        let count = match lines.next() {
            Some(Ok(l)) => l
                .trim()
                .parse::<u32>()
                .map_err(|e| format!("python3 receiver printed {l:?}: {e}"))?,
            other => {
                let out = receiver.stderr_after_exit();
                return Err(format!(
                    "python3 receiver gave no count (got {other:?}): {out}"
                ));
            }
        };
        let _ = receiver.0.wait();
        Ok(1.0 - f64::from(count.min(packets)) / f64::from(packets))
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // Processes still running inside a namespace keep it alive (unnamed) until they exit.
        for ns in self.created.drain(..) {
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Kills (and reaps) the child when dropped, so error paths leave no process behind.
struct KillOnDrop(Child);

impl KillOnDrop {
    fn stderr_after_exit(&mut self) -> String {
        let _ = self.0.wait();
        let mut err = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        err.trim().to_string()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Deletes `rpl-<pid>-*` namespaces left behind by test processes that no longer exist.
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn check_tool(program: &str, version_arg: &str, package: &str) -> Result<(), String> {
    match Command::new(program)
        .arg(version_arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(format!(
            "`{program}` not found in PATH; install the `{package}` package (apt-get install {package})"
        )),
        Err(e) => Err(format!("cannot run `{program} {version_arg}`: {e}")),
    }
}

fn ip(args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    cmd
}

fn check(out: std::io::Result<Output>, what: &str) -> Result<String, String> {
    let out = out.map_err(|e| format!("{what}: cannot run: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{what}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn run(mut cmd: Command, what: &str) -> Result<String, String> {
    check(cmd.stdin(Stdio::null()).output(), what)
}

fn run_with_stdin(mut cmd: Command, input: &str, what: &str) -> Result<String, String> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{what}: cannot run: {e}"))?;
    // Dropping stdin closes it, so the program sees end of input before we wait.
    let written = match child.stdin.take() {
        Some(mut stdin) => stdin.write_all(input.as_bytes()),
        None => Ok(()),
    };
    let out = check(child.wait_with_output(), what)?;
    written.map_err(|e| format!("{what}: writing stdin: {e}"))?;
    Ok(out)
}
