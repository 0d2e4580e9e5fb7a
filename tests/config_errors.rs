//! Bad configuration is refused at start-up, naming the key or path, before anything changes.

mod common;

use std::fs;
use std::process::Command;

use common::*;

fn replicate_with(w: &World, config: &str) -> (bool, String) {
    let p = w.path("bad.toml");
    fs::write(&p, config).unwrap();
    let mut child = Command::new(bin())
        .args(["-c", p.to_str().unwrap(), "replicate", "--io", "pread"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(10) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("replicate accepted this config and ran:\n{config}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    (o.status.success(), stderr(&o))
}

#[test]
fn bad_configs_name_what_is_wrong() {
    let w = World::new("");
    let good = fs::read_to_string(&w.config).unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            good.replace("name = \"backup\"", "name = \"backup\"\nbogus-key = 1"),
            "bogus-key",
        ),
        (
            good.replace(&format!("db = \"{}\"", w.db.display()), ""),
            "db",
        ),
        (
            good.replace("[[database]]", "[[database]]\nsync-interval = \"soon\""),
            "soon",
        ),
        (
            good.replace("[[database]]", "[[database]]\nretention = 7"),
            "retention",
        ),
        (
            good.replace(&w.backup.display().to_string(), "/etc/hostname/backup"),
            "/etc/hostname/backup",
        ),
        (good.replace("type = \"fs\"", "type = \"ftp\""), "ftp"),
        (
            good.replace(&w.db.display().to_string(), "/nonexistent/dir/data.db"),
            "/nonexistent/dir/data.db",
        ),
        (
            "[[database]]\ndb = \"${REPLITED_TEST_UNSET_VAR}\"\n".into(),
            "REPLITED_TEST_UNSET_VAR",
        ),
        ("this is not toml".into(), "bad.toml"),
        (
            format!("{good}\n[[database.replicate]]\nname = \"s\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"0.0.0.0:50051\"\n"),
            "Invalid stream address",
        ),
        (
            format!("{good}\n[[database.replicate]]\nname = \"s\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"quic://127.0.0.1:50051\"\n"),
            "tls_cert",
        ),
        (
            format!("{good}\n[[database.replicate]]\nname = \"s\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"quic://127.0.0.1:50051\"\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n"),
            "/nonexistent/c.pem",
        ),
        (
            format!("{good}\n[[database.replicate]]\nname = \"s\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"quic://127.0.0.1:1\"\ntls_cart = \"x\"\n"),
            "tls_cart",
        ),
        (
            format!("{good}\n[[database.replicate]]\nname = \"s\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"quic://127.0.0.1:1\"\n[[database.replicate]]\nname = \"t\"\n[database.replicate.params]\ntype = \"stream\"\naddr = \"quic://127.0.0.1:2\"\n"),
            "more than one replicate target of type \"stream\"",
        ),
    ];
    for (cfg, needle) in cases {
        let (ok, err) = replicate_with(&w, &cfg);
        assert!(!ok, "accepted a bad config:\n{cfg}");
        assert!(
            err.contains(needle),
            "error does not name {needle:?}: {err}\nconfig:\n{cfg}"
        );
    }
    // Nothing was written for the rejected configs.
    assert!(!w.backup.exists() || w.stored_files().is_empty());
    // ${VAR:-default} and case-insensitive types load (restore reads the same config; with
    // nothing stored yet it answers NoSnapshotError).
    let fallback = w.path("fallback-root");
    let cfg = good
        .replace(
            &w.backup.display().to_string(),
            &format!("${{REPLITED_TEST_UNSET_VAR:-{}}}", fallback.display()),
        )
        .replace("type = \"fs\"", "type = \"Fs\"");
    let p = w.path("ok.toml");
    fs::write(&p, cfg).unwrap();
    let o = Command::new(bin())
        .args([
            "-c",
            p.to_str().unwrap(),
            "restore",
            "-o",
            w.path("x.db").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(
        err.contains("NoSnapshotError") && err.contains(fallback.to_str().unwrap()),
        "{err}"
    );
}

/// replited-core is no_std and nothing of tokio, quinn, rusqlite or std's I/O is in its normal
/// dependency tree.
#[test]
fn core_is_no_std_and_io_free() {
    let lib =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../core/src/lib.rs")).unwrap();
    assert!(
        lib.contains("#![no_std]"),
        "core/src/lib.rs must be #![no_std]"
    );
    assert!(lib.contains("#![forbid(unsafe_code)]"));
    let o = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "replited-core",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    assert!(o.status.success(), "cargo tree failed: {}", stderr(&o));
    let tree = String::from_utf8_lossy(&o.stdout);
    for banned in [
        "tokio",
        "quinn",
        "rusqlite",
        "libsqlite3",
        "nix ",
        "libc",
        "std ",
    ] {
        assert!(
            !tree.contains(banned),
            "{banned} is in replited-core's dependency tree:\n{tree}"
        );
    }
    // And the crates it does use are built without their std features.
    let meta =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../core/Cargo.toml")).unwrap();
    assert!(
        meta.matches("default-features = false").count() >= 2,
        "{meta}"
    );
}

/// replica-sidecar refuses a config it cannot follow with, naming what is missing.
#[test]
fn replica_sidecar_config_errors() {
    let w = World::new("");
    let run = |cfg: &str| {
        let p = w.path("replica.toml");
        fs::write(&p, cfg).unwrap();
        let o = Command::new(bin())
            .args(["-c", p.to_str().unwrap(), "replica-sidecar"])
            .output()
            .unwrap();
        assert!(!o.status.success(), "accepted:\n{cfg}");
        stderr(&o)
    };
    let db = w.path("replica/data.db");
    fs::create_dir_all(db.parent().unwrap()).unwrap();
    let err = run(&format!("[[database]]\ndb = \"{}\"\n[[database.replicate]]\nname = \"b\"\nparams.type = \"fs\"\nparams.root = \"/tmp\"\n", db.display()));
    assert!(err.contains("type = \"stream\""), "{err}");
    let err = run(&format!("[[database]]\ndb = \"{}\"\n[[database.replicate]]\nname = \"p\"\nparams.type = \"stream\"\nparams.addr = \"http://127.0.0.1:50051\"\n", db.display()));
    assert!(err.contains("tls_ca"), "{err}");
    let err = run(&format!("[[database]]\ndb = \"{}\"\n[[database.replicate]]\nname = \"p\"\nparams.type = \"stream\"\nparams.addr = \"http://127.0.0.1:50051\"\nparams.tls_ca = \"/nonexistent/ca.pem\"\n", db.display()));
    assert!(err.contains("does not exist"), "{err}");
    assert!(!db.exists());
}

/// Runs the binary with `args` after `-c CONFIG` (written to bad.toml); (exit code, stderr).
/// A command that keeps running is killed and reported.
fn run_with(w: &World, config: &str, args: &[&str]) -> (Option<i32>, String) {
    let p = w.path("bad.toml");
    fs::write(&p, config).unwrap();
    let mut child = Command::new(bin())
        .args(["-c", p.to_str().unwrap()])
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(10) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{args:?} accepted this config and ran:\n{config}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    (o.status.code(), stderr(&o))
}

/// `role`, `[replica]` and `[http]` are checked like the rest, and a command refuses a config
/// declaring the other role, pointing to the right command; nothing is created meanwhile.
#[test]
fn role_replica_and_http_errors() {
    let w = World::new("");
    let good = fs::read_to_string(&w.config).unwrap();
    let replica_db = w.path("replica/data.db");
    fs::create_dir_all(replica_db.parent().unwrap()).unwrap();
    let replica = format!("[[database]]\ndb = \"{}\"\n[[database.replicate]]\nname = \"p\"\nparams.type = \"stream\"\nparams.addr = \"http://127.0.0.1:50051\"\nparams.tls_ca = \"{}\"\n", replica_db.display(), w.config.display());
    let cases: Vec<(String, &[&str], Vec<&str>)> = vec![
        (
            format!("role = \"leader\"\n{good}"),
            &["replicate"],
            vec!["invalid role", "leader", "\"primary\"", "\"replica\""],
        ),
        (
            format!("role = \"leader\"\n{good}"),
            &["run"],
            vec!["invalid role", "leader", "\"primary\"", "\"replica\""],
        ),
        (
            format!("{good}\n[replica]\nexec = \"true\"\n"),
            &["replicate"],
            vec!["[replica]", "role = \"replica\""],
        ),
        (
            format!("role = \"primary\"\n{good}\n[replica]\nexit-on-rebuild = true\n"),
            &["run"],
            vec!["[replica]", "role = \"replica\""],
        ),
        (
            format!("{good}\n[http]\naddr = \"nonsense\"\n"),
            &["replicate"],
            vec!["http.addr", "nonsense", "HOST:PORT"],
        ),
        (
            format!("{good}\n[http]\naddr = \"127.0.0.1:99999\"\n"),
            &["replicate"],
            vec!["http.addr", "127.0.0.1:99999"],
        ),
        (
            format!("{good}\n[http]\naddress = \"127.0.0.1:9090\"\n"),
            &["replicate"],
            vec!["unknown", "address"],
        ),
        (
            format!("role = \"replica\"\n{replica}"),
            &["replicate"],
            vec!["role = \"replica\"", "replited run", "replica-sidecar"],
        ),
        (
            format!("role = \"primary\"\n{replica}"),
            &["replica-sidecar"],
            vec!["role = \"primary\"", "replited run", "replicate"],
        ),
        (
            format!(
                "role = \"replica\"\n{replica}\n[replica]\nexec = \"x\"\nexit-on-rebuild = true\n"
            ),
            &["run"],
            vec!["exit-on-rebuild", "exec"],
        ),
        (
            format!(
                "role = \"replica\"\n{replica}\n[replica]\nexec = \"x\"\nexit-on-rebuild = true\n"
            ),
            &["replica-sidecar"],
            vec!["exit-on-rebuild", "exec"],
        ),
        (
            format!("role = \"replica\"\n{replica}\n[replica]\nrestart-on-schema-change = true\n"),
            &["run"],
            vec!["restart-on-schema-change", "exec"],
        ),
        (
            format!("role = \"replica\"\n{replica}\n[replica]\nexec = \"x\"\nrestart-after = 5\n"),
            &["run"],
            vec!["unknown", "restart-after"],
        ),
    ];
    for (cfg, args, needles) in cases {
        let (code, err) = run_with(&w, &cfg, args);
        assert_eq!(
            code,
            Some(1),
            "{args:?} must exit 1 for this config:\n{cfg}\nstderr: {err}"
        );
        for needle in needles {
            assert!(
                err.contains(needle),
                "{args:?}: the error does not say {needle:?}: {err}\nconfig:\n{cfg}"
            );
        }
        assert!(
            !err.contains("capturing") && !err.contains("connecting"),
            "{args:?} started working before refusing: {err}"
        );
    }
    assert!(!w.backup.exists(), "a refused primary created its backup");
    assert!(
        !replica_db.exists(),
        "a refused replica created its database"
    );
    assert_eq!(
        fs::read_dir(replica_db.parent().unwrap()).unwrap().count(),
        0,
        "a refused replica wrote beside its database"
    );
}
