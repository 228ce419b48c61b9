//! Shared PKI: instances on one database share the CA kept there, even when they start at the same moment;
//! operator CA files take precedence and never enter the database.

use antumbra_e2e::{pub_, Server};

use super::{instance, test_database, ClusterEnv, TOKEN};

fn ca_of(server: &Server) -> String {
    reqwest::blocking::get(format!("{}/v1/ca", server.base))
        .unwrap()
        .text()
        .unwrap()
}

#[test]
fn instances_starting_at_once_on_a_fresh_database_agree_on_one_ca() {
    let env = std::sync::Arc::new(ClusterEnv::new(&test_database()));
    let dir = tempfile::tempdir().unwrap();
    let starting: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|name| {
            let env = env.clone();
            let dir = dir.path().to_owned();
            std::thread::spawn(move || {
                let env = env.vars();
                instance(&dir, name, &env, &[])
            })
        })
        .collect();
    let servers: Vec<Server> = starting.into_iter().map(|t| t.join().unwrap()).collect();
    let ca = ca_of(&servers[0]);
    assert!(ca.contains("BEGIN CERTIFICATE"), "{ca}");
    for server in &servers[1..] {
        assert_eq!(ca_of(server), ca, "one CA for every instance");
    }
    // With a shared database the CA key stays there, not on the instances' disks.
    for name in ["a", "b", "c"] {
        assert!(!dir.path().join(name).join("pki/ca.key").exists());
    }
    // A device registered through one instance connects to another.
    let creds = tempfile::tempdir().unwrap();
    let d = servers[2].register(TOKEN, "any-door", creds.path());
    let out = pub_(&servers[1], &d, "any-door", "devices/any-door/hello", "1", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn operator_ca_files_take_precedence_and_stay_out_of_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let ca = std::process::Command::new("openssl")
        .current_dir(dir.path())
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "op-ca.key",
            "-out",
            "op-ca.crt",
            "-days",
            "30",
            "-subj",
            "/O=Operator/CN=Operator Root",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])
        .output()
        .unwrap();
    assert!(ca.status.success(), "{}", String::from_utf8_lossy(&ca.stderr));
    let (cert, key) = (dir.path().join("op-ca.crt"), dir.path().join("op-ca.key"));
    let files = [
        "--ca-cert",
        cert.to_str().unwrap(),
        "--ca-key",
        key.to_str().unwrap(),
    ];
    let db = test_database();
    let env = ClusterEnv::new(&db);
    let env = env.vars();
    let a = instance(dir.path(), "a", &env, &files);
    let b = instance(dir.path(), "b", &env, &files);
    let operator_ca = std::fs::read_to_string(&cert).unwrap();
    for server in [&a, &b] {
        assert_eq!(ca_of(server).trim(), operator_ca.trim());
    }
    let d = a.register(TOKEN, "by-the-book", dir.path());
    let out = pub_(&b, &d, "by-the-book", "devices/by-the-book/hello", "1", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stored = std::process::Command::new("psql")
        .args([&db, "-tAc", "SELECT count(*) FROM certificate_authority"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&stored.stdout).trim(),
        "0",
        "the operator's key is not copied into the database"
    );
}
