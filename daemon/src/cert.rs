//! Development certificates for the replication transport: a private CA and the server and client
//! certificates it signs.
//!
//! replited's QUIC transport always verifies certificates (there is no "skip verification"
//! mode): a replica checks the primary's certificate against a CA it trusts, and a primary
//! configured with a client CA accepts only replicas presenting a certificate signed by it. For a
//! deployment without a PKI of its own, make one CA and sign everything with it:
//!
//! ```text
//! make_ca(dir, "replited dev CA")                    -> dir/ca.pem, dir/ca-key.pem
//! make_cert(dir, out, "primary", ["db1.example", "10.0.0.1"], false)
//!                                                    -> out/primary.pem, out/primary-key.pem (serverAuth)
//! make_cert(dir, out, "replica-1", [], true)         -> out/replica-1.pem, out/replica-1-key.pem (clientAuth)
//! ```
//!
//! The primary is configured with `primary.pem` / `primary-key.pem` (and `ca.pem` as its client
//! CA for mutual TLS); each replica with `ca.pem` (and its own client certificate). Keep
//! `ca-key.pem` off the servers: it is only needed to issue certificates.
//!
//! Keys are ECDSA P-256, written as PKCS#8 PEM with mode 0600. The CA is valid for 10 years and
//! may only sign end-entity certificates (path length 0); certificates are valid for
//! [`CERT_VALIDITY_DAYS`] days, starting one hour in the past to tolerate clock skew.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, Ia5String, IsCa, KeyPair, KeyUsagePurpose, PrintableString, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// The CA certificate's file name.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key's file name.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// How long the CA is valid.
pub const CA_VALIDITY_DAYS: u64 = 3650;
/// How long an issued certificate is valid.
pub const CERT_VALIDITY_DAYS: u64 = 825;

const DAY: Duration = Duration::from_secs(86_400);
const SKEW: Duration = Duration::from_secs(3_600);

/// Writes `ca.pem` + `ca-key.pem` (a self-signed CA valid for 10 years, subject `CN=<name>`) into
/// `dir`, creating it if needed. The key is written with mode 0600.
///
/// Refuses to overwrite an existing CA: every certificate it signed would become useless.
pub fn make_ca(dir: &Path, name: &str) -> anyhow::Result<()> {
    if name.trim().is_empty() {
        bail!("the CA's name must not be empty");
    }
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            bail!(
                "{} already exists: refusing to replace a CA (every certificate it signed would stop working)",
                p.display()
            );
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    let key = KeyPair::generate().context("generating the CA key")?;
    let mut params = ca_params(DistinguishedName::new());
    params.distinguished_name.push(DnType::CommonName, name);
    set_validity(&mut params, CA_VALIDITY_DAYS);
    let cert = params
        .self_signed(&key)
        .context("signing the CA certificate")?;

    // Key first: a ca.pem without its key would block a retry.
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(
        "wrote CA {name:?}: {} and {}",
        cert_path.display(),
        key_path.display()
    );
    Ok(())
}

/// Writes `NAME.pem` + `NAME-key.pem` into `out_dir` (created if needed; replaced if present),
/// signed by the CA in `ca_dir` (`ca.pem`, `ca-key.pem`), subject `CN=<name>`.
///
/// `sans` are the subject alternative names: each is an IP address (v4 or v6) or a DNS name. A
/// server certificate (`client == false`, extended key usage serverAuth) needs at least one: a
/// replica checks the name or address it connects to against them. A client certificate
/// (`client == true`, extended key usage clientAuth) may have none.
pub fn make_cert(
    ca_dir: &Path,
    out_dir: &Path,
    name: &str,
    sans: &[String],
    client: bool,
) -> anyhow::Result<()> {
    check_file_name(name)?;
    let subject_alt_names = sans
        .iter()
        .map(|s| parse_san(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !client && subject_alt_names.is_empty() {
        bail!(
            "a server certificate needs at least one DNS name or IP address (the names replicas connect to)"
        );
    }

    let (issuer, ca_key) = load_ca(ca_dir)?;

    let key = KeyPair::generate().context("generating the key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = subject_alt_names;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, CERT_VALIDITY_DAYS);
    let cert = params
        .signed_by(&key, &issuer, &ca_key)
        .context("signing the certificate")?;

    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let cert_path = out_dir.join(format!("{name}.pem"));
    let key_path = out_dir.join(format!("{name}-key.pem"));
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(
        "wrote {} certificate {name:?} (SANs {sans:?}): {} and {}",
        if client { "client" } else { "server" },
        cert_path.display(),
        key_path.display()
    );
    Ok(())
}

/// A one-line description of a certificate for logs: its subject and subject alternative names,
/// e.g. `CN=replica-1 SAN=[replica-1.example, 10.0.0.2]`. None when the DER cannot be parsed.
pub fn describe(der: &[u8]) -> Option<String> {
    let tbs = tbs_fields(der)?;
    let mut out = String::new();
    for (oid, _tag, value) in subject_attributes(tbs.subject)? {
        let label = match oid.as_slice() {
            [2, 5, 4, 3] => "CN".to_string(),
            [2, 5, 4, 6] => "C".to_string(),
            [2, 5, 4, 7] => "L".to_string(),
            [2, 5, 4, 8] => "ST".to_string(),
            [2, 5, 4, 10] => "O".to_string(),
            [2, 5, 4, 11] => "OU".to_string(),
            other => other
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join("."),
        };
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&label);
        out.push('=');
        out.push_str(&String::from_utf8_lossy(value));
    }
    let sans = tbs.extensions.map(subject_alt_names).unwrap_or_default();
    if !sans.is_empty() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&format!("SAN=[{}]", sans.join(", ")));
    }
    Some(out)
}

/// The CA as an rcgen issuer: parameters reproducing its subject exactly (the issuer name of the
/// certificates it signs must match it byte for byte), and its key.
fn load_ca(ca_dir: &Path) -> anyhow::Result<(rcgen::Certificate, KeyPair)> {
    let cert_path = ca_dir.join(CA_CERT_FILE);
    let key_path = ca_dir.join(CA_KEY_FILE);
    let der = CertificateDer::from_pem_file(&cert_path)
        .map_err(|e| anyhow!("reading the CA certificate {}: {e}", cert_path.display()))?;
    let key_pem = fs::read_to_string(&key_path)
        .with_context(|| format!("reading the CA key {}", key_path.display()))?;
    let key = KeyPair::from_pem(&key_pem)
        .with_context(|| format!("parsing the CA key {}", key_path.display()))?;

    let bad = || {
        anyhow!(
            "{}: not a certificate replited can parse",
            cert_path.display()
        )
    };
    let tbs = tbs_fields(&der).ok_or_else(bad)?;
    if tbs.spki != key.public_key_der().as_slice() {
        bail!(
            "{} is not the key of {}",
            key_path.display(),
            cert_path.display()
        );
    }
    let mut dn = DistinguishedName::new();
    for (oid, tag, value) in subject_attributes(tbs.subject).ok_or_else(bad)? {
        let value = String::from_utf8(value.to_vec()).map_err(|_| bad())?;
        let value = match tag {
            0x0c => DnValue::Utf8String(value),
            0x13 => DnValue::PrintableString(PrintableString::try_from(value).map_err(|_| bad())?),
            0x16 => DnValue::Ia5String(Ia5String::try_from(value).map_err(|_| bad())?),
            _ => bail!(
                "{}: unsupported string type {tag:#x} in the CA's subject",
                cert_path.display()
            ),
        };
        let ty = DnType::from_oid(&oid);
        if dn.get(&ty).is_some() {
            bail!(
                "{}: repeated attribute in the CA's subject",
                cert_path.display()
            );
        }
        dn.push(ty, value);
    }
    // Only the subject, key identifier method and key are used when signing; the validity of
    // this stand-in is irrelevant.
    let issuer = ca_params(dn)
        .self_signed(&key)
        .context("preparing the CA for signing")?;
    Ok((issuer, key))
}

fn ca_params(dn: DistinguishedName) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// From an hour ago (clock skew between hosts) to `days` days from now.
fn set_validity(params: &mut CertificateParams, days: u64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(SKEW);
    params.not_after = epoch + now + DAY * days as u32;
}

/// `name` becomes a file name (`NAME.pem`): refuse what would escape `out_dir` or clash with the
/// CA's files.
fn check_file_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 200
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        bail!(
            "bad certificate name {name:?}: use 1 to 200 ASCII letters, digits, '.', '-' or '_', not starting with '.'"
        );
    }
    if name == "ca" || name == "ca-key" {
        bail!("the certificate name {name:?} is reserved for the CA's own files");
    }
    Ok(())
}

fn parse_san(s: &str) -> anyhow::Result<SanType> {
    let s = s.trim();
    let unbracketed = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    if rustls::pki_types::DnsName::try_from(s).is_err() {
        bail!("bad subject alternative name {s:?}: not an IP address or a DNS name");
    }
    let name = Ia5String::try_from(s.to_ascii_lowercase())
        .map_err(|_| anyhow!("bad subject alternative name {s:?}: not ASCII"))?;
    Ok(SanType::DnsName(name))
}

/// Writes `path` through a temporary file renamed into place; `mode` is set before any byte is
/// written.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut tmp = PathBuf::from(path);
    tmp.set_extension(format!("pem.tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow!("writing {}: {e}", path.display())
    })
}

// --- A minimal DER reader: just enough of X.509 to reproduce a CA's subject and to describe a
// peer's certificate in logs. ---

/// One TLV: (tag, contents, what follows).
fn tlv(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = data.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

struct Tbs<'a> {
    /// The subject Name's contents (the RDN sequence).
    subject: &'a [u8],
    /// The whole SubjectPublicKeyInfo encoding.
    spki: &'a [u8],
    /// The Extensions sequence's contents, if any.
    extensions: Option<&'a [u8]>,
}

fn tbs_fields(cert: &[u8]) -> Option<Tbs<'_>> {
    let (0x30, cert, _) = tlv(cert)? else {
        return None;
    };
    let (0x30, tbs, _) = tlv(cert)? else {
        return None;
    };
    let (mut tag, _, mut rest) = tlv(tbs)?;
    if tag == 0xa0 {
        // version, then serial
        (tag, _, rest) = tlv(rest)?;
    }
    if tag != 0x02 {
        return None;
    }
    let (0x30, _, rest) = tlv(rest)? else {
        return None; // signature algorithm
    };
    let (0x30, _, rest) = tlv(rest)? else {
        return None; // issuer
    };
    let (0x30, _, rest) = tlv(rest)? else {
        return None; // validity
    };
    let (0x30, subject, rest) = tlv(rest)? else {
        return None;
    };
    let spki_start = rest;
    let (0x30, _, mut rest) = tlv(rest)? else {
        return None;
    };
    let spki = &spki_start[..spki_start.len() - rest.len()];
    let mut extensions = None;
    while !rest.is_empty() {
        let (tag, contents, r) = tlv(rest)?;
        if tag == 0xa3 {
            let (0x30, exts, _) = tlv(contents)? else {
                return None;
            };
            extensions = Some(exts);
        }
        rest = r;
    }
    Some(Tbs {
        subject,
        spki,
        extensions,
    })
}

fn decode_oid(bytes: &[u8]) -> Option<Vec<u64>> {
    let mut arcs = Vec::new();
    let mut acc: u64 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        acc = acc.checked_mul(128)? | (b & 0x7f) as u64;
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (acc / 40).min(2);
                arcs.push(first);
                arcs.push(acc - first * 40);
            } else {
                arcs.push(acc);
            }
            acc = 0;
        } else if i + 1 == bytes.len() {
            return None;
        }
    }
    (!arcs.is_empty()).then_some(arcs)
}

/// An attribute of a Name: (OID, string tag, value bytes).
type Attribute<'a> = (Vec<u64>, u8, &'a [u8]);

/// The attributes of a Name, in order. Only
/// single-valued RDNs are supported.
fn subject_attributes(name: &[u8]) -> Option<Vec<Attribute<'_>>> {
    let mut out = Vec::new();
    let mut rest = name;
    while !rest.is_empty() {
        let (0x31, set, r) = tlv(rest)? else {
            return None;
        };
        let (0x30, atv, extra) = tlv(set)? else {
            return None;
        };
        if !extra.is_empty() {
            return None; // multi-valued RDN
        }
        let (0x06, oid, value) = tlv(atv)? else {
            return None;
        };
        let (tag, value, _) = tlv(value)?;
        out.push((decode_oid(oid)?, tag, value));
        rest = r;
    }
    Some(out)
}

/// The DNS names and IP addresses of a subjectAltName extension, from the Extensions contents.
fn subject_alt_names(mut exts: &[u8]) -> Vec<String> {
    const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11]; // 2.5.29.17
    let mut out = Vec::new();
    while let Some((0x30, ext, rest)) = tlv(exts) {
        exts = rest;
        let Some((0x06, oid, mut fields)) = tlv(ext) else {
            continue;
        };
        if oid != SAN_OID {
            continue;
        }
        // Optional `critical` BOOLEAN, then the OCTET STRING holding GeneralNames.
        if let Some((0x01, _, r)) = tlv(fields) {
            fields = r;
        }
        let Some((0x04, octets, _)) = tlv(fields) else {
            continue;
        };
        let Some((0x30, mut names, _)) = tlv(octets) else {
            continue;
        };
        while let Some((tag, value, rest)) = tlv(names) {
            names = rest;
            match tag {
                0x82 => out.push(String::from_utf8_lossy(value).into_owned()),
                0x87 => {
                    if let Ok(v4) = <[u8; 4]>::try_from(value) {
                        out.push(IpAddr::from(v4).to_string());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(value) {
                        out.push(IpAddr::from(v6).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    out
}
