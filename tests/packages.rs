//! The .deb and .rpm packages, built by `scripts/package` (the one command) from this tree:
//! - what they hold, read back with `dpkg-deb`, `rpm` and `lintian`: every file where it
//!   belongs with its mode, the same bytes as the repository's units and example, a stripped
//!   binary that needs nothing but glibc, the conffile / `%config(noreplace)` marking, minimal
//!   dependencies, the maintainer scripts;
//! - the .deb installed with `dpkg -i` in a booted systemd (Debian 12 in systemd-nspawn,
//!   `tests/common/container.rs`): `systemctl start replited@data` backs up a load that restores
//!   equal to the primary, an upgrade to a rebuilt package keeps the edited config and restarts
//!   the running instance, removal stops it, purge leaves nothing but the backups;
//! - the .rpm: its payload installed, upgraded and erased by the real `rpm` in a root directory
//!   (no Fedora here), and its scriptlets, exactly as the package holds them, run in a booted
//!   systemd in the order rpm runs them for an install, an upgrade and an erase.
//!
//! Needs root, systemd-nspawn, dpkg-deb, rpm and rpm2archive (apt-get install rpm), and lintian
//! when it is installed (`scripts/test` installs all of them).

mod common;
#[path = "common/container.rs"]
mod container;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use container::{output_text, Container};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

/// Runs a host command, asserts success, returns its stdout.
fn run_ok(prog: &str, args: &[&str]) -> String {
    let o = run(prog, args);
    assert!(
        o.status.success(),
        "{prog} {args:?} failed ({}):\n{}",
        o.status,
        output_text(&o)
    );
    text(&o.stdout)
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A pair of packages built by one run of `scripts/package`.
struct Packages {
    deb: PathBuf,
    rpm: PathBuf,
    /// The upstream version (`0.1.0`); the .deb's is `VERSION-1`, the .rpm's `VERSION-1` too.
    version: String,
}

fn build(args: &[&str]) -> Packages {
    let script = repo().join("scripts/package");
    let start = Instant::now();
    let o = Command::new(&script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        o.status.success(),
        "scripts/package {args:?} failed ({}):\n{}",
        o.status,
        output_text(&o)
    );
    eprintln!(
        "scripts/package {args:?} took {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let out = text(&o.stdout);
    let find = |ext: &str| {
        let p = out
            .lines()
            .find(|l| l.ends_with(ext))
            .unwrap_or_else(|| panic!("scripts/package printed no {ext}:\n{out}"));
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{} does not exist", p.display());
        p
    };
    let deb = find(".deb");
    let rpm = find(".rpm");
    let deb_version = run_ok("dpkg-deb", &["-f", s(&deb), "Version"])
        .trim()
        .to_string();
    let version = deb_version
        .strip_suffix("-1")
        .unwrap_or_else(|| panic!("the .deb's version {deb_version} has no revision -1"))
        .to_string();
    Packages { deb, rpm, version }
}

/// The packages of this tree, built once per test process by the one command.
fn packages() -> &'static Packages {
    static P: OnceLock<Packages> = OnceLock::new();
    P.get_or_init(|| build(&[]))
}

/// The same tree packaged again as the next patch version, for upgrades.
fn upgrade() -> &'static Packages {
    static P: OnceLock<Packages> = OnceLock::new();
    P.get_or_init(|| {
        let base = &packages().version;
        let mut parts: Vec<u64> = base
            .split('.')
            .map(|p| p.parse().unwrap_or_else(|_| panic!("version {base}")))
            .collect();
        *parts.last_mut().unwrap() += 1;
        let next: Vec<String> = parts.iter().map(u64::to_string).collect();
        let next = next.join(".");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("packages-upgrade");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let p = build(&["--version", &next, "--out", s(&dir)]);
        assert_eq!(p.version, next);
        p
    })
}

/// The man pages and completions the CLI definition generates (`replited generate`, the dev
/// binary: the same definition as the release build the packages hold).
fn generated() -> &'static PathBuf {
    static G: OnceLock<PathBuf> = OnceLock::new();
    G.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("packages-generated");
        let _ = fs::remove_dir_all(&dir);
        run_ok(bin(), &["generate", s(&dir)]);
        dir
    })
}

/// The man pages `replited generate` writes (`replited.1`, `replited-restore.1`, …).
fn man_pages() -> BTreeSet<String> {
    let pages: BTreeSet<String> = fs::read_dir(generated().join("man"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".1"))
        .collect();
    assert!(pages.contains("replited.1"), "no replited.1 in {pages:?}");
    assert!(pages.len() > 3, "too few man pages: {pages:?}");
    pages
}

fn gunzip(path: &Path) -> Vec<u8> {
    let o = run("gzip", &["-dc", s(path)]);
    assert!(o.status.success(), "gzip -dc {}", path.display());
    o.stdout
}

/// Asserts that `installed` holds the same bytes as the repository file `rel`.
fn same_as_repo(installed: &Path, rel: &str) {
    let want = fs::read(repo().join(rel)).unwrap();
    let got =
        fs::read(installed).unwrap_or_else(|e| panic!("cannot read {}: {e}", installed.display()));
    assert!(
        got == want,
        "{} differs from {rel} in the repository",
        installed.display()
    );
}

/// The shared libraries an ELF file needs (objdump's NEEDED entries).
fn needed(path: &Path) -> BTreeSet<String> {
    run_ok("objdump", &["-p", s(path)])
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("NEEDED")).then(|| w.next().unwrap().to_string())
        })
        .collect()
}

/// glibc's libraries, and libgcc_s (in every Debian and Fedora base system).
fn is_glibc(lib: &str) -> bool {
    [
        "libc.so.",
        "libm.so.",
        "libpthread.so.",
        "libdl.so.",
        "librt.so.",
        "libgcc_s.so.",
        "ld-linux",
    ]
    .iter()
    .any(|p| lib.starts_with(p))
}

/// The installed binary: stripped, needs only glibc, runs and says its version.
fn check_binary(path: &Path, version: &str) {
    let libs = needed(path);
    eprintln!("{} needs {libs:?}", path.display());
    assert!(libs.iter().any(|l| l.starts_with("libc.so.")), "{libs:?}");
    assert!(
        libs.iter().all(|l| is_glibc(l)),
        "the binary needs more than glibc: {libs:?}"
    );
    let sections = run_ok("objdump", &["-h", s(path)]);
    for section in [".symtab", ".debug_info", ".debug_line"] {
        assert!(
            !sections.contains(section),
            "{} is not stripped: it has {section}",
            path.display()
        );
    }
    let v = run_ok(s(path), &["--version"]);
    assert_eq!(v.trim(), format!("replited {version}"));
}

/// Every path of the packages but the documentation, with its mode: the same in both.
fn common_files() -> Vec<(&'static str, &'static str)> {
    vec![
        ("/usr/bin/replited", "-rwxr-xr-x"),
        ("/usr/lib/systemd/system/replited@.service", "-rw-r--r--"),
        ("/usr/lib/systemd/system/replited@.socket", "-rw-r--r--"),
        ("/usr/lib/systemd/system/pocketbase@.service", "-rw-r--r--"),
        ("/usr/lib/sysusers.d/replited.conf", "-rw-r--r--"),
        ("/usr/lib/tmpfiles.d/replited.conf", "-rw-r--r--"),
        ("/etc/replited/example.toml", "-rw-r--r--"),
        (
            "/usr/share/bash-completion/completions/replited",
            "-rw-r--r--",
        ),
        (
            "/usr/share/fish/vendor_completions.d/replited.fish",
            "-rw-r--r--",
        ),
    ]
}

/// The repository files that the packages install unchanged.
const FROM_REPO: &[(&str, &str)] = &[
    (
        "/usr/lib/systemd/system/replited@.service",
        "systemd/replited@.service",
    ),
    (
        "/usr/lib/systemd/system/replited@.socket",
        "systemd/replited@.socket",
    ),
    (
        "/usr/lib/systemd/system/pocketbase@.service",
        "systemd/pocketbase@.service",
    ),
    (
        "/usr/lib/sysusers.d/replited.conf",
        "systemd/replited.sysusers",
    ),
    (
        "/usr/lib/tmpfiles.d/replited.conf",
        "systemd/replited.tmpfiles",
    ),
    ("/etc/replited/example.toml", "packaging/example.toml"),
    ("/usr/share/doc/replited/README.md", "README.md"),
];

/// Checks the files installed (or extracted) under `root`: contents, the binary, the man pages
/// and the completions. `zsh` is where the distribution keeps zsh's completions.
fn check_tree(root: &Path, version: &str, zsh: &str) {
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    for (path, rel) in FROM_REPO {
        same_as_repo(&at(path), rel);
    }
    check_binary(&at("/usr/bin/replited"), version);
    for page in man_pages() {
        let gz = at(&format!("/usr/share/man/man1/{page}.gz"));
        assert!(
            gunzip(&gz) == fs::read(generated().join("man").join(&page)).unwrap(),
            "{} is not the generated {page}",
            gz.display()
        );
    }
    for (installed, generated_name) in [
        (
            "/usr/share/bash-completion/completions/replited",
            "replited.bash",
        ),
        (zsh, "_replited"),
        (
            "/usr/share/fish/vendor_completions.d/replited.fish",
            "replited.fish",
        ),
    ] {
        assert!(
            fs::read(at(installed)).unwrap()
                == fs::read(generated().join("completions").join(generated_name)).unwrap(),
            "{installed} is not the generated {generated_name}"
        );
    }
    assert!(
        !at("/etc/replited/data.toml").exists(),
        "a package must not ship an instance's config"
    );
}

/// Package names in a Debian relationship field (`libc6 (>= 2.34), systemd | systemd-sysusers`).
fn deb_names(field: &str) -> BTreeSet<String> {
    field
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or("").to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

/// The .deb and the .rpm, built by `scripts/package`, hold what they should: every path with
/// its mode, the repository's units and example byte for byte, a stripped glibc-only binary,
/// the generated man pages and completions, the docs; the example as the only conffile
/// (`%config(noreplace)` in the .rpm); minimal dependencies; the maintainer scripts of
/// `packaging/`; and lintian finds no error in the .deb.
#[test]
fn packages_build_and_hold_what_they_should() {
    let p = packages();
    let version = &p.version;
    eprintln!(
        "{}: {} bytes\n{}: {} bytes",
        p.deb.display(),
        fs::metadata(&p.deb).unwrap().len(),
        p.rpm.display(),
        fs::metadata(&p.rpm).unwrap().len()
    );

    // --- the .deb
    let info = run_ok("dpkg-deb", &["-I", s(&p.deb)]);
    eprintln!("dpkg-deb -I:\n{info}");
    let field = |name: &str| {
        run_ok("dpkg-deb", &["-f", s(&p.deb), name])
            .trim()
            .to_string()
    };
    assert_eq!(field("Package"), "replited");
    assert_eq!(field("Version"), format!("{version}-1"));
    assert_eq!(field("Architecture"), "amd64");
    let depends = field("Depends");
    let names = deb_names(&depends);
    assert!(names.contains("libc6"), "Depends: {depends}");
    assert!(
        depends.contains("libc6 (>= "),
        "libc6 without a version: {depends}"
    );
    let allowed: BTreeSet<String> = [
        "libc6",
        "libgcc-s1",
        "systemd",
        "systemd-sysusers",
        "systemd-tmpfiles",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert!(
        names.is_subset(&allowed),
        "Depends has more than glibc, libgcc and systemd's sysusers/tmpfiles: {depends}"
    );
    // The trusted certificates for https:// S3 endpoints.
    assert_eq!(field("Recommends"), "ca-certificates");
    for f in ["Pre-Depends", "Suggests", "Conflicts", "Breaks"] {
        assert_eq!(field(f), "", "unexpected {f}");
    }

    // Paths, modes and owners.
    let listing = run_ok("dpkg-deb", &["-c", s(&p.deb)]);
    let mut entries = BTreeMap::new();
    for line in listing.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let path = w[5]
            .trim_start_matches('.')
            .trim_end_matches('/')
            .to_string();
        entries.insert(path, (w[0].to_string(), w[1].to_string()));
    }
    let mut want: Vec<(String, &str)> = common_files()
        .into_iter()
        .map(|(p, m)| (p.to_string(), m))
        .collect();
    want.push((
        "/usr/share/zsh/vendor-completions/_replited".into(),
        "-rw-r--r--",
    ));
    for doc in [
        "README.md",
        "copyright",
        "changelog.gz",
        "changelog.Debian.gz",
    ] {
        want.push((format!("/usr/share/doc/replited/{doc}"), "-rw-r--r--"));
    }
    for page in man_pages() {
        want.push((format!("/usr/share/man/man1/{page}.gz"), "-rw-r--r--"));
    }
    for (path, mode) in &want {
        let (m, owner) = entries
            .get(path)
            .unwrap_or_else(|| panic!("{path} is not in the .deb:\n{listing}"));
        assert_eq!(m, mode, "{path}");
        // cargo-deb writes numeric owners.
        assert!(
            owner == "0/0" || owner == "root/root",
            "{path} belongs to {owner}"
        );
    }
    let files: Vec<&String> = entries
        .iter()
        .filter(|(_, (m, _))| !m.starts_with('d'))
        .map(|(p, _)| p)
        .collect();
    let wanted: BTreeSet<&String> = want.iter().map(|(p, _)| p).collect();
    let extra: Vec<&&String> = files
        .iter()
        .filter(|p| !wanted.contains(*p) && p.as_str() != "/usr/share/lintian/overrides/replited")
        .collect();
    assert!(extra.is_empty(), "unexpected files in the .deb: {extra:?}");

    // Contents.
    let tmp = tempfile::Builder::new()
        .prefix("replited-pkg")
        .tempdir()
        .unwrap();
    let deb_root = tmp.path().join("deb");
    run_ok("dpkg-deb", &["-x", s(&p.deb), s(&deb_root)]);
    check_tree(
        &deb_root,
        version,
        "/usr/share/zsh/vendor-completions/_replited",
    );
    // libgcc-s1 is named by hand (cargo-deb drops it from dpkg-shlibdeps' answer): exactly
    // when the binary needs libgcc_s.
    let needs_libgcc = needed(&deb_root.join("usr/bin/replited"))
        .iter()
        .any(|l| l.starts_with("libgcc_s.so."));
    assert_eq!(
        names.contains("libgcc-s1"),
        needs_libgcc,
        "Depends: {depends}; the binary needs libgcc_s: {needs_libgcc}"
    );
    let doc = deb_root.join("usr/share/doc/replited");
    assert!(gunzip(&doc.join("changelog.gz")) == fs::read(repo().join("CHANGELOG.md")).unwrap());
    let debian_changelog = text(&gunzip(&doc.join("changelog.Debian.gz")));
    assert!(
        debian_changelog.starts_with(&format!("replited ({version}-1) ")),
        "changelog.Debian: {debian_changelog}"
    );
    let copyright = fs::read_to_string(doc.join("copyright")).unwrap();
    assert!(copyright.contains("License: Apache-2.0"), "{copyright}");

    // Control files: the one conffile and the maintainer scripts of packaging/deb.
    let control = tmp.path().join("control");
    run_ok("dpkg-deb", &["-e", s(&p.deb), s(&control)]);
    assert_eq!(
        fs::read_to_string(control.join("conffiles"))
            .unwrap()
            .trim(),
        "/etc/replited/example.toml"
    );
    for script in ["postinst", "prerm", "postrm"] {
        same_as_repo(&control.join(script), &format!("packaging/deb/{script}"));
        let mode = run_ok("stat", &["-c", "%a", s(&control.join(script))]);
        assert_eq!(mode.trim(), "755", "{script}");
    }
    assert!(!control.join("preinst").exists());

    // lintian, when installed: no error and no warning (those it gives and are meant are
    // overridden, with the reason, in packaging/deb/lintian-overrides; info tags are shown).
    if on_path("lintian") {
        let o = run(
            "lintian",
            &["--fail-on", "error,warning", "--display-info", s(&p.deb)],
        );
        eprintln!("lintian {}:\n{}", o.status, output_text(&o));
        assert!(o.status.success(), "lintian:\n{}", output_text(&o));
    } else {
        eprintln!("lintian is not installed: the .deb was not checked with it");
    }

    // --- the .rpm
    let q = |fmt: &str| run_ok("rpm", &["-qp", "--qf", fmt, s(&p.rpm)]);
    eprintln!("rpm -qip:\n{}", run_ok("rpm", &["-qip", s(&p.rpm)]));
    assert_eq!(
        q("%{NAME} %{VERSION} %{RELEASE} %{ARCH} %{LICENSE}"),
        format!("replited {version} 1 x86_64 Apache-2.0")
    );
    let files = q(
        "[%{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} %{FILEFLAGS:fflags} %{FILENAMES}\n]",
    );
    let mut rpm_entries = BTreeMap::new();
    for line in files.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        // fflags is empty for plain files: perms user group [flags] path.
        let (flags, path) = if w.len() == 5 {
            (w[3], w[4])
        } else {
            ("", w[3])
        };
        assert_eq!((w[1], w[2]), ("root", "root"), "{line}");
        rpm_entries.insert(path.to_string(), (w[0].to_string(), flags.to_string()));
    }
    let mut want: Vec<(String, &str, &str)> = common_files()
        .into_iter()
        .map(|(p, m)| (p.to_string(), m, ""))
        .collect();
    want.push((
        "/usr/share/zsh/site-functions/_replited".into(),
        "-rw-r--r--",
        "",
    ));
    for doc in ["README.md", "CHANGELOG.md"] {
        want.push((format!("/usr/share/doc/replited/{doc}"), "-rw-r--r--", "d"));
    }
    want.push((
        "/usr/share/licenses/replited/LICENSE".into(),
        "-rw-r--r--",
        "d",
    ));
    for page in man_pages() {
        want.push((format!("/usr/share/man/man1/{page}.gz"), "-rw-r--r--", "d"));
    }
    for (path, mode, _) in &want {
        let (m, _) = rpm_entries
            .get(path)
            .unwrap_or_else(|| panic!("{path} is not in the .rpm:\n{files}"));
        assert_eq!(m, mode, "{path}");
    }
    let wanted: BTreeSet<&String> = want.iter().map(|(p, _, _)| p).collect();
    let extra: Vec<&String> = rpm_entries.keys().filter(|p| !wanted.contains(p)).collect();
    assert!(extra.is_empty(), "unexpected files in the .rpm: {extra:?}");
    // The example is %config(noreplace); nothing else is config.
    for (path, (_, flags)) in &rpm_entries {
        if path == "/etc/replited/example.toml" {
            assert!(
                flags.contains('c') && flags.contains('n'),
                "{path}: flags {flags}"
            );
        } else {
            assert!(!flags.contains('c'), "{path} is marked config ({flags})");
        }
    }
    assert_eq!(
        run_ok("rpm", &["-qcp", s(&p.rpm)]).trim(),
        "/etc/replited/example.toml"
    );

    // Requires: glibc's libraries (found by cargo-generate-rpm), /bin/sh for the scriptlets,
    // systemd-sysusers/systemd-tmpfiles, which they run, and rpm's own config(replited).
    let requires = run_ok("rpm", &["-qp", "--requires", s(&p.rpm)]);
    eprintln!("rpm --requires:\n{requires}");
    let mut has_libc = false;
    for r in requires.lines().map(str::trim).filter(|r| !r.is_empty()) {
        has_libc |= r.starts_with("libc.so.6");
        let ok = r.starts_with("rpmlib(")
            || r.starts_with("rtld(")
            || r == format!("config(replited) = {version}-1")
            || is_glibc(r)
            || [
                "/bin/sh",
                "/usr/bin/systemd-sysusers",
                "/usr/bin/systemd-tmpfiles",
            ]
            .contains(&r);
        assert!(ok, "unexpected Requires: {r}\n{requires}");
    }
    assert!(has_libc, "no libc.so.6 in Requires:\n{requires}");
    for tag in ["RECOMMENDS", "SUGGESTS", "CONFLICTS", "OBSOLETES"] {
        assert_eq!(q(&format!("[%{{{tag}}}]")), "", "unexpected {tag}");
    }

    // Scriptlets: those of packaging/rpm, and no others.
    for (tag, file) in [("POSTIN", "post"), ("PREUN", "preun"), ("POSTUN", "postun")] {
        let body = q(&format!("%{{{tag}}}"));
        let want = fs::read_to_string(repo().join("packaging/rpm").join(file)).unwrap();
        assert_eq!(
            body.trim(),
            want.trim(),
            "%{tag} is not packaging/rpm/{file}"
        );
    }
    for tag in ["PREIN", "PRETRANS", "POSTTRANS"] {
        assert_eq!(q(&format!("%{{{tag}}}")), "(none)", "unexpected %{tag}");
    }
}

/// The .rpm's payload with the real `rpm` in a root directory (`--root`, `--nodeps`, no
/// scriptlets: this is not Fedora, see `rpm_scriptlets_under_a_booted_systemd` for those):
/// installed, it holds the same files as the .deb; an upgrade keeps an edited example.toml in
/// place without a `.rpmnew`; an erase removes the package's files and saves the edited
/// example as `example.toml.rpmsave`, as Fedora does with `%config(noreplace)`.
#[test]
fn rpm_installs_upgrades_and_erases_in_a_root() {
    let p = packages();
    let u = upgrade();
    let tmp = tempfile::Builder::new()
        .prefix("replited-rpm")
        .tempdir()
        .unwrap();
    let root = tmp.path().join("root");
    fs::create_dir(&root).unwrap();
    let rpm = |args: &[&str]| {
        let mut a = vec!["--root", s(&root)];
        a.extend_from_slice(args);
        run_ok("rpm", &a)
    };
    rpm(&["--initdb"]);
    rpm(&["-i", "--nodeps", "--noscripts", s(&p.rpm)]);
    assert_eq!(
        rpm(&["-q", "--qf", "%{VERSION}-%{RELEASE}", "replited"]),
        format!("{}-1", p.version)
    );
    check_tree(&root, &p.version, "/usr/share/zsh/site-functions/_replited");
    assert_eq!(
        fs::read(root.join("usr/share/licenses/replited/LICENSE")).unwrap(),
        fs::read(repo().join("LICENSE")).unwrap()
    );
    // Both packages hold the same binary.
    let deb_root = tmp.path().join("deb");
    run_ok("dpkg-deb", &["-x", s(&p.deb), s(&deb_root)]);
    assert!(
        fs::read(root.join("usr/bin/replited")).unwrap()
            == fs::read(deb_root.join("usr/bin/replited")).unwrap(),
        "the .rpm and the .deb hold different binaries"
    );

    let example = root.join("etc/replited/example.toml");
    let mut edited = fs::read_to_string(&example).unwrap();
    edited.push_str("# edited by the administrator\n");
    fs::write(&example, &edited).unwrap();
    rpm(&["-U", "--nodeps", "--noscripts", s(&u.rpm)]);
    assert_eq!(
        rpm(&["-q", "--qf", "%{VERSION}-%{RELEASE}", "replited"]),
        format!("{}-1", u.version)
    );
    assert_eq!(fs::read_to_string(&example).unwrap(), edited);
    assert!(!root.join("etc/replited/example.toml.rpmnew").exists());

    rpm(&["-e", "--nodeps", "--noscripts", "replited"]);
    assert!(!example.exists());
    assert_eq!(
        fs::read_to_string(root.join("etc/replited/example.toml.rpmsave")).unwrap(),
        edited
    );
    // Every file of the package is gone (its directories are removed by %postun, which does
    // not run here: rpm_scriptlets_under_a_booted_systemd checks that).
    for line in run_ok("rpm", &["-qlp", s(&p.rpm)]).lines() {
        let path = line.trim().trim_start_matches('/');
        if !path.is_empty() && path != "etc/replited/example.toml" {
            assert!(!root.join(path).exists(), "/{path} is left after rpm -e");
        }
    }
}

/// The drop-in the booted tests give the service: the primary's database lives under the
/// host-shared `/srv`, which `ProtectSystem=strict` makes read-only unless named. (The
/// administrator's file: the packages never touch it.)
const DROPIN: &str = "/etc/systemd/system/replited@.service.d/srv.conf";
const UNIT: &str = "replited@data.service";
/// The primary's database, as the service sees it.
const DB: &str = "/srv/db/data.db";

/// `/etc/replited/data.toml`: `DB` backed up to the packages' backup root.
fn data_config() -> String {
    format!(
        "[log]\nlevel = \"info\"\n\n[[database]]\ndb = \"{DB}\"\n\n[[database.replicate]]\n\
         name = \"backup\"\n[database.replicate.params]\ntype = \"fs\"\n\
         root = \"/var/backups/replited\"\n"
    )
}

/// Gives the service `/srv` and creates the primary's database from the host, as the app
/// would, owned by `replited`; returns its host path.
fn prepare_primary(c: &Container) -> PathBuf {
    c.write_file(DROPIN, "[Service]\nReadWritePaths=/srv\n");
    c.daemon_reload();
    c.sh_ok("mkdir -p /srv/db && chown replited:replited /srv/db");
    let db = c.host(DB);
    run_load(&db, 1, 0);
    c.sh_ok(&format!("chown replited:replited {DB}"));
    c.write_file("/etc/replited/data.toml", data_config());
    db
}

/// Copies the backup out of the container (into `/srv`), restores it on the host with the
/// built binary and checks it holds what the primary holds.
fn restore_equals_primary(c: &Container, db: &Path, tag: &str) {
    let copy = format!("/srv/backup-{tag}");
    c.sh_ok(&format!(
        "rm -rf {copy} && cp -a /var/backups/replited {copy}"
    ));
    let out = c.dir().join(format!("restored-{tag}.db"));
    let url = format!("file://{}", c.host(&copy).join("data.db").display());
    run_ok(bin(), &["restore", &url, "-o", s(&out)]);
    assert_eq!(integrity(&out), "ok");
    assert_eq!(
        state(&out),
        state(db),
        "the restore differs from the primary"
    );
}

/// `systemctl start`, which returns once replited sent READY=1.
fn start(c: &Container, unit: &str) {
    c.systemctl_ok(&["start", unit]);
    assert_eq!(c.is_active(unit), "active", "{}", c.journal(unit));
}

/// The loaded `replited@`/`pocketbase@` units that are active (running, starting, stopping).
fn running_instances(c: &Container) -> String {
    text(
        &c.systemctl(&[
            "list-units",
            "--plain",
            "--no-legend",
            "--state=active,activating,deactivating,reloading",
            "replited@*",
            "pocketbase@*",
        ])
        .stdout,
    )
    .trim()
    .to_string()
}

/// How many times systemd reloaded its units in this boot (its journal says "Reloading.").
fn reloads(c: &Container) -> usize {
    let o = c.exec(&["journalctl", "--no-pager", "-b", "_PID=1", "-o", "cat"]);
    text(&o.stdout)
        .lines()
        .filter(|l| l.trim() == "Reloading.")
        .count()
}

/// Waits until systemd's journal shows more than `before` reloads (journald may take a moment
/// to write PID 1's line).
fn wait_reloaded(c: &Container, before: usize, what: &str) {
    let start = Instant::now();
    while reloads(c) <= before {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "systemd did not reload its units after {what}:\n{}",
            c.journal_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The owner and mode of a path in the container (`replited:replited 750`).
fn owner_mode(c: &Container, path: &str) -> String {
    c.sh_ok(&format!("stat -c '%U:%G %a' {path}"))
        .trim()
        .to_string()
}

/// Every path in the container's overlay upper directory (`upper` in `Container::dir()`: all
/// that changed on its root file system) whose name mentions replited or pocketbase.
fn leftovers(c: &Container) -> Vec<String> {
    let upper = c.dir().join("upper");
    let mut found = Vec::new();
    let mut stack = vec![upper.clone()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let path = e.path();
            let rel = format!("/{}", path.strip_prefix(&upper).unwrap().display());
            let name = e.file_name().to_string_lossy().to_lowercase();
            if name.contains("replited") || name.contains("pocketbase") {
                found.push(rel.clone());
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The .deb on a clean Debian 12 with systemd as PID 1:
/// - `dpkg -i` creates the user and its directories, reloads systemd, starts and enables
///   nothing; the shipped example config runs as is (`replited@example`);
/// - with `/etc/replited/data.toml`, `systemctl start replited@data` backs up a load into
///   `/var/backups/replited` that restores equal to the primary;
/// - `dpkg -i` of the next version keeps the edited example.toml without asking and restarts
///   the running instance on the new binary;
/// - `dpkg -r` stops it (everything captured is in the backup) and keeps config and state;
/// - `dpkg --purge` removes config and state and leaves nothing of the package behind but the
///   backups (and the `replited` user, as Debian does).
#[test]
fn deb_installs_upgrades_and_purges_in_a_booted_systemd() {
    let p = packages();
    let u = upgrade();
    let c = Container::boot_clean();
    assert!(!c.sh("command -v replited").status.success());
    fs::copy(&p.deb, c.host("/srv/replited.deb")).unwrap();
    fs::copy(&u.deb, c.host("/srv/replited-upgrade.deb")).unwrap();

    // Install.
    let before = reloads(&c);
    let start_install = Instant::now();
    let out = c.exec_ok(&["dpkg", "-i", "/srv/replited.deb"]);
    eprintln!(
        "dpkg -i took {:.1} s:\n{out}",
        start_install.elapsed().as_secs_f64()
    );
    wait_reloaded(&c, before, "dpkg -i");
    c.sh_ok("id replited && getent group replited");
    assert_eq!(
        c.sh_ok("getent passwd replited | cut -d: -f6,7").trim(),
        "/var/lib/replited:/usr/sbin/nologin"
    );
    assert_eq!(owner_mode(&c, "/var/lib/replited"), "replited:replited 750");
    assert_eq!(
        owner_mode(&c, "/var/backups/replited"),
        "replited:replited 750"
    );
    c.systemctl_ok(&[
        "cat",
        UNIT,
        "replited@data.socket",
        "pocketbase@data.service",
    ]);
    assert_eq!(running_instances(&c), "", "an instance runs after install");
    let enabled = c.sh_ok(
        "find /etc/systemd/system -name 'replited@*' -o -name 'pocketbase@*' | grep -v '\\.d$' || true",
    );
    assert_eq!(enabled.trim(), "", "something was enabled on install");
    c.exec_ok(&["replited", "--version"]);
    c.sh_ok("man -w replited 2>/dev/null || test -e /usr/share/man/man1/replited.1.gz");

    // The shipped example, as is, as an instance (its database does not exist yet: replited is
    // ready and waits for the app to create it).
    c.sh_ok(
        "mkdir -p /var/lib/pocketbase/data && chown replited:replited /var/lib/pocketbase/data",
    );
    start(&c, "replited@example.service");
    c.systemctl_ok(&["stop", "replited@example.service"]);
    c.sh_ok("rm -rf /var/backups/replited/data.db /var/lib/pocketbase");

    // A primary: a load backed up, stopped cleanly, restored equal.
    let db = prepare_primary(&c);
    run_load(&db, 1, 100);
    start(&c, UNIT);
    run_load(&db, 101, 300);
    c.systemctl_ok(&["stop", UNIT]);
    restore_equals_primary(&c, &db, "install");

    // Upgrade while the instance runs, with the example edited.
    c.sh_ok("echo '# edited by the administrator' >> /etc/replited/example.toml");
    let edited = c.sh_ok("cat /etc/replited/example.toml");
    start(&c, UNIT);
    let pid = c.main_pid(UNIT);
    run_load(&db, 301, 400);
    let out = c.exec_ok(&["dpkg", "-i", "/srv/replited-upgrade.deb"]);
    eprintln!("dpkg -i (upgrade):\n{out}");
    assert_eq!(
        c.sh_ok("dpkg-query -W -f '${Version} ${Status}' replited"),
        format!("{}-1 install ok installed", u.version)
    );
    assert_eq!(c.sh_ok("cat /etc/replited/example.toml"), edited);
    c.sh_ok("! ls /etc/replited/*.dpkg-* 2>/dev/null");
    assert_eq!(c.is_active(UNIT), "active", "{}", c.journal(UNIT));
    let new_pid = c.main_pid(UNIT);
    assert!(
        new_pid != 0 && new_pid != pid,
        "the running instance was not restarted by the upgrade (MainPID {pid} → {new_pid}):\n{}",
        c.journal(UNIT)
    );
    let exe = c.sh_ok(&format!("readlink /proc/{new_pid}/exe"));
    assert_eq!(exe.trim(), "/usr/bin/replited", "not the new binary");
    run_load(&db, 401, 500);

    // Remove: the instance stops (writing out everything captured); config and state stay.
    let out = c.exec_ok(&["dpkg", "-r", "replited"]);
    eprintln!("dpkg -r:\n{out}");
    assert_eq!(running_instances(&c), "", "an instance runs after remove");
    assert!(
        !c.systemctl(&["cat", UNIT]).status.success(),
        "units left after remove"
    );
    c.sh_ok("! test -e /usr/bin/replited && test -f /etc/replited/data.toml && test -f /etc/replited/example.toml && test -d /var/lib/replited");
    restore_equals_primary(&c, &db, "remove");

    // Purge: config and state go, backups stay (said so), nothing else is left.
    let listed = c.sh_ok("dpkg-query -L replited 2>/dev/null || true");
    let out = c.exec_ok(&["dpkg", "--purge", "replited"]);
    eprintln!("dpkg --purge:\n{out}");
    assert!(
        out.contains("/var/backups/replited are kept"),
        "purge did not say the backups are kept:\n{out}"
    );
    c.sh_ok("! test -e /etc/replited && ! test -e /var/lib/replited && test -d /var/backups/replited/data.db");
    assert!(!c.sh("dpkg-query -W replited").status.success());
    for path in listed
        .lines()
        .map(str::trim)
        .filter(|l| l.contains("replited"))
    {
        assert!(
            !c.sh(&format!("test -e '{path}'")).status.success(),
            "{path} is left after purge"
        );
    }
    let left: Vec<String> = leftovers(&c)
        .into_iter()
        .filter(|p| {
            !p.starts_with("/var/backups/replited")
                && !p.starts_with("/etc/systemd/system/replited@.service.d")
        })
        .collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    // Debian keeps system users: files (the backups) may still belong to it.
    c.sh_ok("id replited");
}

/// The .rpm's scriptlets, read from the package, run in a booted systemd as rpm runs them
/// (`/bin/sh SCRIPT $1`, around the payload rpm would unpack or remove):
/// - install (`%post 1`): the user and directories, systemd reloaded, nothing started;
/// - upgrade (the new payload, new `%post 2`, old `%preun 1`, old `%postun 1`): the running
///   instance keeps running through `%preun` and is restarted by `%postun`;
/// - erase (`%preun 0`, the payload removed, `%postun 0`): the instance stops, systemd forgets
///   the units; the state stays (rpm has no purge).
#[test]
fn rpm_scriptlets_under_a_booted_systemd() {
    let p = packages();
    let c = Container::boot_clean();
    // The payload as a tar (rpm2archive, from rpm), unpacked by tar in the container.
    let tgz = c.host("/srv/payload.tgz");
    let o = Command::new("rpm2archive")
        .arg("-")
        .stdin(fs::File::open(&p.rpm).unwrap())
        .stdout(fs::File::create(&tgz).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "rpm2archive: {}", output_text(&o));
    let payload = run_ok("rpm", &["-qlp", s(&p.rpm)]);
    for (tag, name) in [("POSTIN", "post"), ("PREUN", "preun"), ("POSTUN", "postun")] {
        let body = run_ok("rpm", &["-qp", "--qf", &format!("%{{{tag}}}"), s(&p.rpm)]);
        fs::write(c.host(&format!("/srv/{name}")), body).unwrap();
    }
    let scriptlet = |name: &str, arg: &str| {
        let o = c.exec(&["sh", &format!("/srv/{name}"), arg]);
        eprintln!("%{name} {arg}: {}", output_text(&o));
        assert!(
            o.status.success(),
            "%{name} {arg} failed ({}):\n{}\n{}",
            o.status,
            output_text(&o),
            c.journal_tail()
        );
    };
    let unpack = || c.sh_ok("tar -xzf /srv/payload.tgz -C / --unlink-first --no-same-owner");

    // Install.
    unpack();
    let before = reloads(&c);
    scriptlet("post", "1");
    wait_reloaded(&c, before, "%post");
    c.sh_ok("id replited");
    assert_eq!(owner_mode(&c, "/var/lib/replited"), "replited:replited 750");
    assert_eq!(
        owner_mode(&c, "/var/backups/replited"),
        "replited:replited 750"
    );
    assert_eq!(running_instances(&c), "");

    let db = prepare_primary(&c);
    start(&c, UNIT);
    let pid = c.main_pid(UNIT);
    run_load(&db, 1, 100);

    // Upgrade: the new files and %post, then the old package's %preun and %postun.
    unpack();
    scriptlet("post", "2");
    scriptlet("preun", "1");
    assert_eq!(
        c.main_pid(UNIT),
        pid,
        "%preun 1 touched the running instance"
    );
    scriptlet("postun", "1");
    assert_eq!(c.is_active(UNIT), "active", "{}", c.journal(UNIT));
    let new_pid = c.main_pid(UNIT);
    assert!(
        new_pid != 0 && new_pid != pid,
        "%postun 1 did not restart the instance (MainPID {pid} → {new_pid})"
    );
    run_load(&db, 101, 200);

    // Erase.
    scriptlet("preun", "0");
    assert_eq!(
        running_instances(&c),
        "",
        "%preun 0 left an instance running"
    );
    let files: Vec<&str> = payload
        .lines()
        .map(str::trim)
        .filter(|f| f.starts_with('/'))
        .collect();
    c.sh_ok(&format!(
        "for f in {}; do if [ -d \"$f\" ] && [ ! -L \"$f\" ]; then rmdir \"$f\" 2>/dev/null || true; else rm -f \"$f\"; fi; done",
        files.iter().rev().map(|f| format!("'{f}'")).collect::<Vec<_>>().join(" ")
    ));
    let before = reloads(&c);
    scriptlet("postun", "0");
    wait_reloaded(&c, before, "%postun 0");
    assert!(
        !c.systemctl(&["cat", UNIT]).status.success(),
        "the units are still known"
    );
    c.sh_ok("test -d /var/lib/replited && test -f /etc/replited/data.toml && id replited");
    // %postun 0 removed the package's directories, but /etc/replited, which holds data.toml.
    c.sh_ok("! test -e /usr/share/doc/replited && ! test -e /usr/share/licenses/replited");
    restore_equals_primary(&c, &db, "erase");
}
