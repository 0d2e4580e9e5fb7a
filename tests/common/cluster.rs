//! A primary and a replica over QUIC on loopback: directories, certificates made with
//! `replited cert`, both configs, and the real binary started as either.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::*;

/// A primary and a replica directory, a development CA and certificates made with
/// `replited cert`, and both configs.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub pdb: PathBuf,
    pub rdb: PathBuf,
    pub pcfg: PathBuf,
    pub rcfg: PathBuf,
    pub port: u16,
}

pub struct Opts {
    /// Require client certificates on the primary.
    pub client_ca: bool,
    /// Give the replica a client certificate.
    pub replica_cert: bool,
    /// The replica's database file name.
    pub replica_name: &'static str,
    /// The address the primary binds and the replica connects to.
    pub host: String,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            client_ca: true,
            replica_cert: true,
            replica_name: "data.db",
            host: "127.0.0.1".into(),
        }
    }
}

impl Cluster {
    pub fn new(o: Opts) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("replited-stream")
            .tempdir()
            .unwrap();
        let d = dir.path();
        for sub in ["primary", "replica"] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        let certs = d.join("certs");
        let c = certs.to_str().unwrap();
        make_certs(&certs, &[&o.host, "localhost"]);
        let port = free_udp_port();
        let pdb = d.join("primary/data.db");
        let rdb = d.join("replica").join(o.replica_name);
        let pcfg = d.join("primary.toml");
        let rcfg = d.join("replica.toml");
        let client_ca = if o.client_ca {
            format!("tls_client_ca = \"{c}/ca.pem\"\n")
        } else {
            String::new()
        };
        fs::write(
            &pcfg,
            format!(
                "[log]\nlevel = \"debug\"\n\n[[database]]\ndb = \"{}\"\n\n[[database.replicate]]\nname = \"backup\"\n[database.replicate.params]\ntype = \"fs\"\nroot = \"{}\"\n\n[[database.replicate]]\nname = \"stream\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"quic://{}:{port}\"\ntls_cert = \"{c}/primary.pem\"\ntls_key = \"{c}/primary-key.pem\"\n{client_ca}",
                pdb.display(),
                d.join("backup").display(),
                o.host,
            ),
        )
        .unwrap();
        let replica_cert = if o.replica_cert {
            format!("tls_cert = \"{c}/replica-1.pem\"\ntls_key = \"{c}/replica-1-key.pem\"\n")
        } else {
            String::new()
        };
        fs::write(
            &rcfg,
            format!(
                "[log]\nlevel = \"debug\"\n\n[[database]]\ndb = \"{}\"\n\n[[database.replicate]]\nname = \"primary\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"http://{}:{port}\"\ntls_ca = \"{c}/ca.pem\"\n{replica_cert}",
                rdb.display(),
                o.host,
            ),
        )
        .unwrap();
        // The app creates its database before replited starts.
        run_load(&pdb, 1, 0);
        Cluster {
            dir,
            pdb,
            rdb,
            pcfg,
            rcfg,
            port,
        }
    }

    pub fn log_path(&self, what: &str) -> PathBuf {
        self.dir.path().join(format!(
            "{what}-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ))
    }

    pub fn spawn(&self, mut cmd: Command, what: &str) -> Daemon {
        let log = self.log_path(what);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    pub fn primary_cmd(&self, mut cmd: Command) -> Daemon {
        cmd.args(["-c", self.pcfg.to_str().unwrap(), "replicate"]);
        let d = self.spawn(cmd, "primary");
        d.wait_for_log("capturing", Duration::from_secs(60));
        d
    }

    pub fn primary(&self) -> Daemon {
        self.primary_cmd(Command::new(bin()))
    }

    pub fn replica_cmd(&self, mut cmd: Command, args: &[&str]) -> Daemon {
        cmd.args(["-c", self.rcfg.to_str().unwrap(), "replica-sidecar"])
            .args(args);
        self.spawn(cmd, "replica")
    }

    pub fn replica(&self, args: &[&str]) -> Daemon {
        self.replica_cmd(Command::new(bin()), args)
    }
}
