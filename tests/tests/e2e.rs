//! End to end through the real `quern` binary: clusters of real processes,
//! killed with SIGKILL where the behaviour under failure is the point.

use quern_tests::*;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn write_local(dir: &Path, name: &str, data: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p.display().to_string()
}

fn chunk_files(c: &BinCluster, datanodes: usize) -> usize {
    (0..datanodes)
        .map(|i| chunk_files_in(&c.datanode_dir(i)).len())
        .sum()
}

/// The first replica of `path`'s first chunk: its datanode's address and
/// index in the cluster, and the chunk file on its disk.
fn first_replica_file(c: &BinCluster, path: &str) -> (String, usize, std::path::PathBuf) {
    let loc: serde_json::Value =
        serde_json::from_str(&c.quern(&["locate", "--json", path]).stdout).unwrap();
    let addr = loc["chunks"][0]["replicas"][0]["node"]["addr"]
        .as_str()
        .unwrap()
        .to_string();
    let chunk_id = loc["chunks"][0]["meta"]["id"].as_u64().unwrap();
    let idx = c.cluster_json()["datanodes"]
        .as_array()
        .unwrap()
        .iter()
        .position(|d| d["addr"] == addr.as_str())
        .unwrap();
    let file = c
        .datanode_dir(idx)
        .join("chunks")
        .join(format!("{chunk_id:016x}.chunk"));
    (addr, idx, file)
}

fn wait(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn cluster_up_put_get_fsck_down() {
    let c = BinCluster::up(3, &[]);
    let local = tempfile::tempdir().unwrap();
    let data = random_bytes(3 * 65536 + 7, 11);
    let src = write_local(local.path(), "data.bin", &data);
    ok(&c.quern(&["mkdir", "-p", "/ds/raw"]));
    ok(&c.quern(&["put", &src, "/ds/raw", "--chunk-size", "64K"]));
    let back = local.path().join("back.bin");
    ok(&c.quern(&["get", "/ds/raw/data.bin", back.to_str().unwrap()]));
    assert_eq!(std::fs::read(&back).unwrap(), data);
    // Into a pipe (as into /dev/null): written through, never replaced.
    let fifo = local.path().join("pipe");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    ok(&c.quern(&["get", "/ds/raw/data.bin", fifo.to_str().unwrap()]));
    assert_eq!(reader.join().unwrap(), data);
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    let cat = c.command(&["cat", "/ds/raw/data.bin"]).output().unwrap();
    assert!(cat.status.success());
    assert_eq!(cat.stdout, data);

    let ls = c.quern(&["ls", "-l", "-R", "/"]);
    ok(&ls);
    assert!(ls.stdout.contains("/ds/raw/data.bin"), "{}", ls.stdout);
    assert!(
        ls.stdout.contains(&format!("{}", data.len())),
        "{}",
        ls.stdout
    );

    let fsck = c.quern(&["fsck", "/"]);
    ok(&fsck);
    assert!(
        fsck.stdout.lines().last().unwrap().starts_with("HEALTHY"),
        "{}",
        fsck.stdout
    );

    let stat: serde_json::Value =
        serde_json::from_str(&c.quern(&["stat", "--json", "/ds/raw/data.bin"]).stdout).unwrap();
    assert_eq!(stat["size"], data.len());
    assert_eq!(stat["chunks"], 4);
    let loc: serde_json::Value =
        serde_json::from_str(&c.quern(&["locate", "--json", "/ds/raw/data.bin"]).stdout).unwrap();
    assert_eq!(loc["chunks"].as_array().unwrap().len(), 4);
    assert_eq!(loc["chunks"][0]["replicas"].as_array().unwrap().len(), 3);
    let report: serde_json::Value =
        serde_json::from_str(&c.quern(&["report", "--json"]).stdout).unwrap();
    assert_eq!(report["datanodes"].as_array().unwrap().len(), 3);
    let fsck_json: serde_json::Value =
        serde_json::from_str(&c.quern(&["fsck", "--json"]).stdout).unwrap();
    assert_eq!(fsck_json["health"], "Healthy");
    let ls_json: serde_json::Value =
        serde_json::from_str(&c.quern(&["ls", "--json", "/ds/raw"]).stdout).unwrap();
    assert_eq!(ls_json[0]["path"], "/ds/raw/data.bin");
    let du = c.quern(&["du", "/ds"]);
    ok(&du);
    assert!(
        du.stdout.contains(&format!("{} bytes", data.len())),
        "{}",
        du.stdout
    );

    // stdin and stdout through `-`.
    let mut put = c
        .command(&["put", "-", "/ds/piped", "--replication", "2"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    put.stdin
        .take()
        .unwrap()
        .write_all(b"through a pipe")
        .unwrap();
    assert!(put.wait().unwrap().success());
    let out = c.command(&["get", "/ds/piped", "-"]).output().unwrap();
    assert_eq!(out.stdout, b"through a pipe");

    ok(&c.quern(&["mv", "/ds/piped", "/ds/raw"]));
    ok(&c.quern(&["setrep", "1", "/ds/raw/piped"]));
    ok(&c.quern(&["rm", "-r", "/ds"]));
    assert_eq!(c.quern(&["ls", "/"]).stdout, "");

    let status: serde_json::Value = serde_json::from_str(
        &c.command(&[
            "cluster",
            "status",
            "--json",
            "--dir",
            c.dir.path().to_str().unwrap(),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap(),
    )
    .unwrap();
    assert_eq!(status["processes"].as_array().unwrap().len(), 4);
    let pids: Vec<i32> = (0..3)
        .map(|i| c.pid("datanode", i))
        .chain([c.pid("namenode", 0)])
        .collect();
    ok(&c.down());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}/cmdline")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .contains(") Z"),
            "process {pid} still running after cluster down"
        );
    }
}

#[test]
fn a_namenode_restarted_without_a_holder_stays_in_safe_mode_until_told_to_leave() {
    let c = BinCluster::up(2, &[]);
    let local = tempfile::tempdir().unwrap();
    let data = random_bytes(4 * 65536, 31);
    let src = write_local(local.path(), "f", &data);
    ok(&c.quern(&[
        "put",
        &src,
        "/f",
        "--chunk-size",
        "64K",
        "--replication",
        "1",
    ]));
    // Datanode 0 comes back without its chunks: they have no holder left.
    c.sigkill("namenode", 0);
    c.sigkill("datanode", 0);
    let lost = chunk_files_in(&c.datanode_dir(0));
    assert!(!lost.is_empty(), "datanode 0 held none of /f's chunks");
    for f in &lost {
        std::fs::remove_file(f).unwrap();
        std::fs::remove_file(f.with_extension("meta")).unwrap();
    }
    // No timer ends safe mode: `up` gives up waiting and says what to do.
    let r = c.restart_with(&["--wait", "4s"]);
    assert_ne!(r.status, 0, "{}", r.stdout);
    assert!(
        r.stderr.contains("safe mode") && r.stderr.contains("quern safemode leave"),
        "{}",
        r.stderr
    );
    let r = c.quern(&["safemode"]);
    ok(&r);
    assert!(r.stdout.contains("safe mode is ON"), "{}", r.stdout);
    let mkdir = c.quern(&["mkdir", "/d"]);
    assert_ne!(mkdir.status, 0);
    assert!(mkdir.stderr.contains("safe mode"), "{}", mkdir.stderr);
    // Reads of what is there still work.
    ok(&c.quern(&["ls", "/"]));
    let r = c.quern(&["safemode", "leave"]);
    ok(&r);
    assert!(r.stdout.contains("safe mode is OFF"), "{}", r.stdout);
    let r = c.quern(&["fsck", "/"]);
    assert_eq!(r.status, 1, "{}", r.stdout);
    assert!(r.stdout.contains("MISSING"), "{}", r.stdout);
    ok(&c.quern(&["mkdir", "/d"]));
    ok(&c.quern(&["safemode", "wait"]));
}

#[test]
fn namenode_sigkill_and_restart_keeps_every_file() {
    let c = BinCluster::up(3, &["--safemode-wait", "20s"]);
    let local = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (i, len) in [0usize, 1, 200_000].into_iter().enumerate() {
        let data = random_bytes(len, 20 + i as u64);
        let src = write_local(local.path(), &format!("f{i}"), &data);
        ok(&c.quern(&["put", &src, &format!("/f{i}"), "--chunk-size", "64K"]));
        files.push(data);
    }
    ok(&c.quern(&["mkdir", "/emptydir"]));
    c.sigkill("namenode", 0);
    let r = c.quern(&["ls", "/"]);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("namenode"), "{}", r.stderr);
    ok(&c.restart());
    for (i, data) in files.iter().enumerate() {
        let out = c.command(&["cat", &format!("/f{i}")]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(&out.stdout, data, "/f{i}");
    }
    assert!(c.quern(&["ls", "/"]).stdout.contains("/emptydir"));
    ok(&c.quern(&["fsck"]));
}

#[test]
fn a_sigkilled_datanode_does_not_lose_reads() {
    let c = BinCluster::up(3, &[]);
    let local = tempfile::tempdir().unwrap();
    let data = random_bytes(300_000, 30);
    let src = write_local(local.path(), "d", &data);
    ok(&c.quern(&[
        "put",
        &src,
        "/d",
        "--chunk-size",
        "64K",
        "--replication",
        "3",
    ]));
    c.sigkill("datanode", 0);
    let out = c.command(&["cat", "/d"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, data);
}

#[test]
fn a_flipped_byte_on_disk_is_read_around_and_fsck_says_corrupt() {
    let c = BinCluster::up(3, &["--replication-interval", "1h"]);
    let local = tempfile::tempdir().unwrap();
    let data = random_bytes(50_000, 40);
    let src = write_local(local.path(), "c", &data);
    ok(&c.quern(&["put", &src, "/c"]));
    let (first_addr, _, file) = first_replica_file(&c, "/c");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[777] ^= 1;
    std::fs::write(&file, bytes).unwrap();

    let out = c.command(&["cat", "/c"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, data);
    let fsck = c.quern(&["fsck", "/"]);
    assert_eq!(fsck.status, 1, "{}", fsck.stdout);
    assert!(
        fsck.stdout.lines().last().unwrap().starts_with("CORRUPT"),
        "{}",
        fsck.stdout
    );
    assert!(
        fsck.stdout.contains(&format!("({first_addr}) is CORRUPT")),
        "{}",
        fsck.stdout
    );
}

#[test]
fn a_client_killed_mid_put_leaves_no_file_and_its_chunks_are_reclaimed() {
    let c = BinCluster::up(2, &["--lease-timeout", "2s"]);
    let mut put = c
        .command(&[
            "put",
            "-",
            "/partial",
            "--chunk-size",
            "64K",
            "--replication",
            "2",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = put.stdin.take().unwrap();
    stdin.write_all(&random_bytes(5 * 65536, 50)).unwrap();
    stdin.flush().unwrap();
    wait(
        Duration::from_secs(20),
        "chunks of the unfinished put",
        || chunk_files(&c, 2) >= 4,
    );
    // SAFETY: signal to a child this test started.
    unsafe { libc::kill(put.id() as i32, libc::SIGKILL) };
    let _ = put.wait();
    drop(stdin);
    let st = c.quern(&["stat", "/partial"]);
    assert_eq!(st.status, 1);
    assert!(
        st.stderr.contains("/partial: no such file or directory"),
        "{}",
        st.stderr
    );
    assert_eq!(c.quern(&["ls", "/"]).stdout, "");
    wait(
        Duration::from_secs(30),
        "orphan chunks to be reclaimed",
        || chunk_files(&c, 2) == 0,
    );
}

#[test]
fn bad_input_gets_one_clear_line_and_changes_nothing() {
    let c = BinCluster::up(1, &[]);
    let local = tempfile::tempdir().unwrap();
    let src = write_local(local.path(), "x", b"x");
    ok(&c.quern(&["mkdir", "/d"]));
    ok(&c.quern(&["put", &src, "/d/x", "--replication", "1"]));
    let existing = local.path().join("exists");
    std::fs::write(&existing, b"keep me").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "get".into(),
                "/nope".into(),
                local.path().join("n").display().to_string(),
            ],
            "/nope: no such file or directory",
        ),
        (vec!["cat".into(), "/d".into()], "/d: is a directory"),
        (
            vec!["ls".into(), "/nope".into()],
            "/nope: no such file or directory",
        ),
        (
            vec!["mkdir".into(), "d".into()],
            "invalid path \"d\": remote paths must be absolute",
        ),
        (
            vec!["mkdir".into(), "/d/../e".into()],
            "`.` and `..` components are not allowed",
        ),
        (vec!["mkdir".into(), "/a//b".into()], "empty name"),
        (vec!["mkdir".into(), "/d".into()], "/d: already exists"),
        (vec!["rm".into(), "/d".into()], "/d: directory not empty"),
        (
            vec!["put".into(), src.clone(), "/d/x".into()],
            "/d/x: already exists (use --force to overwrite)",
        ),
        (
            vec![
                "put".into(),
                local.path().join("missing").display().to_string(),
                "/m".into(),
            ],
            "missing: No such file or directory",
        ),
        (
            vec![
                "put".into(),
                local.path().display().to_string(),
                "/m".into(),
            ],
            "is a directory; put stores files",
        ),
        (
            vec!["put".into(), src.clone(), "/nodir/x".into()],
            "parent directory /nodir does not exist",
        ),
        (
            vec!["put".into(), src.clone(), "/d/x/y".into()],
            "/d/x is a file, not a directory",
        ),
        (
            vec![
                "put".into(),
                src.clone(),
                "/big".into(),
                "--chunk-size".into(),
                "2G".into(),
            ],
            "chunk size 2147483648 is out of range",
        ),
        (
            vec![
                "put".into(),
                src.clone(),
                "/big".into(),
                "--chunk-size".into(),
                "12Q".into(),
            ],
            "unknown unit",
        ),
        (
            vec!["get".into(), "/d/x".into(), existing.display().to_string()],
            "already exists (use --force to replace it)",
        ),
        (
            vec!["mv".into(), "/nope".into(), "/d2".into()],
            "/nope: no such file or directory",
        ),
        (vec!["locate".into(), "/d".into()], "/d: is a directory"),
        (
            vec!["setrep".into(), "0".into(), "/d/x".into()],
            "replication 0 is out of range",
        ),
    ];
    for (args, text) in cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = c.quern(&argv);
        assert_ne!(r.status, 0, "{argv:?} should fail");
        assert!(
            r.stderr.contains(text),
            "{argv:?}: stderr {:?} should contain {text:?}",
            r.stderr
        );
        let lines: Vec<&str> = r
            .stderr
            .lines()
            .filter(|l| l.starts_with("quern:") || l.starts_with("error:"))
            .collect();
        assert_eq!(lines.len(), 1, "{argv:?}: {}", r.stderr);
    }
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
    let out = c.command(&["cat", "/d/x"]).output().unwrap();
    assert_eq!(out.stdout, b"x");
    let ls = c.quern(&["ls", "-R", "/"]);
    assert_eq!(ls.stdout, "/d\n/d/x\n");

    // No configuration, and a configuration naming a dead namenode.
    let r: Run = std::process::Command::new(quern_bin())
        .args(["ls", "/"])
        .env_remove("QUERN_CONFIG")
        .env("HOME", local.path())
        .output()
        .unwrap()
        .into();
    assert_eq!(r.status, 1);
    assert!(r.stderr.contains("no client configuration"), "{}", r.stderr);
    let cfg = std::fs::read_to_string(&c.config).unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dead_cfg = c.dir.path().join("dead.toml");
    let mut lines: Vec<String> = cfg
        .lines()
        .map(|l| {
            if l.starts_with("namenode") {
                format!("namenode = \"{port}\"")
            } else {
                l.to_string()
            }
        })
        .collect();
    lines.push("rpc_timeout_secs = 3".into());
    std::fs::write(&dead_cfg, lines.join("\n")).unwrap();
    let r: Run = std::process::Command::new(quern_bin())
        .args(["--config", dead_cfg.to_str().unwrap(), "ls", "/"])
        .output()
        .unwrap()
        .into();
    assert_eq!(r.status, 1);
    assert!(
        r.stderr.contains(&format!("cannot reach namenode {port}")),
        "{}",
        r.stderr
    );
}

#[test]
fn the_scrubber_finds_a_flipped_byte_and_the_replica_is_healed_without_a_read() {
    let c = BinCluster::up(
        3,
        &[
            "--scrub-interval",
            "1s",
            "--scrub-rate",
            "1GiB",
            "--replication-interval",
            "1s",
        ],
    );
    let local = tempfile::tempdir().unwrap();
    let data = random_bytes(300_000, 41);
    let src = write_local(local.path(), "s", &data);
    ok(&c.quern(&["put", &src, "/s", "-r", "2"]));
    let (bad_addr, idx, file) = first_replica_file(&c, "/s");
    let name = file.file_name().unwrap().to_owned();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[4321] ^= 0x10;
    std::fs::write(&file, bytes).unwrap();

    // No client reads the file: only the scrubber can notice.
    let report = || -> serde_json::Value {
        serde_json::from_str(&c.quern(&["report", "--json"]).stdout).unwrap()
    };
    wait(
        Duration::from_secs(20),
        "the scrubber to report the replica",
        || {
            report()["datanodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["node"]["addr"] == bad_addr.as_str() && d["scrub"]["errors"] == 1)
        },
    );
    let log = std::fs::read_to_string(c.dir.path().join(format!("logs/datanode-{}.log", idx + 1)))
        .unwrap();
    assert!(log.contains("scrubber: local replica is bad"), "{log}");
    // Healed: a good copy made, the bad one replaced or dropped.
    wait(Duration::from_secs(30), "the replica to be healed", || {
        let good = (0..3)
            .filter(|&i| {
                std::fs::read(c.datanode_dir(i).join("chunks").join(&name)).is_ok_and(|b| b == data)
            })
            .count();
        let bad = (0..3)
            .filter(|&i| {
                std::fs::read(c.datanode_dir(i).join("chunks").join(&name)).is_ok_and(|b| b != data)
            })
            .count();
        good == 2 && bad == 0 && c.quern(&["fsck", "/"]).status == 0
    });
    let r = report();
    let passes = r["datanodes"][0]["scrub"]["passes"].as_u64().unwrap();
    assert!(passes >= 1, "{r}");
    let out = c.command(&["cat", "/s"]).output().unwrap();
    assert_eq!(out.stdout, data);
}

#[test]
fn a_datanode_sigstopped_mid_get_is_read_around_within_two_seconds() {
    use std::io::Read;
    let c = BinCluster::up(3, &[]);
    let local = tempfile::tempdir().unwrap();
    let data = random_bytes(64 << 20, 42);
    let src = write_local(local.path(), "big", &data);
    ok(&c.quern(&["put", &src, "/big", "-r", "2", "--chunk-size", "4MiB"]));
    let mut get = c
        .command(&["get", "/big", "-"])
        .env("RUST_LOG", "warn,quern_proto=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = get.stdout.take().unwrap();
    let mut got = vec![0u8; 8 << 20];
    out.read_exact(&mut got).unwrap();
    // Frozen, not dead: its connections stay up, its replicas answer nothing.
    let pid = c.pid("datanode", 0);
    // SAFETY: signals to a pid this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stopped = Instant::now();
    out.read_to_end(&mut got).unwrap();
    let took = stopped.elapsed();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let mut log = String::new();
    get.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    let status = get.wait().unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("hedging on another replica"), "{log}");
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes differ");
    assert!(
        took < Duration::from_secs(2),
        "the rest of the get took {took:?}"
    );
}

#[test]
fn a_directory_of_200000_entries_lists_through_the_cli() {
    const N: usize = 200_000;
    let c = BinCluster::up(1, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let made = Instant::now();
    rt.block_on(async {
        let cfg = quern_proto::config::ClientConfig::load(&c.config).unwrap();
        let client = quern_client::Client::from_config(&cfg).unwrap();
        client.mkdir("/big", false).await.unwrap();
        let mut set = tokio::task::JoinSet::new();
        for w in 0..64 {
            let client = client.clone();
            set.spawn(async move {
                let mut i = w;
                while i < N {
                    client.mkdir(&format!("/big/d{i:06}"), false).await.unwrap();
                    i += 64;
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    });
    eprintln!("{N} directories made in {:?}", made.elapsed());
    let listed = Instant::now();
    let out = c.command(&["ls", "/big"]).output().unwrap();
    eprintln!("listed in {:?}", listed.elapsed());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), N);
    assert_eq!(lines[0], "/big/d000000");
    assert_eq!(lines[N - 1], format!("/big/d{:06}", N - 1));
    assert!(lines.windows(2).all(|w| w[0] < w[1]), "in name order");
}
