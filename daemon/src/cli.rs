//! The command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use replited_core::plan::Target;

use crate::config::{db_name, Config, Role, DEFAULT_CONFIG_PATH};
use crate::replicate::{preflight, targets, wait_for_db, ReloadSlot, Replicator};
use crate::restore::{restore, RestoreOptions};
use crate::server::{Hub, Servers};
use crate::shutdown::Shutdown;
use crate::storage::{FsStorage, Storage};
use crate::walfile::IoBackend;

/// Continuous backup and point-in-time restore for SQLite databases in WAL mode.
#[derive(Parser, Debug)]
#[command(name = "replited", version, about)]
pub struct Cli {
    /// Configuration file.
    #[arg(short = 'c', long, global = true, default_value = DEFAULT_CONFIG_PATH, env = "REPLITED_CONFIG")]
    pub config: PathBuf,
    /// Log level (trace, debug, info, warn, error); overrides `[log] level`. RUST_LOG, when set,
    /// overrides both.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the role the config declares (`role = "primary"`, the default, or `"replica"`): what
    /// `replited@NAME.service` starts.
    Run {
        /// How the WAL is read (primary): io_uring when available (auto), or forced.
        #[arg(long = "io", value_enum, default_value = "auto", env = "REPLITED_IO")]
        io: IoBackend,
    },
    /// Capture every committed transaction of each configured database and store it in its
    /// targets, until SIGTERM/SIGINT (then everything captured is written out and it exits 0).
    Replicate {
        /// How the WAL is read: io_uring when available (auto), or forced.
        #[arg(long = "io", value_enum, default_value = "auto", env = "REPLITED_IO")]
        io: IoBackend,
    },
    /// Rebuild a database from its backup into a new file, verified before it is renamed into
    /// place.
    Restore {
        /// A backup location instead of the config: file:///var/backups/replited/NAME.
        source: Option<String>,
        /// The configured database to restore (its `db` path); optional with one database.
        #[arg(long)]
        db: Option<PathBuf>,
        /// Where to write the database (default: the database's own path).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// Restore the state as of this time (RFC 3339, e.g. 2026-11-21T10:30:00Z).
        #[arg(long, conflicts_with = "txid")]
        timestamp: Option<String>,
        /// Restore the state right after this transaction (decimal, 0x-prefixed hex, or the
        /// 16-digit hex form replited prints).
        #[arg(long)]
        txid: Option<String>,
        /// Do nothing (and succeed) when the output database already exists.
        #[arg(long)]
        if_db_not_exists: bool,
        /// Do nothing (and succeed) when there is no backup to restore from.
        #[arg(long)]
        if_replica_exists: bool,
        /// Replace the output file if it exists (its -wal and -shm are removed).
        #[arg(long)]
        force: bool,
        /// The S3 endpoint for an s3:// SOURCE outside AWS (e.g. http://127.0.0.1:9000);
        /// default: AWS_ENDPOINT_URL, else AWS. Credentials come from AWS_ACCESS_KEY_ID and
        /// AWS_SECRET_ACCESS_KEY, the region from AWS_REGION.
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Follow a primary as a read replica: restore when needed, then apply each of the
    /// primary's transactions as one SQLite transaction, until SIGTERM/SIGINT.
    ReplicaSidecar {
        /// Restore from the primary's backup even if the database exists.
        #[arg(long)]
        force_restore: bool,
        /// The app to run once the replica has caught up, e.g. "pocketbase serve --dir
        /// /var/lib/pocketbase/pb_data" (run with /bin/sh; restarted when it exits, stopped
        /// around a rebuild, sent SIGTERM when replited stops).
        #[arg(long)]
        exec: Option<String>,
        /// Restart the app when the primary changes the schema (PocketBase caches its
        /// collections): the --exec child, or with --exit-on-rebuild the app's unit.
        #[arg(long)]
        restart_on_schema_change: bool,
        /// systemd-unit mode, for an app running as its own unit bound to replited's
        /// (pocketbase@.service): a rebuild makes replited exit with status 75 after marking
        /// the database for a restore, so systemd stops the app, restarts replited (which
        /// restores before READY=1) and starts the app again.
        #[arg(long, conflicts_with = "exec")]
        exit_on_rebuild: bool,
    },
    /// Ask the running replited (its status server) how each database is doing: role,
    /// position, last sync, lag of every target and replica, errors.
    Status {
        /// Print the status server's JSON as is.
        #[arg(long)]
        json: bool,
        /// The status server (HOST:PORT); default: the config's `[http] addr`, else
        /// 127.0.0.1:50052 (replited@.socket's port).
        #[arg(long)]
        addr: Option<String>,
    },
    /// List what the backup targets hold: snapshots (and with --all, segments) per
    /// generation, with their transaction ids, times and sizes.
    Snapshots {
        /// The configured database (its `db` path); default: every database.
        #[arg(long)]
        db: Option<PathBuf>,
        /// Segments too, not only snapshots.
        #[arg(long)]
        all: bool,
    },
    /// Restore the latest backup of each database from each target into a temporary file,
    /// check it (every checksum, then SQLite's integrity check) and report; nothing is
    /// replaced. Exits 1 when any check fails.
    Verify {
        /// The configured database (its `db` path); default: every database.
        #[arg(long)]
        db: Option<PathBuf>,
        /// Where the temporary files go (default: beside each database).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Write the man pages (replited.1 and one per command) and shell completions (bash, zsh,
    /// fish) generated from this command line into DIR: what the packages install.
    #[command(hide = true)]
    Generate {
        /// Where to write `man/*.1` and `completions/*`.
        dir: PathBuf,
    },
    /// Make a development CA and the certificates of the stream transport (TLS is always on).
    Cert {
        /// What to make.
        #[command(subcommand)]
        what: CertCommand,
    },
}

/// `replited cert ...`.
#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// A new CA: DIR/ca.pem and DIR/ca-key.pem (refuses to replace an existing one).
    Ca {
        /// Where to write it.
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "replited development CA")]
        name: String,
    },
    /// A server certificate for a primary, signed by the CA in --ca-dir: OUT/NAME.pem and
    /// OUT/NAME-key.pem.
    Server {
        /// The CA's directory.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Where to write it (default: the CA's directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The certificate's name (and file name).
        #[arg(long, default_value = "primary")]
        name: String,
        /// DNS names and IP addresses replicas connect to (at least one; repeat the flag).
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
    },
    /// A client certificate for a replica, signed by the CA in --ca-dir.
    Client {
        /// The CA's directory.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Where to write it (default: the CA's directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The certificate's name (and file name).
        #[arg(long, default_value = "replica")]
        name: String,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::memory::keep_small();
    crate::transport::install_default_provider();
    crate::s3::trust_system_bundle();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The logger may not be up yet (config errors): print plainly.
            eprintln!("replited: error: {e:#}");
            if crate::sidecar::EXITING_FOR_REBUILD.load(std::sync::atomic::Ordering::SeqCst) {
                ExitCode::from(crate::sidecar::EXIT_REBUILD)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Changes the log level of a running process (SIGHUP reload).
type LevelHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

fn filter_for(level: &str) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::new(format!("replited={level},replited_core={level},warn"))
}

fn init_logging(level: &str) -> Option<LevelHandle> {
    use tracing_subscriber::prelude::*;
    let from_env = tracing_subscriber::EnvFilter::try_from_default_env().ok();
    let fixed = from_env.is_some();
    let (filter, handle) =
        tracing_subscriber::reload::Layer::new(from_env.unwrap_or_else(|| filter_for(level)));
    // Under systemd with stderr going to the journal: native journal entries, with each
    // event's and span's fields as journal fields (DB, TXID, GENERATION, PEER, LAG_MS …) and
    // levels as priorities. Otherwise plain lines on stderr.
    let journald = stderr_is_journal()
        .then(|| tracing_journald::layer().ok())
        .flatten()
        .map(|l| {
            l.with_field_prefix(None)
                .with_syslog_identifier("replited".into())
        });
    let fmt = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(fmt)
        .try_init()
        .ok()
        .filter(|_| !fixed)
        .map(|_| handle)
}

/// systemd's `JOURNAL_STREAM` (`DEVICE:INODE`) names stderr: the service's output goes to the
/// journal, so log to it natively.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// What a running command applies of a reloaded config (beyond the log level), returning a
/// line per change for the log.
type OnReload = Box<dyn Fn(&Config) -> Vec<String> + Send>;

static ON_RELOAD: std::sync::Mutex<Option<OnReload>> = std::sync::Mutex::new(None);

/// SIGHUP: reads the config again and applies it without a restart — the log level at once,
/// and on a primary each database's intervals and storage targets (by its capture loop, after
/// writing out what it captured) — telling systemd `RELOADING=1` (with `MONOTONIC_USEC`) and
/// `READY=1` around it. A config that no longer loads is reported and the running one kept.
fn reload_on_sighup(path: PathBuf, cli_level: Option<String>, handle: Option<LevelHandle>) {
    let Ok(mut signals) = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP]) else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("reload".into())
        .spawn(move || {
            for _ in signals.forever() {
                let mut states = vec![sd_notify::NotifyState::Reloading];
                if let Ok(m) = sd_notify::NotifyState::monotonic_usec_now() {
                    states.push(m);
                }
                let _ = sd_notify::notify(&states);
                match Config::load(&path) {
                    Ok(cfg) => {
                        let level = cli_level.clone().unwrap_or(cfg.log.level.clone());
                        if let Some(h) = &handle {
                            let _ = h.reload(filter_for(&level));
                        }
                        let notes = match &*ON_RELOAD.lock().unwrap_or_else(|e| e.into_inner()) {
                            Some(apply) => apply(&cfg),
                            None => {
                                vec!["other changes take effect at the next restart".to_string()]
                            }
                        };
                        tracing::info!(
                            "reloaded {}: log level {level}; {}",
                            path.display(),
                            notes.join("; ")
                        );
                    }
                    Err(e) => {
                        tracing::error!("reload failed, keeping the running configuration: {e}")
                    }
                }
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            }
        });
}

/// The primary's part of a reload: each running database's new settings go to its capture
/// loop; what needs a restart is said so.
fn primary_reload(running: &Config, slots: Vec<(PathBuf, Arc<ReloadSlot>)>) -> OnReload {
    let (http, dbs) = (running.http.clone(), running.databases.clone());
    Box::new(move |new: &Config| {
        let mut notes = Vec::new();
        for (db, slot) in &slots {
            match new.databases.iter().find(|d| &d.db == db) {
                Some(d) => match slot.request(d.clone(), RELOAD_WAIT) {
                    Ok(what) => notes.push(format!("{}: {what}", db.display())),
                    Err(e) => notes.push(format!("{}: not reloaded: {e}", db.display())),
                },
                None => notes.push(format!(
                    "{}: no longer configured, but captured until the next restart",
                    db.display()
                )),
            }
        }
        for d in &new.databases {
            if !dbs.iter().any(|o| o.db == d.db) {
                notes.push(format!(
                    "{}: new, captured from the next restart",
                    d.db.display()
                ));
            }
        }
        if new.http.addr != http.addr {
            notes.push("[http] changes take effect at the next restart".into());
        }
        notes
    })
}

/// How long a reload waits for a capture loop to take its new settings.
const RELOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Where `replited status` looks without `[http] addr`: replited@.socket's status port.
const DEFAULT_STATUS_ADDR: &str = "127.0.0.1:50052";

/// What every command shares.
struct Common {
    config: PathBuf,
    log_level: Option<String>,
}

fn run(cli: Cli) -> Result<()> {
    let common = Common {
        config: cli.config.clone(),
        log_level: cli.log_level.clone(),
    };
    match cli.command {
        Command::Run { io } => {
            let cfg = Config::load(&cli.config)?;
            match cfg.role.unwrap_or(Role::Primary) {
                Role::Primary => start_primary(&common, cfg, io),
                Role::Replica => start_replica(
                    &common,
                    cfg,
                    crate::sidecar::SidecarOptions {
                        force_restore: false,
                        exec: None,
                        restart_on_schema_change: false,
                        exit_on_rebuild: false,
                    },
                ),
            }
        }
        Command::Replicate { io } => {
            let cfg = Config::load(&cli.config)?;
            if cfg.role == Some(Role::Replica) {
                bail!(
                    "{} declares role = \"replica\": run it with `replited run` or `replited replica-sidecar`",
                    cfg.path.display()
                );
            }
            start_primary(&common, cfg, io)
        }
        Command::Restore {
            source,
            db,
            output,
            timestamp,
            txid,
            if_db_not_exists,
            if_replica_exists,
            force,
            endpoint,
        } => {
            let _ = init_logging(cli.log_level.as_deref().unwrap_or("info"));
            let target = match (timestamp, txid) {
                (Some(t), _) => Target::Time(parse_time(&t)?),
                (_, Some(x)) => Target::Txid(parse_txid(&x)?),
                _ => Target::Latest,
            };
            let (sources, output): (Vec<Arc<dyn Storage>>, PathBuf) = match source {
                Some(url) => {
                    let out =
                        output.ok_or_else(|| anyhow!("restoring from {url} needs -o OUTPUT"))?;
                    let spool = crate::storage::parent_dir(&out).to_path_buf();
                    (
                        vec![Arc::from(storage_from_url(&url, endpoint, &spool)?)],
                        out,
                    )
                }
                None => {
                    let cfg = Config::load(&cli.config)?;
                    let dbc = match cfg.select(db.as_deref())?.as_slice() {
                        [one] => *one,
                        all => bail!(
                            "{} configures {} databases: choose one with --db",
                            cfg.path.display(),
                            all.len()
                        ),
                    };
                    let out = output.unwrap_or_else(|| dbc.db.clone());
                    (targets(dbc)?.into_iter().map(|t| t.storage).collect(), out)
                }
            };
            let refs: Vec<&dyn Storage> = sources.iter().map(|s| &**s).collect();
            restore(
                &refs,
                &RestoreOptions {
                    target,
                    output,
                    force,
                    if_db_not_exists,
                    if_replica_exists,
                },
            )?;
            Ok(())
        }
        Command::ReplicaSidecar {
            force_restore,
            exec,
            restart_on_schema_change,
            exit_on_rebuild,
        } => {
            let cfg = Config::load(&cli.config)?;
            if cfg.role == Some(Role::Primary) {
                bail!(
                    "{} declares role = \"primary\": run it with `replited run` or `replited replicate`",
                    cfg.path.display()
                );
            }
            start_replica(
                &common,
                cfg,
                crate::sidecar::SidecarOptions {
                    force_restore,
                    exec,
                    restart_on_schema_change,
                    exit_on_rebuild,
                },
            )
        }
        Command::Generate { dir } => generate(&dir),
        Command::Status { json, addr } => {
            let addr = match addr {
                Some(a) => a,
                None => Config::load(&common.config)
                    .ok()
                    .and_then(|c| c.http.addr)
                    .unwrap_or_else(|| DEFAULT_STATUS_ADDR.to_string()),
            };
            crate::ops::status(&addr, json)
        }
        Command::Snapshots { db, all } => {
            let _ = init_logging(common.log_level.as_deref().unwrap_or("warn"));
            let cfg = Config::load(&common.config)?;
            crate::ops::snapshots(&cfg, db.as_deref(), all)
        }
        Command::Verify { db, dir } => {
            let _ = init_logging(common.log_level.as_deref().unwrap_or("warn"));
            let cfg = Config::load(&common.config)?;
            crate::ops::verify(&cfg, db.as_deref(), dir.as_deref())
        }
        Command::Cert { what } => {
            let _ = init_logging(cli.log_level.as_deref().unwrap_or("info"));
            cert(what)
        }
    }
}

fn start_primary(cli: &Common, cfg: Config, io: IoBackend) -> Result<()> {
    let handle = init_logging(cli.log_level.as_deref().unwrap_or(&cfg.log.level));
    reload_on_sighup(cli.config.clone(), cli.log_level.clone(), handle);
    if let Some(dir) = &cfg.log.dir {
        tracing::warn!(
            "[log] dir = {dir:?} is ignored: replited logs to stderr (the journal under systemd)"
        );
    }
    replicate(cfg, io)
}

/// A replica; the flags of `replica-sidecar` win over `[replica]`.
fn start_replica(cli: &Common, cfg: Config, flags: crate::sidecar::SidecarOptions) -> Result<()> {
    let handle = init_logging(cli.log_level.as_deref().unwrap_or(&cfg.log.level));
    reload_on_sighup(cli.config.clone(), cli.log_level.clone(), handle);
    let r = &cfg.replica;
    let opts = crate::sidecar::SidecarOptions {
        force_restore: flags.force_restore,
        exit_on_rebuild: flags.exit_on_rebuild || (flags.exec.is_none() && r.exit_on_rebuild),
        restart_on_schema_change: flags.restart_on_schema_change || r.restart_on_schema_change,
        exec: flags.exec.or_else(|| r.exec.clone()),
    };
    if opts.exec.is_some() && opts.exit_on_rebuild {
        bail!(
            "{}: [replica] exit-on-rebuild is for an app run as its own unit; it cannot go with exec",
            cfg.path.display()
        );
    }
    if opts.restart_on_schema_change && opts.exec.is_none() && !opts.exit_on_rebuild {
        bail!(
            "restart-on-schema-change needs the app: --exec (or [replica] exec), or --exit-on-rebuild (or [replica] exit-on-rebuild) for an app run as its own unit"
        );
    }
    crate::sidecar::run(cfg, opts)
}

/// `replited_info` and the process's own figures.
pub fn process_metrics(role: Role) {
    crate::metrics::gauge_fn(
        "replited_info",
        "replited's version and role (always 1).",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("role", role.as_str()),
        ],
        || Some(1.0),
    );
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    crate::metrics::gauge_fn(
        "replited_start_time_seconds",
        "Unix time replited started.",
        &[],
        move || Some(start),
    );
    for (i, kind) in ["put", "get", "list", "delete"].into_iter().enumerate() {
        crate::metrics::counter_fn(
            "replited_s3_requests_total",
            "S3 requests sent, by kind (what an S3 bill counts; a HEAD counts as a GET).",
            &[("kind", kind)],
            move || {
                let (p, g, l, d) = crate::s3::REQUESTS.get();
                Some([p, g, l, d][i] as f64)
            },
        );
    }
    crate::metrics::gauge_fn(
        "replited_resident_memory_bytes",
        "Resident memory of the process.",
        &[],
        || {
            let s = std::fs::read_to_string("/proc/self/statm").ok()?;
            let pages: f64 = s.split_whitespace().nth(1)?.parse().ok()?;
            Some(pages * 4096.0)
        },
    );
}

/// Man pages and shell completions from the command line's definition.
fn generate(dir: &std::path::Path) -> Result<()> {
    use clap::CommandFactory;
    let man = dir.join("man");
    let comp = dir.join("completions");
    std::fs::create_dir_all(&man).with_context(|| man.display().to_string())?;
    std::fs::create_dir_all(&comp).with_context(|| comp.display().to_string())?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man).context("writing man pages")?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "replited", &comp)
            .with_context(|| format!("writing {shell} completions"))?;
    }
    Ok(())
}

fn cert(what: CertCommand) -> Result<()> {
    match what {
        CertCommand::Ca { dir, name } => crate::cert::make_ca(&dir, &name),
        CertCommand::Server {
            ca_dir,
            out,
            name,
            sans,
        } => {
            let out = out.unwrap_or_else(|| ca_dir.clone());
            crate::cert::make_cert(&ca_dir, &out, &name, &sans, false)
        }
        CertCommand::Client { ca_dir, out, name } => {
            let out = out.unwrap_or_else(|| ca_dir.clone());
            crate::cert::make_cert(&ca_dir, &out, &name, &[], true)
        }
    }
}

fn replicate(cfg: Config, io: IoBackend) -> Result<()> {
    let io = io
        .resolve()
        .map_err(|e| anyhow!("io_uring cannot be used: {e}"))?;
    tracing::info!("reading WALs with {}", io.name());
    let shutdown = std::sync::Arc::new(Shutdown::install()?);
    let mut hubs = Vec::new();
    for d in &cfg.databases {
        preflight(d)
            .with_context(|| format!("{}: database {}", cfg.path.display(), d.db.display()))?;
        if let Some((target, p)) = d.stream() {
            if targets(d)?.is_empty() {
                bail!(
                    "{}: database {}: replicate \"{target}\": a stream server needs a storage target (type = \"fs\") beside it: replicas restore from it and catch up from its history",
                    cfg.path.display(),
                    d.db.display()
                );
            }
            hubs.push((Arc::new(Hub::new(d)?), target.to_string(), p.clone()));
        }
    }
    let servers = Servers::start(hubs.clone()).with_context(|| cfg.path.display().to_string())?;
    let health = crate::notify::Health::new(
        Role::Primary,
        cfg.databases
            .iter()
            .map(|d| d.db.display().to_string())
            .collect(),
    );
    for (hub, _, _) in &hubs {
        if let Some(i) = cfg
            .databases
            .iter()
            .position(|d| db_name(&d.db) == hub.name())
        {
            hub.set_health(health.clone(), i);
        }
    }
    process_metrics(Role::Primary);
    crate::http::start(&cfg.http, health.clone())
        .with_context(|| cfg.path.display().to_string())?;
    health.spawn();
    let mut handles = Vec::new();
    let mut slots = Vec::new();
    for (index, d) in cfg.databases.iter().cloned().enumerate() {
        let sd = shutdown.clone();
        let health = health.clone();
        let slot = ReloadSlot::new()?;
        slots.push((d.db.clone(), slot.clone()));
        let name = db_name(&d.db);
        let hub = hubs
            .iter()
            .find(|h| h.0.name() == name)
            .map(|h| h.0.clone());
        handles.push((
            d.db.clone(),
            std::thread::Builder::new()
                .name(format!("capture {name}"))
                .spawn(move || {
                    let r = (|| {
                        if !wait_for_db(&d.db, &sd, Some((&health, index)))? {
                            return Ok(());
                        }
                        let mut r = Replicator::open(d, io)?;
                        r.set_health(health, index);
                        r.set_reload(slot);
                        if let Some(h) = hub {
                            r.set_hub(h);
                        }
                        r.run(&sd)
                    })();
                    if r.is_err() {
                        // One database failing for good stops the service, so systemd's restart
                        // policy applies and the operator sees it.
                        sd.trigger();
                    }
                    r
                })?,
        ));
    }
    *ON_RELOAD.lock().unwrap_or_else(|e| e.into_inner()) = Some(primary_reload(&cfg, slots));
    let mut failed = None;
    let stopping = {
        let (sd, health) = (shutdown.clone(), health.clone());
        std::thread::spawn(move || {
            // STOPPING=1 as soon as the signal comes (capture then writes out what it holds).
            sd.wait();
            health.stopping();
        })
    };
    let handles: Vec<_> = handles.into_iter().map(|(db, h)| (db, h.join())).collect();
    shutdown.trigger();
    let _ = stopping.join();
    if let Some(s) = servers {
        s.stop();
    }
    crate::s3::REQUESTS.log();
    for (db, h) in handles {
        match h {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!("{}: {e:#}", db.display());
                failed.get_or_insert(anyhow!("{}: {e:#}", db.display()));
            }
            Err(_) => {
                failed.get_or_insert(anyhow!("{}: capture thread panicked", db.display()));
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `file:///dir/NAME` → the fs target holding NAME's backups; `s3://bucket/prefix/NAME` → the
/// bucket's (temporary files of downloads go to `spool`).
fn storage_from_url(
    url: &str,
    endpoint: Option<String>,
    spool: &std::path::Path,
) -> Result<Box<dyn Storage>> {
    let u = url::Url::parse(url).with_context(|| format!("invalid backup URL {url}"))?;
    match u.scheme() {
        "file" => {
            let p = u
                .to_file_path()
                .map_err(|_| anyhow!("invalid file URL {url}: expected file:///path/to/NAME"))?;
            if !p.is_dir() {
                bail!("NoSnapshotError: {} is not a backup directory", p.display());
            }
            Ok(Box::new(FsStorage::at(p)))
        }
        "s3" => {
            let bucket = u
                .host_str()
                .ok_or_else(|| anyhow!("invalid S3 URL {url}: expected s3://BUCKET/PREFIX/NAME"))?;
            Ok(Box::new(crate::s3::S3Storage::from_url(
                bucket,
                u.path(),
                endpoint,
                spool,
            )?))
        }
        s => bail!("unsupported backup URL scheme \"{s}\" in {url} (supported: file://, s3://)"),
    }
}

/// RFC 3339 (`Z` or a numeric offset) → ms since the epoch.
pub fn parse_time(s: &str) -> Result<u64> {
    let bad =
        || anyhow!("invalid --timestamp \"{s}\": expected RFC 3339, e.g. 2026-11-21T10:30:00Z");
    let t = s.trim();
    let (base, offset_secs): (String, i64) =
        if let Some(b) = t.strip_suffix('Z').or_else(|| t.strip_suffix('z')) {
            (format!("{b}Z"), 0)
        } else if t.len() > 6
            && matches!(&t[t.len() - 6..t.len() - 5], "+" | "-")
            && &t[t.len() - 3..t.len() - 2] == ":"
        {
            let (b, off) = t.split_at(t.len() - 6);
            let sign = if off.starts_with('-') { -1 } else { 1 };
            let h: i64 = off[1..3].parse().map_err(|_| bad())?;
            let m: i64 = off[4..6].parse().map_err(|_| bad())?;
            (format!("{b}Z"), sign * (h * 3600 + m * 60))
        } else {
            return Err(bad());
        };
    let st = humantime::parse_rfc3339(&base).map_err(|_| bad())?;
    let ms = st
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| bad())?
        .as_millis() as i64
        - offset_secs * 1000;
    u64::try_from(ms).map_err(|_| bad())
}

/// Decimal, 0x-hex, or replited's 16-digit hex.
pub fn parse_txid(s: &str) -> Result<u64> {
    let bad =
        || anyhow!("invalid --txid \"{s}\": expected a number (decimal, 0x-hex, or 16 hex digits)");
    let t = s.trim();
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).map_err(|_| bad());
    }
    if t.len() == 16 && t.chars().all(|c| c.is_ascii_hexdigit()) {
        return u64::from_str_radix(t, 16).map_err(|_| bad());
    }
    t.parse().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z").unwrap(), 1000);
        assert_eq!(parse_time("1970-01-01T00:00:01.250Z").unwrap(), 1250);
        assert_eq!(parse_time("1970-01-01T01:00:01+01:00").unwrap(), 1000);
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn txids() {
        assert_eq!(parse_txid("10").unwrap(), 10);
        assert_eq!(parse_txid("0x10").unwrap(), 16);
        assert_eq!(parse_txid("0000000000000010").unwrap(), 16);
        assert!(parse_txid("x").is_err());
    }
}
