//! Every certificate issued here is checked with `openssl verify`, a verifier that shares no code with ours.

use std::path::Path;
use std::process::Command;

use super::*;

fn ca_in(dir: &Path) -> CertificateAuthority {
    let source = CaSource {
        dir: dir.to_owned(),
        provided: None,
        keep_files: true,
    };
    CertificateAuthority::load_or_create(&source, Duration::days(30)).unwrap()
}

fn device(id: &str) -> DeviceId {
    DeviceId::parse(id).unwrap()
}

/// Runs `openssl verify` for a client (or server) certificate and returns whether it passed.
fn openssl_verify(dir: &Path, ca_pem: &str, cert_pem: &str, purpose: &str) -> bool {
    std::fs::write(dir.join("verify-ca.pem"), ca_pem).unwrap();
    std::fs::write(dir.join("verify-leaf.pem"), cert_pem).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
        .arg(dir.join("verify-ca.pem"))
        .arg(dir.join("verify-leaf.pem"))
        .output()
        .expect("openssl is installed (tests/run.sh installs it)");
    out.status.success()
}

fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn openssl_csr(dir: &Path, keygen: &[&str], subject: &str) -> String {
    let mut args = vec!["req", "-new", "-subj", subject, "-keyout", "k.pem", "-nodes"];
    args.extend_from_slice(keygen);
    openssl(dir, &args)
}

#[test]
fn generated_key_certificate_verifies_with_openssl_as_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path());
    let (cert, key_pem) = ca.issue_with_new_key(&device("shelf-1")).unwrap();
    assert!(key_pem.contains("BEGIN PRIVATE KEY"));
    assert!(openssl_verify(dir.path(), ca.ca_pem(), &cert.pem, "sslclient"));
    assert!(
        !openssl_verify(dir.path(), ca.ca_pem(), &cert.pem, "sslserver"),
        "clientAuth only"
    );

    let text = openssl(
        dir.path(),
        &[
            "x509",
            "-noout",
            "-subject",
            "-serial",
            "-ext",
            "extendedKeyUsage",
            "-in",
            "verify-leaf.pem",
        ],
    );
    assert!(
        text.contains("CN=shelf-1") || text.contains("CN = shelf-1"),
        "{text}"
    );
    assert!(
        text.to_lowercase().contains(&format!("serial={}", cert.serial)),
        "{text}"
    );
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(cert.not_after - cert.not_before > Duration::days(29));
}

#[test]
fn ca_is_created_once_with_a_private_key_file_of_mode_0600_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let first = ca_in(dir.path()).ca_pem().to_owned();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let again = ca_in(dir.path());
    assert_eq!(again.ca_pem(), first, "the second start loads, not recreates");
    // A certificate issued after reload still chains to the CA created first.
    let (cert, _) = again.issue_with_new_key(&device("d")).unwrap();
    assert!(openssl_verify(dir.path(), &first, &cert.pem, "sslclient"));
}

#[test]
fn half_a_ca_is_refused_rather_than_replaced() {
    let dir = tempfile::tempdir().unwrap();
    ca_in(dir.path());
    std::fs::remove_file(dir.path().join("ca.key")).unwrap();
    let source = CaSource {
        dir: dir.path().to_owned(),
        provided: None,
        keep_files: true,
    };
    let err = CertificateAuthority::load_or_create(&source, Duration::days(1)).unwrap_err();
    assert!(matches!(err, PkiError::InvalidCa { .. }), "{err}");
}

#[test]
fn operator_provided_ca_made_by_openssl_is_used() {
    let dir = tempfile::tempdir().unwrap();
    openssl(
        dir.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "op.key",
            "-out",
            "op.crt",
            "-days",
            "30",
            "-subj",
            "/O=Operator/CN=Operator Root",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    let source = CaSource {
        dir: dir.path().join("unused"),
        provided: Some((dir.path().join("op.crt"), dir.path().join("op.key"))),
        keep_files: true,
    };
    let ca = CertificateAuthority::load_or_create(&source, Duration::days(30)).unwrap();
    let (cert, _) = ca.issue_with_new_key(&device("op-device")).unwrap();
    let op_ca = std::fs::read_to_string(dir.path().join("op.crt")).unwrap();
    assert!(openssl_verify(dir.path(), &op_ca, &cert.pem, "sslclient"));
    assert!(
        !dir.path().join("unused").exists(),
        "no CA is generated when one is provided"
    );
}

#[test]
fn operator_ca_with_the_wrong_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    ca_in(a.path());
    ca_in(b.path());
    let source = CaSource {
        dir: dir.path().to_owned(),
        provided: Some((a.path().join("ca.crt"), b.path().join("ca.key"))),
        keep_files: true,
    };
    let err = CertificateAuthority::load_or_create(&source, Duration::days(1)).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}

#[test]
fn csr_from_openssl_is_signed_for_its_own_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path());
    for keygen in [
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"][..],
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"][..],
        &["-newkey", "rsa:2048"][..],
        &["-newkey", "ed25519"][..],
    ] {
        let csr = openssl_csr(dir.path(), keygen, "/CN=sensor-7");
        let cert = ca
            .issue_from_csr(&device("sensor-7"), &csr)
            .unwrap_or_else(|e| panic!("{keygen:?}: {e}"));
        assert!(
            openssl_verify(dir.path(), ca.ca_pem(), &cert.pem, "sslclient"),
            "{keygen:?}"
        );
        // The certificate carries the CSR's key: openssl's view of both public keys is the same.
        let cert_key = openssl(
            dir.path(),
            &["x509", "-noout", "-pubkey", "-in", "verify-leaf.pem"],
        );
        let own_key = openssl(dir.path(), &["pkey", "-pubout", "-in", "k.pem"]);
        assert_eq!(cert_key, own_key, "{keygen:?}");
    }
}

#[test]
fn csr_with_wrong_cn_weak_key_bad_signature_or_garbage_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path());
    let id = device("sensor-7");

    let other = openssl_csr(
        dir.path(),
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "/CN=sensor-8",
    );
    assert!(matches!(
        ca.issue_from_csr(&id, &other),
        Err(PkiError::Csr(CsrError::SubjectMismatch { .. }))
    ));

    let weak = openssl_csr(dir.path(), &["-newkey", "rsa:1024"], "/CN=sensor-7");
    assert!(matches!(
        ca.issue_from_csr(&id, &weak),
        Err(PkiError::Csr(CsrError::WeakKey(_)))
    ));

    let good = openssl_csr(
        dir.path(),
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "/CN=sensor-7",
    );
    let tampered = tamper_signature(&good);
    assert!(matches!(
        ca.issue_from_csr(&id, &tampered),
        Err(PkiError::Csr(CsrError::BadSignature))
    ));

    for garbage in [
        "",
        "hello",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        assert!(
            matches!(
                ca.issue_from_csr(&id, garbage),
                Err(PkiError::Csr(CsrError::Malformed(_)))
            ),
            "{garbage:?}"
        );
    }
    // A certificate is not a CSR.
    assert!(matches!(
        ca.issue_from_csr(&id, ca.ca_pem()),
        Err(PkiError::Csr(CsrError::Malformed(_)))
    ));
}

/// Flips one bit in the last byte of the DER (inside the signature) and re-encodes the PEM.
fn tamper_signature(pem: &str) -> String {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let mut der = block.contents.clone();
    *der.last_mut().unwrap() ^= 0x01;
    let b64 = openssl_base64(&der);
    format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}-----END CERTIFICATE REQUEST-----\n")
}

fn openssl_base64(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["base64", "-e"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
}

#[test]
fn server_certificate_names_the_configured_hosts_and_verifies_as_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path());
    ca.write_server_identity(
        dir.path(),
        &["localhost".into(), "mqtt.example.test".into(), "127.0.0.1".into()],
    )
    .unwrap();
    let chain = std::fs::read_to_string(dir.path().join("server.crt")).unwrap();
    let leaf = &chain[..chain.find("-----END CERTIFICATE-----").unwrap() + 26];
    assert!(openssl_verify(dir.path(), ca.ca_pem(), leaf, "sslserver"));
    let out = Command::new("openssl")
        .args([
            "verify",
            "-purpose",
            "sslserver",
            "-verify_hostname",
            "mqtt.example.test",
            "-CAfile",
        ])
        .arg(dir.path().join("verify-ca.pem"))
        .arg(dir.path().join("verify-leaf.pem"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = Command::new("openssl")
        .args(["verify", "-verify_hostname", "evil.example.test", "-CAfile"])
        .arg(dir.path().join("verify-ca.pem"))
        .arg(dir.path().join("verify-leaf.pem"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a name not configured is not in the certificate"
    );
}
