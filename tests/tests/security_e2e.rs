//! Trust, end to end with the real `quern` binary: formatted namenodes,
//! cluster ids, datanode certificates, the trash, users and permissions.

use quern_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn quern(args: &[&str]) -> Run {
    Command::new(quern_bin())
        .args(args)
        .env_remove("QUERN_CONFIG")
        .output()
        .expect("run quern")
        .into()
}

fn wait(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn all_chunk_files(c: &BinCluster, datanodes: usize) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = (0..datanodes)
        .flat_map(|i| chunk_files_in(&c.datanode_dir(i)))
        .collect();
    v.sort();
    v
}

/// A child process killed when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tls(c: &BinCluster) -> PathBuf {
    c.dir.path().join("tls")
}

fn namenode_addr(c: &BinCluster) -> String {
    c.cluster_json()["namenode"]["addr"]
        .as_str()
        .expect("namenode addr")
        .to_string()
}

/// The certificate `cluster up` issued for datanode `i`.
fn datanode_cert(c: &BinCluster, i: usize) -> (PathBuf, PathBuf) {
    let id = std::fs::read_to_string(c.datanode_dir(i).join("node_id")).expect("node_id");
    let base = tls(c).join(format!("datanode-{}", id.trim()));
    (base.with_extension("pem"), base.with_extension("key"))
}

#[test]
fn a_namenode_never_starts_on_a_directory_that_was_not_formatted() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().display().to_string();
    let r = quern(&["cluster", "init", "--dir", &dir]);
    ok(&r);
    assert!(r.stdout.contains("cluster qc-"), "{}", r.stdout);
    // A mistyped --dir beside the real one finds the same certificates
    // through DIR/../tls, and must still refuse.
    let typo = d.path().join("namenod");
    let r = quern(&[
        "namenode",
        "--dir",
        typo.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("was never formatted"), "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("quern namenode format --dir {}", typo.display())),
        "{}",
        r.stderr
    );
    assert!(!typo.join("meta").exists(), "nothing may be created");
    // Formatting twice is refused too: it would orphan every chunk.
    let real = d.path().join("namenode");
    let r = quern(&["namenode", "format", "--dir", real.to_str().unwrap()]);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("is formatted already"), "{}", r.stderr);
}

#[test]
fn datanodes_refuse_a_namenode_of_another_cluster_and_keep_every_chunk() {
    let c = BinCluster::up(2, &[]);
    let local = tempfile::tempdir().unwrap();
    let data = random_bytes(3 << 20, 11);
    let src = local.path().join("f.bin");
    std::fs::write(&src, &data).unwrap();
    ok(&c.quern(&[
        "put",
        src.to_str().unwrap(),
        "/f.bin",
        "-r",
        "2",
        "--chunk-size",
        "1MiB",
    ]));
    let before = all_chunk_files(&c, 2);
    assert_eq!(before.len(), 6);
    let addr = namenode_addr(&c);
    c.sigkill("namenode", 0);

    // Another, freshly formatted namenode answers at the same address.
    let other = c.dir.path().join("other-namenode");
    ok(&quern(&[
        "namenode",
        "format",
        "--dir",
        other.to_str().unwrap(),
    ]));
    let log = c.dir.path().join("other-namenode.log");
    let imposter = Child(
        Command::new(quern_bin())
            .args([
                "namenode",
                "--dir",
                other.to_str().unwrap(),
                "--listen",
                &addr,
                "--tls",
                tls(&c).to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let dn_log = c.dir.path().join("logs/datanode-1.log");
    wait(Duration::from_secs(30), "the refusal in the log", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("refused a datanode of another cluster")
    });
    // Each datanode finds out at its own pace: one whose heartbeats went to
    // the killed namenode's lifeline port, where nothing answers now, waits
    // out QUIC's idle timeout (10 s) first.
    wait(
        Duration::from_secs(30),
        "datanode 1 to see the other cluster",
        || {
            std::fs::read_to_string(&dn_log)
                .unwrap_or_default()
                .contains("belongs to another cluster")
        },
    );
    // Several heartbeats later nothing is gone.
    std::thread::sleep(Duration::from_secs(2));
    let report = c.quern(&["report", "--json"]);
    ok(&report);
    let j: serde_json::Value = serde_json::from_str(&report.stdout).unwrap();
    assert_eq!(
        j["datanodes"].as_array().unwrap().len(),
        0,
        "{}",
        report.stdout
    );
    drop(imposter);
    assert_eq!(all_chunk_files(&c, 2), before, "every chunk file stays");

    // The right namenode back: the same bytes.
    ok(&c.restart());
    let out = local.path().join("back.bin");
    wait(Duration::from_secs(20), "the file to read back", || {
        c.quern(&["get", "/f.bin", out.to_str().unwrap(), "--force"])
            .status
            == 0
    });
    assert_eq!(std::fs::read(&out).unwrap(), data);
}

#[test]
fn a_datanode_runs_only_with_its_own_certificate() {
    let c = BinCluster::up(2, &[]);
    let addr = namenode_addr(&c);
    let t = tls(&c);
    let spare = c.dir.path().join("spare");
    let spare = spare.to_str().unwrap();
    // The admin's (client) certificate is no datanode's.
    let r = quern(&[
        "datanode",
        "--dir",
        spare,
        "--namenode",
        &addr,
        "--cert",
        t.join("admin.pem").to_str().unwrap(),
        "--key",
        t.join("admin.key").to_str().unwrap(),
        "--ca",
        t.join("ca.pem").to_str().unwrap(),
    ]);
    assert_ne!(r.status, 0);
    assert!(
        r.stderr.contains("needs a datanode certificate"),
        "{}",
        r.stderr
    );
    // Datanode 1's certificate on datanode 2's directory.
    let (cert1, key1) = datanode_cert(&c, 0);
    let dn2 = c.datanode_dir(1);
    let r = quern(&[
        "datanode",
        "--dir",
        dn2.to_str().unwrap(),
        "--namenode",
        &addr,
        "--cert",
        cert1.to_str().unwrap(),
        "--key",
        key1.to_str().unwrap(),
        "--ca",
        t.join("ca.pem").to_str().unwrap(),
    ]);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("holds the chunks of"), "{}", r.stderr);
    // A second process with datanode 1's certificate: refused registration
    // while the real one is live.
    let log = c.dir.path().join("copy.log");
    let copy = Child(
        Command::new(quern_bin())
            .args([
                "datanode",
                "--dir",
                spare,
                "--namenode",
                &addr,
                "--heartbeat",
                "200ms",
                "--cert",
                cert1.to_str().unwrap(),
                "--key",
                key1.to_str().unwrap(),
                "--ca",
                t.join("ca.pem").to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait(Duration::from_secs(15), "the copy to be refused", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("a second process with its certificate")
    });
    drop(copy);
    let r = c.quern(&["report", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["datanodes"].as_array().unwrap().len(), 2, "{}", r.stdout);
}

fn as_user(c: &BinCluster, user: &str, args: &[&str]) -> Run {
    let cfg = c.dir.path().join(format!("users/{user}.toml"));
    Command::new(quern_bin())
        .args(args)
        .env("QUERN_CONFIG", cfg)
        .output()
        .expect("run quern")
        .into()
}

#[test]
fn users_cannot_touch_each_others_files() {
    let c = BinCluster::up(1, &[]);
    let dir = c.dir.path().display().to_string();
    for u in ["alice", "bob"] {
        let r = quern(&["cluster", "add-user", u, "--dir", &dir]);
        ok(&r);
        assert!(
            r.stdout.contains(&format!("/user/{u} (owner {u})")),
            "{}",
            r.stdout
        );
    }
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("s.txt");
    std::fs::write(&src, "bob's words").unwrap();
    let src = src.to_str().unwrap();
    ok(&as_user(
        &c,
        "bob",
        &["put", src, "/user/bob/secret", "--mode", "600", "-r", "1"],
    ));
    ok(&as_user(
        &c,
        "bob",
        &["put", src, "/user/bob/public", "-r", "1"],
    ));

    let r = as_user(&c, "alice", &["cat", "/user/bob/secret"]);
    assert_eq!(r.status, 1);
    assert_eq!(r.stdout, "");
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("permission denied: /user/bob/secret (owner bob, mode 0600)"),
        "{}",
        r.stderr
    );
    let r = as_user(&c, "alice", &["cat", "/user/bob/public"]);
    ok(&r);
    assert_eq!(r.stdout, "bob's words");
    for args in [
        &["rm", "/user/bob/public"][..],
        &["put", src, "/user/bob/public", "--force"][..],
        &["mv", "/user/bob/public", "/user/alice/mine"][..],
        &["chown", "alice", "/user/bob/public"][..],
    ] {
        let r = as_user(&c, "alice", args);
        assert_eq!(r.status, 1, "{args:?}: {}", r.stdout);
        assert!(
            r.stderr.contains("permission denied"),
            "{args:?}: {}",
            r.stderr
        );
    }
    // Nothing changed; the admin may give the file away.
    ok(&c.quern(&["chown", "alice", "/user/bob/public"]));
    let r = c.quern(&["ls", "-l", "/user/bob"]);
    ok(&r);
    let public = r
        .stdout
        .lines()
        .find(|l| l.ends_with("/user/bob/public"))
        .unwrap();
    assert!(public.starts_with("-rw-r--r--"), "{public}");
    assert!(public.contains(" alice "), "{public}");
    let secret = r
        .stdout
        .lines()
        .find(|l| l.ends_with("/user/bob/secret"))
        .unwrap();
    assert!(secret.starts_with("-rw-------"), "{secret}");
    assert!(secret.contains(" bob "), "{secret}");
    let r = c.quern(&["stat", "--json", "/user/bob/public"]);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["owner"], "alice");
    assert_eq!(j["mode"], 0o644);
    ok(&as_user(&c, "alice", &["chmod", "600", "/user/bob/public"]));
    let r = as_user(&c, "bob", &["cat", "/user/bob/public"]);
    assert!(
        r.stderr.contains("(owner alice, mode 0600)"),
        "{}",
        r.stderr
    );
}

#[test]
fn chunks_a_restored_namespace_does_not_know_go_to_the_trash() {
    let c = BinCluster::up(2, &["--report-interval", "1s"]);
    let local = tempfile::tempdir().unwrap();
    let old = random_bytes(300_000, 21);
    let new = random_bytes(500_000, 22);
    let (p_old, p_new) = (local.path().join("old"), local.path().join("new"));
    std::fs::write(&p_old, &old).unwrap();
    std::fs::write(&p_new, &new).unwrap();
    ok(&c.quern(&["put", p_old.to_str().unwrap(), "/old", "-r", "2"]));
    ok(&c.down());
    let nn = c.dir.path().join("namenode");
    let backup = c.dir.path().join("namenode-backup");
    copy_dir(&nn, &backup);
    ok(&c.restart());
    wait(
        Duration::from_secs(20),
        "the namenode to be writable",
        || {
            c.quern(&["put", p_new.to_str().unwrap(), "/new", "-r", "2"])
                .status
                == 0
        },
    );
    let with_new = all_chunk_files(&c, 2);
    assert_eq!(with_new.len(), 4);
    ok(&c.down());
    // An operator restores the old backup of the namespace.
    std::fs::remove_dir_all(&nn).unwrap();
    std::fs::rename(&backup, &nn).unwrap();
    ok(&c.restart());
    wait(
        Duration::from_secs(30),
        "the new chunks to reach the trash",
        || {
            let r = c.quern(&["report", "--json"]);
            serde_json::from_str::<serde_json::Value>(&r.stdout).is_ok_and(|j| {
                j["datanodes"].as_array().is_some_and(|d| {
                    d.iter()
                        .map(|n| n["trash_bytes"].as_u64().unwrap_or(0))
                        .sum::<u64>()
                        == 2 * 500_000
                })
            })
        },
    );
    let r = c.quern(&["report"]);
    assert!(r.stdout.contains("TRASH"), "{}", r.stdout);
    // The newer file's bytes are all in the trash, none was unlinked.
    assert_eq!(all_chunk_files(&c, 2).len(), 2);
    let mut trashed = 0;
    for i in 0..2 {
        for bin in std::fs::read_dir(c.datanode_dir(i).join("trash")).unwrap() {
            for f in std::fs::read_dir(bin.unwrap().path()).unwrap() {
                let f = f.unwrap().path();
                if f.extension().is_some_and(|x| x == "chunk") {
                    assert_eq!(std::fs::read(&f).unwrap(), new);
                    trashed += 1;
                }
            }
        }
    }
    assert_eq!(trashed, 2);
    let back = local.path().join("back");
    ok(&c.quern(&["get", "/old", back.to_str().unwrap()]));
    assert_eq!(std::fs::read(&back).unwrap(), old);
    let r = c.quern(&["ls", "/"]);
    assert!(!r.stdout.contains("/new"), "{}", r.stdout);
}

fn copy_dir(from: &Path, to: &Path) {
    let r = Command::new("cp")
        .args(["-a", from.to_str().unwrap(), to.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(r.success());
}
