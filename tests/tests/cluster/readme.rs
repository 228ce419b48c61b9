//! The README's "Running a cluster" recipe, run as written.

use std::time::Duration;

use serde_json::{json, Value};

use super::servers::{PrivateRedis, ProcessGroup};
use super::test_database;

/// Runs the README's "Running a cluster" block as written, against a fresh database and a Redis of its own, on
/// free ports. Only the addresses are swapped for the test's, and `cargo build --release` is skipped: the binary
/// under test is first on PATH instead.
#[test]
fn readme_cluster_recipe_works_as_written() {
    use std::os::unix::process::CommandExt;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("<!-- cluster:start -->")
        .expect("cluster start marker");
    let end = readme.find("<!-- cluster:end -->").expect("cluster end marker");
    let script: String = readme[start..end]
        .lines()
        .skip_while(|l| !l.starts_with("```sh"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .map(|l| format!("{l}\n"))
        .collect();

    let redis = PrivateRedis::start();
    let db = test_database();
    let ports: Vec<u16> = {
        let held: Vec<_> = (0..4)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        held.iter().map(|l| l.local_addr().unwrap().port()).collect()
    };
    let swaps = [
        ("postgres://postgres@127.0.0.1:5432/antumbra", db.clone()),
        ("redis://127.0.0.1:6379/0", redis.url()),
        ("127.0.0.1:8080", format!("127.0.0.1:{}", ports[0])),
        ("127.0.0.1:8081", format!("127.0.0.1:{}", ports[1])),
        ("127.0.0.1:8883", format!("127.0.0.1:{}", ports[2])),
        ("127.0.0.1:8884", format!("127.0.0.1:{}", ports[3])),
        ("-p 8884", format!("-p {}", ports[3])),
    ];
    let mut script = script;
    for (from, to) in &swaps {
        assert!(
            script.contains(from),
            "the recipe no longer mentions {from}:\n{script}"
        );
        script = script.replace(from, to);
    }
    let prelude = "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n\
                   cargo() { echo \"(test) not running: cargo $*\"; }\n";
    let bin_dir = antumbra_e2e::antumbra_bin().parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut cmd = std::process::Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", &format!("{prelude}{script}")])
        .current_dir(dir.path())
        .env("PATH", path)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .process_group(0);
    for (key, _) in std::env::vars() {
        if key.starts_with("ANTUMBRA_") || key == "DATABASE_URL" || key == "REDIS_URL" || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    let mut group = ProcessGroup(cmd.spawn().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = group.0.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    drop(group);
    let status = status.unwrap_or_else(|| panic!("the recipe did not finish in 120 s:\n{stdout}\n{stderr}"));
    assert!(
        status.success(),
        "the recipe failed ({status}):\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("\none CA\n"),
        "both instances serve one CA:\n{stdout}"
    );
    let delta: Value = stdout
        .lines()
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v.get("state").is_some())
        })
        .unwrap_or_else(|| panic!("no delta printed:\n{stdout}\n{stderr}"));
    assert_eq!(delta["state"], json!({"on": true}), "{delta}");
    assert!(
        !dir.path().join("a/pki/ca.key").exists() && !dir.path().join("b/pki/ca.key").exists(),
        "the CA key stays in the database"
    );
}
